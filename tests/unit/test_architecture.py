"""The import rules of docs/architecture.md, read from the source: no import cycle inside bigmodel/, packages import
only their own layer and the layers below it, and the few hard rules (a plain model, a config that needs nothing
above it, checkpoints that never know an engine). Every import counts, inside functions and TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bigmodel"

# Lowest first; a package may import its own layer and any layer below (docs/architecture.md, "Packages").
LAYERS = (
    ("config",),
    ("models", "losses", "data", "optim"),
    ("parallel",),
    ("checkpoint",),
    ("engines",),
    ("train", "hf", "finetune", "launch"),
    ("tools", "eval"),
    ("bench",),
    ("cli",),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str) -> set[str]:
    """Every module `path` (module `name`) imports, absolute names, bigmodel's and others'."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """bigmodel module -> the bigmodel modules it imports (a `from pkg import name` counts pkg and pkg.name)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported(path, name) if m in paths and m != name} for name, path in paths.items()}


def package_of(module: str) -> str:
    """The top-level part a module belongs to; entry points (`__main__`) belong with the command line."""
    return "cli" if module.endswith(".__main__") else module.split(".")[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_inside_bigmodel():
    assert cycles(import_graph()) == []


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in import_graph() if m != "bigmodel"}
    assert packages <= set(LAYER), f"packages without a layer in LAYERS: {sorted(packages - set(LAYER))}"


def test_packages_import_only_their_layer_and_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module != "bigmodel"
        for target in targets
        if target != "bigmodel" and LAYER[package_of(target)] > LAYER[package_of(module)]
    ]
    assert upward == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("models", ("torch.distributed", "bigmodel.engines", "bigmodel.parallel")),
        ("config", ("torch.distributed", "bigmodel.engines", "bigmodel.parallel")),
        ("checkpoint", ("bigmodel.engines",)),
    ],
)
def test_hard_rules(package, forbidden):
    broken = [
        f"{module_name(path)} imports {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in sorted(imported(path, module_name(path)))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert broken == []


def test_the_checks_see_a_cycle_and_an_upward_arrow():
    """The rules above are only worth something if they can fail: a made-up graph with both."""
    graph = {"bigmodel.config.a": {"bigmodel.engines.b"}, "bigmodel.engines.b": {"bigmodel.config.a"}}
    assert cycles(graph) == [["bigmodel.config.a", "bigmodel.engines.b"]]
    assert LAYER[package_of("bigmodel.engines.b")] > LAYER[package_of("bigmodel.config.a")]
    assert package_of("bigmodel.train.__main__") == "cli"
