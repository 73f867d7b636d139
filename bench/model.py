"""Benchmark: training steps of our RoBERTa against HF `RobertaForMaskedLM` (SDPA attention).

    python -m bench.model                                   # CPU, tiny preset, seq 128, fp32
    python -m bench.model --device cuda --config large --seq 512 --batch 16 --dtype bf16

Both models get the same weights (ours exported through `core.hf.state_dict_to_hf`), the same batch
(no padding, 15% of positions labelled), the same dtype (bf16 = autocast over fp32 weights) and AdamW.
A step is forward, backward, optimizer step. The models alternate (ours, HF, ours, HF, ...) for
`--rounds` rounds of `--steps` timed steps after warm-up; the table gives medians over rounds, eager and
with `torch.compile` (whole model, default mode). Columns:

- tokens/s: input tokens per second (batch x seq / step time);
- MFU: model FLOPs utilisation, our definition (`pretrain.flops`, head on the labelled fraction; the
  same FLOPs are credited to HF, whose head runs on every position), '-' where the peak is unknown (CPU);
- step MiB (CUDA): peak memory a step allocates on top of the resident weights and optimizer state;
- act MiB (eager): tensors saved for backward by one forward (activation memory), any device.

Not a test: it asserts only that both models compute the same loss before timing.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from core.hf import config_to_hf, state_dict_to_hf
from core.model import IGNORE_INDEX, RobertaConfig, RobertaForMaskedLM
from pretrain.flops import device_peak_flops, flops_per_token, mfu
from pretrain.speed import SDPA_BACKENDS, attention_backends, to_float8

MASK_FRACTION = 0.15


@dataclass
class Result:
    """Median measurements of one model in one mode."""

    tokens_per_s: float
    step_mib: float | None
    act_mib: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny",
                   help="model preset: conf/model/<name>.yaml (tiny, base, large)")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast over fp32 weights")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over these)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per model first (compile happens here)")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both",
                   help="eager, compiled, or both")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--sdpa", default="",
                   help="attention kernels to try in order, for both models (system.sdpa_backends), e.g. "
                        "cudnn,flash,efficient,math; empty: PyTorch's order")
    p.add_argument("--fp8", action="store_true",
                   help="ours with float8 Linear layers (system.fp8, torchao); HF stays in --dtype")
    return p.parse_args(argv)


def make_models(cfg: RobertaConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with RoBERTa's init and HF's with the same weights, both in train mode on `device`."""
    import transformers  # a dev dependency: the benchmark compares against it

    torch.manual_seed(0)
    ours = RobertaForMaskedLM(cfg)
    hf_config = transformers.RobertaConfig(**config_to_hf(cfg))
    hf = transformers.AutoModelForMaskedLM.from_config(hf_config, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    tied = {"lm_head.decoder.weight", "lm_head.decoder.bias"}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"HF model did not take our weights: missing {missing}, unexpected {unexpected}")
    return ours.to(device).train(), hf.to(device).train()


def make_batch(cfg: RobertaConfig, batch: int, seq: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (no padding) and labels on ~15% of the positions (-100 elsewhere)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < MASK_FRACTION, ids, IGNORE_INDEX)
    return ids.to(device), labels.to(device)


def loss_of(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, hf: bool,
            bound: int | None = None) -> torch.Tensor:
    """HF's head runs on every position; ours as the trainer runs it, on `bound` positions per sample
    (a static bound: no data-dependent shape, so it compiles as one graph)."""
    if hf:
        return model(input_ids=ids, labels=labels).loss
    return model(ids, labels=labels, max_predictions=bound).loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_mib(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, hf: bool,
                         autocast, bound: int) -> float:
    """MiB of distinct storages saved for backward by one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = loss_of(model, ids, labels, hf, bound)
    del loss
    return sum(storages.values()) / 2**20


def measure(models: dict[str, tuple[torch.nn.Module, bool]], ids: torch.Tensor, labels: torch.Tensor,
            args: argparse.Namespace, device: torch.device, autocast, bound: int) -> dict[str, Result]:
    """Warm up each model, then alternate timed blocks of `args.steps` steps for `args.rounds` rounds."""
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}

    def step(name: str) -> None:
        model, hf = models[name]
        with autocast():
            loss = loss_of(model, ids, labels, hf, bound)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in models:
        for _ in range(args.warmup):
            step(name)
    sync(device)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync(device)
            seconds = time.perf_counter() - start
            speeds[name].append(args.steps * ids.numel() / seconds)
            if device.type == "cuda":
                peaks[name].append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {name: Result(tokens_per_s=statistics.median(speeds[name]),
                         step_mib=statistics.median(peaks[name]) if peaks[name] else None, act_mib=None)
            for name in models}


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """`value` formatted with `spec` and `suffix`, or '-' when it was not measured."""
    return "-" if value is None else format(value, spec) + suffix


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    cfg = RobertaConfig.from_preset(args.config)
    ids, labels = make_batch(cfg, args.batch, args.seq, device)
    bound = int((labels != IGNORE_INDEX).sum(1).max())  # the batch's largest count per sample, read once
    ours, hf = make_models(cfg, device)
    with torch.no_grad():
        ours.eval(), hf.eval()
        diff = abs(loss_of(ours, ids, labels, False, bound).item() - loss_of(hf, ids, labels, True).item())
        ours.train(), hf.train()
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    print(f"config={args.config} {params:.1f}M params, batch {args.batch} "
          f"x seq {args.seq}, {args.dtype}{', ours fp8' if args.fp8 else ''}, sdpa {args.sdpa or 'default'}, "
          f"device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; |loss ours - HF| = {diff:.2e}")
    if diff > 1e-4:
        raise RuntimeError(f"ours and HF disagree on the loss by {diff}: the comparison would be meaningless")
    if device.type == "cuda":  # after the fp32 parity check: fp32 matmuls on tensor cores, as in training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.fp8:  # after the parity check, which float8 would fail by design
        to_float8(ours)
    sdpa = [n for n in args.sdpa.split(",") if n]
    unknown = sorted(set(sdpa) - set(SDPA_BACKENDS))
    if unknown:
        raise SystemExit(f"--sdpa: unknown {unknown}; known: {sorted(SDPA_BACKENDS)}")
    with attention_backends(sdpa or None):
        measure_all(args, cfg, ours, hf, ids, labels, bound, device, dtype, autocast)


def measure_all(args, cfg, ours, hf, ids, labels, bound, device, dtype, autocast) -> None:
    """The timed part of `main`: activations, then each mode's alternating rounds, then the table."""
    act = {"ours": saved_activation_mib(ours, ids, labels, False, autocast, bound),
           "HF": saved_activation_mib(hf, ids, labels, True, autocast, bound)}
    fraction = (labels != IGNORE_INDEX).float().mean().item()
    model_flops = flops_per_token(cfg, args.seq, head_fraction=fraction)
    peak = device_peak_flops(device, dtype)

    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    rows = []
    for mode in modes:
        if mode == "compiled":
            models = {"ours": (torch.compile(ours), False), "HF": (torch.compile(hf), True)}
        else:
            models = {"ours": (ours, False), "HF": (hf, True)}
        started = time.perf_counter()
        results = measure(models, ids, labels, args, device, autocast, bound)
        print(f"{mode}: measured in {time.perf_counter() - started:.0f} s (warm-up and compile included)")
        for name, r in results.items():
            r.act_mib = act[name] if mode == "eager" else None
            rows.append((mode, name, r))
        ratio = results["ours"].tokens_per_s / results["HF"].tokens_per_s
        step_ratio = (results["ours"].step_mib / results["HF"].step_mib
                      if results["ours"].step_mib and results["HF"].step_mib else None)
        act_ratio = act["ours"] / act["HF"] if mode == "eager" else None
        rows.append((mode, "ours/HF", Result(ratio, step_ratio, act_ratio)))

    print(f"\nmodel FLOPs/token {model_flops / 1e9:.3f} G (head on {fraction:.1%}); peak "
          f"{fmt(peak and peak / 1e12, '.1f')} TFLOP/s\n")
    print("| mode | model | tokens/s | MFU | step MiB | act MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, name, r in rows:
        if name == "ours/HF":
            print(f"| {mode} | **ours/HF** | {r.tokens_per_s:.2f}x | | {fmt(r.step_mib, '.2f', 'x')} | "
                  f"{fmt(r.act_mib, '.2f', 'x')} |")
        else:
            util = mfu(r.tokens_per_s, model_flops, peak) if peak else None
            print(f"| {mode} | {name} | {r.tokens_per_s:,.0f} | {fmt(util and 100 * util, '.1f', '%')} | "
                  f"{fmt(r.step_mib, ',.0f')} | {fmt(r.act_mib, ',.0f')} |")


if __name__ == "__main__":
    main()
