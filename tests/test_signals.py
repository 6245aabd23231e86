"""Every stop signal saves the work: SIGHUP too, every job of a parallel sweep, and a signal after the last step.

Each signal is produced for real (sent to a process, or by the run itself at a fault point, MLM_FAULT_SIGNAL_AT)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli
from tests.test_resume import last_step, wait_for


def error_lines(stderr: str) -> list:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def test_sighup_is_a_stop_signal_and_a_second_one_acts_at_once():
    from mlm.preemption import StopSignals, stop_requested

    before = signal.getsignal(signal.SIGHUP)
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # the handler runs before the next line
        assert stop.signum == signal.SIGHUP and stop_requested() == signal.SIGHUP and stop.name == "SIGHUP"
        with pytest.raises(KeyboardInterrupt):  # the second (SIGINT's own handler raises this)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert stop_requested() is None and signal.getsignal(signal.SIGHUP) == before


def test_a_downstream_fine_tune_stops_at_its_next_step_for_a_signal():
    from mlm.downstream import check_stop
    from mlm.preemption import Interrupted, StopSignals

    check_stop()  # nothing asked: goes on
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted, match="stopped by SIGTERM during the downstream fine-tune") as err:
            check_stop()
        assert err.value.exit_code == 128 + signal.SIGTERM
    finally:
        stop.restore()


# ---------------------------------------------------------------- a parallel sweep


def alive(pids) -> list:
    """The processes of `pids` that still run (a zombie waiting for its reaper has ended)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def in_group(pgid: int) -> list:
    return alive([p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid])


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def sweep_args(corpus, sweep, n_jobs=2):
    return ["-m", *TINY_RUN, f"dataset.path={corpus}", "hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}", "runtime.num_threads=1",
            "trainer.max_steps=3,400,400", "trainer.checkpoint_every=0", f"hydra.sweep.dir={sweep}"]


def start_sweep(corpus, sweep, n_jobs=2, running=("1", "2")):
    """Three tiny jobs: job 0 (3 steps) finishes; on two workers, jobs 1 and 2 (400 steps) are training when it returns."""
    args = sweep_args(corpus, sweep, n_jobs)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (sweep / "0" / "results.json").exists() and all(last_step(sweep / job) >= 2 for job in running), proc)
    return proc, [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]


def wait_gone(workers, pgid) -> None:
    """Until the workers and every process of the sweep's group have ended (a loaded machine may take a while to reap them)."""
    deadline = time.time() + 120
    while (alive(workers) or in_group(pgid)) and time.time() < deadline:
        time.sleep(0.2)
    assert alive(workers) == [] and in_group(pgid) == []


@pytest.mark.slow
@pytest.mark.parametrize("to", ["parent", "group"])
def test_a_stopped_parallel_sweep_checkpoints_every_running_job_and_leaves_no_worker(corpus, tmp_path, to):
    """SIGTERM to the sweep's process (a scheduler), or SIGINT to its whole process group (Ctrl-C in a terminal,
    which reaches the workers too): job 0 finished before, jobs 1 and 2 stop with a checkpoint each."""
    sig = signal.SIGTERM if to == "parent" else signal.SIGINT
    sweep = tmp_path / "sweep"
    proc, workers = start_sweep(corpus, sweep)
    try:
        os.kill(proc.pid, sig) if to == "parent" else os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err[-3000:]
    stopped = [line for line in error_lines(err) if line.startswith("stopped: ")]
    assert len(stopped) == 3 and "Traceback" not in err, err[-3000:]
    for job in ("1", "2"):
        [ckpt] = (sweep / job / "checkpoints").iterdir()
        step = json.loads((ckpt / "state.json").read_text())["step"]
        assert 2 <= step < 400 and not (sweep / job / "results.json").exists() and not (sweep / job / "error.txt").exists()
        assert f"stopped by {sig.name} after step {step}; checkpoint {ckpt} written" in err
        assert (sweep / job / "run.lock").read_text() == ""  # released
    assert stopped[-1] == (f"stopped: the sweep was stopped by {sig.name}: its running jobs stopped with a checkpoint and no new job "
                           f"started; what finished is in {sweep / 'summary.md'}; resume with: {as_typed(sweep_args(corpus, sweep))}")
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 1 and "trainer.max_steps=3" in summary  # what finished
    assert (sweep / "run.lock").read_text() == ""
    wait_gone(workers, proc.pid)


@pytest.mark.slow
def test_a_stopped_sweep_running_its_jobs_in_its_own_process_starts_no_other(corpus, tmp_path):
    """n_jobs=1: joblib runs the jobs one after the other in the sweep's process; job 2 never starts."""
    sweep = tmp_path / "sweep"
    proc, _ = start_sweep(corpus, sweep, n_jobs=1, running=("1",))
    os.kill(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGHUP, err[-3000:]
    [ckpt] = (sweep / "1" / "checkpoints").iterdir()
    assert f"stopped: stopped by SIGHUP after step {json.loads((ckpt / 'state.json').read_text())['step']}; checkpoint {ckpt} written" in err
    assert not (sweep / "2" / "checkpoints").exists() and not (sweep / "2" / "metrics.jsonl").exists()
    assert error_lines(err)[-1].startswith("stopped: the sweep was stopped by SIGHUP") and "Traceback" not in err
    assert (sweep / "summary.md").read_text().count("| ok |") == 1


@pytest.mark.slow
def test_workers_whose_sweep_process_was_killed_stop_with_a_checkpoint(corpus, tmp_path):
    """SIGKILL (no handler runs) of the sweep's process: its workers see it gone and stop their jobs as for SIGTERM."""
    sweep = tmp_path / "sweep"
    proc, workers = start_sweep(corpus, sweep)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=300)  # the pipes close when the workers have gone too
    wait_gone(workers, proc.pid)
    for job in ("1", "2"):
        [ckpt] = (sweep / job / "checkpoints").iterdir()
        assert 2 <= json.loads((ckpt / "state.json").read_text())["step"] < 400 and not (sweep / job / "results.json").exists()


# ---------------------------------------------------------------- a signal after the last step

QUICK_DOWNSTREAM = ["downstream=polarity", "downstream.seeds=[0]", "downstream.epochs=1", "downstream.folds=2", "downstream.max_train_examples=40"]


def after_last_step_run(corpus, run_dir):
    return [*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=4", "trainer.eval_every=0", *QUICK_DOWNSTREAM, f"hydra.run.dir={run_dir}"]


def as_typed(args) -> str:
    """The command run_cli runs, as a stop line gives it back (mlm.rundir.resume_command)."""
    return shlex.join([sys.executable, str(ROOT / "run.py"), *args])


@pytest.mark.slow
def test_a_signal_in_the_final_eval_stops_before_final_and_the_rerun_writes_it_without_training(corpus, tmp_path):
    """A default run directory (the command names none): the stop line's command names it, and resumes it."""
    args = after_last_step_run(corpus, tmp_path)[:-1]
    proc = run_cli(args, cwd=tmp_path, env={"MLM_FAULT_SIGNAL_AT": "eval:2:SIGTERM", "OMP_NUM_THREADS": "1"})  # eval 1 is at step 0, eval 2 the final one
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    [run_dir] = (tmp_path / "outputs" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "ckpt-00000004"
    printed = f"{as_typed(args)} hydra.run.dir={run_dir}"
    assert error_lines(proc.stderr) == [f"stopped: stopped by SIGTERM after the last step; checkpoint {ckpt} holds the final eval; "
                                        f"write final/ and results.json (nothing left to train) with: {printed}"]
    assert ckpt.is_dir() and not (run_dir / "final").exists() and not (run_dir / "results.json").exists()
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert '"eval/perplexity"' in metrics.splitlines()[-1] and json.loads(metrics.splitlines()[-1])["step"] == 4

    rerun = subprocess.run(printed, shell=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpt} at step 4" in rerun.stdout + rerun.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4 and results["downstream"]["task"] == "polarity" and (run_dir / "final" / "model.safetensors").exists()
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no step trained, no eval logged again


@pytest.mark.slow
@pytest.mark.parametrize("point", ["final:1", "finetune:1"])
def test_a_signal_while_final_is_written_or_during_the_fine_tune_keeps_the_results_and_the_rerun_adds_downstream(corpus, tmp_path, point):
    """final:1: final/ half-written (it is finished, then results.json, and the fine-tune does not start);
    finetune:1: after the downstream fine-tune's first step (it stops at the next)."""
    run_dir = tmp_path / "run"
    args = after_last_step_run(corpus, run_dir)
    proc = run_cli(args, env={"MLM_FAULT_SIGNAL_AT": f"{point}:SIGHUP", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [f"stopped: stopped by SIGHUP after the last step; the training results are in {run_dir / 'results.json'}; "
                                        f"add the downstream numbers with: {as_typed(args)}"]
    assert "downstream polarity, seed 0, split" not in proc.stdout + proc.stderr  # no fold was finished
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4 and "downstream" not in results and (run_dir / "final" / "model.safetensors").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt-00000004"]
    metrics = (run_dir / "metrics.jsonl").read_text()

    # the rerun's fine-tune stopped too (Ctrl-C): one line, results.json as it was
    stopped = run_cli(args, env={"MLM_FAULT_SIGNAL_AT": "finetune:1:SIGINT", "OMP_NUM_THREADS": "1"})
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert error_lines(stopped.stderr) == [f"stopped: stopped by SIGINT during the downstream fine-tune; {run_dir / 'results.json'} is unchanged; "
                                           f"add the downstream numbers with: {as_typed(args)}"]
    assert json.loads((run_dir / "results.json").read_text()) == results

    rerun = run_cli(args, env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already finished" in rerun.stdout and f"added to {run_dir / 'results.json'}" in rerun.stdout
    updated = json.loads((run_dir / "results.json").read_text())
    assert updated["downstream"]["task"] == "polarity" and {k: v for k, v in updated.items() if k != "downstream"} == results
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again
