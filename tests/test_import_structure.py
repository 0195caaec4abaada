"""The layering of dist_llm (docs: /work/shared/notes/architecture.md), checked on the source.

Every module's imports are read with ``ast`` (imports inside functions count; those under
``if TYPE_CHECKING:`` do not, they never run), relative imports are resolved, and each import
becomes an edge to the most specific dist_llm module it names. Then: no cycle anywhere, the
trainer's data package never imports the prepare pipeline, and config imports only config.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PKG = "dist_llm"
ROOT = Path(__file__).resolve().parents[1] / PKG


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(x) for x in ast.walk(stmt))
    return skip


def _imported_names(module: str, path: Path) -> List[Tuple[str, int]]:
    """Absolute dotted names this module imports (``from a import b`` gives ``a.b``), with lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: List[Tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            if node.level:
                full = base + ("." + node.module if node.module else "")
            else:
                full = node.module or ""
            names += [(f"{full}.{a.name}", node.lineno) for a in node.names]
    return [(n, line) for n, line in names if n == PKG or n.startswith(PKG + ".")]


def _resolve(name: str, mods: Dict[str, Path]) -> Optional[str]:
    """The most specific module a dotted name lies in (``pkg.mod.func`` -> ``pkg.mod``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> Tuple[Dict[str, Set[str]], Dict[str, List[Tuple[str, int]]]]:
    mods = _modules()
    imports = {m: _imported_names(m, p) for m, p in mods.items()}
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for m, names in imports.items():
        for name, _ in names:
            target = _resolve(name, mods)
            if target and target != m:
                edges[m].add(target)
    return edges, imports


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One concrete cycle per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps: List[List[str]] = []

    def visit(v: str) -> None:  # recursive: the depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_path(comp, edges) for comp in comps]


def _cycle_path(comp: List[str], edges: Dict[str, Set[str]]) -> List[str]:
    """A shortest cycle through the component's first module (breadth-first), for the message."""
    members, start = set(comp), comp[0]
    prev: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:  # v closes the cycle: walk back from v to start
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(prev[chain[-1]])
                    return [*reversed(chain), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_graph_sees_the_package() -> None:
    edges, _ = _graph()
    assert "dist_llm.prepare.pipeline" in edges and "dist_llm.data.shards" in edges["dist_llm.prepare.pipeline"]
    assert "dist_llm.prepare" in edges["dist_llm.cli.prepare"]  # imported inside a function there


def test_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles (each module imports the next):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_data_does_not_import_the_prepare_pipeline() -> None:
    _, imports = _graph()
    bad = [f"{m} (line {line}) imports {n}" for m, names in imports.items() if m.split(".")[:2] == [PKG, "data"]
           for n, line in names if n == f"{PKG}.prepare" or n.startswith(f"{PKG}.prepare.")]
    assert not bad, "the trainer's data package must not import dist_llm.prepare:\n  " + "\n  ".join(bad)


def test_config_imports_only_config() -> None:
    _, imports = _graph()
    bad = [f"{m} (line {line}) imports {n}" for m, names in imports.items() if m.split(".")[:2] == [PKG, "config"]
           for n, line in names if not (n == f"{PKG}.config" or n.startswith(f"{PKG}.config."))]
    assert not bad, "dist_llm/config imports nothing of ours but itself:\n  " + "\n  ".join(bad)


# The layers of docs/architecture.md, top to bottom: a package imports only from layers below its
# own (and from itself). A new package goes into this list and into that page's map.
LAYERS: List[Set[str]] = [
    {"cli"},
    {"serve", "compress", "submit"},
    {"evaluation"},
    {"train"},
    {"checkpoint", "prepare"},
    {"parallel"},
    {"interop"},
    {"models", "data", "launch", "observability", "planner"},
    {"config"},
    {"fileio"},
]


def _layer(module: str) -> Optional[int]:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the dist_llm package itself
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), -1)


def test_every_package_has_a_layer() -> None:
    edges, _ = _graph()
    missing = sorted({m.split(".")[1] for m in edges if _layer(m) == -1})
    assert not missing, f"packages not in LAYERS (and docs/architecture.md): {missing}"


def test_packages_import_only_lower_layers() -> None:
    edges, _ = _graph()
    bad = [f"{m} imports {t}" for m in sorted(edges) for t in sorted(edges[m])
           if _layer(m) is not None and _layer(t) is not None and m.split(".")[1] != t.split(".")[1]
           and _layer(t) <= _layer(m)]
    assert not bad, "imports that go up or sideways in docs/architecture.md's layers:\n  " + "\n  ".join(bad)
