"""Bad input: one clear line, a non-zero exit, and nothing a later resume would mistake for progress."""

import errno
import os

import torch

import pytest

from mlm.config import UserError
from tests.conftest import TINY_RUN, compose, run_cli, run_in_process


def assert_clean_failure(proc, run_dir, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["dataset.path=/nonexistent/data.txt"], ["/nonexistent/data.txt", "no such file"]),
        (["masking.mlm_probability=0"], ["mlm_probability=0.0", "strictly between 0 and 1"]),
        (["masking.mlm_probability=1"], ["mlm_probability=1.0"]),
        (["masking.mlm_probability=-0.2"], ["mlm_probability=-0.2"]),
        (["block_size=1024"], ["block_size=1024", "512 positions"]),
        (["dataset.streaming=true", "trainer.max_steps=-1"], ["dataset.streaming=true needs trainer.max_steps > 0"]),
        (["optimizer.beta2=1.0"], ["optimizer.beta2=1.0 must be in [0, 1)"]),  # was torch's ValueError, a traceback
        (["model.attn_implementation=bogus"], ["model.attn_implementation='bogus' is not an attention backend"]),
    ],
)
def test_bad_values_fail_with_one_line(tmp_path, corpus, overrides, needles):
    run_dir = tmp_path / "run"
    proc = run_in_process([*TINY_RUN, f"dataset.path={corpus}", *overrides, f"hydra.run.dir={run_dir}"])
    assert_clean_failure(proc, run_dir, *needles)


def test_missing_text_field_via_cli(tmp_path, eli5_file):
    run_dir = tmp_path / "run"
    proc = run_in_process(
        [*TINY_RUN, f"dataset.path={eli5_file}", "dataset.text_field=body", f"hydra.run.dir={run_dir}"]
    )
    assert_clean_failure(proc, run_dir, "'body' does not exist", "answers")


def test_empty_file_and_too_small_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_in_process([*TINY_RUN, f"dataset.path={empty}", f"hydra.run.dir={tmp_path / 'a'}"])
    assert_clean_failure(proc, tmp_path / "a", "is empty")
    small = tmp_path / "small.txt"
    small.write_text("one short line\nanother short line\n")
    proc = run_in_process(
        [*TINY_RUN, f"dataset.path={small}", "dataset.test_size=0.5", f"hydra.run.dir={tmp_path / 'b'}"]
    )
    assert_clean_failure(proc, tmp_path / "b", "not enough for one block")


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_in_process(
        [*TINY_RUN, "dataset.path=/nonexistent.txt", "debug=true", f"hydra.run.dir={tmp_path}"],
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_checkpoint_from_a_different_model_is_refused(tmp_path, corpus):
    from mlm.train import train

    cfg = compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=2", "trainer.save_model=false"])
    train(cfg, tmp_path)
    other = compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=4", "model.arch.hidden_size=48"])
    with pytest.raises(UserError, match="belongs to a different model"):
        train(other, tmp_path)


@pytest.mark.parametrize(
    "code,advice",
    [
        (errno.ENOSPC, "(free disk space, then resume)"),
        (
            errno.EEXIST,
            "during the write; is another process writing into it?",
        ),  # a collision: no advice about space or permissions
    ],
)
def test_failed_checkpoint_write_says_what_happened(tmp_path, corpus, monkeypatch, code, advice):
    import mlm.checkpoint
    from mlm.train import train

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mlm.checkpoint, "save_file", fail)  # the write of model.safetensors
    cfg = compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=2"])
    with pytest.raises(UserError) as err:
        train(cfg, tmp_path)
    assert f"{os.strerror(code)} (" in str(err.value) and advice in str(err.value)
    assert ("free" in str(err.value) or "permission" in str(err.value)) == (code == errno.ENOSPC)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the half-written checkpoint is gone
    assert not (tmp_path / "results.json").exists()


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    import mlm.train
    from mlm.checkpoint import list_checkpoints

    real_step = mlm.train.train_step
    calls = {"n": 0}

    def poisoned(objective, optimizer, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a weight turns NaN before the third step: its loss is NaN
            with torch.no_grad():
                next(objective.parameters()).fill_(float("nan"))
        return real_step(objective, optimizer, *args, **kwargs)

    monkeypatch.setattr(mlm.train, "train_step", poisoned)
    cfg = compose(
        [
            *TINY_RUN,
            f"dataset.path={corpus}",
            "trainer.max_steps=4",
            "trainer.checkpoint_every=2",
            "trainer.eval_every=100",
        ]
    )
    with pytest.raises(mlm.train.NonFiniteLoss, match="at step 3") as err:
        mlm.train.train(cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002"]
    assert str(err.value).endswith(f"the newest verified checkpoint is {tmp_path / 'checkpoints' / 'ckpt-00000002'}")
    assert not (tmp_path / "results.json").exists()
    # before any checkpoint: no directory is named that does not exist
    calls["n"] = 0
    cfg.trainer.checkpoint_every = 0
    with pytest.raises(mlm.train.NonFiniteLoss, match="at step 3") as err:
        mlm.train.train(cfg, tmp_path / "fresh")
    assert (
        str(err.value).endswith("no verified checkpoint was written before it")
        and not (tmp_path / "fresh" / "checkpoints").exists()
    )


@pytest.mark.slow
def test_a_killed_run_resumes_with_its_speed_and_memory_settings_changed(corpus, tmp_path):
    """The settings that change no result (tests.test_config.SPEED) were each a refusal of the resume."""
    import signal

    from tests.test_config import SPEED

    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=4",
        "trainer.checkpoint_every=2",
        "trainer.save_model=false",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_cli(args, env={"MLM_FAULT_KILL_AT": "step:3"}).returncode == -signal.SIGKILL
    resumed = run_in_process([*args, *SPEED])  # only the kill needs a process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'ckpt-00000002'}" in resumed.stdout + resumed.stderr
    assert "other settings" not in resumed.stdout + resumed.stderr


def test_every_command_ends_a_user_error_the_same_way(capsys):
    """mlm.errors: what run.py, mlm.predict, mlm.export and mlm.downstream do with a UserError, in one place."""
    from mlm.errors import exit_code, exit_on_user_error

    def fails():
        raise UserError("no such file: x.txt")

    assert exit_code(fails) == 2 and capsys.readouterr().err == "error: no such file: x.txt\n"
    assert exit_code(lambda: print("done")) == 0 and capsys.readouterr() == ("done\n", "")
    with pytest.raises(UserError):  # --debug: the traceback instead
        exit_code(fails, debug=True)
    with pytest.raises(ZeroDivisionError):  # a crash stays a traceback
        exit_code(lambda: 1 / 0)
    with pytest.raises(SystemExit) as stop:
        with exit_on_user_error():
            fails()
    assert stop.value.code == 2 and capsys.readouterr().err == "error: no such file: x.txt\n"
    with pytest.raises(SystemExit) as stop:
        with exit_on_user_error(say=None):  # another process of the launch says it
            fails()
    assert stop.value.code == 2 and capsys.readouterr().err == ""
