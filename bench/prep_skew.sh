#!/usr/bin/env bash
# Benchmark (not a test): a skewed corpus build as a SLURM array of 4 tasks, before and after the units
# of work. 8 input .txt files, one 20x the others (the Jargon File repeated), built by
# `launch/prep.sbatch`-style array tasks (one tokenizer thread each) with the code of this tree and,
# with BEFORE=<git rev>, with the code of that revision too (a git worktree, the same venv).
#
#   bash bench/prep_skew.sh [SMALL_KB=2000] [BEFORE=<rev>] [UNIT_BYTES=4194304] [RUNNER=slurm|local]
#
# RUNNER=slurm (the default) needs a running SLURM (launch/ci_slurm.sh start), which runs as many tasks
# at once as it has CPUs (2 on the development machine: tasks 2 and 3 then start when 0 and 1 end);
# RUNNER=local starts the 4 tasks at once as plain processes. Prints, for each code: the array's wall time, each
# task's busy seconds, and max / mean of them (1.0: perfectly balanced; the array's wall time is set by
# the busiest task). Files go to a temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do export "$a"; done
SMALL_KB=${SMALL_KB:-2000}; RUNNER=${RUNNER:-slurm}; UNIT_BYTES=${UNIT_BYTES:-4194304}; BEFORE=${BEFORE:-}
PY=${VENV:-$PWD/.venv}/bin/python
tmp=$(mktemp -d); trap '[ -n "${KEEP:-}" ] || rm -rf "$tmp"; [ -n "$BEFORE" ] && git worktree remove --force "$tmp/before-tree" 2>/dev/null || true' EXIT
"$PY" - "$tmp" "$SMALL_KB" <<'EOF'
import gzip, sys
from pathlib import Path
out, small_kb = Path(sys.argv[1]) / "input", int(sys.argv[2])
out.mkdir()
text = gzip.open("data/jargon.txt.gz", "rt", encoding="utf-8").read()
for i in range(8):
    want = small_kb * 1024 * (20 if i == 3 else 1)
    body = (text * (want // len(text.encode()) + 1)).encode()[:want]
    cut = body.rfind(b"\n\n")  # end on a document boundary
    (out / f"part-{i}.txt").write_bytes(body[:cut] + b"\n")
EOF
"$PY" -m data_prep.build_tokenizer "input=$tmp/input/part-0.txt" "output_dir=$tmp/tok" vocab_size=8192 \
  progress=false >/dev/null

run_array() {  # NAME TREE [extra overrides]: a 4-task array with TREE's code, waits, prints the figures
  local name=$1 tree=$2; shift 2
  mkdir -p "$tmp/$name"
  local t0; t0=$(date +%s.%N)
  local task="cd '$tree'; export PYTHONPATH='$tree' RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false; \
     s=\$(date +%s.%N); \
     '$PY' -m data_prep.build_corpus input='$tmp/input/*.txt' tokenizer='$tmp/tok' output_dir='$tmp/$name/corpus' \
       num_tasks=4 task_index=\$TASK workers=1 progress=false $* >/dev/null || exit; \
     echo \"busy \$(echo \"\$(date +%s.%N) - \$s\" | bc)\""
  if [ "$RUNNER" = slurm ]; then
    local id
    id=$(sbatch --parsable --array=0-3 --ntasks=1 --cpus-per-task=1 --output="$tmp/$name/%a.out" \
      --wrap "TASK=\$SLURM_ARRAY_TASK_ID; $task")
    while [ -n "$(squeue -h -j "$id" 2>/dev/null)" ]; do sleep 0.5; done
  else  # four processes at once, whatever the core count
    for i in 0 1 2 3; do TASK=$i bash -c "$task" >"$tmp/$name/$i.out" 2>&1 & done
    wait
  fi
  local wall; wall=$(echo "$(date +%s.%N) - $t0" | bc)
  "$PY" - "$name" "$wall" "$tmp/$name" <<'EOF'
import statistics, sys
from pathlib import Path
name, wall, d = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
busy = []
for i in range(4):
    lines = [l for l in (d / f"{i}.out").read_text().splitlines() if l.startswith("busy ")]
    if not lines:
        sys.exit(f"{name}: task {i} failed:\n" + (d / f"{i}.out").read_text())
    busy.append(float(lines[-1].split()[1]))
print(f"{name}: wall {wall:.1f} s; task busy s {', '.join(f'{b:.1f}' for b in busy)}; "
      f"max/mean {max(busy) / statistics.mean(busy):.2f}")
EOF
}

du -sh "$tmp/input" | sed 's/^/input: /'
if [ -n "$BEFORE" ]; then
  git worktree add -q --detach "$tmp/before-tree" "$BEFORE"
  run_array before "$tmp/before-tree"
fi
run_array after "$PWD" "unit_bytes=$UNIT_BYTES"
