#!/usr/bin/env bash
# The demo (`make demo`), on CPU in a few minutes: the bundled Jargon File -> byte-level BPE tokenizer
# (vocab 8192) -> token corpus -> `experiment=debug` pretraining (DeepSpeed, one process) -> validation
# -> evaluation -> export to Hugging Face format -> fill-mask on the model card's sample request ->
# fine-tuning on the bundled movie-review sentences (pretrained vs the same model from random weights).
# Prints the final validation loss next to the unigram entropy of the corpus's tokens (nats, the same
# base as the loss) and fails unless the model ends clearly below it (it has learned from context).
# Outputs: demo_out/{tokenizer,corpus,run,hf,finetune}. Extra arguments go to pretrain.train as Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}
PY=${PYTHON:-python}
OUT=demo_out
MARGIN=0.25  # nats the validation loss must end below the unigram entropy

echo "== 1/8 tokenizer (vocab 8192) -> $OUT/tokenizer"
$PY -m data_prep.build_tokenizer input=data/jargon.txt.gz output_dir=$OUT/tokenizer vocab_size=8192 progress=false \
    join_lines=true
echo "== 2/8 corpus -> $OUT/corpus"
$PY -m data_prep.build_corpus input=data/jargon.txt.gz tokenizer=$OUT/tokenizer output_dir=$OUT/corpus \
    valid_fraction=0.02 progress=false join_lines=true overwrite=true
echo "== 3/8 pretraining: experiment=debug -> $OUT/run"
rm -rf "$OUT/run"
$PY -m pretrain.train experiment=debug data.corpus=$OUT/corpus data.tokenizer=$OUT/tokenizer \
    trainer.output_dir=$OUT/run trainer.resume=none "$@"
echo "== 4/8 validation loss vs unigram entropy"
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
echo "== 5/8 evaluation of the last checkpoint (also in its eval.json)"
$PY -m pretrain.evaluate checkpoint=$OUT/run
echo "== 6/8 export to Hugging Face format -> $OUT/hf"
$PY -m serving.export checkpoint=$OUT/run output_dir=$OUT/hf overwrite=true
echo "== 7/8 fill-mask: the model card's sample request (tests/assets/fill_mask_request.json)"
$PY -m serving.fill_mask model=$OUT/hf request=tests/assets/fill_mask_request.json
echo "== 8/8 fine-tuning: movie-review sentiment (data/downstream), pretrained vs from scratch -> $OUT/finetune"
FT="task=movie_sentiment task.max_length=64 train.epochs=2 optim.lr=3e-4 seeds=[1] train.progress_bar=false"
FT="$FT train.log_every=1000 train.eval_batch_size=128"
$PY -m finetune $FT model=$OUT/run output_dir=$OUT/finetune/pretrained
$PY -m finetune $FT model=$OUT/run from_scratch=true save_best=false output_dir=$OUT/finetune/scratch
$PY - "$OUT" <<'EOF'
import json, sys
import transformers

out = sys.argv[1]
pre, scratch = (json.load(open(f"{out}/finetune/{name}/results.json")) for name in ("pretrained", "scratch"))
acc = lambda r: r["summary"]["validation"]["accuracy"]["median"]
majority = pre["baselines"]["majority_accuracy"]
print(f"fine-tuning (movie_sentiment, validation accuracy): pretrained {acc(pre):.4f} | "
      f"same model from random weights {acc(scratch):.4f} | majority class {majority:.4f}")
pipe = transformers.pipeline("text-classification", model=f"{out}/finetune/pretrained/best", device="cpu")
for text in ["A gorgeous, witty, seductive movie.", "The plot is dull and the acting is even worse."]:
    print(f"  {text!r} -> {pipe(text)[0]}")
if not acc(pre) > majority:
    sys.exit("FAIL: the fine-tuned pretrained model does not beat the majority class")
print(f"OK: {acc(pre) - majority:+.3f} over the majority class, {acc(pre) - acc(scratch):+.3f} over random weights")
EOF
