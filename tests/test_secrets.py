"""Secrets stay out of records: a token given on the command line (`+hydra.job.env_set.HF_TOKEN=...`) or held in
a secret-looking environment variable reaches no file of the run: run.lock, .hydra/, run.log, the trackers' files."""

import json
import sys

import pytest

from tests.conftest import TINY_RUN, run_cli, run_in_process

TOKEN = "hf_cmdlineSecret4242"  # given on the command line, for the job's environment
ENV_SECRET = "envSecret98765432"  # in the environment, under a secret-looking name


def test_scrub_masks_assignments_to_secret_keys_in_command_lines():
    from mlm.tracking import scrub

    argv = [
        "run.py",
        f"+hydra.job.env_set.HF_TOKEN={TOKEN}",
        f"hydra.job.env_set={{HF_TOKEN:{TOKEN},OMP_NUM_THREADS:2}}",
        f"--api-key={TOKEN}",
        "model.tokenizer=bert-base-uncased",
        "dataset.path=/data/secret:v2/a=b.txt",
        "optimizer.lr=1e-4",
    ]
    assert scrub(argv) == [
        "run.py",
        "+hydra.job.env_set.HF_TOKEN=***",
        "hydra.job.env_set={HF_TOKEN:***,OMP_NUM_THREADS:2}",
        "--api-key=***",
        "model.tokenizer=bert-base-uncased",
        "dataset.path=/data/secret:v2/a=b.txt",
        "optimizer.lr=1e-4",
    ]


def test_run_lock_records_the_command_line_masked(tmp_path, monkeypatch):
    from mlm.rundir import lock_run_dir, release_run_dir

    monkeypatch.setattr(sys, "argv", ["run.py", "model=tiny", f"+hydra.job.env_set.HF_TOKEN={TOKEN}"])
    lock_run_dir(tmp_path)
    try:
        record = json.loads((tmp_path / "run.lock").read_text())  # what a refused second run shows of the holder
    finally:
        release_run_dir(tmp_path)
    assert record["command"] == "run.py model=tiny +hydra.job.env_set.HF_TOKEN=***"


def test_hydra_snapshot_masks_secrets_and_is_otherwise_what_hydra_writes(tmp_path):
    import hydra.core.utils
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from mlm.cli import register, save_config_snapshot
    from mlm.config import CONF

    register()
    assert hydra.core.utils._save_config is save_config_snapshot  # what Hydra's run_job calls for .hydra/
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config",
            overrides=[*TINY_RUN, f"+hydra.job.env_set.HF_TOKEN={TOKEN}"],
            return_hydra_config=True,
        )
    save_config_snapshot(cfg.hydra, "hydra.yaml", tmp_path / ".hydra")
    written = (tmp_path / ".hydra" / "hydra.yaml").read_text()
    assert TOKEN not in written
    assert written == OmegaConf.to_yaml(cfg.hydra).replace(f"HF_TOKEN={TOKEN}", "HF_TOKEN=***").replace(
        f"HF_TOKEN: {TOKEN}", "HF_TOKEN: '***'"
    )


@pytest.mark.slow
def test_no_secret_reaches_any_file_of_a_run_and_its_rerun_still_resumes(tmp_path, corpus):
    import wandb

    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        f"dataset.path={corpus}",
        f"hydra.run.dir={run_dir}",
        "tracker=all",
        f"+hydra.job.env_set.HF_TOKEN={TOKEN}",
        "tracker.tags=[${oc.env:MY_SECRET}]",
    ]  # a secret that reaches the resolved config, hence W&B and TensorBoard
    env = {"WANDB_MODE": "offline", "MY_SECRET": ENV_SECRET}
    first = run_cli(args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.relative_to(run_dir).parts[0] for p in files}
    assert {".hydra", "run.log", "wandb", "tensorboard", "metrics_train.csv", "results.json"} <= kinds
    assert "HF_TOKEN: '***'" in (run_dir / ".hydra" / "hydra.yaml").read_text()  # the override was recorded, masked
    leaks = [str(p) for p in files for secret in (TOKEN, ENV_SECRET) if secret.encode() in p.read_bytes()]
    assert leaks == []
    # the saved configs are masked alike every time, so a rerun with more steps resumes the checkpoint (the command
    # line in process: what a fresh process writes, its trackers' services started with the secrets in their
    # environment, is the first run's)
    more = run_in_process([*args, "trainer.max_steps=6"], env=env)
    wandb.teardown()  # its service writes the run's file after finish() returns; a run.py process ends with it
    assert more.returncode == 0 and "resumed from" in (run_dir / "run.log").read_text(), more.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 6
    assert [str(p) for p in run_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()] == []


def test_a_sweep_records_no_secret(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0").mkdir(parents=True)
    (sweep_dir / "run.lock").touch()  # an earlier sweep's directory
    (sweep_dir / "0" / "notes.txt").write_text(
        "not a run\n"
    )  # the job is refused (not its directory): no training needed
    out = run_cli(
        [
            *TINY_RUN,
            f"dataset.path={corpus}",
            f"hydra.sweep.dir={sweep_dir}",
            f"+hydra.job.env_set.HF_TOKEN={TOKEN}",
            "-m",
        ]
    )
    assert out.returncode == 1 and "1 job(s) refused" in out.stderr, out.stderr[-2000:]
    assert (
        "HF_TOKEN: '***'" in (sweep_dir / "multirun.yaml").read_text()
    )  # the sweeper writes it; the job start masks it
    assert [str(p) for p in sweep_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()] == []


def test_parallel_jobs_mask_the_sweep_snapshot_together_without_an_error(tmp_path):
    """hydra/launcher=parallel starts every job at once, and each masks multirun.yaml: the loser of the
    rename race raised FileNotFoundError (a warning in every parallel sweep)."""
    import threading

    from mlm.cli import mask_sweep_snapshot

    secret = "hf_" + "q" * 30
    failures = []

    def job(barrier):
        barrier.wait()
        try:
            mask_sweep_snapshot(tmp_path)
        except Exception as e:  # noqa: BLE001 - any error is the failure under test
            failures.append(repr(e))

    for _ in range(30):
        (tmp_path / "multirun.yaml").write_text(
            f"hydra:\n  overrides:\n    task:\n    - +hydra.job.env_set.HF_TOKEN={secret}\n"
        )
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=job, args=(barrier,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert secret not in (tmp_path / "multirun.yaml").read_text()
    assert failures == []
