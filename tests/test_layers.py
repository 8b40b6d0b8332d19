"""The layer order of docs/ARCHITECTURE.md holds: no module imports a higher layer, and imports form no cycle.

Every ``import``/``from ... import`` of a privml module counts, including those inside functions (a lazy
import is still a dependency). The layer table is parsed from docs/ARCHITECTURE.md, so the page and the
code cannot drift apart: a new top-level module or package must be given a layer there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "privml"


def _layers() -> dict[str, int]:
    """{'privml.tensor': 1, ...} from the page's table rows '| N | `privml.x`, `privml.y` | ... |'."""
    table = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`(privml[\w.]*)`", m.group(2)):
                table[name] = int(m.group(1))
    return table


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("privml"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("privml"):
                base_dir = ROOT.joinpath(*mod.split("."))
                for a in node.names:  # `from privml import errors` imports the submodule, not the package API
                    sub = base_dir / a.name
                    found.add(f"{mod}.{a.name}" if sub.is_dir() or sub.with_suffix(".py").exists() else mod)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    best = None
    for prefix, layer in layers.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    assert layers, "docs/ARCHITECTURE.md has no layer table"
    missing = sorted(m for m in _graph() if m != "privml" and _layer_of(m, layers) is None)
    assert not missing, f"give these modules a layer in docs/ARCHITECTURE.md: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    layers = _layers()
    bad = []
    for module, deps in _graph().items():
        if module == "privml":
            continue  # the public API re-exports from every layer
        own = _layer_of(module, layers)
        for dep in deps:
            if dep == "privml":  # the public API: only the top layer (the CLI) may use it
                if own is not None and own < max(layers.values()):
                    bad.append(f"{module} (layer {own}) imports the top-level privml package")
                continue
            layer = _layer_of(dep, layers)
            if layer is not None and own is not None and layer > own:
                bad.append(f"{module} (layer {own}) imports {dep} (layer {layer})")
    assert not bad, "\n".join(sorted(bad))


def test_imports_have_no_cycle() -> None:
    graph = {m: {d for d in deps if d != "privml"} for m, deps in _graph().items() if m != "privml"}
    # a package's __init__ importing its own submodules is not a cycle of responsibilities
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """Positive control: a lazy import of a higher layer inside a lower module is found and ranked higher."""
    layers = _layers()
    fake = tmp_path / "base.py"
    fake.write_text("def f():\n    from privml.compiler.api import compile\n    from . import ops\n")
    deps = _imports(fake, "privml.tensor.base")
    assert {"privml.compiler.api", "privml.tensor.ops"} <= deps
    assert _layer_of("privml.compiler.api", layers) > _layer_of("privml.tensor.base", layers)
