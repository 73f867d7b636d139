"""Export a training checkpoint to a Hugging Face directory:
`python -m serving.export checkpoint=<dir> output_dir=<dir>`.

`checkpoint` is a `step_*` directory, the `latest` pointer, a `checkpoints/` directory or a run
directory, of either backend and any ZeRO stage (0-3, offloaded or not): the weights are consolidated
into one fp32 state dict (`core.checkpoint.load_model_state`). The output directory gets

    config.json, model.safetensors        `core.hf.save_hf` (fp32, or `dtype=bf16`)
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                          copied from the run's tokenizer (`data.tokenizer`, or `tokenizer=`)

so that `transformers.AutoModelForMaskedLM` / `AutoTokenizer` / `pipeline("fill-mask", model=dir)`
load it, and `python -m serving.fill_mask model=<dir>` gives the same answers.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING

from core.checkpoint import (
    CheckpointError,
    checkpoint_tokenizer_dir,
    load_checkpoint_model,
    model_config,
    read_run_config,
    resolve_checkpoint,
)
from core.cli import command
from core.hf import CONFIG_NAME, SAFETENSORS_NAME, HFCheckpointError, save_hf
from core.tokenizer import TOKENIZER_FILES, TokenizerError, copy_tokenizer_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(checkpoint: str | Path, output_dir: str | Path, tokenizer: str | Path | None = None,
           dtype: str = "fp32", overwrite: bool = False, verify: bool = True) -> dict:
    """Write the HF directory of `checkpoint` into `output_dir`; returns a summary (what was written)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint, verify)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir={out} is a file, not a directory (give a directory to write)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir={out} exists and is not empty (overwrite=true replaces it)")
    run_cfg = read_run_config(ckpt)
    tok_dir = checkpoint_tokenizer_dir(run_cfg, tokenizer)
    missing = [name for name in TOKENIZER_FILES if not (tok_dir / name).is_file()]
    if missing:  # checked before the weights are read (copy_tokenizer_files checks again)
        raise TokenizerError(f"{tok_dir}: lacks {missing}; rebuild it with python -m data_prep.build_tokenizer")
    model = load_checkpoint_model(ckpt, model_config(run_cfg)).to(DTYPES[dtype])

    tmp = out.with_name(f".tmp-{out.name}")  # written aside, then moved into place: never half an export
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    copy_tokenizer_files(tok_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"checkpoint": str(ckpt), "output_dir": str(out), "tokenizer": str(tok_dir), "dtype": dtype,
            "parameters": model.num_parameters(),
            "files": sorted([CONFIG_NAME, SAFETENSORS_NAME, *TOKENIZER_FILES])}


@dataclass
class ExportArgs:
    """The settings of `python -m serving.export` (conf/commands/export.yaml)."""

    checkpoint: str = MISSING
    """A step_* dir, a run dir, its checkpoints/ dir or its latest file."""
    output_dir: str = MISSING
    """The HF directory to write."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; null: the run's data.tokenizer."""
    dtype: str = "fp32"
    """dtype of the saved weights: fp32 or bf16."""
    overwrite: bool = False
    """Replace a non-empty output_dir."""
    verify: bool = True
    """Check every checkpoint file's sha256 against its checkpoint.json first (false: sizes only, warned)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")


@command("export", ExportArgs, refused=(CheckpointError, HFCheckpointError, TokenizerError, FileExistsError))
def main(args: ExportArgs) -> int:
    summary = export(args.checkpoint, args.output_dir, args.tokenizer, args.dtype, args.overwrite, args.verify)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    main()
