"""trainer.async_checkpoint: the write of a checkpoint runs in the background from a host copy of the step's state."""

import errno
import threading

import pytest
from safetensors import safe_open

from mlm import checkpoint
from mlm.config import UserError
from tests.test_precision import FACTS, checkpoints, fresh_accelerate_state, setup, step  # noqa: F401 (a fixture)


def held_writes(monkeypatch):
    """Every checkpoint write waits before its first byte until the returned event is set."""
    release, write_files = threading.Event(), checkpoint.write_files
    monkeypatch.setattr(checkpoint, "write_files", lambda *args: release.wait() and write_files(*args))
    return release


def contents(path):
    """Every file's bytes, but model.safetensors as its tensors and metadata: safetensors writes its metadata (the tied
    names) in hash-map order, so two saves of the same weights differ in those bytes (and so in the manifest's hash)."""
    found = {
        p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name not in ("model.safetensors", "manifest.json")
    }
    with safe_open(path / "model.safetensors", "pt") as f:
        found["model.safetensors"] = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    return found


def assert_same(a, b):
    (weights, metadata), (expected, expected_metadata) = a.pop("model.safetensors"), b.pop("model.safetensors")
    assert metadata == expected_metadata and weights.keys() == expected.keys()
    assert all(weights[k].equal(expected[k]) for k in weights)  # bitwise
    assert a == b  # every byte of optimizer.pt, scheduler.pt, rng-0.json, state.json


def test_a_background_checkpoint_holds_its_step_while_the_next_steps_run(fresh_accelerate_state, tmp_path, monkeypatch):
    parts = setup("no")
    for n in range(2):
        step(parts, n)
    save = lambda where, writer=None: checkpoints(parts, where, writer).save(2, FACTS, wait=False)  # noqa: E731
    synchronous = save(tmp_path / "sync")

    release = held_writes(monkeypatch)
    writer = checkpoint.Writer(background=True)
    background = save(tmp_path / "async", writer)
    assert not background.exists() and (tmp_path / "async" / "checkpoints" / ".tmp-ckpt-00000002").is_dir()  # in flight
    step(parts, 2)  # weights, optimizer moments, schedule, RNG all move on while it is written
    step(parts, 3)
    release.set()
    writer.wait()
    assert_same(contents(background), contents(synchronous))  # step 2's, not step 4's
    assert checkpoint.verify(background) is None


def test_a_background_write_error_is_raised_in_the_training_thread(fresh_accelerate_state, tmp_path, monkeypatch):
    parts = setup("no")
    writer = checkpoint.Writer(background=True)
    save = lambda n, wait: checkpoints(parts, tmp_path, writer).save(n, FACTS, wait=wait)  # noqa: E731
    first = save(1, wait=True)

    def full_disk(point):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.faults, "reached", full_disk)
    save(2, wait=False)
    writer._thread.join()  # the write has failed; nothing has raised yet
    with pytest.raises(UserError, match="cannot write checkpoint .*ckpt-00000002: No space left on device"):
        writer.check()  # what the loop calls every step
    writer.check()  # raised once
    assert checkpoint.list_checkpoints(tmp_path) == [first]  # not pruned for a checkpoint that never completed
    assert not (tmp_path / "checkpoints" / ".tmp-ckpt-00000002").exists()

    save(3, wait=False)  # and at the wait, e.g. before the final checkpoint
    with pytest.raises(UserError, match="ckpt-00000003"):
        writer.wait()
