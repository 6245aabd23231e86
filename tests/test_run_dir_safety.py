"""The run directory's safeguards that crash safety rests on: torn metrics lines, atomic writes, the run-dir lock,
fault points, finished runs."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli, run_in_process


def test_torn_last_metrics_line_is_dropped_with_one_warning(tmp_path, caplog):
    from mlm.tracking import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    whole = [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.25}, {"step": 3, "train/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 4, "train/lo')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(tmp_path) == whole
        truncate_metrics(tmp_path, 2)
    warnings = [r.getMessage() for r in caplog.records if "not a complete record" in r.getMessage()]
    assert len(warnings) == 2 and str(path) in warnings[0] and "line 4" in warnings[0]  # once per read
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in whole[:2])
    assert not list(tmp_path.glob(".tmp-*"))


def test_atomic_path_replaces_whole_or_keeps_the_old(tmp_path):
    from mlm.files import atomic_path, atomic_write_json

    target = tmp_path / "final"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    atomic_write_json(tmp_path / "results.json", {"perplexity": 3.5})
    assert json.loads((tmp_path / "results.json").read_text()) == {"perplexity": 3.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "results.json"]


def run_python(code: str, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def test_fault_points_kill_at_the_nth_visit_and_tear_writes(tmp_path):
    code = """
        from mlm import faults
        faults.reached("step"); print("step 1", flush=True)
        faults.reached("eval"); print("eval 1", flush=True)
        faults.reached("step"); print("step 2", flush=True)
    """
    proc = run_python(code, env={"MLM_FAULT_KILL_AT": "step:2"})
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split("\n")[:2] == ["step 1", "eval 1"]
    assert run_python(code, env={"MLM_FAULT_KILL_AT": "step:3"}).returncode == 0
    assert "unknown point" in run_python(code, env={"MLM_FAULT_KILL_AT": "stpe:1"}).stderr
    path = tmp_path / "m.jsonl"
    proc = run_python(
        f"""
        from mlm import faults
        with open({str(path)!r}, "a") as f:
            faults.write(f, "0123456789\\n", "metrics")
            faults.write(f, "abcdefghij\\n", "metrics")
    """,
        env={"MLM_FAULT_KILL_AT": "metrics:2"},
    )
    assert proc.returncode == -signal.SIGKILL and path.read_text() == "0123456789\nabcde"


HOLD = """
    import sys, time
    from mlm.rundir import lock_run_dir
    lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_lock_is_exclusive_and_a_dead_holder_is_taken_over(holder, caplog):
    from mlm.rundir import RunDirLocked, lock_run_dir, release_run_dir

    run_dir, proc = holder
    with pytest.raises(RunDirLocked, match=f"in use by another run \\(pid {proc.pid} on "):
        lock_run_dir(run_dir)
    proc.kill()  # SIGKILL: no cleanup, the record stays; the kernel drops the flock
    proc.wait()
    with caplog.at_level(logging.WARNING):
        lock = lock_run_dir(run_dir)
    assert f"did not end cleanly (pid {proc.pid} on" in caplog.text
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid() and lock.fd is not None
    release_run_dir(run_dir)
    assert (run_dir / "run.lock").read_text() == ""  # a clean end: the next run takes it silently


def test_second_run_into_a_locked_dir_exits_2_and_touches_nothing(holder, text_file):
    run_dir, proc = holder
    before = sorted(p.name for p in run_dir.rglob("*"))
    fresh = run_dir.parent / "fresh-home"  # as on a new machine: no matplotlib font cache, nothing in HOME
    out = run_cli(
        [*TINY_RUN, f"dataset.path={text_file}", f"hydra.run.dir={run_dir}"],
        env={"HOME": str(fresh), "MPLCONFIGDIR": str(fresh / "mpl"), "XDG_CACHE_HOME": str(fresh / "cache")},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and f"pid {proc.pid} on" in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before == ["run.lock"]  # no .hydra, no log file


def test_finished_means_the_planned_steps_with_the_same_settings(tmp_path):
    from mlm.rundir import finished_results
    from mlm.config import UserError

    settings = {"optimizer.lr": 0.001, "seed": 42, "trainer.max_steps": 4, "trainer.progress_bar": False}
    (tmp_path / "results.json").write_text(json.dumps({"steps": 4, "perplexity": 9.0, "config": settings}))
    assert finished_results(tmp_path, "auto", 4, settings)["perplexity"] == 9.0
    assert (
        finished_results(tmp_path, "auto", 4, {**settings, "trainer.progress_bar": True}) is not None
    )  # no effect on results
    assert (
        finished_results(tmp_path, "auto", 8, {**settings, "trainer.max_steps": 8}) is None
    )  # asked for more: train on
    assert finished_results(tmp_path, "never", 4, settings) is None
    with pytest.raises(UserError, match="other settings \\(optimizer.lr=0.001 there, 0.0002 now\\)"):
        finished_results(
            tmp_path, "auto", 4, {**settings, "optimizer.lr": 0.0002}
        )  # e.g. a sweep rerun with other values
    (tmp_path / "results.json").write_text('{"steps": 4, "perpl')  # cannot happen (atomic), but must not pass
    assert finished_results(tmp_path, "auto", 4, settings) is None


def test_a_run_stopped_by_its_budget_is_finished_with_the_same_budget(tmp_path):  # and trains on with a larger one
    from mlm.rundir import finished_results
    from mlm.config import UserError

    settings = {
        "trainer.max_steps": 100000,
        "trainer.budget_minutes": 0.25,
        "runtime.num_workers": 0,
        "dataset.streaming": False,
    }
    (tmp_path / "results.json").write_text(
        json.dumps({"steps": 19, "stopped": "budget", "perplexity": 9.0, "config": settings})
    )
    assert finished_results(tmp_path, "auto", 100000, settings)["steps"] == 19
    assert (
        finished_results(tmp_path, "auto", 100000, {**settings, "runtime.num_workers": 2}) is not None
    )  # speed only ...
    assert (
        finished_results(tmp_path, "auto", 100000, {**settings, "trainer.budget_minutes": 0.5}) is None
    )  # more time: train on
    streamed = {**settings, "dataset.streaming": True}
    (tmp_path / "results.json").write_text(
        json.dumps({"steps": 19, "stopped": "budget", "perplexity": 9.0, "config": streamed})
    )
    with pytest.raises(UserError, match="num_workers"):  # ... except for a stream, whose shards follow the workers
        finished_results(tmp_path, "auto", 100000, {**streamed, "runtime.num_workers": 2})


def test_two_runs_into_one_dir_first_completes_second_exits_2(tmp_path, text_file):
    from mlm.rundir import describe

    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        *TINY_RUN,
        f"dataset.path={text_file}",
        f"hydra.run.dir={run_dir}",
        "trainer.checkpoint_every=1",
        "trainer.log_every=1",
    ]
    env = {**os.environ, "MLM_FAULT_CHECKPOINT_DELAY": "1"}  # keeps the first run going while the second starts
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_dir / "run.lock"
    deadline = time.time() + 300
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    second = run_in_process(args[2:], env={"MLM_FAULT_CHECKPOINT_DELAY": "1"})  # the second in this process
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and describe(holder) in second.stderr, second.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [(r["step"], next(k for k in r if k != "step").split("/")[0]) for r in records]
    assert len(kinds) == len(set(kinds)) and [s for s, k in kinds if k == "train"] == [1, 2, 3, 4]


def plant_links(run_dir, names):
    """run_dir/<name> -> a victim file outside it, for each name; returns {victim: (bytes, mtime_ns)} to compare after."""
    run_dir.mkdir(parents=True, exist_ok=True)
    victims = {}
    for n, name in enumerate(names, 1):
        victim = run_dir.parent / f"victim{n}"
        victim.write_text(f"someone else's file {n}\n")
        os.utime(victim, ns=(10**18, 10**18))
        (run_dir / name).symlink_to(victim)
        victims[victim] = (victim.read_bytes(), victim.stat().st_mtime_ns)
    return victims


def untouched(victims):
    return all((v.read_bytes(), v.stat().st_mtime_ns) == before for v, before in victims.items())


def test_a_run_dir_whose_files_are_links_is_refused_and_the_targets_untouched(tmp_path, text_file):
    run_dir = tmp_path / "run"
    victims = plant_links(run_dir, ["run.lock", "run.log", "metrics.jsonl"])
    out = run_in_process([*TINY_RUN, f"dataset.path={text_file}", f"hydra.run.dir={run_dir}"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and "is a symbolic link" in lines[0]
        and str(run_dir / "metrics.jsonl") in lines[0]
    )
    assert untouched(victims)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "metrics.jsonl",
        "run.lock",
        "run.log",
    ]  # no .hydra, nothing written


def test_a_sweep_job_dir_holding_a_link_is_refused_and_its_target_untouched(tmp_path, text_file):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "run.lock").touch()  # an earlier sweep's directory
    victims = plant_links(sweep_dir / "0", ["run.log"])  # Hydra opens a job's log before the job checks its directory
    out = run_in_process([*TINY_RUN, f"dataset.path={text_file}", f"hydra.sweep.dir={sweep_dir}", "-m"])
    assert out.returncode == 1 and "1 job(s) refused" in out.stderr, out.stderr[-2000:]
    assert "run.log is a symbolic link" in (sweep_dir / "refused.txt").read_text()
    assert untouched(victims) and (sweep_dir / "0" / "run.log").is_symlink()


def test_no_writer_follows_a_link(tmp_path):
    import errno
    import logging

    from mlm.cli import save_config_snapshot
    from mlm.config import UserError
    from mlm.files import NoFollowFileHandler, atomic_write_text, open_append, torch_save, write_error, write_json
    from mlm.rundir import lock_run_dir
    from mlm.tracking import CsvTracker, JsonlTracker

    run_dir = tmp_path / "run"
    names = [
        "results.json",
        ".tmp-results.json",
        "metrics.jsonl",
        "metrics_train.csv",
        "run.log",
        "state.json",
        "scheduler.pt",
    ]
    victims = plant_links(run_dir, names)
    atomic_write_text(
        run_dir / "results.json", "{}"
    )  # a rename replaces the link; its temporary file is never written through
    assert (run_dir / "results.json").read_text() == "{}" and not (run_dir / "results.json").is_symlink()
    for write in (
        lambda: open_append(run_dir / "metrics.jsonl"),
        lambda: CsvTracker(run_dir).log({"train/loss": 1.0}, 1),
        lambda: write_json(run_dir / "state.json", {}),
        lambda: torch_save({}, run_dir / "scheduler.pt"),
    ):
        with pytest.raises(OSError) as e:
            write()
        assert e.value.errno == errno.ELOOP
    jsonl = JsonlTracker(run_dir)
    jsonl.log({"train/loss": 1.0}, 1)
    assert jsonl.failure.errno == errno.ELOOP  # the loop stops the run on this, with a checkpoint, saying:
    assert str(write_error("metrics", jsonl.path, jsonl.failure)).endswith(
        "(a symbolic link is in its place; remove it, then resume)"
    )
    handler = NoFollowFileHandler(run_dir / "run.log")
    handler.emit(logging.makeLogRecord({"msg": "a line for the log"}))
    handler.close()
    hydra_dir = run_dir / ".hydra"
    victims.update(plant_links(hydra_dir, ["config.yaml"]))
    save_config_snapshot({"a": 1}, "config.yaml", hydra_dir)  # left for the run-dir check to refuse
    assert untouched(victims)
    with pytest.raises(UserError, match="is a symbolic link"):
        lock_run_dir(run_dir)
    assert untouched(victims)


def test_a_linked_hydra_folder_is_refused_but_the_run_dir_itself_may_be_a_link(tmp_path):
    from mlm.config import UserError
    from mlm.rundir import lock_run_dir, refuse_links, release_run_dir

    elsewhere = tmp_path / "scratch" / "run"  # e.g. outputs/runs/x -> a scratch disk: the user's choice of directory
    elsewhere.mkdir(parents=True)
    (tmp_path / "run").symlink_to(elsewhere)
    lock_run_dir(tmp_path / "run")
    release_run_dir(tmp_path / "run")
    assert (elsewhere / "run.lock").is_file()
    (tmp_path / "theirs").mkdir()
    (elsewhere / ".hydra").symlink_to(tmp_path / "theirs")
    with pytest.raises(UserError, match=f"{tmp_path / 'run' / '.hydra'} is a symbolic link"):
        refuse_links(tmp_path / "run")


def test_a_ranks_failure_record_is_never_written_through_a_link(tmp_path):
    """error-rank<r>.json (mlm.job) is written into the run dir while a job fails: a link planted
    there during the run is not followed (the check up front only sees links planted before)."""
    from mlm.job import _record_failure

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "error-rank1.json").symlink_to(victim)
    _record_failure(run_dir, 1, "rank 1: boom", failed_at=0.0)
    assert victim.read_text() == "keep me"


# ---------------------------------------------------------------- the same command resumes its unfinished run


def composed_run(overrides, mode="RUN"):
    """The config (hydra node included) `python run.py <overrides>` starts with, as the run-dir resolver sees it."""
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode
    from omegaconf import open_dict

    from mlm.cli import register
    from mlm.config import CONF

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode[mode]
    return cfg


def default_run(cfg, name: str, step=None, results=False, lock=None):
    """outputs/runs/<name> as a run of `cfg` leaves it: Hydra's snapshot (.hydra/), a checkpoint of `step` (its manifest
    is what makes it complete), results.json if it finished, and run.lock's holder record."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from mlm.cli import save_config_snapshot

    run_dir = Path("outputs/runs") / name
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    save_config_snapshot(task, "config.yaml", run_dir / ".hydra")
    save_config_snapshot(OmegaConf.create(list(cfg.hydra.overrides.task)), "overrides.yaml", run_dir / ".hydra")
    if step is not None:
        (run_dir / "checkpoints" / f"ckpt-{step:08d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"ckpt-{step:08d}" / "manifest.json").write_text(
            json.dumps({"step": step, "files": {}})
        )
    if results:
        (run_dir / "results.json").write_text("{}")
    (run_dir / "run.lock").write_text(json.dumps(lock) if lock else "")
    return run_dir


def test_a_run_without_a_run_dir_resumes_the_newest_unfinished_run_of_the_same_command(tmp_path, monkeypatch, capsys):
    import psutil
    import socket

    from mlm import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        cli, "start_stamp", lambda: "2026-12-06_12-00-00"
    )  # the clock may tick a second between two calls
    cfg = composed_run([*TINY_RUN, "trainer.max_steps=8"])

    def chosen(config=cfg):
        cli._stamps.clear()  # decided once per process
        return cli.launch_stamp(_root_=config)

    fresh = chosen()
    assert not Path("outputs/runs", fresh).exists() and capsys.readouterr().out == ""
    default_run(cfg, "2026-01-01_00-00-00", step=4)
    default_run(cfg, "2026-01-02_00-00-00", step=8, results=True)  # finished: never chosen
    default_run(cfg, "2026-01-03_00-00-00")  # no checkpoint yet (a run just started): never chosen
    pid1 = {"host": socket.gethostname(), "pid": 1, "start": psutil.Process(1).create_time()}
    newest = default_run(cfg, "2026-01-04_00-00-00", step=2, lock=pid1)  # in use by a live process
    assert chosen() == "2026-01-01_00-00-00"
    assert capsys.readouterr().out == (
        "resuming the unfinished run outputs/runs/2026-01-01_00-00-00 (same command; its newest checkpoint "
        f"is at step 4); to start a new run instead add hydra.run.dir=outputs/runs/{fresh}\n"
    )
    (newest / "run.lock").write_text(
        json.dumps({**pid1, "start": 1.0})
    )  # its holder is gone (pid 1 is another process now)
    assert chosen() == newest.name
    # another command, or the same one whose settings changed (an edited config file): a new run
    assert chosen(composed_run([*TINY_RUN, "trainer.max_steps=9"])) not in {
        p.name for p in Path("outputs/runs").iterdir()
    }
    (newest / ".hydra" / "config.yaml").write_text(
        (newest / ".hydra" / "config.yaml").read_text().replace("lr: ", "lr: 1")
    )
    assert chosen() == "2026-01-01_00-00-00"
    # a run that says where it goes, one that starts over, or a sweep never takes another run's directory
    assert chosen(composed_run([*TINY_RUN, "trainer.max_steps=8", "resume=never"])) not in {
        p.name for p in Path("outputs/runs").iterdir()
    }
    assert chosen(composed_run([*TINY_RUN, "trainer.max_steps=8"], mode="MULTIRUN")) not in {
        p.name for p in Path("outputs/runs").iterdir()
    }
    Path("outputs/runs/2026-01-01_00-00-00/error.txt").write_text(
        "the eval masked no token in 2 blocks\n"
    )  # failed: a decision, not an unfinished run
    assert chosen() not in {p.name for p in Path("outputs/runs").iterdir()}


def test_the_ranks_of_one_launch_resume_the_same_run_when_a_holder_ends_between_their_looks(tmp_path, monkeypatch):
    import psutil
    import socket

    from mlm import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(tmp_path))  # where the launch's choice is written
    cfg = composed_run([*TINY_RUN, "trainer.max_steps=8"])
    older = default_run(cfg, "2026-01-01_00-00-00", step=4)
    pid1 = {"host": socket.gethostname(), "pid": 1, "start": psutil.Process(1).create_time()}
    newest = default_run(cfg, "2026-01-04_00-00-00", step=2, lock=pid1)  # in use by another live process

    def rank(r):
        for key, value in {"RANK": r, "LOCAL_RANK": r, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2}.items():
            monkeypatch.setenv(key, str(value))
        cli._stamps.clear()  # each rank is a process of its own
        return cli.launch_stamp(_root_=cfg)

    assert rank(0) == older.name
    (newest / "run.lock").write_text("")  # its holder ends cleanly before rank 1 looks: alone, rank 1 would take it
    assert rank(1) == older.name
    assert cli.agreed_choice(lambda: "other") == older.name  # the same launcher: its first choice stands


def test_the_resume_command_is_the_command_given_with_its_run_dir(tmp_path, monkeypatch):
    from mlm.rundir import python_name, resume_command

    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "MLM_MAKE_TARGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        sys, "argv", ["run.py", "model=tiny", "+hydra.job.env_set.HF_TOKEN=hf_abc", "optimizer.lr=1e-4"]
    )
    run_dir = tmp_path / "outputs" / "runs" / "2026-01-01_00-00-00"
    # the secret is left out, not masked (a pasted *** would be the token), and named after the command
    assert resume_command(Path("outputs/runs/2026-01-01_00-00-00")) == (
        f"{python_name()} run.py model=tiny optimizer.lr=1e-4 hydra.run.dir={run_dir} (and add again, with its value: +hydra.job.env_set.HF_TOKEN=...)"
    )
    monkeypatch.setenv("MLM_MAKE_TARGET", "train")  # what the Makefile's train target sets
    assert resume_command(run_dir) == (
        f'make train ARGS="model=tiny optimizer.lr=1e-4 hydra.run.dir={run_dir}" '
        "(and add again, with its value: +hydra.job.env_set.HF_TOKEN=...)"
    )
    monkeypatch.setattr(sys, "argv", ["run.py", "hydra.run.dir=here"])  # named: as given
    assert resume_command(tmp_path / "here") == 'make train ARGS="hydra.run.dir=here"'
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank's argv is not the launcher's
    assert resume_command(tmp_path / "here") == "the same launch command (torchrun, accelerate launch, srun)"
    monkeypatch.setattr(sys, "argv", ["run.py"])
    assert (
        resume_command(run_dir)
        == f"the same launch command (torchrun, accelerate launch, srun) with hydra.run.dir={run_dir} added"
    )


def test_error_txt_gives_the_resume_command_only_for_a_failure_a_rerun_gets_past(tmp_path, monkeypatch):
    import errno

    from mlm.cli import _fail
    from mlm.config import Resumable
    from mlm.files import write_error

    for name in ("RANK", "WORLD_SIZE", "MLM_MAKE_TARGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["run.py", f"hydra.run.dir={tmp_path}"])
    (tmp_path / "checkpoints" / "ckpt-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ckpt-00000004" / "manifest.json").write_text(json.dumps({"step": 4, "files": {}}))
    job = {"multirun": True}  # returns instead of exiting
    _fail(tmp_path, job, "the eval masked no token in 2 blocks")  # a setting: the same command fails again
    assert (tmp_path / "error.txt").read_text() == "the eval masked no token in 2 blocks\n"
    full = write_error("metrics", tmp_path / "metrics.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, Resumable)  # run_job passes resumable=isinstance(e, Resumable)
    _fail(tmp_path, job, str(full), resumable=True)
    from mlm.rundir import python_name

    assert (tmp_path / "error.txt").read_text().splitlines() == [
        str(full),
        f"resume with: {python_name()} run.py hydra.run.dir={tmp_path}",
    ]


def test_only_the_main_process_prints_its_error_and_stop_lines(tmp_path, monkeypatch, capsys, caplog):
    from mlm.cli import _fail, main_process_says

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 of a torchrun launch: its console would repeat rank 0's line
    with caplog.at_level(logging.WARNING, logger="mlm"):
        main_process_says("stopped: a stop signal on another process")
        with pytest.raises(SystemExit):
            _fail(tmp_path, {"multirun": False}, "cannot write metrics")
    assert capsys.readouterr().err == "" and "stopped: a stop signal on another process" in caplog.text
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of a second node: that node's output has its own copy
    main_process_says("stopped: by SIGINT")
    assert capsys.readouterr().err == "stopped: by SIGINT\n"
