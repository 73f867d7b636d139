"""The shape of the house: a package per stage, a core that imports no stage, data flowing one way, and
no import cycle between modules (function-local imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "data_prep", "pretrain", "serving", "finetune")
MAY_IMPORT = {  # the direction of the data: conf -> data_prep -> pretrain -> serving / finetune, all on core
    "core": {"core"},
    "data_prep": {"core", "data_prep"},
    "pretrain": {"core", "data_prep", "pretrain"},
    "serving": {"core", "serving"},
    "finetune": {"core", "pretrain", "finetune"},  # pretrain: the process group and the schedule
}


def module_imports() -> dict[str, set[str]]:
    """{module: the modules of our packages it imports}, from the source (every import statement)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}  # `from core import checkpoint`
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES and m != name}
    modules = set(graph)
    return {name: {m for m in deps if m in modules} for name, deps in graph.items()}


def test_each_stage_imports_only_what_comes_before_it():
    wrong = [f"{m} imports {d}" for m, deps in module_imports().items() for d in sorted(deps)
             if d.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_the_model_is_one_file_that_imports_nothing_of_ours():
    assert module_imports()["core.model"] == set()


def test_no_import_cycle():
    graph = module_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert state and all(v == 2 for v in state.values())
