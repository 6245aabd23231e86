"""Faults a user meets, each produced for real: a full disk, a read-only disk, a run dir that is a file or
someone else's folder, settings changed before a resume, an unwritable metrics file, SIGTERM, SIGINT or SIGHUP mid-run,
an eval that scores nothing."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, as_typed, compose, run_cli, run_in_process
from tests.test_resume import assert_same_as_uninterrupted, last_step, wait_for


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small filesystem of our own at `path` (as root: this machine and CI run the suite as root)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def error_lines(proc) -> list:
    return [line for line in proc.stderr.strip().splitlines() if line.strip()]


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing_behind(corpus, tmp_path):
    """Measured: a tiny checkpoint is 13 MB, so a 20 MB disk holds the first and fails the second."""
    with tmpfs(tmp_path / "disk", "20m") as disk:
        run_dir = disk / "run"
        args = [
            *TINY_RUN,
            f"dataset.path={corpus}",
            "trainer.max_steps=40",
            "trainer.checkpoint_every=2",
            f"hydra.run.dir={run_dir}",
        ]
        for attempt in range(2):  # the rerun resumes and meets the same full disk: the same line, not "in use"
            proc = run_in_process(args)  # the disk is the point, not the process
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert error_lines(proc) == [
                f"error: cannot write checkpoint {run_dir}/checkpoints/ckpt-00000004: "
                "No space left on device (free disk space, then resume)"
            ], proc.stderr[-3000:]
            assert not list(run_dir.rglob(".tmp-*")) and not list(run_dir.rglob(".old-*"))
            assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt-00000002"]
            assert (run_dir / "run.lock").read_text() == ""  # released: the next run is not told the dir is in use
            assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_read_only_run_dir_and_a_run_dir_that_is_a_file_are_one_line(corpus, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        proc = run_in_process([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={ro / 'run'}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert error_lines(proc) == [
            f"error: cannot write the run directory's lock {ro / 'run' / 'run.lock'}: "
            "Read-only file system (fix the permissions, then resume)"
        ]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    proc = run_in_process([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={a_file}"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc) == [
        f"error: the run directory {a_file} is a file; give the run a directory (hydra.run.dir=...)"
    ]
    assert a_file.read_text() == "mine"


def test_a_folder_this_harness_did_not_make_is_refused_untouched(corpus, tmp_path):
    folder = tmp_path / "my-results"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.bin").write_text("my model")
    (folder / "results.json").write_text("{}")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    proc = run_in_process([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={folder}"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc) == [
        f"error: {folder} holds files no run of this harness wrote (final, results.json; no run.lock); "
        "give the run a directory of its own (hydra.run.dir=... or hydra.sweep.dir=...)"
    ]
    assert (
        sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    )  # no lock, no .hydra, nothing deleted


def test_only_result_affecting_settings_block_a_resume(tmp_path, caplog):
    from mlm.checkpoint import FORMAT, file_record
    from mlm.rundir import check_resume_settings
    from mlm.config import UserError

    ckpt = tmp_path / "checkpoints" / "ckpt-00000004"
    ckpt.mkdir(parents=True)
    settings = {
        "optimizer.lr": 0.001,
        "block_size": 32,
        "seed": 1,
        "dataset.path": "a.txt",
        "trainer.max_steps": 8,
        "trainer.eval_every": 2,
        "trainer.log_every": 1,
        "runtime.num_workers": 0,
        "trainer.checkpoint_every": 2,
        "trainer.per_device_batch_size": 4,
        "trainer.gradient_accumulation_steps": 1,
    }
    (ckpt / "state.json").write_text(json.dumps({"format": FORMAT, "step": 4, "config": settings, "world_size": 1}))
    (ckpt / "manifest.json").write_text(
        json.dumps({"step": 4, "files": {"state.json": file_record(ckpt / "state.json")}})
    )
    allowed = {
        **settings,
        "trainer.eval_every": 3,
        "trainer.log_every": 5,
        "runtime.num_workers": 2,
        "trainer.checkpoint_every": 1,
        "trainer.max_steps": 20,
    }
    check_resume_settings(tmp_path, "auto", 20, allowed)  # cadence, workers, more steps: allowed
    split = {**settings, "trainer.per_device_batch_size": 2, "trainer.gradient_accumulation_steps": 2}
    check_resume_settings(
        tmp_path, "auto", 8, split
    )  # the same global batch, split otherwise (e.g. on other processes)
    with pytest.raises(
        UserError,
        match=r"global batch \(per_device_batch_size x gradient_accumulation_steps x processes\)=4 there, 8 now",
    ):
        check_resume_settings(tmp_path, "auto", 8, {**settings, "trainer.per_device_batch_size": 8})
    check_resume_settings(tmp_path, "never", 8, {**settings, "optimizer.lr": 1.0})  # starting over: nothing to compare
    changed = {**settings, "optimizer.lr": 0.002, "block_size": 64, "seed": 2, "dataset.path": "b.txt"}
    with pytest.raises(UserError) as err:
        check_resume_settings(tmp_path, "auto", 8, changed)
    assert str(err.value) == (
        f"{ckpt} was trained with other settings (block_size=32 there, 64 now; dataset.path='a.txt' there, "
        "'b.txt' now; optimizer.lr=0.001 there, 0.002 now; seed=1 there, 2 now); put them back to resume it, "
        f"or branch from it with these in a run directory of its own: hydra.run.dir=<new dir> resume={ckpt}"
    )
    check_resume_settings(
        tmp_path, str(ckpt), 8, changed
    )  # a checkpoint named by hand: a branch, warned about, not refused
    assert f"resuming {ckpt} with other settings: block_size=32 there, 64 now" in caplog.text
    with pytest.raises(UserError, match="trainer.max_steps=3 is below the 4 steps"):
        check_resume_settings(tmp_path, "auto", 3, {**settings, "trainer.max_steps": 3})


@pytest.mark.slow
def test_another_lr_on_an_unfinished_run_is_refused_with_checkpoints_untouched(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=8",
        "trainer.checkpoint_every=2",
        f"hydra.run.dir={run_dir}",
    ]
    killed = run_cli(args, env={"MLM_FAULT_KILL_AT": "step:5"})
    assert killed.returncode == -signal.SIGKILL
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != "run.lock")
    other = run_in_process([*args, "optimizer.lr=0.01"])  # after the kill, the command line in process
    assert other.returncode == 2, other.stderr[-2000:]
    assert (
        "taking over" in other.stdout and len(other.stdout.strip().splitlines()) == 1
    )  # the killed run's lock, and only that
    assert error_lines(other) == [
        f"error: {run_dir}/checkpoints/ckpt-00000004 was trained with other settings (optimizer.lr=0.0004 "
        "there, 0.01 now); put them back to resume it, or branch from it with these in a run directory of its own: "
        f"hydra.run.dir=<new dir> resume={run_dir}/checkpoints/ckpt-00000004"
    ]
    assert (
        sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != "run.lock") == before
    )  # .hydra too
    same = run_in_process([*args, "trainer.eval_every=4"])  # eval cadence changes no result: resumes
    assert same.returncode == 0 and "at step 4\n" in same.stdout + same.stderr, same.stderr[-2000:]


def test_an_eval_that_scores_no_token_is_an_error_before_training(corpus, tmp_path):
    from mlm.config import UserError
    from mlm.train import train

    with pytest.raises(UserError) as e:
        train(compose([*TINY_RUN, f"dataset.path={corpus}", "masking.mlm_probability=1e-9"]), tmp_path / "run")
    assert str(e.value) == (
        "the eval masked no token in 16 blocks at masking.mlm_probability=1e-09; "
        "raise masking.mlm_probability or trainer.max_eval_blocks"
    )
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()
    with pytest.raises(UserError) as e:
        train(compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_eval_blocks=-1"]), tmp_path / "run2")
    assert str(e.value) == "trainer.max_eval_blocks=-1 must be at least 1 (or unset for the whole held-out split)"


def start(args, env=None):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SIGNAL_STEPS = 200  # a signal lands from step 20 or 30 on: steps enough that the run is still training then
SIGNAL_RUN = [
    *TINY_RUN,
    f"trainer.max_steps={SIGNAL_STEPS}",
    "trainer.checkpoint_every=0",
    "runtime.mixed_precision=no",
    "trainer.eval_every=50",
]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference, trained in process (what run.py adds to a run is not compared: .hydra/, run.log)."""
    from mlm.train import train

    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(compose([*SIGNAL_RUN, f"dataset.path={corpus}"]), run_dir)
    return run_dir


@pytest.mark.slow
def test_sigterm_then_sighup_checkpoint_at_a_step_boundary_and_the_reruns_resume_exactly(
    corpus, uninterrupted, tmp_path
):
    """SIGTERM (a scheduler) stops the run; the command as given resumes it, and SIGHUP (the terminal or ssh session
    closed) stops that rerun; the next rerun ends exactly where an uninterrupted run ends."""
    run_dir = tmp_path / "run"
    args = [*SIGNAL_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    resume = as_typed(args)  # the command as given: it names its run dir
    step = 0
    for sig, after in ((signal.SIGTERM, 30), (signal.SIGHUP, None)):
        after = after or step + 5  # the rerun: 5 steps past the checkpoint it resumed
        proc = start(args)
        wait_for(lambda after=after: last_step(run_dir) >= after, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)  # the step in flight, one checkpoint, then out
        resumed_line = f"resumed from {run_dir / 'checkpoints' / f'ckpt-{step:08d}'} at step {step}\n"
        assert (resumed_line in out + err) == bool(step), err[-3000:]  # the rerun resumed the signal before's
        step = assert_stopped(proc, err, sig, run_dir, after)
        assert err.strip().endswith(
            f"; checkpoint {run_dir / 'checkpoints' / f'ckpt-{step:08d}'} written; resume with: {resume}"
        )
    resumed = run_in_process(args)  # only the signals need a process
    assert resumed.returncode == 0 and f"at step {step}\n" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def assert_stopped(proc, err: str, sig, run_dir: Path, after: int = 30) -> int:
    """One `stopped:` line, one checkpoint of the step it names (past `after`), the lock released; that step.
    Under make, make ends by the signal itself once the run has exited (a shell shows 128 + signal either way)."""
    assert proc.returncode == (-sig if proc.args[0] == "make" else 128 + sig), err[-3000:]
    lines = [
        line for line in err.strip().splitlines() if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]  # make's own "Interrupt"
    name = signal.Signals(sig).name
    assert (
        lines[0]
        == f"{name}: stopping after this step with a checkpoint (a second {name} stops at once, saving nothing more)"
    ), err[-3000:]
    assert len(lines) == 2 and lines[1].startswith(f"stopped: stopped by {name} after step ") and "Traceback" not in err
    step = int(lines[1].split("after step ")[1].split(";")[0])
    assert (
        sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == f"ckpt-{step:08d}"
        and after <= step < SIGNAL_STEPS
    )
    assert (run_dir / "run.lock").read_text() == ""  # released
    return step


def clone_with_make(tmp_path: Path):
    """A checkout as `make train` sees it (links to this one's files) and the environment that makes its set-up
    already done: the installed stamp and this Python (MAKEFLAGS passes them as command-line variables)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "run.py", "conf", "pyproject.toml"):
        (clone / name).symlink_to(ROOT / name)
    (tmp_path / "installed").write_text("")  # newer than pyproject.toml
    return clone, {
        **os.environ,
        "MAKEFLAGS": f"PY={sys.executable} STAMP={tmp_path / 'installed'}",
    }  # threads as the reference run's


@pytest.mark.slow
def test_ctrl_c_in_make_train_then_make_train_again_or_the_printed_command_resume_the_run(
    corpus, uninterrupted, tmp_path
):
    """`make train` (no run dir), Ctrl-C (SIGINT to the terminal's process group: make and the run); `make train` again
    resumes that run, saying so; Ctrl-C again; then the command the first stop line printed finishes it, exactly."""
    clone, env = clone_with_make(tmp_path)
    make_train = ["make", "-s", "train", f"ARGS={' '.join([*SIGNAL_RUN, f'dataset.path={corpus}'])}"]

    def ctrl_c_after(step: int):
        proc = subprocess.Popen(
            make_train,
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        wait_for(lambda: any(last_step(d) >= step for d in (clone / "outputs" / "runs").glob("*")), proc)
        os.killpg(proc.pid, signal.SIGINT)
        return proc, *proc.communicate(timeout=120)

    proc, out, err = ctrl_c_after(30)
    [run_dir] = (clone / "outputs" / "runs").iterdir()
    step = assert_stopped(proc, err, signal.SIGINT, run_dir)
    printed = err.split("resume with: ")[1].strip().splitlines()[0]
    assert printed == f'make train ARGS="{" ".join([*SIGNAL_RUN, f"dataset.path={corpus}"])} hydra.run.dir={run_dir}"'

    proc, out, err = ctrl_c_after(step + 5)  # the same command again: the same run
    assert out.startswith(
        f"resuming the unfinished run outputs/runs/{run_dir.name} (same command; its newest checkpoint is at step {step}); "
        "to start a new run instead add hydra.run.dir=outputs/runs/"
    ), out[:2000]
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt-{step:08d}'} at step {step}\n" in out + err
    second = assert_stopped(proc, err, signal.SIGINT, run_dir, after=step + 5)
    assert [d.name for d in (clone / "outputs" / "runs").iterdir()] == [run_dir.name]
    assert err.split("resume with: ")[1].strip().splitlines()[0] == printed

    resumed = subprocess.run(printed, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"at step {second}\n" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert "resuming the unfinished run" not in resumed.stdout  # it named its run dir
    assert_same_as_uninterrupted(run_dir, uninterrupted)


@pytest.mark.slow
def test_an_unwritable_metrics_file_stops_with_a_checkpoint_and_loses_no_record(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SIGNAL_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    proc = start(args)
    metrics, kept = run_dir / "metrics.jsonl", tmp_path / "kept.jsonl"
    wait_for(lambda: last_step(run_dir) >= 30, proc)
    while True:  # swap the file for a directory: the next append fails with an OSError (IsADirectoryError)
        os.rename(metrics, tmp_path / "part.jsonl")
        with open(kept, "a") as f:
            f.write((tmp_path / "part.jsonl").read_text())
        with contextlib.suppress(FileExistsError):
            metrics.mkdir()
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write metrics {metrics}: Is a directory"), err[
        -2000:
    ]
    assert "which keeps the unwritten records" in lines[0]
    error = (run_dir / "error.txt").read_text().splitlines()  # the cause, then the command that resumes the run
    assert error == [lines[0].removeprefix("error: "), f"resume with: {as_typed(args)}"]
    shutil.rmtree(metrics)
    shutil.move(kept, metrics)  # the user fixes the disk; the records written before stay
    resumed = run_in_process(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_uninterrupted(
        run_dir, uninterrupted
    )  # metrics too: the records that failed were carried by the checkpoint


@pytest.mark.slow
def test_a_handler_that_was_there_before_is_called_after_the_checkpoint(corpus, tmp_path):
    """As under submitit, whose SIGUSR2 handler requeues the job and exits: here a stand-in that records its call."""
    run_dir, marker = tmp_path / "run", tmp_path / "requeued"
    script = f"""
import runpy, signal, sys
def requeue(signum, frame):
    open({str(marker)!r}, "w").write(str(signum))
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["run.py", *{[*SIGNAL_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]!r}]
runpy.run_path({str(ROOT / "run.py")!r}, run_name="__main__")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: last_step(run_dir) >= 20, proc)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 255 and marker.read_text() == str(int(signal.SIGUSR2)), err[-3000:]
    state = json.loads(next((run_dir / "checkpoints").glob("ckpt-*/state.json")).read_text())
    assert 20 <= state["step"] < SIGNAL_STEPS and not (run_dir / "results.json").exists()
