"""The layout of the house, read from the source: which room may import which, and no import circles.

The lower rooms (model, flow, codecs, checkpoint, data, inference, parallel) serve every recipe, so
they import nothing from the rooms above them (recipes, lora, plan, eval), not even inside a
function; model, flow, codecs and inference import no Lightning (the DataModule and the checkpoint
IO plugin are Lightning by nature). Every `import` statement counts, function-level ones included,
and importing `a.b.c` also runs the packages `a.b` and `a` (their __init__), so those count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "magitrain"
LOWER = ("model", "flow", "codecs", "checkpoint", "data", "inference", "parallel")
UPPER = ("recipes", "lora", "plan", "eval")
NO_LIGHTNING = ("model", "flow", "codecs", "inference")
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its __init__)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute name, line) of everything `module` imports, anywhere in its source; a `from X import
    y` names X.y when that is a module, else X."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def edges() -> dict[str, set[tuple[str, int]]]:
    """{module: {(magitrain module it runs by importing, line)}}, packages' __init__ included;
    also {(lightning, line)} for a Lightning import."""
    files = module_files()
    graph = {m: set() for m in files}
    for module, path in files.items():
        for name, line in imported_names(module, path):
            root = name.split(".")[0]
            if root in LIGHTNING:
                graph[module].add((root, line))
            if root != "magitrain":
                continue
            while name not in files:  # `from magitrain.x import some_function`
                name = name.rpartition(".")[0]
            # importing a.b.c runs a.b's __init__ too, unless `module` is inside a.b (already running)
            parts = name.split(".")
            for n in range(2, len(parts) + 1):
                target = ".".join(parts[:n])
                if not module.startswith(target + ".") and target != module:
                    graph[module].add((target, line))
    return graph


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def route(graph: dict[str, set[str]], start: str, bad) -> list[str] | None:
    """The shortest import chain from `start` to a name `bad` accepts (breadth first), or None."""
    parent, queue = {start: None}, [start]
    for v in queue:
        for w in sorted(graph.get(v, ())):
            if w in parent:
                continue
            parent[w] = v
            if bad(w):
                chain = [w]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return chain[::-1]
            queue.append(w)
    return None


def forbidden_routes(rooms: tuple[str, ...], bad) -> list[str]:
    graph = {m: {t for t, _ in targets} for m, targets in edges().items()}
    routes = (route(graph, m, bad) for m in sorted(graph) if room(m) in rooms)
    return [" -> ".join(r) for r in routes if r]


def test_lower_rooms_import_nothing_from_the_rooms_above():
    """Catches checkpoint/export.py importing lora/export.py (and through lora/recipe.py the Lightning
    recipes) inside its export function: checkpoint I/O must serve any recipe. Indirect routes (through
    a top-level module such as magitrain.cli) count too."""
    found = forbidden_routes(LOWER, lambda m: room(m) in UPPER)
    assert not found, "lower rooms import upper ones:\n" + "\n".join(found)


def test_model_flow_codecs_inference_import_no_lightning():
    """Catches a Lightning import (even a lazy one, or one through another module) in the rooms that
    must run without a trainer."""
    found = forbidden_routes(NO_LIGHTNING, lambda m: m in LIGHTNING)
    assert not found, "\n".join(found)


def test_eval_metrics_import_no_lightning():
    """Catches a Lightning import in the clip metrics: `python -m magitrain.eval` scores a folder of
    clips without a trainer (its __main__ runs in magitrain.cli's `command_line`, which names
    Lightning only to route its logs, and skips that import for the eval)."""
    graph = {m: {t for t, _ in targets} for m, targets in edges().items()}
    metrics = [m for m in sorted(graph) if room(m) == "eval" and m != "magitrain.eval.__main__"]
    routes = (route(graph, m, lambda t: t in LIGHTNING) for m in metrics)
    found = [" -> ".join(r) for r in routes if r]
    assert metrics and not found, "\n".join(found)


def test_no_import_circles():
    """Catches the circles checkpoint -> inference -> lora -> recipes -> checkpoint and data decode ->
    index -> prompts -> writer -> index (function-level imports count: they only hide a circle)."""
    graph = {m: {t for t, _ in targets if t.startswith("magitrain")} for m, targets in edges().items()}
    assert not circles(graph), "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles(graph))


def test_the_graph_sees_function_level_and_relative_imports():
    """The checks above would pass vacuously if the graph missed imports: it must see a lazy import
    inside a function (recipes/module.py's to_inference_dtype), a relative one and a package's __init__."""
    graph = {m: {t for t, _ in targets} for m, targets in edges().items()}
    assert "magitrain.inference.networks" in graph["magitrain.recipes.module"]
    assert "magitrain.inference" in graph["magitrain.recipes.module"]  # the package runs first
    assert "magitrain.lora.adapters" in graph["magitrain.lora"]
    assert "lightning" in graph["magitrain.recipes.module"]
    assert "magitrain.lora" not in graph["magitrain.lora.adapters"]  # its own package runs already
