"""The house order of `compax/`: imports run downward through four layers and form no cycle.

    run       what a run is: the config and its validation, the stages and the pipeline, the
              workdir, the report, the public API (`compax/__init__.py`, `finished_run`,
              `one_model`) and `registrations` (every registered method and analysis)
    methods   the registered compression steps (`compress/methods/`) and analyses (`analyses/`)
    engine    what methods and analyses are built from: the compression engine (`compress/`), the
              measurements (`measure/`), training (`train/`), the population engine, plotting,
              the ONNX graphs and onnxruntime (`export/`)
    base      data, models, errors, safe files (atomic writes, checksums, the workdir lock)

A module may import its own layer and the layers below it, at the top of the file or inside a
function alike (a lazy import is still an import). Python runs a package's `__init__` before any
of its modules: that implicit step is not an import, but a module naming its own package (`from
compax.analyses import Analysis` inside `compax/analyses/`) is. The graph is read with `ast`.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "compax"
LAYERS = ("base", "engine", "methods", "run")  # lowest first
BASE = ("compax.data", "compax.models", "compax.errors", "compax.safe_files")
ENGINE = ("compax.compress", "compax.measure", "compax.train", "compax.member_vmap",
          "compax.distributed", "compax.compilation_cache", "compax.kernels", "compax.plots",
          "compax.export")
METHODS = ("compax.compress.methods", "compax.analyses")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    """The layer of a compax module (the most specific prefix wins: `compress.methods` is a
    method although `compress` is the engine)."""
    if _within(module, METHODS):
        return "methods"
    if _within(module, ENGINE):
        return "engine"
    if _within(module, BASE):
        return "base"
    return "run"


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports() -> dict[str, set[str]]:
    """{module: the compax modules it imports}, every import statement of the file."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in known.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in map(resolve, (t for t in targets if t.startswith("compax")))
                      if t and t != name}
        graph[name] = found
    return graph


def test_the_graph_is_read():
    graph = imports()
    assert "compax.compress.registry" in graph["compax.compress.methods.quantize"]
    assert layer("compax.compress.methods.quantize") == "methods"
    assert layer("compax.compress.ptq") == "engine" and layer("compax.pipeline") == "run"


def test_no_import_runs_upward():
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})"
                    for a, targets in imports().items() for b in targets
                    if LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("module", ["compax.compress.registry", "compax.analyses"])
def test_registries_sit_below_what_registers_into_them(module):
    # A method or analysis imports its registry; the registry never imports a method.
    assert not any(layer(b) == "methods" and b != module and not b.startswith(module + ".")
                   for b in imports()[module])
