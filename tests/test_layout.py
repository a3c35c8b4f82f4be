"""The package layout holds: ktjax's import graph (every import, lazy ones inside functions too) has no circle,
and no module imports from a floor above its own. docs/design.md ("Code map") names the same floors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ktjax"

# Floors, lowest first: a module may import from its own floor and the floors below it.
FLOORS = (
    ("ktjax.errors", "ktjax.util"),                      # errors and small helpers
    ("ktjax.kv",),                                       # the latent cache and its XLA attention (the references)
    ("ktjax.model",),                                    # the math: config, layers, MLA, MoE, decoder
    ("ktjax.weights", "ktjax.pallas", "ktjax.cpu"),      # weights on disk and in memory; the kernel backends
    ("ktjax.runtime",),                                  # the backend door, engine, settings, planning, sampling
    ("ktjax.serve", "ktjax.demo"),                       # HTTP serving; the demo model
    ("ktjax",),                                          # the public face: load, Engine, KtjaxError
    ("ktjax.cli", "ktjax.generate", "ktjax.convert", "ktjax.train", "ktjax.serve.__main__"),  # commands
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ktjax modules that `name` imports anywhere in its file (absolute or relative, at any depth)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def floor_of(name: str) -> int:
    """The floor of the longest prefix of `name` that FLOORS lists."""
    best, floor = -1, None
    for i, names in enumerate(FLOORS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    assert floor is not None, f"{name} is on no floor: add it to FLOORS (and to docs/design.md's code map)"
    return floor


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_floor(graph):
    for name in graph:
        floor_of(name)


def test_no_import_from_a_higher_floor(graph):
    upward = sorted(f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
                    for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a))
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    """Tarjan's strongly connected components: any component of more than one module is a circle."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_scanner_sees_lazy_and_relative_imports(tmp_path):
    """The graph is only as good as the scanner: a function-level relative import is seen."""
    pkg = tmp_path / "ktjax" / "kv"
    pkg.mkdir(parents=True)
    src = pkg / "cache.py"
    src.write_text("def f():\n    from ..cpu import kernels\n    from . import formats\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = imports_of("ktjax.kv.cache", src, {"ktjax.cpu.kernels", "ktjax.kv.formats", "ktjax.cpu"})
    finally:
        ROOT = saved
    assert found == {"ktjax.cpu.kernels", "ktjax.kv.formats"}


def test_the_server_uses_only_public_engine_api():
    """serve/ drives the Engine through its public names (as vLLM's server drives its engine), never `engine._x`:
    the Engine may change its insides without breaking the server."""
    private = []
    for path in sorted((PACKAGE / "serve").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "engine":
                    private.append(f"{path.relative_to(ROOT)}:{node.lineno} engine.{node.attr}")
    assert not private, private
