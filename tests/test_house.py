"""The shape of the house (docs: README's layout): cut/ is the paper in PyTorch, pipeline/ is the
data's journey, jobs/ wires the two; no package reaches up into jobs/ or across into the other, and
no module imports a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cut", "pipeline", "jobs")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The house's modules ``path`` imports at module level or inside functions (``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if name in known:
                    found.add(name)
                elif node.module in known:
                    found.add(node.module)
    return found


GRAPH = {name: imports(path, modules()) - {name} for name, path in modules().items()}


@pytest.mark.parametrize(("low", "high"), [("cut", "jobs"), ("pipeline", "jobs"), ("cut", "pipeline"),
                                           ("pipeline", "cut")])
def test_no_arrow_from_a_package_up_into_jobs_or_across(low, high):
    arrows = [(a, b) for a, targets in GRAPH.items() for b in targets
              if a.split(".")[0] == low and b.split(".")[0] == high]
    assert not arrows, arrows


def test_no_import_circle():
    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for c in map(circle_from, GRAPH) if c]
    assert not circles, circles


def test_no_function_named_like_a_test_outside_tests():
    named = [f"{path.relative_to(ROOT)}:{node.name}" for path in modules().values()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")]
    assert not named, named
