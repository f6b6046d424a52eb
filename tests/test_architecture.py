"""The house rules of the code base, checked on its source (docs/architecture.md).

- No import cycles between modules (imports inside ``if TYPE_CHECKING:`` do not run and are left out).
- pacs_node's stage packages (receive, route, process, deliver, retain) share only
  the config layer, the small common layer and storage; they never import each
  other. The faces (web, app) sit above them; only ``app`` wires stages together.
- ``inference`` imports neither ``pacs_node`` nor ``storage``; ``storage`` imports
  neither; the runtime never imports the demo/phantom/training tooling (``pacs_lab``)
  except ``app`` (``pacs-node demo``, ``models evaluate``), and ``pacs_lab`` never
  imports ``pacs_node``.
- Benchmarks do not import the tests.
- A function-local import of the project's own modules is allowed only where it is
  lazy by intent (listed below, with the reason).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("pacs_node", "inference", "storage", "pacs_lab")

#: pacs_node packages and the pacs_node packages each may import.
BASE = {"pacs_node", "pacs_node.errors"}
STAGES = ("receive", "route", "process", "deliver", "retain")
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "common": {"config"},
    **{stage: {"config", "common"} for stage in STAGES},
    "query": {"config", "common"},  # the one read layer of the faces (CLI, JSON API, dashboard)
    "web": {
        "config",
        "common",
        "query",
        *STAGES,
    },  # a face: STOW -> receive, rerun -> process, retry -> deliver, tester -> route
    "app": {"config", "common", "query", "web", *STAGES},  # the only place that wires stages
}

#: (importing module, imported module) pairs imported inside a function on purpose.
LAZY_BY_INTENT: dict[tuple[str, str], str] = {
    # torch and the networks load only in processes that run models
    ("pacs_node.process.worker", "inference.pipeline"): "torch loads only in worker processes",
    ("pacs_node.process.worker", "inference.errors"): "beside inference.pipeline",
    ("pacs_node.process.results", "inference.outputs.common"): "highdicom loads only in worker processes",
    ("pacs_node.process.results", "inference.outputs.keyimage"): "highdicom loads only in worker processes",
    ("pacs_node.process.results", "inference.outputs.seg"): "highdicom loads only in worker processes",
    ("pacs_node.process.results", "inference.outputs.sr"): "highdicom loads only in worker processes",
    ("pacs_node.process.results", "inference.outputs.notice"): "highdicom loads only in worker processes",
    ("pacs_node.process.results", "inference.segments"): "SimpleITK and scipy load only in worker processes",
    # celery and kombu load only in distributed mode
    ("pacs_node.process.distributed", "pacs_node.process.celery_app"): "celery loads only with queue.backend celery",
    ("pacs_node.app.service", "pacs_node.process.distributed"): "celery loads only with queue.backend celery",
    ("pacs_node.app.cli", "pacs_node.process.celery_app"): "celery loads only for `pacs-node worker`",
    # each CLI command loads only what it runs
    ("pacs_node.app.cli", "pacs_node.app.service"): "`serve` alone starts the stages",
    ("pacs_node.app.cli", "pacs_node.app.demo"): "`demo` alone loads phantoms and torch",
    ("pacs_node.app.cli", "pacs_lab.evaluation"): "`models evaluate` alone loads phantoms and torch",
    ("pacs_node.app.cli", "inference.manifest"): "`models` commands alone read model packages",
    ("pacs_node.app.cli", "inference.errors"): "beside inference.manifest",
    ("pacs_node.app.cli", "inference.importer"): "`models import` alone reads nnU-Net folders",
    ("pacs_node.app.demo", "pacs_lab.evaluation"): "torch and phantoms load when the demo runs",
    ("pacs_node.app.demo", "pacs_lab.phantoms.brain"): "torch and phantoms load when the demo runs",
    ("pacs_node.app.demo", "pacs_lab.tasks"): "torch and phantoms load when the demo runs",
    ("pacs_node.app.demo", "inference.manifest"): "read when the demo runs",
    ("pacs_node.app.demo", "inference.pipeline"): "torch loads when the demo runs",
    ("pacs_node.app.demo", "inference.segments"): "read when the demo runs",
    ("pacs_node.web.dashboard.views", "inference.manifest"): "the models page alone reads model packages",
    ("pacs_node.web.dashboard.views", "inference.errors"): "beside inference.manifest",
    # heavy optional backends, chosen by the model package
    ("inference.pipeline", "inference.backends.native"): "the backend a package names is the one loaded",
    ("inference.pipeline", "inference.backends.nnunet"): "nnunetv2 is an optional extra",
    ("pacs_lab.tasks", "pacs_lab.phantoms.brain"): "each task loads its own phantom generator",
    ("pacs_lab.tasks", "pacs_lab.phantoms.abdomen"): "each task loads its own phantom generator",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lazy: bool  # inside a function
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in (*FIRST_PARTY, "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            out[_module_name(path)] = path
    return out


MODULES = _sources()


def _resolve(name: str) -> str | None:
    """The first-party module an import names (a name imported from a module counts as the module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _walk(other, in_function)
            continue
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))


def _edges(module: str) -> list[Edge]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []
    for node, lazy in _walk(tree, False):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                edges.append(Edge(module, target, lazy, getattr(node, "lineno", 0)))
    return edges


EDGES = [edge for module in MODULES for edge in _edges(module)]


def _layer(module: str) -> str | None:
    """The pacs_node package a module belongs to (None outside pacs_node, 'base' for errors/__init__)."""
    parts = module.split(".")
    if parts[0] != "pacs_node":
        return None
    if module in BASE or len(parts) == 1 or module == "pacs_node.__main__":
        return "base" if module != "pacs_node.__main__" else "app"
    return parts[1]


def _cycles(edges: list[Edge]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan, recursive: the graph is a few hundred modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_source_tree_is_what_the_test_reads() -> None:
    # a guard for the guards below: they read the real tree, not nothing
    assert "pacs_node.app.cli" in MODULES and "pacs_node.receive.scp" in MODULES
    assert len(EDGES) > 200


def test_no_import_cycles() -> None:
    assert _cycles(EDGES) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = [Edge("a", "b", False, 1), Edge("b", "c", True, 1), Edge("c", "a", False, 1), Edge("c", "d", False, 1)]
    assert _cycles(edges) == [["a", "b", "c"]]


def test_stage_packages_share_only_config_common_and_storage() -> None:
    wrong = []
    for e in EDGES:
        src, dst = _layer(e.source), _layer(e.target)
        if src is None or dst is None or dst == "base" or src == dst:
            continue
        if src == "base" or dst not in ALLOWED.get(src, set()):
            wrong.append(f"{e.source}:{e.line} imports {e.target} ({src} -> {dst})")
    assert wrong == []


def test_inference_storage_and_lab_stay_below_the_node() -> None:
    wrong = []
    forbidden = {
        "inference": ("pacs_node", "storage", "pacs_lab"),
        "storage": ("pacs_node", "inference", "pacs_lab"),
        "pacs_lab": ("pacs_node", "storage"),
        "benchmarks": ("tests",),
    }
    for e in EDGES:
        top = e.source.split(".")[0]
        if e.target.split(".")[0] in forbidden.get(top, ()):
            wrong.append(f"{e.source}:{e.line} imports {e.target}")
    # the runtime never needs the lab; the app loads it for `demo` and `models evaluate` only
    for e in EDGES:
        if e.target.startswith("pacs_lab") and _layer(e.source) not in (None, "app"):
            wrong.append(f"{e.source}:{e.line} imports {e.target}")
    assert wrong == []


def test_benchmarks_do_not_import_the_tests() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "benchmarks").glob("*.py")))
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {name for name in imported if name == "tests" or name.startswith("tests.")}


def test_function_local_imports_are_lazy_by_intent() -> None:
    local = {(e.source, e.target) for e in EDGES if e.lazy and not e.source.startswith("benchmarks")}
    unexplained = sorted(f"{s} -> {t}" for s, t in local - set(LAZY_BY_INTENT))
    assert unexplained == []
    stale = sorted(f"{s} -> {t}" for s, t in set(LAZY_BY_INTENT) - local)
    assert stale == [], "LAZY_BY_INTENT lists imports that are no longer there"


@pytest.mark.parametrize("top", ["inference", "storage"])
def test_lower_packages_import_without_the_node(top: str) -> None:
    # a structural check above; this one runs the import in a clean interpreter
    import subprocess
    import sys

    code = (
        f"import importlib, pkgutil, sys, {top}\n"
        f"for m in pkgutil.walk_packages({top}.__path__, '{top}.'):\n"
        "    if '.migrations' in m.name: continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('pacs_node', 'pacs_lab'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
