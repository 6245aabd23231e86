"""Checkpoint verification and rotation on hand-made checkpoint directories (fast: no training)."""

import json
from pathlib import Path

import pytest

from mlm import checkpoint
from mlm.config import UserError


STATE = json.dumps({"format": checkpoint.FORMAT}).encode()  # state.json's one key read before verification


def make_checkpoint(root: Path, step: int, files=None) -> Path:
    """A checkpoint directory as Checkpoints.save lays it out: the files, then a manifest of their hashes."""
    path = root / "checkpoints" / f"ckpt-{step:08d}"
    for name, data in (files or {"model.safetensors": b"w" * 1000, "state.json": STATE}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    records = {str(p.relative_to(path)): checkpoint.file_record(p) for p in sorted(path.rglob("*")) if p.is_file()}
    (path / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": records}))
    return path


SHARDED = {
    "sharded/.metadata": b"m" * 300,
    "sharded/__0_0.distcp": b"a" * 500,
    "sharded/__1_0.distcp": b"b" * 500,
    "state.json": STATE,
}


def test_a_checkpoint_verifies_as_written(tmp_path):
    assert checkpoint.verify(make_checkpoint(tmp_path, 2)) is None
    assert checkpoint.verify(make_checkpoint(tmp_path, 4, SHARDED)) is None


@pytest.mark.parametrize("name", list(SHARDED))
def test_any_changed_byte_of_a_sharded_checkpoint_is_caught_before_it_is_read(tmp_path, name):
    path = make_checkpoint(tmp_path, 4, SHARDED)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 1  # one bit, size kept
    (path / name).write_bytes(bytes(data))
    assert checkpoint.verify(path) == f"{name} changed after it was written (its SHA-256 differs from manifest.json)"


def test_a_file_planted_in_a_checkpoint_fails_verification(tmp_path):
    path = make_checkpoint(tmp_path, 4, SHARDED)
    (path / "sharded" / "__2_0.distcp").write_bytes(b"x")  # e.g. a pickle torch.distributed.checkpoint would read
    assert "holds files this run did not write: sharded/__2_0.distcp" in checkpoint.verify(path)


def test_auto_resume_sets_bad_checkpoints_aside_and_takes_the_newest_good_one(tmp_path):
    good = make_checkpoint(tmp_path, 2)
    for step in (4, 6):
        bad = make_checkpoint(tmp_path, step)
        (bad / "model.safetensors").write_bytes(b"x" * 1000)
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt-00000002",
        "corrupt-ckpt-00000004",
        "corrupt-ckpt-00000006",
    ]
    assert checkpoint.list_checkpoints(tmp_path) == [good]  # set aside: never resumed, never rotated


def test_an_explicit_resume_path_that_fails_verification_is_refused(tmp_path):
    bad = make_checkpoint(tmp_path, 4)
    (bad / "state.json").write_bytes(b"[" + b" " * (len(STATE) - 2) + b"]")  # size kept
    with pytest.raises(UserError, match="state.json changed after it was written"):
        checkpoint.resolve_resume(str(bad), tmp_path)
    assert bad.is_dir()  # the user's own choice: not moved


def test_rotation_keeps_the_checkpoint_just_written_even_below_newer_steps(tmp_path):
    """Newer-numbered checkpoints (left by another run in the dir) must not push out the one just saved."""
    for step in (8, 9):
        make_checkpoint(tmp_path, step)
    written = make_checkpoint(tmp_path, 5)
    checkpoint._prune(tmp_path / "checkpoints", 2, written)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000009", "ckpt-00000005"]


@pytest.mark.parametrize("state", [{}, {"format": checkpoint.FORMAT + 1}])
def test_a_checkpoint_of_another_format_is_refused_in_one_line_with_the_way_out(tmp_path, state):
    path = make_checkpoint(tmp_path, 2, {"state.json": json.dumps(state).encode()})
    found = state.get("format", "none (an earlier version)")
    for resume in ("auto", str(path)):
        with pytest.raises(UserError) as refused:
            checkpoint.resolve_resume(resume, tmp_path)
        assert str(refused.value) == (
            f"checkpoint {path} is of checkpoint format {found}; this version reads format {checkpoint.FORMAT} only "
            "(CHANGELOG.md): train from its run's final/ (model.source=pretrained model.name_or_path=<run>/final), "
            "or start over (resume=never)"
        )
    with pytest.raises(UserError, match="is of checkpoint format"):
        checkpoint.read_state(path)  # what a load and mlm.export read first
    assert checkpoint.list_checkpoints(tmp_path) == [path]  # refused, not set aside or deleted
    assert checkpoint.resume_candidates("never", tmp_path) == []  # starting over reads none of it


def test_a_manifest_without_hashes_is_incomplete(tmp_path):
    path = make_checkpoint(tmp_path, 2)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"] = {k: v["size"] for k, v in manifest["files"].items()}  # sizes only
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(path).startswith("incomplete") and checkpoint.list_checkpoints(tmp_path) == []


class OneProcess:
    """What load_newest needs of an Accelerator, for one process."""

    num_processes, is_main_process = 1, True

    def wait_for_everyone(self):
        pass


def test_checkpoints_that_verify_but_fail_to_load_are_tried_newest_first_then_refused(tmp_path):
    """No fresh start after a failed load: the model and optimizer may hold half of that checkpoint."""
    for step in (2, 4):
        make_checkpoint(tmp_path, step)
    tried = []

    def load(path):
        tried.append(path.name)
        if path.name == "ckpt-00000004":
            raise RuntimeError("written wrong")
        return {"step": 2}

    assert checkpoint.load_newest("auto", tmp_path, load, OneProcess()) == (
        tmp_path / "checkpoints" / "ckpt-00000002",
        {"step": 2},
    )
    assert tried == ["ckpt-00000004", "ckpt-00000002"] and (tmp_path / "checkpoints" / "corrupt-ckpt-00000004").is_dir()

    def never(path):
        raise RuntimeError("a bug in loading")

    with pytest.raises(
        UserError, match="no checkpoint in .* loads \\(ckpt-00000002: RuntimeError: a bug in loading\\)"
    ):
        checkpoint.load_newest("auto", tmp_path, never, OneProcess())
    assert checkpoint.list_checkpoints(tmp_path) == []  # set aside, not deleted
    assert checkpoint.load_newest("auto", tmp_path / "empty", never, OneProcess()) == (
        None,
        None,
    )  # nothing there: a fresh start
