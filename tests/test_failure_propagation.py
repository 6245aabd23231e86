"""A failed or silent rank ends every rank of its job, whatever the backend does (mlm.job.PeerWatch)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY_RUN, compose, torchrun_command

RUN = [*TINY_RUN, "runtime.mixed_precision=no", "trainer.per_device_batch_size=2", "trainer.eval_every=1000"]


@contextlib.contextmanager
def launched(cmd: list, **kwargs):
    """Popen in a session of its own: whatever happens (a timeout too), every process of the job is killed."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_collective_timeout_must_be_positive():
    from mlm.config import UserError

    cfg = compose([*TINY_RUN, "dataset.path=x.txt", "runtime.collective_timeout_minutes=0"])
    with pytest.raises(UserError, match="runtime.collective_timeout_minutes=0"):
        cfg.validate()


def test_slurm_jobs_end_every_task_when_one_exits_with_an_error(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    from mlm.cli import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    script = _make_sbatch_string(command="python run.py", folder=tmp_path, setup=list(cfg.hydra.launcher.setup))
    lines = script.splitlines()
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert "export SLURM_KILL_BAD_EXIT=1" in lines[:srun]  # srun reads it: --kill-on-bad-exit


@pytest.mark.slow
def test_a_failure_ends_a_peer_stuck_in_a_collective_through_the_store(corpus, tmp_path):
    # Rank 1 raises after step 2 and then, as MLM_TEST_FAIL_HOLD asks, never leaves its group: its
    # sockets stay open, so rank 0's next gloo all-reduce does not end (as an NCCL one would not,
    # whatever the failed rank does); the group's own timeout (30 min) is far beyond the subprocess's.
    # Only the failure published on the job's store can end rank 0.
    cmd = torchrun_command(
        29641, *RUN, f"dataset.path={corpus}", "trainer.max_steps=1000", "runtime.collective_timeout_minutes=30"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "0",
        "MLM_TEST_FAIL": "0:1:2",
        "MLM_TEST_FAIL_HOLD": "1",
    }
    with launched(cmd, cwd=tmp_path, env=env) as proc:
        _, err = proc.communicate(timeout=400)
    assert proc.returncode != 0
    assert "error: rank 1 failed (RuntimeError: injected failure (MLM_TEST_FAIL=0:1:2))" in err, err[-3000:]
    [run] = (tmp_path / "outputs" / "runs").iterdir()
    log = (run / "run.log").read_text()  # rank 0's: its watch ended it, not its collective
    assert "rank 1 failed (RuntimeError: injected failure (MLM_TEST_FAIL=0:1:2)); ending the job" in log
    assert "this rank is stuck in a collective that does not end; exiting" in log
    error = (run / "error.txt").read_text().splitlines()
    assert error[0] == "rank 1: RuntimeError: injected failure (MLM_TEST_FAIL=0:1:2)"  # the cause first
    assert error[1].startswith("PeerFailed: rank 1 failed")
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line
    ]
    assert max(steps) <= 2 and not (run / "results.json").exists()


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no process of rank {rank}")


def wait_for_step(run_parent: Path, step: int, launcher: subprocess.Popen) -> None:
    while launcher.poll() is None:
        for metrics in run_parent.glob("*/metrics.jsonl"):
            if any(
                json.loads(line).get("step", 0) >= step
                for line in metrics.read_text().splitlines()
                if line.endswith("}")
            ):
                return
        time.sleep(0.5)
    raise AssertionError(f"the run ended before step {step}: {launcher.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_ends_the_job(corpus, tmp_path):
    # SIGSTOP: the process stays, its sockets stay open, the torchrun agent sees it alive; only its
    # heartbeat on the store stops. A timeout of 12 s: the job ends that long after the stop (the suite
    # waits for it), and no training step or collective of a tiny run on a busy machine takes that long.
    cmd = torchrun_command(
        29643, *RUN, f"dataset.path={corpus}", "trainer.max_steps=100000", "runtime.collective_timeout_minutes=0.2"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    with launched(cmd, cwd=tmp_path, env=env) as launcher:
        wait_for_step(tmp_path / "outputs" / "runs", 3, launcher)
        main, stopped = rank_process(launcher, 0), rank_process(launcher, 1)
        stopped.send_signal(signal.SIGSTOP)
        main.wait(timeout=400)  # rank 0 ends by itself (psutil.TimeoutExpired if it does not)
        # torchrun's SIGTERM cannot end the stopped rank, and the agent would wait 30 s before its SIGKILL: ours now
        with contextlib.suppress(psutil.NoSuchProcess):
            stopped.kill()
        _, err = launcher.communicate(timeout=400)
    assert launcher.returncode != 0
    # rank 0 failed by itself, before the stopped rank was killed: torchrun's summary names its exit status
    [status] = re.findall(rf"exitcode\s*: (-?\d+) \(pid: {main.pid}\)", err) or [None]
    assert status not in (None, "0"), err[-3000:]
    assert "PeerFailed: rank 1 went silent: no heartbeat for" in err, err[-3000:]
    [run] = (tmp_path / "outputs" / "runs").iterdir()
    assert "rank 1 went silent: no heartbeat for" in (run / "run.log").read_text()  # rank 0's log says why it ended


CACHE_JOB = """
import os, sys, time
from pathlib import Path
import torch
from accelerate import PartialState
from mlm.job import Job, cache_builders_first
run_dir, rank = Path(sys.argv[1]), int(os.environ["RANK"])
with Job(run_dir, collective_timeout_minutes=0.1) as job:
    with cache_builders_first(PartialState(), job):
        if rank == 0:
            time.sleep(13)  # a block cache that takes over twice the collective timeout (6 s)
        with open(run_dir / "order", "a") as f:
            f.write(f"{rank}\\n")
    torch.distributed.all_reduce(torch.ones(1))
"""


ALONE_JOB = """
import os, sys, time
from pathlib import Path
import torch
from mlm.job import Job, on_main_alone
run_dir, rank, fail = Path(sys.argv[1]), int(os.environ["RANK"]), sys.argv[2] == "fail"
def work():
    time.sleep(13)  # a fine-tune over twice the collective timeout (6 s)
    if fail:
        raise RuntimeError("the fine-tune broke")
    return "scores"
with Job(run_dir, collective_timeout_minutes=0.1) as job:
    value = on_main_alone("downstream", work, job)
    with open(run_dir / "order", "a") as f:
        f.write(f"{rank} {value}\\n")
"""


def job_of_two(stack: contextlib.ExitStack, source: str, args: list, env: dict) -> list:
    """`python -c source *args` as ranks 0 and 1 of a job (env names its store), ended with the stack."""
    return [
        stack.enter_context(
            launched([sys.executable, "-c", source, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        )
        for r in range(2)
    ]


@pytest.mark.slow
def test_ranks_wait_past_the_collective_timeout_for_the_cache_and_the_main_process_fine_tune_and_leave_if_it_fails(
    tmp_path,
):
    """Three jobs of two processes at once (each mostly sleeps): the block cache built first on rank 0
    (cache_builders_first), and the downstream fine-tune on the main process alone (on_main_alone), once finished,
    once failed."""
    store = {"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    cache, ok, fail = tmp_path / "cache", tmp_path / "ok", tmp_path / "fail"
    for d in (cache, ok, fail):
        d.mkdir()
    with contextlib.ExitStack() as stack:
        jobs = {
            "cache": job_of_two(stack, CACHE_JOB, [str(cache)], {**os.environ, **store, "MASTER_PORT": "29645"}),
            "ok": job_of_two(stack, ALONE_JOB, [str(ok), "ok"], {**store, "MASTER_PORT": "29651"}),
            "fail": job_of_two(stack, ALONE_JOB, [str(fail), "fail"], {**store, "MASTER_PORT": "29652"}),
        }
        errs = {name: [p.communicate(timeout=300)[1] for p in procs] for name, procs in jobs.items()}

    procs = jobs["cache"]
    assert [p.returncode for p in procs] == [0, 0], errs["cache"][0][-2000:] + errs["cache"][1][-2000:]
    assert (cache / "order").read_text() == "0\n1\n"  # rank 1 built after rank 0, and waited for it

    procs = jobs["ok"]
    assert [p.returncode for p in procs] == [0, 0], errs["ok"][0][-2000:] + errs["ok"][1][-2000:]
    assert (ok / "order").read_text() == "0 scores\n1 None\n"  # rank 1 went on only after rank 0's work

    procs = jobs["fail"]  # rank 1 learns of the failure and leaves, instead of waiting for ever
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "the fine-tune broke" in errs["fail"][1] and not (fail / "order").exists()


def test_leaving_waits_for_the_watch_to_finish_its_store_request():
    """A rank that leaves its job and exits while its watch thread is inside a store call aborts
    (the interpreter ends a daemon thread inside C++ code), which failed a finished 3-rank job."""
    import threading

    from mlm.job import PeerWatch

    inside, release = threading.Event(), threading.Event()

    class SlowStore:  # its first request blocks until released, as one on a loaded machine can
        def set(self, key, value):
            inside.set()
            release.wait(5)

        def check(self, keys):
            return False

    watch = PeerWatch(SlowStore(), rank=0, world_size=2, silent_after_s=600, on_stuck=lambda reason: None).start()
    assert inside.wait(5)
    threading.Timer(0.5, release.set).start()
    watch.leave()
    assert release.is_set() and not watch._thread.is_alive()
