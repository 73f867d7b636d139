"""The typed schema of `conf/pretrain.yaml` and its start-up checks.

The dataclasses below are registered with Hydra's ConfigStore as `pretrain_schema`, the first entry of
the primary config's defaults list: every YAML file merged on top of it is checked against these types,
so an unknown key or a value of the wrong type fails while the config is composed, naming the key.
The values themselves live in the YAML files under `conf/` (one source per setting); the model and the
masking reuse `core.model.RobertaConfig` and `pretrain.masking.MaskingConfig` as their schema.

`to_run_config(cfg, world_size)` turns the composed DictConfig into these dataclasses and checks what
a type cannot: choices, the batch arithmetic (global = micro x accumulation x world size, the
accumulation derived when not given), seq_len against the model's positions, and the corpus manifest's
vocabulary against the model's. Each failure raises `ConfigError` naming the keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from core import checkpoint
from core.cli import unknown_keys
from core.model import RobertaConfig
from core.tokenizer import check_built_with
from pretrain.masking import MaskingConfig
from pretrain.speed import FP8_PACKAGE, SDPA_BACKENDS, fp8_available

BACKENDS = ("deepspeed", "torch")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PACKINGS = ("full_sentences", "doc_sentences")
COMPILE_BACKENDS = ("inductor", "aot_eager")


class ConfigError(ValueError):
    """A setting (or a combination of settings) that cannot run; the message names the keys."""


@dataclass
class DataConfig:
    """What the model reads (`conf/data/*.yaml`)."""

    corpus: str = MISSING
    """Corpus directory written by `data_prep.build_corpus` (holds manifest.json)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; when given, its hash must match the corpus manifest's."""
    seq_len: int = MISSING
    """Tokens per sample, `<s>` and `</s>` included (RoBERTa: 512)."""
    packing: str = MISSING
    """`full_sentences` (blocks cross documents, RoBERTa's choice) or `doc_sentences`."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Dynamic masking: 15% of tokens, 80/10/10."""
    valid_max_batches: int = 0
    """Validation batches per rank at each evaluation; 0 = the whole valid split."""


@dataclass
class OptimConfig:
    """AdamW (`conf/optim/*.yaml`); biases and LayerNorm weights get no weight decay."""

    lr: float = MISSING
    """Peak learning rate (reached at the end of warm-up)."""
    beta1: float = MISSING
    beta2: float = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    """Clip the global gradient norm to this value; 0 = no clipping (RoBERTa)."""


@dataclass
class ScheduleConfig:
    """How long and how big (`conf/schedule/*.yaml`): the learning-rate schedule and the batch."""

    max_steps: int = MISSING
    """Optimizer steps of the run; the learning rate reaches `final_lr` here."""
    warmup_steps: int = MISSING
    """Steps of linear warm-up from 0 to `optim.lr`."""
    final_lr: float = 0.0
    """Learning rate at `max_steps` after the linear decay."""
    global_batch_size: int = MISSING
    """Sequences per optimizer step over all ranks (= micro_batch_size x grad_accum x world size). It fixes
    the sample order: a checkpoint resumes on any world size W for which it is a multiple of
    micro_batch_size x W."""


@dataclass
class SystemConfig:
    """How the step runs on the hardware (`conf/system/*.yaml`)."""

    device: str = MISSING
    """`auto` (cuda when available, else cpu), `cpu` or `cuda`."""
    precision: str = MISSING
    """`bf16` or `fp32`."""
    micro_batch_size: int = MISSING
    """Sequences per forward/backward on one rank."""
    grad_accum: Optional[int] = None
    """Micro-batches per optimizer step on one rank; null = derived from the global batch for each world
    size (what a resume on another number of ranks needs)."""
    compile: bool = False
    """`torch.compile` each transformer layer (dropout, residual, LayerNorm and GELU fused into its kernels);
    works with activation checkpointing and every DeepSpeed stage."""
    compile_backend: str = "inductor"
    """The `torch.compile` backend: `inductor` (generated kernels: the speed) or `aot_eager` (traces forward
    and backward but runs eager kernels: no code generation, for checking a graph quickly)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass."""
    sdpa_backends: Optional[list[str]] = None
    """The attention kernels to try, in order, from `flash`, `cudnn`, `efficient`, `math` (e.g.
    `[cudnn,flash,efficient,math]`); null = PyTorch's order. Only listed ones run: keep `math` last as the
    fallback for cases the others refuse (docs/PERFORMANCE.md)."""
    fp8: bool = False
    """Train the encoder's Linear layers in float8 (torchao's float8 training, `pip install '.[fp8]'`;
    pretrain/speed.py). Fast on GPUs with FP8 tensor cores (H100, H200); runs on a CPU, emulated and slow,
    for tests. Checkpoints are the same files with or without it."""
    num_workers: int = MISSING
    """Data-loader worker processes per rank (0 = load in the training process)."""
    pin_memory: bool = False
    prefetch_factor: int = 2
    """Batches each worker keeps ready."""
    dist_timeout_s: int = 1800
    """Timeout of collective operations (a rank that hangs longer fails the job)."""


@dataclass
class DeepSpeedConfig:
    """ZeRO settings of the DeepSpeed backend (`conf/deepspeed/*.yaml`)."""

    zero_stage: int = MISSING
    """0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU (ZeRO 1-3)."""
    offload_param: bool = False
    """Keep parameters on the CPU (ZeRO 3 only)."""
    overlap_comm: bool = False
    """Overlap the gradient reduction with the backward pass (ZeRO 2-3; ZeRO-1 in bf16 reduces once per
    step, at the accumulation boundary, and ignores it)."""
    contiguous_gradients: bool = True
    """Copy reduced gradients into one contiguous buffer as they are produced (ZeRO 2-3: less
    fragmentation, one copy per bucket)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduction bucket (ZeRO 2-3). A bucket as big as the model reduces only after
    the whole backward, so nothing overlaps it: keep it a fraction of the parameter count."""
    allgather_bucket_size: int = 500_000_000
    """Elements per all-gather of the updated parameters after the optimizer step (ZeRO 1-2)."""


@dataclass
class TrainerConfig:
    """The loop (`conf/trainer/*.yaml`)."""

    backend: str = MISSING
    """`deepspeed` (any number of ranks) or `torch` (one process, one device)."""
    output_dir: Optional[str] = None
    """Run directory: checkpoints, metrics.jsonl, wandb; null = Hydra's run directory."""
    seed: int = MISSING
    """Seed of the model init, the data order, the masks and dropout."""
    log_every: int = MISSING
    """Steps between metric records (metrics.jsonl, wandb, progress bar)."""
    eval_every: int = MISSING
    """Steps between validations; 0 = only at the end."""
    save_every: int = MISSING
    """Steps between checkpoints; 0 = only at the end. A checkpoint is always written at the end."""
    keep_last: int = MISSING
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = MISSING
    """`auto` (the newest complete checkpoint of output_dir, if any), `none`, or a checkpoint path."""
    verify_checkpoint: bool = True
    """Check the sha256 of every checkpoint file before resuming from it."""
    stop_at_step: Optional[int] = None
    """Stop (checkpoint and exit 0) after this step without changing the schedule; null = max_steps."""
    max_consecutive_nonfinite: int = MISSING
    """Steps in a row with a non-finite loss or gradient norm after which the run fails (exit 3)."""
    progress_bar: bool = True


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    enabled: bool = True
    project: str = "roberta-pretrain"
    entity: Optional[str] = None
    mode: Optional[str] = None
    """`online`, `offline` or `disabled`; null = the WANDB_MODE environment variable, else `offline`."""
    name: Optional[str] = None
    """Run name; null = the experiment name."""
    tags: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig:
    """The whole run: `python -m pretrain.train experiment=... key=value ...`."""

    name: str = MISSING
    """Experiment name: the default run directory is outputs/<name>."""
    model: RobertaConfig = field(default_factory=RobertaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _first_set(value: Any, default: Any) -> Any:
    return default if value in (None, "") else value


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""Where `conf/pretrain.yaml` and its groups live."""


def register_schema() -> None:
    """Register `pretrain_schema` (idempotent); `conf/pretrain.yaml` lists it first in its defaults.

    Also the resolver `${first_set:a,b}` (a unless it is null or empty, else b), with which
    `hydra.run.dir` follows `trainer.output_dir` when it is given.
    """
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
    OmegaConf.register_new_resolver("first_set", _first_set, replace=True)


register_schema()


# ---------------------------------------------------------------------------------------------------
# Start-up validation


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _positive(key: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value} must be {'>= 0' if zero_ok else '> 0'}")


def derive_grad_accum(global_batch: int, micro_batch: int, grad_accum: int | None, world_size: int) -> int:
    """The micro-batches per step and rank; raises unless global = micro x accum x world size."""
    per_step = micro_batch * world_size
    if grad_accum is None:
        if global_batch % per_step:
            raise ConfigError(
                f"schedule.global_batch_size={global_batch} is not a multiple of system.micro_batch_size="
                f"{micro_batch} x world_size={world_size} (= {per_step}): no whole system.grad_accum fits"
            )
        return global_batch // per_step
    if micro_batch * grad_accum * world_size != global_batch:
        raise ConfigError(
            f"schedule.global_batch_size={global_batch} != system.micro_batch_size={micro_batch} x "
            f"system.grad_accum={grad_accum} x world_size={world_size} (= {per_step * grad_accum}); leave "
            "system.grad_accum null to derive it for each world size (a resume on another one)"
        )
    return grad_accum


MISSING_HINTS = {
    "data.corpus": "Give data.corpus=<corpus dir> and data.tokenizer=<tokenizer dir> (python -m "
                   "data_prep.build_tokenizer / build_corpus make them), or experiment=debug after `make demo` "
                   "has built demo_out/.",
}


def check_corpus_vocab(corpus_dir: str, vocab_size: int) -> None:
    """The corpus manifest's vocab_size must equal model.vocab_size (read from the manifest only)."""
    from data_prep.corpus import load_manifest
    from data_prep.shards import CorpusError

    try:
        manifest = load_manifest(corpus_dir)
    except CorpusError as e:
        hint = " (the debug experiment's demo_out/ is built by `make demo`)" if "demo_out" in str(corpus_dir) else ""
        raise ConfigError(f"data.corpus={corpus_dir}: {e}{hint}") from None
    check_built_with(f"{Path(corpus_dir) / 'manifest.json'} (data.corpus)", manifest["vocab_size"],
                     manifest["tokenizer_hash"], expect_vocab_size=vocab_size, error=ConfigError)


def to_run_config(cfg: DictConfig, world_size: int, check_corpus: bool = True) -> PretrainConfig:
    """The composed config as dataclasses, checked for this world size; `system.grad_accum` is filled in.

    Raises `ConfigError` (or the model's / masking's `ValueError`) naming the offending keys.
    """
    unknown = unknown_keys(cfg, PretrainConfig)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}: not in the schema (pretrain/config.py), "
                          "added with `+`")
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: required, no default. {MISSING_HINTS.get(missing[0], '')}".rstrip()
        )
    try:
        run: PretrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except ValueError as e:  # __post_init__ of RobertaConfig / MaskingConfig
        raise ConfigError(str(e)) from None
    except Exception as e:  # omegaconf's MissingMandatoryValue, ValidationError
        raise ConfigError(f"{type(e).__name__}: {e}") from None
    if not run.data.tokenizer:
        raise ConfigError("data.tokenizer is required: the tokenizer directory the corpus was built with (its "
                          "hash is checked against the manifest; evaluation, export and fill-mask read it from "
                          "the run's config)")
    _choice("trainer.backend", run.trainer.backend, BACKENDS)
    _choice("system.precision", run.system.precision, PRECISIONS)
    _choice("system.device", run.system.device, DEVICES)
    _choice("data.packing", run.data.packing, PACKINGS)
    _choice("system.compile_backend", run.system.compile_backend, COMPILE_BACKENDS)
    for name in run.system.sdpa_backends or ():
        _choice("system.sdpa_backends", name, tuple(SDPA_BACKENDS))
    if run.system.sdpa_backends is not None and not run.system.sdpa_backends:
        raise ConfigError("system.sdpa_backends=[] lists no attention kernel: name some, or null for PyTorch's order")
    if run.system.fp8 and not fp8_available():
        raise ConfigError(f"system.fp8=true needs {FP8_PACKAGE}, which is not installed: pip install '.[fp8]'")
    _choice("deepspeed.zero_stage", run.deepspeed.zero_stage, (0, 1, 2, 3))
    if run.deepspeed.offload_param and run.deepspeed.zero_stage != 3:
        raise ConfigError(
            f"deepspeed.offload_param=true needs deepspeed.zero_stage=3, got {run.deepspeed.zero_stage}"
        )
    if run.deepspeed.offload_optimizer and run.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1, got 0")
    if run.trainer.backend == "torch" and world_size != 1:
        raise ConfigError(
            f"trainer.backend=torch runs one process, but world_size={world_size}: use trainer.backend=deepspeed"
        )
    if run.trainer.resume not in ("auto", "none") and not run.trainer.resume:
        raise ConfigError("trainer.resume must be 'auto', 'none' or a checkpoint path, got ''")
    for key in ("schedule.max_steps", "schedule.global_batch_size", "system.micro_batch_size",
                "trainer.log_every", "trainer.keep_last", "trainer.max_consecutive_nonfinite",
                "optim.lr", "optim.eps"):
        group, name = key.split(".")
        _positive(key, getattr(getattr(run, group), name))
    for key in ("schedule.warmup_steps", "schedule.final_lr", "trainer.eval_every", "trainer.save_every",
                "system.num_workers", "optim.weight_decay", "optim.grad_clip", "data.valid_max_batches"):
        group, name = key.split(".")
        _positive(key, getattr(getattr(run, group), name), zero_ok=True)
    for key in ("optim.beta1", "optim.beta2"):
        value = getattr(run.optim, key.split(".")[1])
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    if run.schedule.warmup_steps > run.schedule.max_steps:
        raise ConfigError(
            f"schedule.warmup_steps={run.schedule.warmup_steps} exceeds schedule.max_steps={run.schedule.max_steps}"
        )
    if run.system.grad_accum is not None:
        _positive("system.grad_accum", run.system.grad_accum)
    run.system.grad_accum = derive_grad_accum(
        run.schedule.global_batch_size, run.system.micro_batch_size, run.system.grad_accum, world_size
    )
    if not 3 <= run.data.seq_len <= run.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={run.data.seq_len} must be within [3, model.max_positions - 2 = "
            f"{run.model.max_seq_len}] (model.max_positions={run.model.max_positions})"
        )
    if check_corpus:
        check_corpus_vocab(run.data.corpus, run.model.vocab_size)
    return run


def resolved_yaml(cfg: DictConfig) -> str:
    """The composed config with interpolations resolved, as YAML (saved beside each checkpoint)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_run_config(ckpt: Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """The run config saved in checkpoint `ckpt`, with `key=value` overrides (e.g. `data.corpus=...`),
    checked against the schema: an unknown key or a bad value raises `ConfigError` naming it."""

    def first_line(e: Exception) -> str:  # omegaconf appends full_key / reference_type lines
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    try:
        merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(ckpt / checkpoint.RUN_CONFIG))
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError, a YAML error
        raise ConfigError(f"{ckpt / checkpoint.RUN_CONFIG}: {first_line(e)}") from None
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ConfigError(f"{override!r}: an override is key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except Exception as e:
            raise ConfigError(f"override {override!r}: {first_line(e)}") from None
    try:
        run = OmegaConf.to_object(merged)
    except ValueError as e:  # RobertaConfig / MaskingConfig __post_init__
        raise ConfigError(f"{ckpt / checkpoint.RUN_CONFIG} with overrides {list(overrides)}: {e}") from None
    except Exception as e:  # MissingMandatoryValue
        raise ConfigError(f"{ckpt / checkpoint.RUN_CONFIG}: {first_line(e)}") from None
    assert isinstance(run, PretrainConfig)
    return run
