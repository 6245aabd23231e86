"""The wheel holds the whole package: every module of mlm/, subpackages included, and imports
from an install that is not this checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds, offline, from a copy of what the build reads (so no build/ or *.egg-info
    lands in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mlm", src / "mlm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_has_every_module_of_the_package(wheel):
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mlm").rglob("*.py") if "__pycache__" not in p.parts}
    assert {"mlm/data/__init__.py", "mlm/data/blocks.py", "mlm/schedules.py", "mlm/mask_preview.py"} <= modules
    missing = modules - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"not in {wheel.name}: {sorted(missing)}"


@pytest.mark.slow
def test_an_install_of_the_wheel_imports_the_data_package_and_the_loop(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"  # elsewhere: no mlm/ beside the interpreter's cwd
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import json, mlm.data, mlm.train; print(json.dumps({m.__name__: m.__file__ for m in (mlm.data, mlm.train)}))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}  # the install alone: this checkout is not on the path
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(path.startswith(str(target)) for path in files.values()), files  # not an editable install's checkout


def make(clone, *args):
    proc = subprocess.run(["make", "-s", *args], cwd=clone, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_make_setup_follows_the_torch_spec_and_make_clean_keeps_the_runs(tmp_path):
    """Dry runs (-n) of the Makefile in a checkout-like folder: nothing is installed."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    _, plan = make(tmp_path, "-n", "setup")
    stamp = tmp_path / plan.split("> ")[-1].strip()  # the set-up's last command writes its stamp
    assert "pip install --quiet torch==2.13.0" in plan and "pip uninstall" not in plan  # a first set-up
    stamp.parent.mkdir()
    stamp.write_text("torch==2.13.0\n")  # as that set-up leaves it
    assert make(tmp_path, "-n", "setup") == (0, "")
    cuda = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    _, plan = make(tmp_path, "-n", "setup", f"TORCH_SPEC={cuda}")
    assert (
        "pip uninstall --quiet --yes torch" in plan and f"pip install --quiet {cuda}\n" in plan
    )  # pip would keep 2.13.0+cpu
    assert plan.index("rm -f .venv/.installed*") < plan.index("pip uninstall")  # a failed install leaves no stamp
    stamp.unlink()
    cuda_stamp = tmp_path / plan.split("> ")[-1].strip()
    cuda_stamp.write_text(cuda + "\n")  # after that CUDA set-up, the targets that leave TORCH_SPEC alone keep its torch
    for target in ("train", "test", "gpu-check"):
        code, plan = make(tmp_path, "-n", target)
        assert code == 0 and "pip" not in plan.replace("-m pytest", ""), plan
    assert make(tmp_path, "-n", "setup") == (0, "")
    cuda_stamp.unlink()
    (tmp_path / ".venv" / ".installed").touch()  # an older checkout's stamp: set up with the default spec
    code, plan = make(tmp_path, "-n", "train")
    assert code == 0 and "pip" not in plan and "run.py" in plan

    run = tmp_path / "outputs" / "runs" / "r"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    for cache in (".pytest_cache", "mlm/__pycache__"):
        (tmp_path / cache).mkdir(parents=True)
    assert make(tmp_path, "clean")[0] == 0
    assert (
        (run / "results.json").exists()
        and not (tmp_path / ".pytest_cache").exists()
        and not (tmp_path / "mlm" / "__pycache__").exists()
    )
    code, said = make(tmp_path, "clean-outputs")
    assert code == 2 and "make clean-outputs CONFIRM=1" in said and (run / "results.json").exists()
    assert make(tmp_path, "clean-outputs", "CONFIRM=1")[0] == 0 and not (tmp_path / "outputs").exists()


def test_exported_models_are_not_tracked_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert (
        subprocess.run(["git", "check-ignore", "-q", "exported/step-500/model.safetensors"], cwd=ROOT).returncode == 0
    )  # docs/export.md's folder
