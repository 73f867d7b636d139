"""The one `key=value` argument parser of the data_prep command lines (Hydra-style overrides).

Each CLI describes its settings as a dataclass, each field with its help text (`setting`):

    @dataclass
    class Args:
        output_dir: str = setting(help="where to write")   # no default: required
        vocab_size: int = setting(50265, "ids in all")

    def main(argv=None): args = parse_args(Args, argv); ...

`parse_args` reads `key=value` words, converts each value to the field's type (str, int, float,
bool, each optionally `| None` written as `null`), and exits with code 2 and a message naming the key
on an unknown key, a bad value, a missing required key or a word without `=`. `help` or `--help`
prints the fields. `run(main)` maps our input errors to a one-line message and exit code 1.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with its help text (shown by `help`); no default means required."""
    return dataclasses.field(default=default, metadata={"help": help})


class UsageError(Exception):
    """A command line that does not fit the settings dataclass (exit code 2)."""


def _convert(key: str, raw: str, tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("null", "none"):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    try:
        if tp is bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp in (int, float, str):
            return tp(raw.replace("_", "") if tp is int else raw)
    except ValueError:
        raise UsageError(f"{key}={raw!r}: not a valid {tp.__name__}") from None
    raise TypeError(f"field {key}: unsupported type {tp!r}")


def usage(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = "(required)" if required else f"= {f.default!r}"
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  {f.name}: {tp} {default}\n      {f.metadata.get('help', '')}")
    return "settings (key=value):\n" + "\n".join(lines)


def parse_args(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `key=value` words (default: sys.argv[1:]); exit 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("help", "--help", "-h") for a in argv):
        print(usage(cls))
        raise SystemExit(0)
    try:
        return _parse(cls, argv)
    except UsageError as e:
        print(f"error: {e}\n{usage(cls)}", file=sys.stderr)
        raise SystemExit(2) from None


def _parse(cls: type[T], argv: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for word in argv:
        key, sep, raw = word.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise UsageError(f"{word!r}: arguments are key=value")
        if key not in known:
            raise UsageError(f"unknown key {key!r} (known: {', '.join(known)})")
        if key in values:
            raise UsageError(f"key {key!r} given twice")
        values[key] = _convert(key, raw, hints[key])
    missing = [
        k for k, f in known.items()
        if k not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UsageError(f"missing required key(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except ValueError as e:  # __post_init__ validation names the key
        raise UsageError(str(e)) from None


def run(main: Callable[[], int | None], errors: tuple[type[BaseException], ...]) -> None:
    """Run a CLI's main; an error of the given kinds prints `error: <message>` and exits 1."""
    try:
        code = main()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code or 0)
