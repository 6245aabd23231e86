"""The modules of mlm/ import each other without a circle, function-local imports included.

A circle works only while some import of it stays inside a function; the test reads every import
statement with ast (nothing is imported), so a module that is imported halfway never hides one."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.conftest import ROOT

PACKAGE = ROOT / "mlm"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: Set[str], root: Path = ROOT) -> Set[str]:
    """The modules of `modules` that `path` imports anywhere in its body: `from mlm.x import y` is
    mlm.x.y when that is a module, else mlm.x; relative imports are resolved against the package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> Dict[str, Set[str]]:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, ..., a], or [] (depth-first search, in sorted order)."""
    state: Dict[str, str] = {}  # module -> "open" while on the current path, "done" after
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_sees_a_circle_through_a_function_local_import(tmp_path):
    # the shape this test was written against: masking -> optim, optim -> models in a function, models -> masking
    graph = {
        "mlm.masking": {"mlm.optim"},
        "mlm.optim": {"mlm.models"},
        "mlm.models": {"mlm.masking"},
        "mlm.config": set(),
    }
    assert find_cycle(graph) == ["mlm.masking", "mlm.optim", "mlm.models", "mlm.masking"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    module = tmp_path / "mlm" / "optim.py"
    module.parent.mkdir()
    module.write_text("import math\n\ndef f():\n    from mlm.models import build_model\n    from . import config\n")
    assert imported_modules(module, {"mlm.models", "mlm.config", "mlm"}, root=tmp_path) == {
        "mlm.models",
        "mlm.config",
        "mlm",
    }


def test_the_graph_reads_every_module_and_its_local_imports():
    graph = import_graph()
    assert {"mlm", "mlm.config", "mlm.data", "mlm.data.blocks", "mlm.masking", "mlm.train"} <= set(graph)
    assert "mlm.data.blocks" in graph["mlm.data"]  # the package's own re-exports
    assert "mlm.config" in graph["mlm.masking"]


def test_no_import_cycle_in_mlm():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_masking_library_needs_no_cli_or_plotting():
    """Its command line and plots live in mlm/mask_preview.py."""
    tree = ast.parse((PACKAGE / "masking.py").read_text())
    names = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not names & {"argparse", "matplotlib"}


def test_libraries_do_not_import_upward():
    """python -m mlm.downstream composes its settings through mlm.overrides, not mlm.cli (which imports
    mlm.downstream); mlm.flops finds the cache dir in mlm.files, not in the data-cache module."""
    graph = import_graph()
    downstream = {m: graph[m] for m in graph if m.startswith("mlm.downstream")}
    assert "mlm.downstream.__main__" in downstream and all("mlm.cli" not in found for found in downstream.values())
    assert not {m for m in graph["mlm.flops"] if m.startswith("mlm.data")}
