"""Imports run one way: no module of ufcpu or weights_convert imports another that imports it back,
directly or through others, at module level or inside a function.

The graph is built from the source with `ast` (every `import` and `from ... import` anywhere in a
file, functions included). How the package `__init__` modules count:

- `import ufcpu.x` / `from ufcpu.x import y` / `from . import x` (x a submodule) is an edge to
  the submodule `ufcpu.x` only. Python runs `ufcpu/__init__.py` first, but the package's
  `__init__` is its public surface, which imports the submodules it re-exports: counting that
  implicit step would make every submodule a cycle with `__init__` and the test meaningless.
- `import ufcpu` / `from ufcpu import name` (name not a submodule) / `from . import name` is an
  edge to `ufcpu` (its `__init__`), and the `__init__`'s own imports are edges like any module's.
  So a module that reaches the package surface (`from ufcpu import CheckpointError` in the
  converter, say) closes a cycle through `__init__ -> engine -> hub -> ...` and is caught.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ufcpu", "weights_convert")

# Edges left out of the cycle check, each with its reason; none today, so every cycle fails.
KNOWN_EDGES: set[tuple[str, str]] = set()


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` one import statement refers to (see the rules above)."""
    def known(name: str) -> str | None:   # the longest prefix of name that is one of our modules
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                return ".".join(parts[:k])
        return None

    found = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            found.add(known(a.name))
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        for a in node.names:
            sub = f"{name}.{a.name}"
            found.add(sub if sub in modules else known(name))
    return {t for t in found if t is not None}


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    graph = {m: set() for m in files}
    for m, f in files.items():
        is_package = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            graph[m] |= _targets(node, m, is_package, set(files)) - {m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):   # Tarjan; the graphs here are a few dozen modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_path_in(sorted(comp), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_in(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle through comp[0] inside the component (breadth-first), for a readable failure."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_no_import_cycles():
    graph = import_graph(ROOT)
    assert {"ufcpu", "ufcpu.layout", "ufcpu.hub", "weights_convert.convert", "weights_convert.hub_config"} <= graph.keys()
    for a, b in KNOWN_EDGES:
        graph[a].discard(b)
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_ufcpu_reaches_the_converter_only_through_hub():
    graph = import_graph(ROOT)
    into_converter = sorted(m for m, ts in graph.items() if m.startswith("ufcpu")
                            and any(t.startswith("weights_convert") for t in ts))
    assert into_converter == ["ufcpu.hub"]
    assert graph["ufcpu.weights"] >= {"ufcpu.layout"} and "weights_convert.convert" not in graph["ufcpu.weights"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("files,cycle", [
    # a cycle hidden by a deferred import inside a function
    ({"ufcpu/__init__.py": "", "ufcpu/a.py": "from . import b\n",
      "ufcpu/b.py": "def f():\n    from .a import x\n"}, ["ufcpu.a", "ufcpu.b", "ufcpu.a"]),
    # through another package, absolute imports
    ({"ufcpu/__init__.py": "", "ufcpu/hub.py": "def f():\n    import weights_convert.convert\n",
      "weights_convert/__init__.py": "", "weights_convert/convert.py": "from ufcpu.hub import x\n"},
     ["ufcpu.hub", "weights_convert.convert", "ufcpu.hub"]),
    # reaching the package surface closes a cycle through __init__
    ({"ufcpu/__init__.py": "from .engine import load\n", "ufcpu/engine.py": "from . import hub\n",
      "ufcpu/hub.py": "def f():\n    from weights_convert import convert\n",
      "weights_convert/__init__.py": "", "weights_convert/convert.py": "from ufcpu import CheckpointError\n"},
     ["ufcpu", "ufcpu.engine", "ufcpu.hub", "weights_convert.convert", "ufcpu"]),
])
def test_the_cycle_finder_finds_planted_cycles(tmp_path, files, cycle):
    _write(tmp_path, files)
    assert cycles(import_graph(tmp_path)) == [cycle]


def test_a_submodule_import_is_not_an_edge_to_the_package_init(tmp_path):
    _write(tmp_path, {"ufcpu/__init__.py": "from .engine import load\n", "ufcpu/engine.py": "from . import hub\n",
                      "ufcpu/hub.py": "from ufcpu.errors import E\nfrom . import errors\n", "ufcpu/errors.py": "",
                      "weights_convert/__init__.py": "", "weights_convert/convert.py": "from ufcpu.errors import E\n"})
    g = import_graph(tmp_path)
    assert g["ufcpu.hub"] == {"ufcpu.errors"} and g["weights_convert.convert"] == {"ufcpu.errors"}
    assert cycles(g) == []
