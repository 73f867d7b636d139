"""Fill-mask inference: `python -m serving.fill_mask model=<dir> request=<file or -> [top_k=5]`.

The schema and the model side live in `serving.masker` (read its docstring); this is the command line.
With `serve=true` the same schema is served over HTTP (`serving.server`: `POST /score`, `GET /health`,
concurrent requests batched into one forward).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from core.checkpoint import CheckpointError
from core.cli import command
from core.hf import HFCheckpointError
from core.tokenizer import TokenizerError
from serving.masker import DEFAULT_TOP_K, RequestError, decode_request, load_fill_masker
from serving.server import Limits, serve

# --------------------------------------------------------------------------------------------------
# CLI


@dataclass
class FillMaskArgs:
    """The settings of `python -m serving.fill_mask` (conf/commands/fill_mask.yaml)."""

    model: str = MISSING
    """HF directory (python -m serving.export) or a checkpoint: a step_* dir, a run dir, its checkpoints/
    dir or its latest file."""
    request: Optional[str] = None
    """Request JSON file, or - for stdin (not with serve=true)."""
    top_k: int = DEFAULT_TOP_K
    """Candidates per string when the request has no parameters.top_k."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; null: the HF dir's own, or the run's data.tokenizer."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    serve: bool = False
    """Serve the same schema over HTTP (POST /score, GET /health) instead."""
    host: str = "127.0.0.1"
    """Server address."""
    port: int = 8000
    """Server port; 0 picks a free one (printed)."""
    max_batch: int = 64
    """Most strings in one forward (the server batches concurrent requests up to it, sharing it fairly)."""
    max_strings: int = Limits.max_strings
    """Server: most strings in one request (413 beyond)."""
    max_candidates: int = Limits.max_candidates
    """Server: most candidates in one answer, strings x top_k (413 beyond)."""
    verify: bool = True
    """Check every checkpoint file's sha256 against its checkpoint.json first (false: sizes only, warned)."""

    def __post_init__(self) -> None:
        if self.serve == (self.request is not None):
            raise ValueError("give request=<file or -> to answer one request, or serve=true to serve; "
                             "not both")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r} is not one of cpu, cuda, auto")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is not in [0, 65535]")
        for key in ("max_batch", "max_strings", "max_candidates"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")


def read_request_text(source: str) -> str:
    """The request file's text, or stdin's for `-`."""
    try:
        if source == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        path = Path(source)
        if not path.is_file():
            raise RequestError(f"request={source}: no such file")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request={source}: not UTF-8 ({e})") from None


@command("fill_mask", FillMaskArgs, refused=(RequestError, CheckpointError, HFCheckpointError, TokenizerError))
def main(args: FillMaskArgs) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    masker = load_fill_masker(args.model, args.tokenizer, args.device, args.max_batch, args.verify)
    masker.check_top_k(args.top_k)
    if args.serve:
        serve(masker, args.host, args.port, default_top_k=args.top_k, model_name=args.model,
              limits=Limits(args.max_strings, args.max_candidates))
        return 0
    assert args.request is not None
    request = decode_request(read_request_text(args.request), args.top_k)
    json.dump(masker(request), sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    main()
