"""The one command-line convention of every command: a Hydra app over `conf/commands/<command>.yaml`.

    @dataclass
    class ExportArgs:              # the typed schema: every setting, its type, its default and its doc
        checkpoint: str = MISSING
        dtype: str = "fp32"
        def __post_init__(self): ...   # validation naming the key (ValueError)

    main = command("export", ExportArgs, refused=(CheckpointError, ...))(lambda args: export(...))

`conf/commands/<command>.yaml` selects the schema (`defaults: [<command>_schema, _self_]`); the schema is the one
source of every default. So every command takes Hydra's `key=value` overrides, lists (`input=[a,b]`),
`--cfg job`, `--help`, `-m` sweeps and `hydra/launcher=slurm_*` alike.

Exit codes, the same for every command:
  0   done
  2   refused at start-up: an unknown key, a wrong type or value (named), or input the command refuses
      (a missing file, a corrupt shard or checkpoint, a bad request): one line `error: <why>` on stderr
  1   a bug: Hydra prints the traceback
Commands may add their own (training: 3 too many non-finite steps, 75 stopped by a signal, resume me).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "commands")
"""The primary configs of the commands other than training (conf/pretrain.yaml and its groups). They
live apart from training's groups because Hydra takes a key named like a group (`model=`, `data=`) for
a group choice."""
EXIT_BAD_INPUT = 2
"""Exit code of a command refused at start-up (bad configuration or input), for every command."""

T = TypeVar("T")


def schema_name(config_name: str) -> str:
    return f"{config_name}_schema"


def register(config_name: str, schema: type) -> None:
    """Store `schema` as `<config_name>_schema`, the node the command's YAML names in its defaults, and
    its `--help` page as `hydra/help: <config_name>`."""
    store = ConfigStore.instance()
    store.store(name=schema_name(config_name), node=schema)
    store.store(group="hydra/help", name=config_name, node=_help_page(config_name, schema))


def field_docs(schema: type) -> dict[str, str]:
    """{field: the docstring written under it} (the dataclass's source is the one place of the docs)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _help_page(config_name: str, schema: type) -> dict[str, str]:
    module = sys.modules[schema.__module__]
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    docs = field_docs(schema)
    lines = [f"  {f.name}: {docs.get(f.name, '')}" for f in dataclasses.fields(schema)]
    text = (f"{summary}\n\nSettings (key=value; lists as key=[a,b]):\n" + "\n".join(lines)
            + "\n\nThe composed config (--cfg job prints it):\n\n$CONFIG\n"
            + "Exit codes: 0 done, 2 refused at start-up (the message names the key or input), 1 a bug.\n"
            + "Hydra's own flags: --hydra-help. Sweeps: -m key=a,b.\n")
    escaped = text.replace("${", "\\${")
    return {"app_name": config_name, "header": "", "footer": "", "template": escaped}


def unknown_keys(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of `cfg` that `schema` (a dataclass, nested dataclasses followed) does not have: Hydra's
    `+key=value` adds keys even to a typed config, and OmegaConf.to_object would drop them silently.
    (Nested types come from the config nodes, not from annotations: a schema pickled by value into a
    SLURM job, as submitit does with `__main__`, has annotations its new module cannot resolve.)"""
    if not isinstance(cfg, DictConfig) or not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in cfg.keys():
        if key not in fields:
            found.append(f"{prefix}{key}")
            continue
        child = cfg.get(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            found += unknown_keys(child, OmegaConf.get_type(child), f"{prefix}{key}.")
    return found


def to_args(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as the schema's dataclass (its `__post_init__` validates): ValueError naming
    the key on a bad value."""
    unknown = unknown_keys(cfg, schema)
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))} (the settings are: {known})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{', '.join(missing)}: required; give {' '.join(k + '=...' for k in missing)}")
    try:
        obj = OmegaConf.to_object(cfg)
    except ValueError:
        raise
    except Exception as e:  # omegaconf's MissingMandatoryValue, ValidationError: name the key
        raise ValueError(f"{str(e).splitlines()[0]}") from None
    assert isinstance(obj, schema), type(obj)
    return obj


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def hydra_app(config_dir: str, config_name: str, task: Callable[[DictConfig], None]) -> Callable[[], None]:
    """`hydra.main` over `config_dir/<config_name>.yaml`, except that a config Hydra cannot compose (an
    unknown key, a wrong type: Hydra prints why and exits 1) exits 2, as every refusal at start-up."""
    started = False

    def run_task(cfg: DictConfig) -> None:
        nonlocal started
        started = True
        task(cfg)

    app = hydra.main(config_path=config_dir, config_name=config_name, version_base="1.3")(run_task)

    def main() -> None:
        try:
            app()
        except SystemExit as e:
            if e.code == 1 and not started:
                sys.exit(EXIT_BAD_INPUT)
            raise

    return main


def command(config_name: str, schema: type[T], refused: tuple[type[BaseException], ...] = ()
            ) -> Callable[[Callable[[T], int | None]], Callable[[], None]]:
    """Make `fn(args) -> exit code` the Hydra app of `conf/commands/<config_name>.yaml` with `schema` as
    its typed config. The returned `main()` reads sys.argv (Hydra's syntax) and exits with the convention
    above: a config Hydra cannot compose, a ValueError of the schema, or an error of a `refused` type
    exits 2 with one line on stderr."""
    errors = (ValueError, *refused)

    def decorate(fn: Callable[[T], int | None]) -> Callable[[], None]:
        def task(cfg: DictConfig) -> None:
            try:
                code = fn(to_args(cfg, schema))
            except errors as e:
                fail(str(e))
            if code:
                sys.exit(code)

        app = hydra_app(CONF_DIR, config_name, task)

        @functools.wraps(fn)
        def main() -> None:
            register(config_name, schema)
            app()

        return main

    return decorate


def compose_args(config_name: str, schema: type[T], overrides: list[str] | None = None) -> T:
    """The same config as `python -m <command> <overrides>` gives, in-process (tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    register(config_name, schema)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides or []))
    return to_args(cfg, schema)


def as_list(key: str, value: Any) -> list[str]:
    """A setting that takes one string or a list of them (`input=a.txt`, `input=[a.txt,'b/*.gz']`)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{key}={value!r}: expected a string or a list of strings")
