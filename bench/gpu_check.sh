#!/usr/bin/env bash
# A first look at the project on an H100/H200 (about 8 minutes): a GEMM and SDPA-backend probe, the GPU
# tests (tests/test_gpu.py), bench.train with DeepSpeed ZeRO-1 (the paper's setting) and ZeRO-2 at
# accumulation 4, bench.model eager and compiled against HF. Prepare on a CPU machine first, from the
# project's root:  ../shared/tools/gpu-wheels.sh   (writes .whl/)
# then on the GPU machine, from a copy of the project's root that includes .whl/, with a time-out of
# ~540 s:   bash bench/gpu_check.sh
# Every stage has its own time box inside BUDGET seconds; logs land in $OUT/<stage>.log. The figures go
# into docs/PERFORMANCE.md with the device name this prints first.
# bench.train runs RoBERTa-large with the bundled corpus's tokenizer (vocabulary 8192, so the LM head is
# smaller than the paper's 50265): its step times are the large encoder's; bench.model uses vocab 50265.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"; T0=$SECONDS; BUDGET=${BUDGET:-480}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
stage() {  # NAME LIMIT_S TAIL CMD...: time-boxed within BUDGET, logged to $OUT/NAME.log
  local name=$1 limit=$2 tail=$3 left=$((BUDGET - SECONDS + T0)); shift 3
  [ "$left" -gt 45 ] || { echo "=== $name: skipped, budget spent"; return; }
  echo "=== $name (t=$((SECONDS - T0)) s)"; timeout -k 10 $((limit < left ? limit : left)) "$@" >"$OUT/$name.log" 2>&1
  echo "--- $name rc=$?"; tail -n "$tail" "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader; command -v cc || echo "no C compiler: compile stages fail"
stage probe 120 40 python3 - <<'EOF'
import contextlib, time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend as B
import deepspeed, hydra, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "ds", deepspeed.__version__, "hf", transformers.__version__, torch.cuda.get_device_name())
def timed(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for m, k, n in ((16384, 1024, 3072), (16384, 1024, 1024), (16384, 1024, 4096), (16384, 4096, 1024)):
    a, b = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) for r in (m, n))
    print(f"gemm M{m} K{k} N{n}: {2 * m * k * n / timed(lambda: a @ b.t()) / 1e12:4.0f} TFLOP/s")
qkv = torch.randn(32, 512, 3, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def attn(p, be):  # one layer, packed-QKV layout of model.py:189-190
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel([be]) if be is not None else contextlib.nullcontext():
        F.scaled_dot_product_attention(q, k, v, dropout_p=p).sum().backward()
for p in (0.1, 0.125, 0.0):
    for be in (None, B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
        try:
            print(f"attn p={p:<5} {str('default' if be is None else be):30} {24e3 * timed(lambda: attn(p, be)):6.1f} ms/micro-batch (24 layers)")
        except RuntimeError as e:
            print(f"attn p={p:<5} {str(be):30} unavailable: {str(e).splitlines()[0][:60]}")
EOF
stage pytest_gpu 180 8 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
BT="python3 -m bench.train system=gpu model=large model.vocab_size=8192 data.seq_len=512 model.hidden_dropout=0.1
    model.attention_dropout=0.1 system.micro_batch_size=32 trainer.backend=deepspeed schedule.global_batch_size=128"
stage train_zero1_ga4 200 25 $BT deepspeed=zero1 steps=6 warmup=2
BM="python3 -m bench.model --device cuda --config large --seq 512 --batch 16 --dtype bf16"
stage model_eager 200 12 $BM --compile off --rounds 5 --steps 5
stage model_compiled 330 12 $BM --compile on --rounds 3 --steps 5
stage train_zero2_ga4 150 25 $BT deepspeed=zero2 steps=5 warmup=2
echo "=== summary (t=$((SECONDS - T0)) s)"
grep -hE '^\| (eager|compiled)|"(full|bare)_(mfu|step_s)"|"overhead"|passed|failed|error' "$OUT"/*.log | head -40
