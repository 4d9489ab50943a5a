"""The package's imports point one way: no cycles, and nothing the model is built from
reaches the engine, the CLI or the worker machinery (ast over the package's own files)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokenspeed"
# what model code (layers/, models/) and the TP group must never reach, even indirectly
ABOVE_THE_MODEL = {"tokenspeed.engine", "tokenspeed.cli", "tokenspeed.parallel.workers",
                   "tokenspeed.parallel.dp", "tokenspeed.shard", "tokenspeed.session"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (any import statement, at any depth)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from .x import y` may name a submodule y or a name in x
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges = {module_name(f): imports_of(f, modules) for f in files}
    # importing a.b runs a/__init__.py first, unless the importer is inside package a
    for name, targets in edges.items():
        own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        for t in list(targets):
            parts = t.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts))} - own
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_import_cycles():
    edges = graph()
    cycles = sorted(name for name in edges if name in reachable(edges, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_model_code_never_reaches_the_engine():
    edges = graph()
    low = [n for n in edges if n.startswith(("tokenspeed.layers", "tokenspeed.models"))]
    low.append("tokenspeed.parallel.group")
    for name in low:
        bad = reachable(edges, name) & ABOVE_THE_MODEL
        assert not bad, f"{name} reaches {sorted(bad)}"


def test_the_walk_sees_real_edges():
    """Guard against a walk that finds nothing: known edges must be there."""
    edges = graph()
    assert "tokenspeed.parallel.group" in edges["tokenspeed.layers.linear"]
    assert "tokenspeed.shard" in edges["tokenspeed.engine"]
    assert "tokenspeed.parallel" in edges["tokenspeed.parallel.workers"] or \
        "tokenspeed.parallel.launch" in edges["tokenspeed.parallel.workers"]
