"""Trackers: W&B offline runs, groups for sweeps, failures that do not stop training, no secrets, curves."""

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, run_cli, sentences

SECRET = "wandbkey-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(sentences(300)))
    return path


def offline_runs(run_dir: Path):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def read_wandb_run(run_dir: Path):
    """Config and history of an offline run, read back with wandb's own datastore reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    [run] = offline_runs(run_dir)
    [path] = run.glob("*.wandb")
    ds = datastore.DataStore()
    ds.open_for_scan(str(path))
    config, history, run_info = {}, [], None
    while True:
        data = ds.scan_data()
        if data is None:
            break
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "run":
            run_info = rec.run
    return config, history, run_info


def test_offline_wandb_run_has_metrics_and_config_and_no_secret(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HF_TOKEN": SECRET}  # no key: auto mode must go offline
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", f"hydra.run.dir={run_dir}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline" in proc.stdout + proc.stderr and "wandb sync" in proc.stdout + proc.stderr
    config, history, run = read_wandb_run(run_dir)
    assert config["block_size"]["value"] == 32 and config["model.source"]["value"] == "scratch"
    assert any("eval/perplexity" in h for h in history)
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_s"} <= set().union(*history)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_api_key_never_written_to_run_files(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET}
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", "tracker=all", f"hydra.run.dir={run_dir}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "metrics_train.csv" for p in files) and any("tfevents" in p.name for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_multirun_jobs_share_a_wandb_group(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", "optimizer.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"],
                   env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [read_wandb_run(sweep / str(i))[2] for i in range(2)]
    assert infos[0].run_group == infos[1].run_group == "sweep"
    assert {i.display_name for i in infos} == {"optimizer.lr=1e-3", "optimizer.lr=2e-3"} or all("optimizer.lr=" in i.display_name for i in infos)
    assert all(any(t.startswith("optimizer.lr=") for t in i.tags) for i in infos)


def test_a_tracker_that_raises_does_not_stop_training(tmp_path, caplog):
    from mlm.tracking import JsonlTracker, SafeTrackers

    class Broken:
        run_id = None

        def log(self, metrics, step):
            raise RuntimeError("server said no")

        summary = finish = lambda *a: None

    trackers = SafeTrackers([Broken(), JsonlTracker(tmp_path)])
    trackers.log({"train/loss": 1.0}, 1)
    trackers.log({"train/loss": 0.5}, 2)
    assert caplog.text.count("server said no") == 1  # said once, then switched off
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the others keep logging


def test_broken_tracker_in_a_real_run(corpus, tmp_path, monkeypatch, caplog):
    """A run whose W&B client raises on every log still trains to the end."""
    import mlm.tracking
    from mlm.train import train
    from tests.conftest import compose

    def broken_log(self, metrics, step):
        raise ConnectionError("W&B is down")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(mlm.tracking.WandbTracker, "log", broken_log)
    cfg = compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb"])
    results = train(cfg, tmp_path)
    assert results["steps"] == 4 and (tmp_path / "results.json").exists()
    assert "W&B is down" in caplog.text and "switched off" in caplog.text
    assert len([r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in r]) == 4


def test_scrub_masks_secret_keys_and_values(monkeypatch):
    from mlm.tracking import scrub

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cleaned = scrub({"tracker": {"api_key": "abc"}, "note": f"key={SECRET}", "lr": 1e-3})
    assert cleaned == {"tracker": {"api_key": "***"}, "note": "key=***", "lr": 1e-3}


def test_curves_png_is_written(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0
    data = (run_dir / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
