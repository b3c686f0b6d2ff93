"""The house rules of docs/architecture.md, checked by walking the package's imports.

- no import circles between netanatomy's modules (module-level imports);
- only ``netanatomy.io`` opens a weights file, and nobody outside it imports a private
  ``io`` name;
- the papers' experiments live in ``netanatomy.experiments`` and nowhere else;
- the floors point one way: nothing below the capability floor imports the report or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "netanatomy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool) -> set[str]:
    """netanatomy modules that ``module`` imports (``from pkg import sub`` counts ``pkg.sub``)."""
    path, tree = MODULES[module]
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under module-level if/try still run at import time
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes += [n for top in tree.body if isinstance(top, ast.ClassDef) for n in top.body]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("netanatomy"))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            if not target.startswith("netanatomy"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(module)
    return {m for m in found if m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for m in MODULES:
        deps = _imports(m, top_level_only)
        # a package's own __init__ importing its submodules is how packages re-export
        graph[m] = {d for d in deps if not d.startswith(m + ".")}
    return graph


def test_the_walker_sees_the_package():
    assert "netanatomy.io" in MODULES and "netanatomy.model" in MODULES
    assert "netanatomy.model" in _imports("netanatomy.io", top_level_only=True)


def test_no_import_circles():
    cycle = _cycle(_graph(top_level_only=False))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_OPENERS = {
    ("torch", "load"),
    ("onnx", "load"),
    ("onnx", "load_model"),
    ("np", "load"),
    ("numpy", "load"),
    ("safetensors", "safe_open"),
}
_OPENER_NAMES = {"safe_open", "load_file", "safe_load_file"}


def _opens_weights(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                if (fn.value.id, fn.attr) in _OPENERS or fn.attr in _OPENER_NAMES:
                    lines.append(node.lineno)
            elif isinstance(fn, ast.Name) and fn.id in _OPENER_NAMES:
                lines.append(node.lineno)
    return lines


def test_only_io_opens_weights_files():
    offenders = []
    for m, (path, tree) in MODULES.items():
        if m == "netanatomy.io" or m.startswith("netanatomy.io."):
            continue
        for line in _opens_weights(tree):
            offenders.append(f"{path.relative_to(PKG.parent)}:{line}")
    assert not offenders, "weights opened outside io/: " + ", ".join(offenders)


def test_weights_opener_check_can_fail():
    tree = ast.parse("import torch\nx = torch.load('a.pt', weights_only=True)\n")
    assert _opens_weights(tree) == [2]


def test_no_private_io_names_outside_io():
    offenders = []
    for m, (path, tree) in MODULES.items():
        if m == "netanatomy.io" or m.startswith("netanatomy.io."):
            continue
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(m, is_pkg, node)
                names = [target + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["netanatomy", "io"] and any(p.startswith("_") for p in parts[2:]):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {name}")
    assert not offenders, "private io names used outside io/: " + ", ".join(offenders)


def test_experiments_live_in_experiments():
    stray = [
        m for m in MODULES
        if "experiment" in m.rsplit(".", 1)[-1]
        and not m.startswith(("netanatomy.experiments", "netanatomy.cli."))  # cli/experiment.py holds their commands
    ]
    assert not stray, f"experiment modules outside netanatomy/experiments/: {stray}"
    assert "netanatomy.experiments" in MODULES


@pytest.mark.parametrize(
    "lower",
    ["netanatomy.errors", "netanatomy._util", "netanatomy.model", "netanatomy.io",
     "netanatomy.analysis"],
)
def test_lower_floors_do_not_import_upper_ones(lower):
    upper = ("netanatomy.report", "netanatomy.cli", "netanatomy.experiments")
    own = [m for m in MODULES if m == lower or m.startswith(lower + ".")]
    bad = sorted(
        f"{m} -> {d}" for m in own for d in _imports(m, top_level_only=False) if d.startswith(upper)
    )
    assert not bad, "upward imports: " + ", ".join(bad)


def test_capabilities_do_not_import_experiments_or_cli():
    caps = ("spectral", "banding", "branches", "dynamics", "zoo", "synthesis", "stats")
    bad = []
    for m in MODULES:
        if m.split(".")[1:2] and m.split(".")[1] in caps:
            bad += [
                f"{m} -> {d}"
                for d in _imports(m, top_level_only=False)
                if d.startswith(("netanatomy.experiments", "netanatomy.cli"))
            ]
    assert not bad, "capability packages import experiments or the CLI: " + ", ".join(sorted(bad))
