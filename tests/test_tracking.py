"""Trackers: W&B offline runs, groups for sweeps, failures that do not stop training, no secrets, curves."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from mlm.tracking import read_metrics
from tests.conftest import TINY_RUN, run_in_process

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
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
        elif kind == "run":
            run_info = rec.run
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
    return config, history, run_info


def test_offline_wandb_run_has_metrics_and_config_and_no_secret(corpus, tmp_path, monkeypatch, caplog):
    import wandb

    from mlm.train import train
    from tests.conftest import compose

    monkeypatch.delenv("WANDB_MODE", raising=False)  # no key: auto mode must go offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run_dir = tmp_path / "run"
    train(compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb"]), run_dir)
    wandb.teardown()  # its service writes the run's file after finish() returns; a run.py process ends with it
    assert "logging offline" in caplog.text and "wandb sync" in caplog.text
    config, history, run = read_wandb_run(run_dir)
    assert config["block_size"] == 32 and config["model.source"] == "scratch"
    assert any("eval/perplexity" in h for h in history)
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_s"} <= set().union(*history)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_api_key_never_written_to_run_files(corpus, tmp_path, monkeypatch):
    """The trackers' own files (what run.py adds, .hydra/ and run.log, is tests/test_secrets.py's)."""
    import wandb

    from mlm.train import train
    from tests.conftest import compose

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    train(compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=all"]), run_dir)
    wandb.teardown()  # its service writes the run's file after finish() returns; a run.py process ends with it
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "metrics_train.csv" for p in files) and any("tfevents" in p.name for p in files)
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_multirun_jobs_share_a_wandb_group(corpus, tmp_path):
    import wandb

    sweep = tmp_path / "sweep"
    proc = run_in_process(  # Hydra's multirun runs its jobs one by one in the process that starts it: this one
        [
            "-m",
            *TINY_RUN,
            f"dataset.path={corpus}",
            "tracker=wandb",
            "trainer.max_steps=1",  # what is checked is how each job's W&B run is named, not its training
            "trainer.eval_every=0",
            "trainer.save_model=false",
            "optimizer.lr=1e-3,2e-3",
            f"hydra.sweep.dir={sweep}",
        ],
        env={"WANDB_MODE": "offline"},
    )
    wandb.teardown()  # its service writes the runs' files after finish() returns; a run.py process ends with it
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


def test_resumed_run_continues_the_same_wandb_run(corpus, tmp_path, monkeypatch):
    import wandb
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
    train(
        compose([*TINY_RUN, f"dataset.path={corpus}", "tracker=wandb", "trainer.max_steps=4"]), tmp_path
    )  # resume=auto
    wandb.teardown()  # its service writes the run's file after finish() returns; a run.py process ends with it
    ids = run_ids()
    assert len(ids) == 2 and ids[0] == ids[1]  # two sessions, one W&B run


# --- a resume holds each step once in every tracker; a start-over starts them all over ---------------------------

REPLAY = [
    *TINY_RUN,
    "tracker=all",
    "trainer.max_steps=6",
    "trainer.checkpoint_every=3",
    "trainer.eval_every=2",
    "trainer.save_model=false",
]


@pytest.fixture(scope="module")
def killed_after_step_6(corpus, tmp_path_factory):
    """A run dir as a kill after step 6's records leaves it: every tracker holds steps 1-6, the newest checkpoint
    is step 3's (step 6's and results.json go, as if the kill came before them). Tests resume copies of it."""
    from mlm.checkpoint import list_checkpoints
    from mlm.train import train
    from tests.conftest import compose

    run_dir = tmp_path_factory.mktemp("killed") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        train(compose([*REPLAY, f"dataset.path={corpus}"]), run_dir)
    newest = list_checkpoints(run_dir)[0]
    assert newest.name == "ckpt-00000006"
    shutil.rmtree(newest)
    (run_dir / "results.json").unlink()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def csv_steps(path: Path):
    import csv

    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def tensorboard_steps(run_dir: Path, tag: str):
    """The steps of a scalar as TensorBoard's own reader shows them (it honours purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def wandb_sessions(run_dir: Path, run_id: str):
    """Each offline folder of one W&B run, oldest first: (run record, history rows), read with wandb's protobufs."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # wandb-core may still hold a finished run's last records; teardown waits for them (as exit does)

    sessions = []
    for folder in (run_dir / "wandb").glob("offline-run-*"):
        run, rows = None, []
        for payload in wandb_records(next(folder.glob("*.wandb"))):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                )
        if run.run_id == run_id:
            sessions.append((folder, run, rows))
    sessions.sort(key=lambda s: (s[1].start_time.seconds, s[1].start_time.nanos))  # not by name: see below
    return sessions


def test_a_resume_holds_each_step_once_in_every_tracker(corpus, killed_after_step_6, tmp_path, monkeypatch, caplog):
    from mlm.train import train
    from tests.conftest import compose

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = copy_of(killed_after_step_6, tmp_path)
    kept = [r for r in read_metrics(run_dir) if r["step"] <= 3]
    assert csv_steps(run_dir / "metrics_train.csv") == [1, 2, 3, 4, 5, 6]  # what the interrupted run logged
    with open(run_dir / "metrics_train.csv", "a") as f:
        f.write("7,0.51")  # and a row torn by the kill
    caplog.clear()
    caplog.set_level("INFO", logger="mlm.train")
    results = train(compose([*REPLAY, f"dataset.path={corpus}"]), run_dir)  # resume=auto: from step 3, steps 4-6 again
    assert results["steps"] == 6 and "resumed from" in caplog.text

    assert csv_steps(run_dir / "metrics_train.csv") == [1, 2, 3, 4, 5, 6]
    assert csv_steps(run_dir / "metrics_eval.csv") == [0, 2, 4, 6]
    assert tensorboard_steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(run_dir, "eval/perplexity") == [0, 2, 4, 6]
    assert (
        len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    )  # the old file is kept; readers purge it

    # W&B: one run, two offline folders (one per session); the second rewinds the run to the last record kept
    run_id = json.loads((run_dir / "checkpoints" / "ckpt-00000006" / "state.json").read_text())["train_state"][
        "tracker_run_id"
    ]
    (first_folder, first, old_rows), (second_folder, second, new_rows) = wandb_sessions(run_dir, run_id)
    assert first.run_id == second.run_id == run_id
    point = second.branch_point
    assert (point.run, point.metric, point.value) == (run_id, "_step", len(kept) - 1)
    assert [r["_step"] for r in new_rows][0] == len(kept)  # W&B's counter goes on from the rewind point
    synced = [
        r for r in old_rows if r["_step"] <= point.value
    ] + new_rows  # what `wandb sync` of both leaves in the run
    assert [r["step"] for r in synced if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in synced if "eval/perplexity" in r] == [0, 2, 4, 6]
    assert [r["step"] for r in old_rows if "train/loss" in r] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # (rows 4-6 there are the rewound ones)
    # the line to upload the records names both folders, oldest first
    assert f"`wandb sync {first_folder} {second_folder}`" in caplog.text


def test_the_upload_line_names_sessions_started_in_the_same_second(tmp_path):
    """wandb names a session's folder by the second it started and adds -1, -2, ... when that folder exists: a
    resume within a second of the kill (as in CI) gets offline-run-<same second>-<id>-1."""
    from types import SimpleNamespace

    from mlm.tracking import wandb_sync_command

    names = [
        "offline-run-20261206_180051-abc",
        "offline-run-20261206_180051-abc-1",
        "offline-run-20261206_180051-abc-10",
    ]
    names += [
        "offline-run-20261206_180051-abc-2",
        "offline-run-20261206_180059-abc",
        "offline-run-20261206_180051-abcd",
    ]
    for name in names:
        (tmp_path / "wandb" / name / "files").mkdir(parents=True)
    run = SimpleNamespace(id="abc", dir=str(tmp_path / "wandb" / names[1] / "files"))
    order = [names[0], names[1], names[3], names[2], names[4]]  # -10 after -2; another run's id is not this one
    assert wandb_sync_command(run) == "wandb sync " + " ".join(str(tmp_path / "wandb" / n) for n in order)


def test_resume_never_starts_every_tracker_over(corpus, killed_after_step_6, tmp_path, monkeypatch, caplog):
    from mlm.train import train
    from tests.conftest import compose

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = copy_of(killed_after_step_6, tmp_path)
    old_events = set((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    [old_id] = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    caplog.clear()
    train(
        compose(
            [*REPLAY, f"dataset.path={corpus}", "resume=never", "trainer.max_steps=2", "trainer.checkpoint_every=0"]
        ),
        run_dir,
    )

    assert csv_steps(run_dir / "metrics_train.csv") == [1, 2] and csv_steps(run_dir / "metrics_eval.csv") == [0, 2]
    assert old_events and not old_events & set((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard_steps(run_dir, "train/loss") == [1, 2]
    new_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")} - {old_id}
    assert len(new_ids) == 1  # a new W&B run, not the old one resumed
    [(_, run, rows)] = wandb_sessions(run_dir, new_ids.pop())
    assert not run.HasField("branch_point") and [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert old_id not in caplog.text.split("wandb sync")[-1]  # the upload line names the new run only


# --- a W&B server that cannot be reached: offline records, one line --------------------------------------------

KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters: the shape wandb accepts as an API key


def test_wandb_init_timeout_is_a_few_seconds_and_wandbs_variable_sets_it(monkeypatch):
    from mlm.tracking import WANDB_INIT_TIMEOUT_S, wandb_init_timeout

    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    assert wandb_init_timeout() == WANDB_INIT_TIMEOUT_S <= 15  # wandb's own default is 90 s
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "45")
    assert wandb_init_timeout() == 45.0


def test_unreachable_wandb_server_falls_back_to_offline_with_one_line(tmp_path, monkeypatch, caplog, free_tcp_port):
    import wandb

    import mlm.tracking
    from mlm.config import TrackerConfig
    from mlm.tracking import open_trackers

    monkeypatch.setattr(mlm.tracking, "_unreachable", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # auto + a key: online
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_tcp_port}")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # (the default is WANDB_INIT_TIMEOUT_S; 3 keeps the test short)
    calls = []
    real_init = wandb.init

    def spy(**kwargs):
        calls.append((kwargs["mode"], kwargs["settings"].init_timeout))
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    cfg = TrackerConfig(backends=["wandb"])

    def one_job(run_dir):
        caplog.clear()
        trackers = open_trackers(cfg, run_dir, {"lr": 1e-3}, {}, is_main=True)
        trackers.log({"train/loss": 2.5}, 1)
        trackers.log({"train/loss": 2.0}, 2)
        trackers.finish()
        return [r.getMessage() for r in caplog.records if r.name == "mlm.tracking"]

    lines = one_job(tmp_path / "a")
    assert calls == [("online", 3.0), ("offline", 3.0)]  # the online try waited what the code passed, no longer
    [line] = lines
    assert (
        f"could not start online at http://127.0.0.1:{free_tcp_port}" in line
        and "waited at most 3 s" in line
        and "`wandb sync " in line
    )
    [(_, run, rows)] = wandb_sessions(
        tmp_path / "a", next((tmp_path / "a" / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1]
    )
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]  # the records, ready for `wandb sync`
    assert str(next((tmp_path / "a" / "wandb").glob("offline-run-*"))) in line

    # the next job of a sweep in this process goes offline at once, again with one line
    calls.clear()
    [line] = one_job(tmp_path / "b")
    assert calls == [("offline", 3.0)] and "failed earlier in this process" in line
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_start_over_deletes_no_event_file_through_a_linked_tensorboard_folder(tmp_path):
    from mlm.tracking import rewind_records

    victim = tmp_path / "elsewhere" / "events.out.tfevents.1.host"
    victim.parent.mkdir()
    victim.write_bytes(b"someone's events")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").symlink_to(victim.parent)
    rewind_records(tmp_path / "run", -1)
    assert victim.read_bytes() == b"someone's events"


# --- a server that answers but refuses: the rewind is dropped, the run stays online; only unreachable marks the server ---

REFUSED_REWIND = "failed to rewind run: input: rewindRun rewinding runs is not enabled for this entity"  # wandb 0.31's CommError text


@pytest.fixture
def online_wandb(tmp_path, monkeypatch, caplog):
    """wandb in auto mode with a key (online), its init replaced by `fail` then offline runs: (calls, one_job, fail)."""
    import wandb

    import mlm.tracking
    from mlm.config import TrackerConfig
    from mlm.tracking import open_trackers

    monkeypatch.setattr(mlm.tracking, "_unreachable", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    calls, fail, real_init = [], {}, wandb.init

    def fake_init(**kwargs):  # the server's answer to each online try; an offline run stands in for an accepted one
        calls.append({k: kwargs.get(k) for k in ("mode", "resume_from", "id", "resume")})
        if kwargs["mode"] == "online" and fail.get("resume_from" in kwargs):
            raise fail["resume_from" in kwargs]
        return real_init(**{**kwargs, "mode": "offline"})

    monkeypatch.setattr(wandb, "init", fake_init)

    def one_job(run_dir, resume_id=None):
        caplog.clear()
        calls.clear()
        run_dir.mkdir(parents=True, exist_ok=True)
        trackers = open_trackers(
            TrackerConfig(backends=["wandb"]), run_dir, {"lr": 1e-3}, {}, is_main=True, resume_id=resume_id
        )
        trackers.log({"train/loss": 2.0}, 4)
        trackers.finish()
        return [r.getMessage() for r in caplog.records if r.name == "mlm.tracking"]

    return calls, one_job, fail


def kept_records(run_dir: Path, steps):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 3.0}) + "\n" for s in steps))


def test_a_refused_rewind_continues_the_run_online_with_one_warning(tmp_path, online_wandb):
    from wandb.errors import CommError

    import mlm.tracking

    calls, one_job, fail = online_wandb
    fail[True] = CommError(REFUSED_REWIND)  # only a try with resume_from is refused
    kept_records(tmp_path / "a", [1, 2, 3])
    [line] = one_job(tmp_path / "a", resume_id="abc123")
    assert calls == [
        {"mode": "online", "resume_from": "abc123?_step=2", "id": None, "resume": None},
        {"mode": "online", "resume_from": None, "id": "abc123", "resume": "allow"},
    ]
    assert (
        "would not rewind run abc123" in line and "rewinding runs is not enabled" in line and "may appear twice" in line
    )
    assert "offline" not in line and mlm.tracking._unreachable == {}

    # the next job of the sweep still starts online, and says nothing
    assert one_job(tmp_path / "b") == [] and [c["mode"] for c in calls] == ["online"]


def test_a_refusal_stays_with_its_job_and_names_no_timeout(tmp_path, online_wandb):
    from wandb.errors import AuthenticationError

    calls, one_job, fail = online_wandb
    fail[False] = AuthenticationError("invalid credentials: the server did not recognize an account for the API key")
    [line] = one_job(tmp_path / "a")
    assert [c["mode"] for c in calls] == ["online", "offline"]
    assert (
        "could not start online at https://wandb.example.org (invalid credentials" in line
        and "WANDB_INIT_TIMEOUT" not in line
    )
    [line] = one_job(tmp_path / "b")  # the next job tries online again: the server was reached
    assert [c["mode"] for c in calls] == ["online", "offline"] and "failed earlier" not in line


def test_a_connection_error_marks_the_server_and_names_no_timeout(tmp_path, online_wandb):
    from wandb.errors import CommError

    import mlm.tracking

    calls, one_job, fail = online_wandb
    fail[False] = CommError(
        "request to https://wandb.example.org/graphql failed: dial tcp: lookup wandb.example.org: no such host"
    )
    [line] = one_job(tmp_path / "a")
    assert (
        "no such host" in line
        and "WANDB_INIT_TIMEOUT" not in line
        and "https://wandb.example.org" in mlm.tracking._unreachable
    )
    [line] = one_job(tmp_path / "b")
    assert [c["mode"] for c in calls] == ["offline"] and "failed earlier in this process" in line


def test_a_timeout_gives_the_harness_advice_not_wandbs(tmp_path, online_wandb):
    """wandb's own advice (pass init_timeout to wandb.init) is dropped: the harness's variable and setting are named."""
    from wandb.errors import CommError

    from mlm.tracking import wandb_init_timeout

    calls, one_job, fail = online_wandb
    fail[False] = CommError(
        "Run initialization has timed out after 10.0 sec. Please try increasing the timeout with the "
        "`init_timeout` setting: `wandb.init(settings=wandb.Settings(init_timeout=120))`."
    )
    [line] = one_job(tmp_path / "a")
    assert [c["mode"] for c in calls] == ["online", "offline"]
    assert (
        "could not start online at https://wandb.example.org (Run initialization has timed out after 10.0 sec.; waited at "
        f"most {wandb_init_timeout():g} s, set by WANDB_INIT_TIMEOUT; tracker.mode=offline skips the try)"
    ) in line
    assert "init_timeout" not in line and "increasing" not in line


def test_online_without_an_api_key_names_where_a_key_goes(tmp_path, monkeypatch, caplog):
    """tracker.mode=online with no key anywhere: the real wandb refuses at once; one line names WANDB_API_KEY, `wandb login`
    and tracker.mode=offline, and the run logs offline."""
    import wandb

    import mlm.tracking
    from mlm.config import TrackerConfig
    from mlm.tracking import open_trackers

    monkeypatch.setattr(mlm.tracking, "_unreachable", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    wandb.teardown()  # wandb keeps the settings (key, server) an earlier test's runs read from the environment
    trackers = open_trackers(
        TrackerConfig(backends=["wandb"], mode="online"), tmp_path / "run", {"lr": 1e-3}, {}, is_main=True
    )
    trackers.log({"train/loss": 2.0}, 1)
    trackers.finish()
    [line] = [r.getMessage() for r in caplog.records if r.name == "mlm.tracking"]
    assert line.startswith(
        "W&B: could not start online at https://api.wandb.ai: no API key (set WANDB_API_KEY or run "
        "`wandb login`, or tracker.mode=offline), logging offline to "
    )


def test_an_unreachable_server_during_a_rewind_goes_offline_keeping_the_rewind(
    tmp_path, monkeypatch, caplog, free_tcp_port
):
    """The real wandb, nothing listening: its rewind fails with a timeout; the offline folder keeps the rewind for `wandb sync`."""
    import wandb

    import mlm.tracking
    from mlm.config import TrackerConfig
    from mlm.tracking import open_trackers

    monkeypatch.setattr(mlm.tracking, "_unreachable", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_tcp_port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    modes, real_init = [], wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: modes.append(kw["mode"]) or real_init(**kw))
    kept_records(tmp_path / "a", [1, 2, 3])
    caplog.clear()
    trackers = open_trackers(
        TrackerConfig(backends=["wandb"]), tmp_path / "a", {}, {}, is_main=True, resume_id="abc123"
    )
    trackers.finish()
    [line] = [r.getMessage() for r in caplog.records if r.name == "mlm.tracking"]
    assert modes == ["online", "offline"]  # no second online try: the server was not reached
    assert "failed to rewind run" in line and "waited at most 3 s, set by WANDB_INIT_TIMEOUT" in line
    assert f"http://127.0.0.1:{free_tcp_port}" in mlm.tracking._unreachable
    [(_, run, rows)] = wandb_sessions(tmp_path / "a", "abc123")
    assert (run.branch_point.run, run.branch_point.metric, run.branch_point.value) == ("abc123", "_step", 2)
