"""Crash safety: SIGKILL at any moment, resume, and end exactly where an uninterrupted run ends."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_RUN, check_settings_as_run_py, compose, run_cli, run_in_process

pytestmark = pytest.mark.slow

# fp32, dropout on (so the RNG state matters), checkpoints every 3 steps, eval every 4
RUN = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "trainer.max_steps=14",
    "trainer.checkpoint_every=3",
    "trainer.eval_every=4",
    "trainer.log_every=1",
    "trainer.keep_checkpoints=2",
    "trainer.save_model=true",
]
TIMING = ("perf/",)  # wall-clock figures differ between any two runs; everything else must not


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference, trained in process (what run.py adds to a run is not compared: .hydra/, run.log)."""
    from mlm.train import train

    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(compose([*RUN, f"dataset.path={corpus}"]), run_dir)
    return run_dir


def records(run_dir: Path):
    """Every record of metrics.jsonl without its timing keys, in file order (so duplicates and gaps show)."""
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def start(corpus, run_dir, env=None):
    cmd = [sys.executable, str(ROOT / "run.py"), *RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def rerun(run_dir: Path, args, caplog) -> str:
    """The run's rerun (resume=auto), in process after run.py's settings check: what it logged. (Resuming by the same command is tests/test_failures.py's.)"""
    from mlm.train import train

    cfg = compose([a for a in args if not a.startswith("hydra.run.dir=")])
    check_settings_as_run_py(cfg, run_dir)
    caplog.clear()
    caplog.set_level(logging.INFO)
    train(cfg, run_dir)
    return caplog.text


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("kill point never reached")


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [
        json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")
    ]  # not a line being written
    return max(steps, default=0)


def assert_same_as_uninterrupted(run_dir: Path, reference: Path, other_settings=()):
    """(other_settings: keys of results.json's config that these two runs set differently on purpose)"""
    a = load_file(run_dir / "final" / "model.safetensors")
    b = load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"{k} differs"  # bitwise identical weights
    assert records(run_dir) == records(reference)  # every logged value, including steps after the checkpoint
    measured = (
        "train_seconds",
        "tokens_per_s",
        "mfu",
        "wall_seconds",
        "peak_rss_mb",
        "data_wait",
    )  # of this process, not of the training
    results, expected = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    for key in other_settings:
        assert results["config"].pop(key) != expected["config"].pop(key)
    assert {k: v for k, v in results.items() if k not in measured} == {
        k: v for k, v in expected.items() if k not in measured
    }


@pytest.fixture(scope="module")
def killed_mid_run(corpus, tmp_path_factory):
    """A run SIGKILLed between checkpoints, past those at 3 and 6, mid-way to 9; each test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = start(corpus, run_dir)
    wait_for(lambda: last_step(run_dir) >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    return run_dir


def copy_of(killed_mid_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(killed_mid_run, run_dir)
    return run_dir


def test_sigkill_during_training_then_resume_is_exact(corpus, uninterrupted, killed_mid_run, tmp_path, caplog):
    run_dir = copy_of(killed_mid_run, tmp_path)
    assert "resumed from" in rerun(run_dir, [*RUN, f"dataset.path={corpus}"], caplog)
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_sigkill_during_checkpoint_write_leaves_no_valid_looking_checkpoint(corpus, uninterrupted, tmp_path, caplog):
    run_dir = tmp_path / "run"
    proc = start(corpus, run_dir, env={"MLM_FAULT_CHECKPOINT_DELAY": "30"})  # every write hangs half-done
    tmp_ckpt = run_dir / "checkpoints" / ".tmp-ckpt-00000003"
    wait_for(lambda: (tmp_ckpt / "model.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from mlm.checkpoint import list_checkpoints

    assert list_checkpoints(run_dir) == []  # the half-written one is not mistaken for progress
    # and a corrupt complete-looking one (a complete checkpoint, the reference's newest, its weights truncated) is
    # skipped with a warning naming it
    corrupt = run_dir / "checkpoints" / "ckpt-00000099"
    shutil.copytree(list_checkpoints(uninterrupted)[0], corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert f"skipping incomplete or corrupt checkpoint {corrupt}" in rerun(
        run_dir, [*RUN, f"dataset.path={corpus}"], caplog
    )
    shutil.rmtree(corrupt)
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_sigkill_during_a_background_checkpoint_write_resumes_exactly_from_the_one_before(
    corpus, uninterrupted, tmp_path, caplog
):
    """trainer.async_checkpoint: every write is held half-done until two more steps ran; the second one (checkpoint 6)
    is then killed. The reference run wrote synchronously, so the results are also the same with the option on and off."""
    from mlm.checkpoint import list_checkpoints, newest_verified

    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.async_checkpoint=true", f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    killed = run_cli(args, env={"MLM_FAULT_CHECKPOINT_HOLD_STEPS": "2", "MLM_FAULT_KILL_AT": "checkpoint:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert last_step(run_dir) >= 7  # step 7 was trained and logged while checkpoint 6 was being written
    assert (run_dir / "checkpoints" / ".tmp-ckpt-00000006" / "optimizer.pt").exists()  # killed mid-write
    assert newest_verified(run_dir) == run_dir / "checkpoints" / "ckpt-00000003"
    assert "at step 3\n" in rerun(
        run_dir, args, caplog
    )  # writes 6, 9 and 12 in the background again; the last is waited for
    assert_same_as_uninterrupted(run_dir, uninterrupted, other_settings=["trainer.async_checkpoint"])
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-00000014", "ckpt-00000012"]  # pruned once complete
    assert not list(run_dir.rglob(".tmp-*"))


def test_a_stop_signal_completes_the_background_write_in_flight_and_its_own(corpus, uninterrupted, tmp_path, caplog):
    """SIGTERM at step 5 while checkpoint 3 is held half-written in the background: the stop after step 6 waits for it,
    writes checkpoint 6, and the rerun resumes from 6 exactly. (At step 4, an eval step, the stop would give that eval up,
    which the rerun does not redo: not an uninterrupted run's records.)"""
    from mlm.checkpoint import list_checkpoints, verify

    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.async_checkpoint=true", f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    stopped = run_cli(args, env={"MLM_FAULT_CHECKPOINT_HOLD_STEPS": "3", "MLM_FAULT_SIGNAL_AT": "step:5:SIGTERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after step 6" in stopped.stderr
    checkpoints = list_checkpoints(run_dir)
    assert [p.name for p in checkpoints] == ["ckpt-00000006", "ckpt-00000003"] and not [
        p for p in checkpoints if verify(p)
    ]
    assert not list(run_dir.rglob(".tmp-*"))
    assert "at step 6\n" in rerun(run_dir, args, caplog)
    assert_same_as_uninterrupted(run_dir, uninterrupted, other_settings=["trainer.async_checkpoint"])


def test_keeps_only_the_last_k_checkpoints(uninterrupted):
    from mlm.checkpoint import list_checkpoints

    kept = list_checkpoints(uninterrupted)
    assert [p.name for p in kept] == ["ckpt-00000014", "ckpt-00000012"]
    state = json.loads((kept[0] / "state.json").read_text())
    assert state["step"] == 14 and state["train_state"]["tokens"] == 14 * 4 * 32


# One kill per moment of a run's life, each in a fresh process that resumes the same run directory
# (counts are per process: "eval:2" is the second evaluation this process runs). With 14 steps,
# checkpoints every 3 and evals every 4, the runs below go:
KILLS = [  # (kill point, the step the run resumes from: None for a fresh start)
    ("startup:1", None),  # fresh start, killed before anything is logged
    ("eval:2", None),  # fresh again: eval at step 0 logged, killed computing the eval at step 4 (checkpoint 3 on disk)
    ("checkpoint:2", 3),  # checkpoint 6 written, killed half-way through checkpoint 9
    ("metrics:5", 6),  # killed in the middle of writing its 5th record (step 10's): a torn last line
    ("step:3", 9),  # drops the torn line; killed right after the optimizer step 12, before checkpoint 12
    ("final:1", 9),  # final eval and checkpoint 14 done, killed with final/ half-saved
    ("results:1", 14),  # the final eval is logged already; killed before results.json
]


def test_kills_at_every_phase_then_resume_match_an_uninterrupted_run(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    for i, (point, resumes_at) in enumerate(KILLS):
        proc = run_cli(args, env={"MLM_FAULT_KILL_AT": point})
        out = proc.stdout + proc.stderr
        assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert ("resumed from" not in out) if resumes_at is None else (f"at step {resumes_at}\n" in out), out[-3000:]
        assert not (run_dir / "results.json").exists()
        if i and KILLS[i - 1][0].startswith("metrics"):  # the torn line was dropped with one warning naming it
            assert out.count("metrics.jsonl line") == 1 and "is not a complete record" in out, out[-3000:]
        if point.startswith("metrics"):
            assert not (run_dir / "metrics.jsonl").read_text().endswith("\n"), "the kill should leave a torn last line"
        if point.startswith("final"):
            assert not (run_dir / "final").exists()  # half a model never appears under the final name
    done = run_in_process(args)  # only the kills need a process
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 14\n" in done.stdout + done.stderr  # only final/ and results.json were left to do
    assert_same_as_uninterrupted(run_dir, uninterrupted)
    assert not [p.name for p in run_dir.rglob(".tmp-*")] and not [p.name for p in run_dir.rglob(".old-*")]

    # run again: finished, says so in one line, trains and logs nothing
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    again = run_in_process(args)  # (the same as a process: tests/test_run.py)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines() == [again.stdout.strip()] and "already finished" in again.stdout
    assert str(run_dir / "results.json") in again.stdout and again.stderr.strip() == ""
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def flip_bytes(path: Path, count: int = 64) -> None:
    """Change `count` bytes in the middle of a file, keeping its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rng-0.json"])
def test_changed_bytes_in_the_newest_checkpoint_resume_from_the_older_one_exactly(
    corpus, uninterrupted, killed_mid_run, tmp_path, damaged, caplog
):
    run_dir = copy_of(killed_mid_run, tmp_path)
    newest = run_dir / "checkpoints" / "ckpt-00000006"
    flip_bytes(newest / damaged, count=min(64, (newest / damaged).stat().st_size // 4))
    out = rerun(run_dir, [*RUN, f"dataset.path={corpus}"], caplog)
    assert f"{damaged} changed after it was written" in out and "at step 3\n" in out, out[-3000:]
    aside = run_dir / "checkpoints" / "corrupt-ckpt-00000006"
    assert (aside / damaged).exists()  # kept for a look, out of the way of resume and rotation
    shutil.rmtree(aside)
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_a_checkpoint_that_verifies_but_fails_to_load_is_set_aside(corpus, killed_mid_run, tmp_path, caplog):
    """Files that hash as the manifest says but do not load (written wrong, not damaged later)."""
    from mlm.checkpoint import MANIFEST, file_record

    run_dir = copy_of(killed_mid_run, tmp_path)
    newest = run_dir / "checkpoints" / "ckpt-00000006"
    (newest / "optimizer.pt").write_bytes(b"not a torch file")
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["optimizer.pt"] = file_record(newest / "optimizer.pt")
    (newest / MANIFEST).write_text(json.dumps(manifest))
    out = rerun(run_dir, [*RUN, f"dataset.path={corpus}"], caplog)
    assert "failed to load" in out and "at step 3\n" in out, out[-3000:]
    assert (run_dir / "checkpoints" / "corrupt-ckpt-00000006" / "optimizer.pt").read_bytes() == b"not a torch file"
