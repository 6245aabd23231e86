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
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
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
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = "import json, mlm.data, mlm.train; print(json.dumps({m.__name__: m.__file__ for m in (mlm.data, mlm.train)}))"
    env = {**os.environ, "PYTHONPATH": str(target)}  # the install alone: this checkout is not on the path
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(path.startswith(str(target)) for path in files.values()), files  # not an editable install's checkout
