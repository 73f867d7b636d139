"""How a benchmark reports: one `key value` line per figure, and the same as JSON when asked."""
from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, out: str = "") -> None:
    width = max(map(len, result), default=0) + 2
    for key, value in result.items():
        print(f"{key:{width}s} {value}")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
