#!/bin/bash
# Submit a corpus build as a SLURM array of K tasks plus a merge job that runs when all K succeed.
#
#   launch/submit_prep.sh K input=<files or globs> tokenizer=<dir> output_dir=<dir> [build_corpus overrides]
#
# Prints the two job ids ("array <id>", "merge <id>"). Extra sbatch options: SBATCH_ARGS="--partition=cpu".
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 K input=... tokenizer=... output_dir=... [overrides]" >&2; exit 2
fi
K=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs
out=""
for a in "$@"; do case "$a" in output_dir=*) out=${a#output_dir=} ;; esac; done
[ -n "$out" ] || { echo "$0: output_dir=... is required" >&2; exit 2; }
# shellcheck disable=SC2086
array=$(sbatch --parsable ${SBATCH_ARGS:-} --array=0-$((K - 1)) "$here/prep.sbatch" "$@")
# shellcheck disable=SC2086
merge=$(sbatch --parsable --job-name=prep-merge --ntasks=1 --output=logs/%x-%j.out ${SBATCH_ARGS:-} \
  --dependency=afterok:"$array" \
  --wrap ". '${VENV:-$PWD/.venv}/bin/activate' && cd '$PWD' && exec python -m data_prep.build_corpus merge=true output_dir='$out'")
echo "array $array"
echo "merge $merge"
