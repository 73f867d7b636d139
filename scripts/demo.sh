#!/usr/bin/env bash
# The demo (`make demo`), on CPU in a few minutes: the bundled Jargon File -> byte-level BPE tokenizer
# (vocab 8192) -> token corpus -> `experiment=debug` pretraining (DeepSpeed, one process) -> validation
# -> evaluation -> export to Hugging Face format -> fill-mask on the model card's sample request.
# Prints the final validation loss next to the unigram entropy of the corpus's tokens (nats, the same
# base as the loss) and fails unless the model ends clearly below it (it has learned from context).
# Outputs: demo_out/{tokenizer,corpus,run,hf}. Extra arguments go to pretrain.train as Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}
PY=${PYTHON:-python}
OUT=demo_out
MARGIN=0.25  # nats the validation loss must end below the unigram entropy

echo "== 1/7 tokenizer (vocab 8192) -> $OUT/tokenizer"
$PY -m data_prep.build_tokenizer input=data/jargon.txt.gz output_dir=$OUT/tokenizer vocab_size=8192 progress=false \
    join_lines=true
echo "== 2/7 corpus -> $OUT/corpus"
$PY -m data_prep.build_corpus input=data/jargon.txt.gz tokenizer=$OUT/tokenizer output_dir=$OUT/corpus \
    valid_fraction=0.02 progress=false join_lines=true
echo "== 3/7 pretraining: experiment=debug -> $OUT/run"
rm -rf "$OUT/run"
$PY -m pretrain.train experiment=debug data.corpus=$OUT/corpus data.tokenizer=$OUT/tokenizer \
    trainer.output_dir=$OUT/run trainer.resume=none "$@"
echo "== 4/7 validation loss vs unigram entropy"
$PY - "$OUT" "$MARGIN" <<'EOF'
import json, sys
import numpy as np
from data_prep.corpus import Corpus

out, margin = sys.argv[1], float(sys.argv[2])
corpus = Corpus.open(f"{out}/corpus", "train")
counts = np.zeros(corpus.vocab_size, dtype=np.int64)
for tokens, _ in corpus.shard_arrays():
    counts += np.bincount(tokens, minlength=corpus.vocab_size)
p = counts[counts > 0] / counts.sum()
entropy = float(-(p * np.log(p)).sum())
records = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
final = [r for r in records if "valid/loss" in r][-1]
print(f"final validation loss (step {final['step']}): {final['valid/loss']:.4f} nats "
      f"(perplexity {final['valid/ppl']:.1f}, masked-token accuracy {final['valid/accuracy']:.3f})")
print(f"unigram entropy of the corpus tokens:      {entropy:.4f} nats")
if not final["valid/loss"] < entropy - margin:
    sys.exit(f"FAIL: the validation loss is not {margin} nats below the unigram entropy")
print(f"OK: {entropy - final['valid/loss']:.3f} nats below the unigram entropy")
EOF
echo "== 5/7 evaluation of the last checkpoint (also in its eval.json)"
$PY -m pretrain.evaluate checkpoint=$OUT/run
echo "== 6/7 export to Hugging Face format -> $OUT/hf"
$PY -m serving.export checkpoint=$OUT/run output_dir=$OUT/hf overwrite=true
echo "== 7/7 fill-mask: the model card's sample request (tests/assets/fill_mask_request.json)"
$PY -m serving.fill_mask model=$OUT/hf request=tests/assets/fill_mask_request.json
