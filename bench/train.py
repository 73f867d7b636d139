"""Benchmark of the full training step against the bare model step (a benchmark, not a test).

    python -m bench.train [steps=20] [warmup=5] [key=value Hydra overrides of pretrain.train ...]
    python -m bench.train system=gpu trainer.backend=deepspeed deepspeed=zero2      # on a GPU

In one process, with the same model config, batch and precision:
  full  the trainer's step as `python -m pretrain.train` runs it: the data loader (packing, masking),
        the masked-token all-reduce, forward/backward of every micro-batch through the engine
        (DeepSpeed by default), the non-finite check and the optimizer step;
  bare  forward / backward / AdamW on one fixed batch already on the device: plain PyTorch, nothing
        else, with the full step's precision (bf16 by autocast when the run is bf16), compile setting,
        activation checkpointing, optimizer kind and static prediction bound, so the overhead compares
        like with like.
The two are timed in turn, step by step (so that a busy machine slows both alike). Reports the median
step time of each, tokens/s, MFU (where the device's peak is known) and the
overhead of full over bare (goal: at most 3%). Without `data.corpus`, the bundled corpus is built
into a temporary directory first (tokenizer vocab 8192).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
JARGON = REPO / "data" / "jargon.txt.gz"
DEFAULTS = ["experiment=debug", "trainer.resume=none", "trainer.progress_bar=false", "wandb.enabled=false",
            "trainer.save_every=0", "trainer.eval_every=0"]


def build_jargon(root: Path) -> tuple[str, str]:
    """The bundled corpus (tokenizer vocab 8192) under `root`: (corpus dir, tokenizer dir)."""
    from data_prep.build_corpus import BuildCorpusArgs, build_corpus
    from data_prep.build_tokenizer import BuildTokenizerArgs, build_tokenizer

    tok, corpus = root / "tokenizer", root / "corpus"
    build_tokenizer(BuildTokenizerArgs(output_dir=str(tok), input=str(JARGON), vocab_size=8192, progress=False))
    build_corpus(BuildCorpusArgs(output_dir=str(corpus), input=str(JARGON), tokenizer=str(tok),
                                 valid_fraction=0.02, progress=False))
    return str(corpus), str(tok)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_step(trainer) -> Callable[[], None]:
    """The trainer's own step, loader included, loading the next step on a thread as its loop does
    (the trainer's `StepAhead`: here the load also overlaps the bare step timed in between)."""
    trainer._it = iter(trainer.loader)  # what the trainer's `_loop` sets up before its steps
    trainer.engine.train(True)
    return lambda: trainer.train_step(trainer.ahead.take(load_next=True))


def bare_step(trainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward/backward (x grad_accum) + AdamW on one fixed host batch already copied to the device, plain
    PyTorch, a model of its own, with the full step's settings: precision (bf16 by autocast), float8
    layers, compile (each layer, as the trainer does), activation checkpointing, the optimizer `build_optimizer` makes
    (fused on CUDA), the static bound of predictions and no attention mask when there is no padding."""
    from core.model import RobertaForMaskedLM
    from pretrain import speed
    from pretrain.optim import build_optimizer

    run, device = trainer.run, trainer.device
    torch.manual_seed(0)
    s = run.system
    model = speed.apply(RobertaForMaskedLM(run.model), s.fp8, s.activation_checkpointing, s.compile,
                        s.compile_backend).to(device)
    opt = build_optimizer(model, run.optim)
    bound = trainer.max_predictions([batch])
    on_device = trainer._to_device(batch)
    bf16 = run.system.precision == "bf16"

    def step() -> None:
        for _ in range(trainer.grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                out = model(on_device["input_ids"], on_device.get("attention_mask"), on_device["labels"],
                            reduction="sum", max_predictions=bound)
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], n: int, warmup: int, device: torch.device
                     ) -> dict[str, list[float]]:
    """Seconds per call of each step function, called in turn (order alternating), so that a busy
    machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(warmup + n):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str]) -> None:
    from pretrain import speed
    from pretrain.flops import device_peak_flops, flops_per_token, mfu
    from pretrain.train import build_trainer

    opts = {"steps": 20, "warmup": 5}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in opts:
            opts[key] = int(value)
        else:
            overrides.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        if not any(o.startswith("data.corpus=") for o in overrides):
            corpus, tok = build_jargon(Path(tmp))
            overrides += [f"data.corpus={corpus}", f"data.tokenizer={tok}"]
        overrides += [f"trainer.output_dir={tmp}/run"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("pretrain", overrides=DEFAULTS + overrides)
        trainer = build_trainer(cfg)
        run, env, device = trainer.run, trainer.env, trainer.device
        batch = trainer._next_batches(iter(trainer.loader))[0]  # a host batch, prepared as the full step's
        with speed.attention_backends(run.system.sdpa_backends):
            timed = time_interleaved({"full": full_step(trainer), "bare": bare_step(trainer, batch)},
                                     opts["steps"], opts["warmup"], device)
        trainer.ahead.close()

    tokens = run.schedule.global_batch_size * run.data.seq_len / env.world_size
    dtype = torch.bfloat16 if run.system.precision == "bf16" else torch.float32
    peak = device_peak_flops(device, dtype)
    fpt = flops_per_token(run.model, run.data.seq_len)
    result = {"device": str(device), "backend": run.trainer.backend, "zero_stage": run.deepspeed.zero_stage,
              "precision": run.system.precision, "seq_len": run.data.seq_len,
              "micro_batch": run.system.micro_batch_size, "grad_accum": trainer.grad_accum,
              "threads": torch.get_num_threads(), "steps": opts["steps"]}
    # MFU over the real (non-padding) tokens: the full step's last step, the bare step's fixed batch.
    real_bare = (int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
    real = {"full": trainer.step_real_tokens / env.world_size, "bare": real_bare * trainer.grad_accum}
    for name, times in timed.items():
        median = statistics.median(times)
        result[f"{name}_step_s"] = median
        result[f"{name}_tokens_per_s"] = tokens / median
        if peak:
            result[f"{name}_mfu"] = mfu(real[name] / median, fpt, peak)
    result["overhead"] = result["full_step_s"] / result["bare_step_s"] - 1
    if env.rank == 0:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
