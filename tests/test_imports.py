"""The direction of imports (DESIGN 2), read from the source with `ast`, not by importing it:
`paradyse -> planners -> cost_models`, `paradyse -> parallel_lib`, `integrations -> paradyse`;
nothing below `paradyse` imports it; `planners` and `cost_models` import no torch at package
import (only the cost-model profiler, its timing and start-up check, and the validator touch
torch and parallel_lib); nothing imports `integrations` except through configuration
(importlib); no circles."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import REPO_ROOT

PACKAGES = ("paradyse", "parallel_lib", "cost_models", "planners", "integrations")
MAY_IMPORT = {
    "parallel_lib": set(),
    "cost_models": {"parallel_lib"},  # the measuring modules only (MEASURING)
    "planners": {"cost_models"},
    "paradyse": {"parallel_lib", "cost_models", "planners"},
    "integrations": {"paradyse", "parallel_lib", "cost_models", "planners"},
}
MEASURING = {
    "cost_models.profile",
    "cost_models.profile_check",
    "cost_models.profile_calibration",
    "cost_models.timing",
    "cost_models.validate",
    "cost_models.validate_cells",
    "cost_models.validate_groups",
}
"""The modules of cost_models that measure this machine: they may import torch and parallel_lib."""
PURE = ("cost_models", "planners")


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module, dotted."""
    target: str
    """The imported module, dotted and absolute."""
    top_level: bool
    """At module level (runs on import), not inside a function or class body."""
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # `from pkg import name` may import the submodule pkg.name: both count
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports_of(root: Path) -> list[Import]:
    """Every import statement of the packages under `root`, with where it runs."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            is_package = path.name == "__init__.py"
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            top = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = _resolve(module, is_package, node)
                else:
                    continue
                for target in targets:
                    found.append(Import(module, target, id(node) in top, node.lineno))
    return found


def _package(name: str) -> str:
    return name.split(".")[0]


def violations(root: Path) -> list[str]:
    """Every import against DESIGN 2's rules, one line each."""
    imports = imports_of(root)
    known = {i.module for i in imports}
    bad = []
    for imp in imports:
        source, target = _package(imp.module), _package(imp.target)
        where = f"{imp.module}:{imp.line} imports {imp.target}"
        if target in PACKAGES and target != source and target not in MAY_IMPORT[source]:
            bad.append(f"{where}: {source} may not import {target}")
        if source == "cost_models" and target == "parallel_lib" and imp.module not in MEASURING:
            bad.append(f"{where}: only {sorted(MEASURING)} may import parallel_lib")
        if source in PURE and target == "torch" and imp.module not in MEASURING:
            bad.append(f"{where}: {source} is pure Python (torch only in {sorted(MEASURING)})")
    bad += _package_import_closure(imports, known)
    bad += _circles(imports, known)
    return bad


def _package_import_closure(imports: list[Import], known: set[str]) -> list[str]:
    """`import cost_models` / `import planners` must not pull torch in through any module-level
    import chain."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.top_level:
            edges.setdefault(imp.module, set()).add(imp.target)
    bad = []
    for package in PURE:
        seen, todo = set(), [package]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            for target in edges.get(module, ()):
                if _package(target) == "torch":
                    bad.append(f"`import {package}` reaches torch through {module}")
                elif target in known:
                    todo.append(target)
    return bad


def _circles(imports: list[Import], known: set[str]) -> list[str]:
    """Module-level imports between the project's modules form no cycle, and neither do the
    packages' imports of each other (lazy ones included)."""
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for imp in imports:
        source, target = _package(imp.module), _package(imp.target)
        if target in PACKAGES and target != source:
            packages.setdefault(source, set()).add(target)
        if imp.top_level and imp.target in known and imp.target != imp.module:
            modules.setdefault(imp.module, set()).add(imp.target)
    return [f"import circle: {' -> '.join(c)}" for c in (_cycle(packages), _cycle(modules)) if c]


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path that ends where it starts, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_project_imports_in_one_direction() -> None:
    bad = violations(Path(REPO_ROOT))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("where", "code", "words"),
    [
        ("parallel_lib/ops.py", "def f():\n    import paradyse\n", "may not import paradyse"),
        ("planners/units.py", "from paradyse.layer import x\n", "may not import paradyse"),
        ("cost_models/counts.py", "import torch\n", "pure Python"),
        ("cost_models/static.py", "def f():\n    import torch\n", "pure Python"),
        ("cost_models/counts.py", "from parallel_lib import x\n", "may import parallel_lib"),
        ("paradyse/engine.py", "import integrations.grass\n", "may not import integrations"),
        ("parallel_lib/groups.py", "from .comm import all_reduce_\n", "import circle"),
    ],
)
def test_the_walk_finds_a_wrong_import(tmp_path, where: str, code: str, words: str) -> None:
    """The checker on a copy of the tree with one bad import added: it must say so."""
    for package in PACKAGES:
        for path in (Path(REPO_ROOT) / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(REPO_ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    target = tmp_path / where
    target.write_text(target.read_text(encoding="utf-8") + "\n" + code, encoding="utf-8")
    found = violations(tmp_path)
    assert any(words in line for line in found), found
