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


# ---------------------------------------------------------------- what a process that does not train loads
# Every `python run.py` pays its imports before anything else; torch and transformers' model code are seconds of CPU.
# A module set to None in sys.modules makes importing it fail: each test blocks what its path must not need.


def test_a_finished_runs_rerun_checks_its_data_without_torch(tmp_path, monkeypatch):
    import sys

    from mlm import rundir
    from tests.conftest import TINY_RUN, compose

    monkeypatch.setitem(sys.modules, "mlm.checkpoint", None)  # -> mlm.parallel -> torch.distributed
    cfg = compose([*TINY_RUN, f"dataset.path={tmp_path / 'c.txt'}"])
    assert rundir.check_same_data(tmp_path, cfg, {"data": None}) is None  # a finished run: nothing to resume
    cfg.resume = "auto"
    try:
        rundir.check_same_data(tmp_path, cfg, None)  # an unfinished one looks for a checkpoint to resume
    except ImportError:
        pass
    else:
        raise AssertionError("the resume path no longer reads checkpoints: this test blocks the wrong module")


def test_the_usual_attention_backends_are_checked_without_loading_transformers_models(monkeypatch):
    import sys

    import pytest

    from mlm.config import check_attn_implementation

    monkeypatch.setitem(sys.modules, "transformers.modeling_utils", None)
    check_attn_implementation("sdpa")
    check_attn_implementation("eager")
    with pytest.raises(ImportError):  # any other name asks transformers
        check_attn_implementation("flex_attention")


def test_the_summary_loads_the_final_model_only_to_fill_in_probe_sentences(tmp_path):
    import pytest

    from mlm.cli import summary_text
    from mlm.config import UserError
    from tests.conftest import TINY_RUN, compose

    (tmp_path / "final").mkdir()  # no model in it: loading it would fail
    results = {"perplexity": 9.0, "perplexity_before": 10.0, "steps": 4, "train_seconds": 1.0, "tokens_per_s": 1.0}
    text = summary_text(compose([*TINY_RUN, "trainer.probe_sentences=[]"]), tmp_path, results)
    assert f"model: {tmp_path / 'final'}  (python -m mlm.predict" in text.splitlines()[-1]
    with pytest.raises(UserError, match="has no tokenizer files"):  # trainer=debug has a probe sentence: it loads
        summary_text(compose(TINY_RUN), tmp_path, results)


def test_a_bad_setting_is_refused_before_the_training_code_is_loaded(tmp_path, monkeypatch, capsys):
    """run_job, as Hydra calls it for `python run.py trainer.per_device_batch_size=0`: one line, exit 2, and
    mlm.train (torch, transformers' models, datasets: seconds of imports) never imported."""
    import sys

    import pytest
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mlm.cli import register, run_job
    from mlm.config import CONF
    from mlm.job import Rendezvous

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            "config", ["model=tiny", "trainer=debug", "trainer.per_device_batch_size=0"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    monkeypatch.setitem(sys.modules, "mlm.train", None)
    with pytest.raises(SystemExit) as stopped:
        run_job(cfg, Rendezvous())
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: trainer.per_device_batch_size=0 must be at least 1\n"


def test_libraries_do_not_import_upward():
    """python -m mlm.downstream composes its settings through mlm.overrides, not mlm.cli (which imports
    mlm.downstream); mlm.flops finds the cache dir in mlm.files, not in the data-cache module."""
    graph = import_graph()
    downstream = {m: graph[m] for m in graph if m.startswith("mlm.downstream")}
    assert "mlm.downstream.__main__" in downstream and all("mlm.cli" not in found for found in downstream.values())
    assert not {m for m in graph["mlm.flops"] if m.startswith("mlm.data")}
