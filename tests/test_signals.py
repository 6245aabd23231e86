"""Every stop signal saves the work: SIGHUP too, every job of a parallel sweep, and a signal after the last step.

Each signal is produced for real (sent to a process, or by the run itself at a fault point, MLM_FAULT_SIGNAL_AT)."""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, TINY_RUN, as_typed, compose, run_cli, run_in_process, torchrun_command
from tests.test_resume import last_step, wait_for


def error_lines(stderr: str) -> list:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def test_sighup_is_a_stop_signal_said_in_one_line_and_a_second_one_stops_at_once_in_one_line(capfd, tmp_path):
    from mlm.preemption import StopSignals, stop_requested

    before = signal.getsignal(signal.SIGHUP)
    stop = StopSignals(newest=lambda: tmp_path / "ckpt-00000002").install()
    stop.plan = "stopping after this step with a checkpoint"
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # the handler runs before the next line
        assert stop.signum == signal.SIGHUP and stop_requested() == signal.SIGHUP and stop.name == "SIGHUP"
        assert (
            capfd.readouterr().err
            == "SIGHUP: stopping after this step with a checkpoint (a second SIGHUP stops at once, saving nothing more)\n"
        )
        with pytest.raises(SystemExit) as second:  # not SIGINT's own KeyboardInterrupt (a traceback)
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.code == 128 + signal.SIGINT
        assert (
            capfd.readouterr().err
            == f"stopped: stopped at once by a second SIGINT; the newest checkpoint is {tmp_path / 'ckpt-00000002'}\n"
        )
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a third acts as without us
    finally:
        stop.restore()
    assert stop_requested() is None and signal.getsignal(signal.SIGHUP) == before


def test_before_training_the_first_signal_stops_at_once_and_a_handler_from_before_gets_it(capfd):
    """No plan yet (data, cache build, model, checkpoint load): nothing to save. submitit's handler is still called."""
    from mlm.preemption import StopSignals

    stop = StopSignals(plan=None).install()
    try:
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert (
            capfd.readouterr().err
            == "stopped: stopped at once by SIGTERM before training began; no checkpoint was written, the rerun starts over\n"
        )
    finally:
        stop.restore()
    called = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))  # a stand-in for submitit's
    try:
        stop = StopSignals(plan=None).install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert called == [signal.SIGUSR2] and signal.getsignal(signal.SIGUSR2) is not stop._handle
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR2, previous)


def test_an_eval_gives_up_at_its_next_batch_once_a_stop_is_asked(tokenizer):
    """In-process: the stop arrives after the eval's second batch (a fault point); the third batch is never scored."""
    import numpy as np
    from accelerate import Accelerator
    from datasets import Dataset

    from mlm.config import MaskingConfig
    from mlm.evaluate import evaluate
    from mlm.models import MLMObjective, build_model
    from mlm.preemption import Abandoned, StopSignals
    from tests.conftest import compose

    model, _ = build_model(compose(["model=tiny"]).model, 32, seed=0)
    blocks = Dataset.from_dict(
        {"input_ids": np.random.default_rng(0).integers(1000, 20000, size=(20, 32)).astype(np.int32)}
    )
    objective = MLMObjective(model, sparse=True)
    scored = []
    objective.register_forward_hook(lambda module, args, out: scored.append(1))
    stop = StopSignals().install()
    stop.plan = "abandoning the eval"
    os.environ["MLM_FAULT_SIGNAL_AT"] = "eval_batch:2:SIGTERM"
    try:
        with pytest.raises(Abandoned, match="2 of 5 batches"):
            evaluate(objective, blocks, tokenizer, MaskingConfig(), 0, Accelerator(cpu=True), batch_size=4)
    finally:
        del os.environ["MLM_FAULT_SIGNAL_AT"]
        stop.restore()
    assert len(scored) == 2 and objective.training


def test_a_downstream_fine_tune_stops_at_its_next_step_for_a_signal():
    from mlm.downstream.protocol import check_stop
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
    return [
        "-m",
        *TINY_RUN,
        f"dataset.path={corpus}",
        "hydra/launcher=parallel",
        f"hydra.launcher.n_jobs={n_jobs}",
        "runtime.num_threads=1",
        "trainer.max_steps=3,400,400",
        "trainer.checkpoint_every=0",
        f"hydra.sweep.dir={sweep}",
    ]


def start_sweep(corpus, sweep, n_jobs=2, running=("1", "2")):
    """Three tiny jobs: job 0 (3 steps) finishes; on two workers, jobs 1 and 2 (400 steps) are training when it returns."""
    args = sweep_args(corpus, sweep, n_jobs)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(
        lambda: (sweep / "0" / "results.json").exists() and all(last_step(sweep / job) >= 2 for job in running), proc
    )
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
        assert (
            2 <= step < 400 and not (sweep / job / "results.json").exists() and not (sweep / job / "error.txt").exists()
        )
        assert f"stopped by {sig.name} after step {step}; checkpoint {ckpt} written" in err
        assert (sweep / job / "run.lock").read_text() == ""  # released
    assert stopped[-1] == (
        f"stopped: the sweep was stopped by {sig.name}: its running jobs stopped with a checkpoint and no new job "
        f"started; what finished is in {sweep / 'summary.md'}; resume with: {as_typed(sweep_args(corpus, sweep))}"
    )
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
    assert (
        f"stopped: stopped by SIGHUP after step {json.loads((ckpt / 'state.json').read_text())['step']}; checkpoint {ckpt} written"
        in err
    )
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
        assert (
            2 <= json.loads((ckpt / "state.json").read_text())["step"] < 400
            and not (sweep / job / "results.json").exists()
        )


# ---------------------------------------------------------------- a signal after the last step

QUICK_DOWNSTREAM = [
    "downstream=polarity",
    "downstream.seeds=[0]",
    "downstream.epochs=1",
    "downstream.folds=2",
    "downstream.max_train_examples=40",
]


def after_last_step_run(corpus, run_dir):
    return [
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=4",
        "trainer.eval_every=0",
        *QUICK_DOWNSTREAM,
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_a_signal_in_the_final_eval_stops_before_final_and_the_rerun_writes_it_without_training(corpus, tmp_path):
    """A default run directory (the command names none): the stop line's command names it, and resumes it."""
    args = after_last_step_run(corpus, tmp_path)[:-1]
    proc = run_cli(
        args, cwd=tmp_path, env={"MLM_FAULT_SIGNAL_AT": "eval:2:SIGTERM", "OMP_NUM_THREADS": "1"}
    )  # eval 1 is at step 0, eval 2 the final one
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    [run_dir] = (tmp_path / "outputs" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "ckpt-00000004"
    printed = f"{as_typed(args, tmp_path)} hydra.run.dir={run_dir}"
    assert error_lines(proc.stderr) == [
        "SIGTERM: stopping once the final checkpoint is written; nothing is left to train (a second SIGTERM stops at once, saving nothing more)",
        f"stopped: stopped by SIGTERM after the last step; checkpoint {ckpt} holds the final eval; "
        f"write final/ and results.json (nothing left to train) with: {printed}",
    ]
    assert ckpt.is_dir() and not (run_dir / "final").exists() and not (run_dir / "results.json").exists()
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert '"eval/perplexity"' in metrics.splitlines()[-1] and json.loads(metrics.splitlines()[-1])["step"] == 4

    # the printed command, in process (only the signal needs a process; test_failures.py runs a printed command in a
    # shell): its words after `python run.py`, from the directory it was printed in
    _, script, *words = shlex.split(printed)
    assert script == str(ROOT / "run.py")
    rerun = run_in_process(words, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpt} at step 4" in rerun.stdout + rerun.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert (
        results["steps"] == 4
        and results["downstream"]["task"] == "polarity"
        and (run_dir / "final" / "model.safetensors").exists()
    )
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no step trained, no eval logged again


@pytest.mark.slow
@pytest.mark.parametrize("point", ["final:1", "finetune:1"])
def test_a_signal_while_final_is_written_or_during_the_fine_tune_keeps_the_results_and_the_rerun_adds_downstream(
    corpus, tmp_path, point
):
    """final:1: final/ half-written (it is finished, then results.json, and the fine-tune does not start);
    finetune:1: after the downstream fine-tune's first step (it stops at the next)."""
    run_dir = tmp_path / "run"
    args = after_last_step_run(corpus, run_dir)
    proc = run_cli(args, env={"MLM_FAULT_SIGNAL_AT": f"{point}:SIGHUP", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr[-3000:]
    plan = (
        "finishing final/ and results.json (seconds)"
        if point == "final:1"
        else f"stopping the downstream fine-tune at its next step; {run_dir / 'results.json'} holds the training results"
    )
    assert error_lines(proc.stderr) == [
        f"SIGHUP: {plan} (a second SIGHUP stops at once, saving nothing more)",
        f"stopped: stopped by SIGHUP after the last step; the training results are in {run_dir / 'results.json'}; "
        f"add the downstream numbers with: {as_typed(args)}",
    ]
    assert "downstream polarity, seed 0, split" not in proc.stdout + proc.stderr  # no fold was finished
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4 and "downstream" not in results and (run_dir / "final" / "model.safetensors").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt-00000004"]
    metrics = (run_dir / "metrics.jsonl").read_text()

    if point == "final:1":  # the rerun's fine-tune stopped too (Ctrl-C): one line, results.json as it was. Once: after
        # either stop the rerun is the same finished run (final/, results.json without downstream) asked for downstream
        stopped = run_cli(args, env={"MLM_FAULT_SIGNAL_AT": "finetune:1:SIGINT", "OMP_NUM_THREADS": "1"})
        assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
        assert error_lines(stopped.stderr) == [
            "SIGINT: stopping the downstream fine-tune at its next step; results.json stays as it is (a second SIGINT stops at once, saving nothing more)",
            f"stopped: stopped by SIGINT during the downstream fine-tune; {run_dir / 'results.json'} is unchanged; "
            f"add the downstream numbers with: {as_typed(args)}",
        ]
        assert json.loads((run_dir / "results.json").read_text()) == results

    rerun = run_in_process(args)  # no signal: in process
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already finished" in rerun.stdout and f"added to {run_dir / 'results.json'}" in rerun.stdout
    updated = json.loads((run_dir / "results.json").read_text())
    assert (
        updated["downstream"]["task"] == "polarity"
        and {k: v for k, v in updated.items() if k != "downstream"} == results
    )
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again


# ---------------------------------------------------------------- a signal during an eval, a checkpoint or the cache build

EVAL_RUN = [
    *TINY_RUN,
    "trainer.eval_batch_size=4",
    "runtime.num_threads=1",
]  # 16 eval blocks: 4 batches an eval, at steps 0, 2 and 4


@pytest.mark.slow
@pytest.mark.parametrize("final", [False, True], ids=["periodic", "final"])
def test_a_sigterm_during_an_eval_stops_at_its_next_batch_with_the_last_steps_checkpoint_and_the_rerun_resumes(
    corpus, tmp_path, final
):
    """The signal lands after the 2nd of the 4 batches of the eval at step 2 (eval batch 6 of the run) or of the final
    eval at step 4 (eval batch 10)."""
    from mlm.checkpoint import list_checkpoints, verify

    run_dir = tmp_path / "run"
    args = [*EVAL_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    proc = run_cli(
        args, env={"MLM_FAULT_SIGNAL_AT": f"eval_batch:{10 if final else 6}:SIGTERM", "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    step = 4 if final else 2
    ckpt = run_dir / "checkpoints" / f"ckpt-{step:08d}"
    stopped = (
        f"stopped: stopped by SIGTERM after the last step; checkpoint {ckpt} is the last step's; run the final eval and write "
        f"final/ and results.json (nothing left to train) with: {as_typed(args)}"
        if final
        else f"stopped: stopped by SIGTERM after step 2; checkpoint {ckpt} written; resume with: {as_typed(args)}"
    )
    assert error_lines(proc.stderr) == [
        f"SIGTERM: abandoning the eval at step {step}; stopping with the checkpoint of step {step} (a second SIGTERM stops at once, saving nothing more)",
        stopped,
    ]
    assert f"abandoned the eval at step {step} after 2 of 4 batches" in proc.stdout  # the 3rd batch was never scored
    assert list_checkpoints(run_dir) == [ckpt] and verify(ckpt) is None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/perplexity" in r] == (
        [0, 2] if final else [0]
    )  # the abandoned eval logged nothing

    rerun = run_in_process(args)  # no signal: in process
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in rerun.stdout + rerun.stderr
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/perplexity" in r] == (
        [0, 2, 4] if final else [0, 4]
    )  # the rerun goes on without it


def test_a_second_sigint_while_the_checkpoint_is_written_stops_at_once_in_one_line(corpus, tmp_path):
    """The first Ctrl-C (after the step-0 eval) says what it will do; the second lands in the half-written checkpoint."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        [*EVAL_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"],
        env={"MLM_FAULT_SIGNAL_AT": "eval:1:SIGINT,checkpoint:1:SIGINT", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        "SIGINT: stopping after this step with a checkpoint (a second SIGINT stops at once, saving nothing more)",
        "stopped: stopped at once by a second SIGINT; no checkpoint was written, the rerun starts over",
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (run_dir / "run.lock").read_text() == ""  # released on the way out


def test_a_sigint_during_the_cache_build_stops_at_once_and_the_next_run_builds_a_complete_cache(
    corpus, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "cache"
    args = [
        *EVAL_RUN,
        f"dataset.path={corpus}",
        "dataset.tokenize_batch_size=50",
        "trainer.max_steps=1",
        "trainer.eval_every=0",
    ]
    env = {"MLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'a'}"], env={**env, "MLM_FAULT_SIGNAL_AT": "tokenize:2:SIGINT"})
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        "stopped: stopped at once by SIGINT before training began; no checkpoint was written, the rerun starts over"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list((cache / "blocks").iterdir()) == []  # neither a cache entry nor the build's temporary directory

    from mlm.train import train

    monkeypatch.setenv("MLM_CACHE", str(cache))
    caplog.set_level(logging.INFO, logger="mlm.data.blocks")
    train(compose(args), tmp_path / "b")  # the next run: in process, as nothing of it is about the command line
    assert "preprocessed" in caplog.text and len(list((cache / "blocks").iterdir())) == 1


@pytest.mark.slow
def test_a_signal_to_one_rank_during_an_eval_stops_every_rank_at_the_same_batch(corpus, tmp_path):
    """torchrun, 2 processes: only rank 1 is signalled, after its 2nd of 4 batches of the eval at step 2; the flag rides on
    the eval's per-batch all-reduce, so rank 0 gives up at the same batch and both write the checkpoint of step 2."""
    from mlm.checkpoint import list_checkpoints, verify

    cmd = torchrun_command(
        29657,
        *EVAL_RUN,
        "trainer.max_eval_blocks=32",
        "trainer.per_device_batch_size=2",
        f"dataset.path={corpus}",
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "0",
        "MLM_FAULT_SIGNAL_AT": "eval_batch:6:SIGTERM",
        "MLM_FAULT_RANK": "1",
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, proc.stderr[-3000:]
    [run_dir] = (tmp_path / "outputs" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "ckpt-00000002"
    assert list_checkpoints(run_dir) == [ckpt] and verify(ckpt) is None
    assert sorted(p.name for p in ckpt.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
    assert "abandoned the eval at step 2 after 2 of 4 batches" in (run_dir / "run.log").read_text()  # rank 0's log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/perplexity" in r] == [0]
    assert (
        f"stopped: stopped by a stop signal on another process after step 2; checkpoint {ckpt} written" in proc.stderr
    )
    assert proc.stderr.count("stopped: ") == 1, proc.stderr[
        -3000:
    ]  # the main process's line only, not rank 1's as well
