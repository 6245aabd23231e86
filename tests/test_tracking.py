"""Trackers: W&B offline runs, groups for sweeps, failures that do not stop training, no secrets, curves."""

import json
import struct
from pathlib import Path

from tests.conftest import TINY_RUN, run_cli

SECRET = "wandbkey-0123456789abcdef0123456789abcdef"


def offline_runs(run_dir: Path):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(path: Path):
    """Protobuf records of a .wandb file: a ':W&B' header, then a LevelDB-style log of 32 KiB blocks
    whose records are [crc32][length u16][type u8] + payload (type 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


def read_wandb_run(run_dir: Path):
    """Config, history and run record of the offline run in `run_dir`, parsed with wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    [run] = offline_runs(run_dir)
    [path] = run.glob("*.wandb")
    config, history, run_info = {}, [], None
    for payload in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "run":
            run_info = rec.run
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
    return config, history, run_info


def test_offline_wandb_run_has_metrics_and_config_and_no_secret(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HF_TOKEN": SECRET}  # no key: auto mode must go offline
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", f"hydra.run.dir={run_dir}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline" in proc.stdout + proc.stderr and "wandb sync" in proc.stdout + proc.stderr
    config, history, run = read_wandb_run(run_dir)
    assert config["block_size"] == 32 and config["model.source"] == "scratch"
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
    assert len({i.display_name for i in infos}) == 2 and all("optimizer.lr=" in i.display_name for i in infos)
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
    # settings whose names merely contain "token" are kept: a run must record its tokenizer
    model = {"tokenizer": "distilroberta-base", "arch": {"pad_token_id": 1}, "hf_token": "abc", "HF_TOKEN": "abc"}
    assert scrub({"model": model})["model"] == {**model, "hf_token": "***", "HF_TOKEN": "***"}


def test_curves_png_is_written(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0
    data = (run_dir / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_resumed_run_continues_the_same_wandb_run(corpus, tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    from mlm.train import train
    from tests.conftest import compose

    def run_ids():
        ids = []
        for run in offline_runs(tmp_path):
            for payload in wandb_records(next(run.glob("*.wandb"))):
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(payload)
                if rec.WhichOneof("record_type") == "run":
                    ids.append(rec.run.run_id)
        return ids

    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", "trainer.max_steps=2"]), tmp_path)
    train(compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", "trainer.max_steps=4"]), tmp_path)  # resume=auto
    ids = run_ids()
    assert len(ids) == 2 and ids[0] == ids[1]  # two sessions, one W&B run
