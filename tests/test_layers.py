"""The package's layers: imports only point down, and no two modules import each other (directly or round a loop).

The order is written once, here (the README's layout section draws it). A package may import its own modules and
any package on a lower floor; same-floor packages never import one another. Imports under ``if TYPE_CHECKING``
count too: a type-only dependency still ties the layers together.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignkit"

# floor -> packages on it (the first entry is the ground)
LAYERS: list[tuple[str, ...]] = [
    ("core", "model_configs"),
    ("metrics", "encoders"),
    ("losses", "features"),
    ("data",),
    ("modules", "eval"),
    ("callbacks",),
    ("run",),
    ("tools",),
    ("cli",),
    ("__main__",),
]
FLOOR = {pkg: i for i, floor in enumerate(LAYERS) for pkg in floor}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """Every alignkit module ``path`` imports (absolute or relative, at any depth in the file), with its line."""
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "alignkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "alignkit":
                continue
            # `from alignkit.x import y` may name a submodule y: count it as the dependency when it is one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                where = root.parent / Path(*sub.split("."))
                is_module = where.with_suffix(".py").is_file() or where.is_dir()
                found.append((sub if is_module else target, node.lineno))
    return found


def _graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p, root): _imports(p, root) for p in sorted(root.rglob("*.py"))}


def _floor_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        here = _floor_package(mod)
        for dep, line in deps:
            there = _floor_package(dep)
            if not there or there == here:
                continue
            if FLOOR[there] >= FLOOR[here]:
                bad.append(
                    f"{mod}:{line} imports {dep} ({here} on floor {FLOOR[here]}, {there} on {FLOOR[there]})"
                )
    return sorted(set(bad))


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules in a loop."""
    edges = defaultdict(set)
    for mod, deps in graph.items():
        for dep, _ in deps:
            # `import alignkit.a.b` loads alignkit.a too; a package's __init__ is not a dependency of its own modules
            if dep in graph and dep != mod and not mod.startswith(dep + "."):
                edges[mod].add(dep)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_floor():
    packages = {_floor_package(m) for m in _graph()} - {""}
    assert packages <= set(FLOOR), f"add {sorted(packages - set(FLOOR))} to LAYERS in tests/test_layers.py"


def test_imports_only_point_down():
    bad = _upward_imports(_graph())
    assert not bad, "imports that point up or sideways a floor:\n" + "\n".join(bad)


def test_no_import_cycles():
    loops = _cycles(_graph())
    assert not loops, f"modules that import each other: {loops}"


def test_core_imports_nothing_else_from_alignkit():
    graph = _graph()
    outside = [
        f"{m} imports {d}" for m, deps in graph.items() if _floor_package(m) == "core" for d, _ in deps
        if _floor_package(d) != "core"
    ]  # fmt: skip
    assert not outside, outside


# The checker itself, on a made-up package: it must see what the real tree does not have.
def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "alignkit"
    for pkg in ("core", "losses", "run"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "run" / "dist.py").write_text("X = 1\n")
    (root / "losses" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from alignkit.run.dist import X\nfrom . import b\n"
    )
    (root / "losses" / "b.py").write_text("import alignkit.losses.a\n")
    (root / "core" / "c.py").write_text("from ..losses import b\n")
    graph = _graph(root)
    up = _upward_imports(graph)
    assert any(u.startswith("alignkit.losses.a:3 imports alignkit.run.dist ") for u in up), up
    assert any(u.startswith("alignkit.core.c:1 imports alignkit.losses.b ") for u in up), up
    assert len(up) == 2, up
    assert _cycles(graph) == [["alignkit.losses.a", "alignkit.losses.b"]]
