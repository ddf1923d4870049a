"""The layers hold: kernels <- models <- export <- runtime <- bench (each may import only those to its left,
function-level imports included), no import cycle among the product's modules, and no module imports one of
a higher layer. Read from the sources (ast), so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "models", "export", "runtime", "bench")  # a module may import its own layer and lower ones
ROOT_MODULES = {"log"}  # flf2v.log: below every layer


def _targets(node: ast.AST, layer: str) -> list[str]:
    """The flf2v modules ("layer.name") an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name.removeprefix("flf2v.") for a in node.names if a.name.startswith("flf2v.")]
    elif isinstance(node, ast.ImportFrom) and node.level:
        base = layer if node.level == 1 else ""
        names = [f"{base}.{node.module}" if node.module else f"{base}.{a.name}" for a in node.names]
        names = [n.lstrip(".") for n in names]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flf2v"):
        mod = node.module.removeprefix("flf2v").lstrip(".")
        names = [mod] if "." in mod else [f"{mod}.{a.name}" if mod else a.name for a in node.names]
    else:
        return []
    return [".".join(n.split(".")[:2]) for n in names]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            mod = f"{layer}.{path.stem}"
            graph[mod] = {t for n in ast.walk(ast.parse(path.read_text())) for t in _targets(n, layer)} - {mod}
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_sees_imports():
    # the test's own reader, checked on known edges (a reader that saw nothing would pass everything below)
    g = import_graph()
    assert "models.keymaps" in g["models.lora"], g["models.lora"]
    assert "runtime.engine_backend" in g["runtime.ort_backend"], g["runtime.ort_backend"]
    assert "export.manifest" in g["runtime.engine_folders"], g["runtime.engine_folders"]
    assert "runtime.pipeline" in g["bench.runners"] or any(t.startswith("runtime.") for t in g["bench.runners"])


def test_no_module_imports_a_higher_layer():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    up = [f"{m} -> {t}" for m, ts in import_graph().items() for t in sorted(ts)
          if t.split(".")[0] not in ROOT_MODULES and rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not up, f"{len(up)} imports of a higher layer ({' < '.join(LAYERS)}): {up}"


def test_no_import_cycles():
    graph = import_graph()
    cycles = {" -> ".join(c) for m in graph if (c := _cycle_from(graph, m))}
    assert not cycles, f"{len(cycles)} import cycles: {sorted(cycles)[:10]}"
