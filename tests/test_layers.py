"""Layers look down only, and no module imports itself round a cycle: checked on the source, every import
(late ones inside functions included for layers; module-level ones for cycles)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).parent.parent
#: What each package may import of the project: itself and the layers below it.
ALLOWED = {"broker": {"broker"}, "gateway": {"broker", "gateway"}, "workers": {"broker", "workers"},
           "redserve": {"broker", "gateway", "workers", "redserve", "ui"}}


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, *, module_level: bool) -> set[str]:
    """The modules ``path`` imports (``from package import module`` counts as the module, not the package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    known = modules()
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return out



def test_layers_look_down_only():
    wrong = []
    for name, path in modules().items():
        package = name.split(".")[0]
        for imported in imports(path, module_level=False):
            top = imported.split(".")[0]
            if top in ALLOWED and top not in ALLOWED[package]:
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_no_import_cycles():
    mods = modules()
    graph = {name: {m for m in imports(path, module_level=True) if m in mods and m != name}
             for name, path in mods.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
