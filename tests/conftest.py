"""Shared fixtures: the real Hydra config (composed, then shrunk), the offline tokenizer, tiny corpora."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "science star planet light water energy cell river city king war music language theory number system "
    "galaxy milky way spiral mass gravity orbit earth moon sun heat atom electron field force"
).split()


def sentences(n: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(n)]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Block caches go to a temporary directory, never the user's."""
    os.environ["MLM_CACHE"] = str(tmp_path_factory.mktemp("mlm-cache"))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    """A run trained in process with runtime.num_threads sets torch's thread count for the whole process: put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from mlm.config import ModelConfig
    from mlm.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def compose(overrides: List[str] = ()):
    """The real config from conf/, composed by Hydra with overrides, as the typed Config."""
    from mlm.overrides import compose as compose_config

    return compose_config(overrides)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """One text file of 500 generated sentences that every end-to-end run may read (never written to)."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(sentences(500)))
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(sentences(400)))
    return path


@pytest.fixture
def eli5_file(tmp_path) -> Path:
    """A jsonl file with the ELI5 (eli5_category) schema: answers is a struct of lists."""
    rng = random.Random(1)
    rows = []
    for i in range(60):
        n = rng.randint(1, 3)
        rows.append(
            {
                "q_id": f"q{i}",
                "title": f"Why does thing {i} happen?",
                "selftext": "",
                "category": "Physics",
                "subreddit": "askscience",
                "answers": {
                    "a_id": [f"a{i}_{j}" for j in range(n)],
                    "text": sentences(n, seed=i * 7 + 3),
                    "score": [rng.randint(1, 50) for _ in range(n)],
                    "text_urls": [[] for _ in range(n)],
                },
                "title_urls": [],
                "selftext_urls": [],
            }
        )
    path = tmp_path / "eli5.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


TINY_RUN = [
    "model=tiny",
    "trainer=debug",
    "experiment=none",
    "dataset=local",
    "block_size=32",
]  # a plain tiny model: no head recipe


def as_typed(args, cwd: Path = ROOT) -> str:
    """The command run_cli runs from `cwd`, as a stop line gives it back (mlm.rundir.resume_command names the Python as
    called from there: a venv inside the checkout is `.venv/bin/python`)."""
    from mlm.rundir import python_name

    with contextlib.chdir(cwd):
        return shlex.join([python_name(), str(ROOT / "run.py"), *args])


def check_settings_as_run_py(cfg, run_dir: Path) -> None:
    """The settings check run.py's guard makes before it resumes a run (UserError on a result-affecting change): for
    tests that resume in process."""
    from omegaconf import OmegaConf

    from mlm.rundir import check_resume_settings, flat_settings

    check_resume_settings(run_dir, cfg.resume, cfg.trainer.max_steps, flat_settings(OmegaConf.structured(cfg)))


def torchrun_command(port: int, *args: str, processes: int = 2) -> list:
    """`torchrun --nproc_per_node <processes> --master_port <port> run.py <args>` as an argv list."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        str(ROOT / "run.py"),
        *args,
    ]


def run_cli(
    args: List[str], cwd: Path = ROOT, env=None, timeout: int = 600, module: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python run.py ...` (or `python -m module ...`) as a user would."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "run.py")]
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets a variable
    return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_in_process(
    args: List[str], cwd: Path = ROOT, env=None, module: str | None = None
) -> subprocess.CompletedProcess:
    """run_cli's command run in this process, for a test whose point is what the command prints and its exit code:
    run.py as `python run.py` runs it (runpy, as __main__: the key check, Hydra, its callbacks, run_job, the error
    wrapper), or `module`'s main(argv) (mlm.predict, mlm.export, mlm.downstream.__main__); minus the interpreter start
    and its ~6 CPU-s of imports. What a run changes in the process is put back after: the working directory,
    os.environ, sys.argv, the logging Hydra sets up (its run.log handler closed), the signal handlers and the stop
    state of mlm.preemption, Hydra's global state, mlm.cli's launch stamps. Python's warnings are said on stderr as a
    fresh process says them (pytest would record them instead). Output written to the file descriptors themselves
    (C code) is not in the result: a test of that launches the process (run_cli)."""
    import io
    import runpy
    import traceback
    import warnings

    argv = [module, *args] if module else [str(ROOT / "run.py"), *args]
    out, err = io.StringIO(), io.StringIO()
    with _process_state_restored(), contextlib.chdir(cwd), warnings.catch_warnings(), _logging_to(out, err):
        for key, value in {"HYDRA_FULL_ERROR": "0", **(env or {})}.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)  # None unsets it
        sys.argv = argv
        _fresh_process_warnings(err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if module:
                    import importlib

                    code = exit_status(importlib.import_module(module).main(list(args)))
                else:
                    runpy.run_path(argv[0], run_name="__main__")
                    code = 0
            except SystemExit as e:
                code = exit_status(e.code)
            except Exception:  # an uncaught error: its traceback, exit code 1
                traceback.print_exc()
                code = 1
    return subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())


def exit_status(code) -> int:
    """The exit status of a process ended by SystemExit(code), as the interpreter makes it: None is 0, a message is
    said on stderr and is 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _logging_to(out, err):
    """Logging as in a fresh process, said on the command's stdout and stderr: the root logger without pytest's
    handlers (a warning goes to logging's last resort, stderr), and the handlers libraries made on this process's
    stdout or stderr (transformers') writing to the command's. Their streams are put back after."""
    import logging

    logging.getLogger().handlers = []
    logging.getLogger().setLevel(logging.WARNING)
    moved = {}
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", []):
            if type(h) is logging.StreamHandler and h.stream in (
                sys.stdout,
                sys.__stdout__,
                sys.stderr,
                sys.__stderr__,
            ):
                moved[h] = h.setStream(out if h.stream in (sys.stdout, sys.__stdout__) else err)
    try:
        yield
    finally:
        for h, stream in moved.items():
            h.setStream(stream)


def _fresh_process_warnings(err) -> None:
    """Python's default warning filters, each warning written on the command's stderr (inside catch_warnings)."""
    import warnings

    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )


@contextlib.contextmanager
def _process_state_restored():
    """Whatever a command run in this process changes of the process's global state, put back after it."""
    import logging
    import signal

    import mlm.cli
    import mlm.preemption
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    environ, argv = dict(os.environ), sys.argv
    handlers = {sig: signal.getsignal(sig) for sig in mlm.preemption.STOP_SIGNALS}
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    before = {lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled, list(lg.filters)) for lg in loggers}
    preemption = (mlm.preemption._active, mlm.preemption._sweep)
    mlm.cli._stamps.clear()  # a fresh process decides its launch stamp anew
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        mlm.cli._stamps.clear()
        mlm.preemption._active, mlm.preemption._sweep = preemption
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for lg in [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]:
            for handler in lg.handlers:
                if lg not in before or handler not in before[lg][1]:
                    handler.close()  # Hydra's run.log handler: its file closed as at a process's end
            level, lg.handlers, lg.propagate, lg.disabled, lg.filters = before.get(lg, (0, [], True, False, []))
            lg.setLevel(level)  # (and clears the loggers' cached levels)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = argv


@pytest.fixture(scope="session")
def fsdp_runs(tmp_path_factory):
    """tests/test_sharding.py's tiny run on 2 processes under torchrun, each variant trained once, on first use, for the
    FSDP2 tests of test_sharding, test_ema and test_export: `fsdp_runs["ddp"]`, `["fsdp"]`, `["fsdp_ema"]` (see
    tests.test_sharding.SharedRuns). The tests read them; a test that resumes one resumes `fsdp_runs.copy(name, to)`."""
    from tests.test_sharding import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("fsdp-runs"))


@pytest.fixture(autouse=True, scope="session")
def _cpu_peak_probed_once(_isolated_cache):
    """The CPU matmul peak (mlm.flops.cpu_peak) probed once in the session's cache and kept there as settled, at
    torch's thread count and at one thread (runtime.num_threads=1, OMP_NUM_THREADS=1, torchrun's workers), for fp32
    and the dtype `runtime.mixed_precision=auto` trains in here: every run after it, in process or not, reads it.
    Unsettled, a run probes again (about a second) whenever the 1-minute load average is over half the cores, which
    the suite's own training keeps it: measured, 0.76 s of a 1.77-s tiny run in process. (tests/test_mfu.py tests
    the probe and its cache in directories of its own.)"""
    from unittest import mock

    import torch

    from mlm import flops
    from mlm.precision import resolve_mixed_precision

    threads = torch.get_num_threads()
    dtypes = {torch.float32, flops.matmul_dtype(resolve_mixed_precision("auto"))}
    try:
        with mock.patch.object(flops, "machine_busy", lambda: False):  # settled whatever the load now
            for n in sorted({threads, 1}):
                torch.set_num_threads(n)
                for dtype in dtypes:
                    flops.cpu_peak(dtype, n)
    finally:
        torch.set_num_threads(threads)
    yield
