"""Experiment trackers behind one small protocol. The only module in `mlm/` that imports wandb.

Every run writes `metrics.jsonl` (one JSON object per logged step); `tracker.backends` adds
wandb, tensorboard and/or csv. A tracker that fails (no key, no network, a bug in a client) is
switched off with one warning and the run goes on. Non-main processes get a `NullTracker`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from mlm import faults
from mlm.config import TrackerConfig
from mlm.files import atomic_write_text, open_append

log = logging.getLogger(__name__)

# "token" as a word of its own (HF_TOKEN, auth_token), not model.tokenizer or a config's mask_token_id: those are settings
SECRET_KEY = re.compile(r"(api[_-]?key|(?<![a-z])token(?![a-z]|_id)|secret|password|passwd)", re.I)
# KEY=value or KEY: value inside a string: a command line's `+hydra.job.env_set.HF_TOKEN=hf_...`, `env_set={HF_TOKEN:hf_...}`
# (a KEY starts a word: /data/secret:v2 is a path)
ASSIGNMENT = re.compile(r"(?<![\w./\-])([\w.\-]+)(=|:[ ]?)([^\s,{}\[\]]+)")


class Tracker:
    """What every tracker does, and by default does nothing: log a step's metrics, record the run's summary, finish."""

    run_id: Optional[str] = None

    def log(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: Dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


MASKED = "***"  # what a secret-looking value is saved as


def secret_values() -> List[str]:
    """Values of environment variables whose names look secret (WANDB_API_KEY, HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 8]


def scrub(obj: Any, secrets: Optional[List[str]] = None) -> Any:
    """A copy of a config tree (or a command line's list of arguments) with secret-looking keys, KEY=value
    assignments to them inside strings, and any secret environment value masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (MASKED if SECRET_KEY.search(str(k)) and v else scrub(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        obj = ASSIGNMENT.sub(lambda m: f"{m[1]}{m[2]}{MASKED}" if SECRET_KEY.search(m[1]) else m[0], obj)
        for s in secrets:
            obj = obj.replace(s, MASKED)
    return obj


@contextlib.contextmanager
def masked_argv():
    """sys.argv with secrets masked (scrub), for a library that records the command line; restored after."""
    argv = sys.argv[:]
    sys.argv[:] = scrub(argv)
    try:
        yield
    finally:
        sys.argv[:] = argv


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: dashboards filter and group on flat keys."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_config(tree: Dict[str, Any]) -> Dict[str, Any]:
    """A config tree as flat keys, secrets masked, values as JSON reads them back (results.json keeps this)."""
    return json.loads(json.dumps(flatten(scrub(tree)), default=str))


class NullTracker(Tracker):
    """A process other than the main one records nothing."""

    failure = None
    unwritten: List[Dict[str, Any]] = []


class JsonlTracker(Tracker):
    """metrics.jsonl: the run's own record, read by the report and by resume (which truncates it).

    A record that cannot be written (a full disk) is kept in `unwritten` and tried again with the
    next one; the loop stops the run with a checkpoint that carries them (see `failure`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.unwritten: List[Dict[str, Any]] = []
        self.failure: Optional[OSError] = None

    def log(self, metrics, step):
        self.unwritten.append({"step": step, **metrics})
        try:
            # one write per record; a kill mid-write leaves a torn last line, dropped on resume
            with open_append(self.path) as f:
                faults.write(f, "".join(json.dumps(r) + "\n" for r in self.unwritten), "metrics")
        except OSError as e:
            self.failure = e
            return
        self.unwritten = []


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The records of the run's metrics.jsonl ([] where there is none); a line that is not a whole record (a kill
    mid-write) is dropped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            log.warning(
                "%s line %d is not a complete record (%r); a run killed mid-write leaves one; ignoring it",
                path,
                n,
                line[:60],
            )
            continue
        records.append(record)
    return records


def truncate_metrics(run_dir: Path, after_step: int, unwritten: List[Dict[str, Any]] = ()) -> None:
    """Drop records past `after_step` (and torn lines): a resumed run re-logs them, so the file matches an uninterrupted run.
    `unwritten`: records the checkpoint carried because a write failed; added (once each) in their place."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists() and not unwritten:
        return
    kept = [r for r in read_metrics(run_dir) if r["step"] <= after_step and r not in unwritten]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in sorted([*kept, *unwritten], key=lambda r: r["step"])))


def rewind_records(run_dir: Path, after_step: int, unwritten: List[Dict[str, Any]] = ()) -> None:
    """Every tracker's files in the run dir as a run (re)starting after `after_step` (-1: a fresh start) needs them:
    metrics.jsonl and metrics_*.csv keep the records up to it; a fresh start also removes the old run's TensorBoard
    events (a resumed run's TensorBoard writer purges the replayed steps instead: see TensorBoardTracker)."""
    run_dir = Path(run_dir)
    truncate_metrics(run_dir, after_step, unwritten)
    for path in run_dir.glob("metrics_*.csv"):
        rewind_csv(path, after_step)
    events = run_dir / "tensorboard"
    if after_step < 0 and events.is_dir() and not events.is_symlink():  # never delete through a link
        for path in events.glob("events.out.tfevents.*"):
            path.unlink()


def rewind_csv(path: Path, after_step: int) -> None:
    """A metrics_*.csv keeps its header and the rows up to `after_step` (none: the file goes); a torn last row goes too."""
    if after_step < 0:
        path.unlink()
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # a kill mid-write
        lines.pop()
    rows = [line for line in lines[1:] if (step := csv_step(line)) is not None and step <= after_step]
    if rows != lines[1:]:
        atomic_write_text(path, "".join([*lines[:1], *rows]))


def csv_step(line: str) -> Optional[int]:
    try:
        return int(next(csv.reader([line]))[0])
    except (ValueError, IndexError, StopIteration):
        return None


class CsvTracker(Tracker):
    """metrics.csv, one row per log call (columns fixed by the first row of each kind)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)

    def log(self, metrics, step):
        kind = next(iter(metrics)).split("/")[0]  # train, eval, perf... one file per kind keeps columns stable
        path = self.dir / f"metrics_{kind}.csv"
        new = not path.exists()
        with open_append(path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *metrics], extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({"step": step, **metrics})


class TensorBoardTracker(Tracker):
    """Event files in <run>/tensorboard. A run resumed at step k opens its writer with purge_step k+1:
    TensorBoard's readers then drop what the interrupted run logged after its checkpoint (the steps replayed now)."""

    def __init__(self, run_dir: Path, config: Dict[str, Any], start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = start_step + 1 if start_step else None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        # at the first step of this session: a later resume from the same checkpoint purges it with the replayed steps
        self.writer.add_text(
            "config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", global_step=purge_step or 0
        )

    def log(self, metrics, step):
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def finish(self):
        self.writer.close()


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key is configured (env or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


WANDB_INIT_TIMEOUT_S = 10.0  # wandb waits 90 s by default; a server not reached by then means offline records instead
# W&B server URL -> why it could not be reached earlier in this process (a sweep's later jobs)
_unreachable: Dict[str, str] = {}


def wandb_init_timeout() -> float:
    """Seconds wandb.init may take online before the run falls back to offline; WANDB_INIT_TIMEOUT (wandb's own variable) sets it."""
    return float(os.environ.get("WANDB_INIT_TIMEOUT") or WANDB_INIT_TIMEOUT_S)


_TIMEOUT_SIGNS = ("timed out", "deadline exceeded")  # wandb-core's words when init_timeout ran out
_CONNECTION_SIGNS = (
    "connection refused",
    "connection reset",
    "no such host",
    "network is unreachable",
    "dial tcp",
    "tls handshake",
)


def unreachable_cause(error: Exception) -> Optional[str]:
    """'timeout' or 'connection' when wandb.init failed because the server was not reached; None when it answered with
    a refusal. wandb raises CommError for both (a refused rewind reads "failed to rewind run: <the server's answer>")."""
    text = str(error).lower()
    if isinstance(error, TimeoutError) or any(sign in text for sign in _TIMEOUT_SIGNS):
        return "timeout"
    if isinstance(error, ConnectionError) or any(sign in text for sign in _CONNECTION_SIGNS):
        return "connection"
    return None


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return scrub(text.splitlines()[0][:200] if text else type(error).__name__)


def offline_folders(wandb_dir: Path, run_id: str) -> List[Path]:
    """Every offline folder of one W&B run, oldest first: a resumed run has one per session. wandb names them
    offline-run-<second>-<id>, with -1, -2, ... added when a session starts in the same second as the last."""
    named = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(m, p) for p in wandb_dir.glob("offline-run-*") if (m := named.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (mp[0][1], int(mp[0][2] or 0)))]


def wandb_sync_command(run) -> str:
    """`wandb sync` naming every offline folder of this W&B run, oldest first."""
    folders = offline_folders(Path(run.dir).parent.parent, run.id)
    return "wandb sync " + " ".join(shlex.quote(str(f)) for f in folders)


# wandb's own way out (wandb.Settings(init_timeout=...)), not ours
_WANDB_ADVICE = re.compile(r"\s*(Consider|Please try) increasing .*", re.I | re.S)


def online_failure(url: str, error: Exception, cause: Optional[str]) -> str:
    """Why W&B could not start online, in the harness's words: the fix by environment variable or setting, never
    wandb's advice to pass an init_timeout to wandb.init, which this harness's users do not call."""
    if "no api key" in str(error).lower():  # wandb's UsageError when neither WANDB_API_KEY nor `wandb login` gave one
        return f"could not start online at {url}: no API key (set WANDB_API_KEY or run `wandb login`, or tracker.mode=offline)"
    why = _WANDB_ADVICE.sub("", first_line(error)) or type(error).__name__
    if cause == "timeout":
        why += f"; waited at most {wandb_init_timeout():g} s, set by WANDB_INIT_TIMEOUT"
    fix = (
        "tracker.mode=offline skips the try"
        if cause
        else "check WANDB_API_KEY or `wandb login`, or tracker.mode=offline"
    )
    return f"could not start online at {url} ({why}; {fix})"


def offline_reason(requested: str) -> str:
    if requested == "offline":
        return "tracker.mode=offline"
    return f"WANDB_MODE={os.environ['WANDB_MODE']}" if os.environ.get("WANDB_MODE") else "no API key"


class WandbTracker:
    """One W&B run per job. Multirun jobs share a group; overrides become the run name and tags.

    A run resumed in its own directory continues its W&B run rewound to the checkpoint (W&B's `resume_from`,
    which drops the history after that point): its history then holds each step once. W&B's internal step
    counts log calls, one per metrics.jsonl record, so the records kept by the rewind of metrics.jsonl say
    where. Offline the rewind point is recorded in the new session's folder and applied by `wandb sync`.
    Rewind is a W&B preview feature: a server that refuses it gets the run continued as is (resume="allow"), and its
    history may then hold the steps between the checkpoint and the interruption twice."""

    def __init__(
        self, cfg: TrackerConfig, run_dir: Path, config: Dict[str, Any], job: Dict[str, Any], resume_id: Optional[str]
    ):
        import wandb

        self.wandb = wandb
        overrides = scrub([o for o in job.get("overrides", []) if not o.startswith("hydra.")])
        options = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=scrub(cfg.group or job.get("sweep_name")),
            name=scrub(cfg.run_name or (",".join(overrides) if overrides else job.get("name"))),
            tags=scrub([*cfg.tags, *[o[:64] for o in overrides]]),
            config={**flatten(config), "hydra/job_name": job.get("name"), "hydra/overrides": overrides},
            dir=str(run_dir),
            reinit="finish_previous",  # multirun jobs share a process: never log into the previous job's run
        )
        if resume_id:
            options["resume_from"] = f"{resume_id}?_step={len(read_metrics(run_dir)) - 1}"
        self.run, offline = self.start(cfg.mode, options, resume_id)
        self.run_id = self.run.id if self.run is not None else None
        # eval and perf curves plot against the optimizer step, not W&B's internal call counter,
        # which also keeps a resumed run's curves continuous
        self.run.define_metric("step")
        for pattern in ("train/*", "eval/*", "perf/*"):
            self.run.define_metric(pattern, step_metric="step")
        self.run.define_metric("eval/perplexity", step_metric="step", summary="min")
        self.run.define_metric("eval/loss", step_metric="step", summary="min")
        self.run.define_metric("eval/bits_per_char", step_metric="step", summary="min")
        if offline:
            log.warning(
                "W&B: %s, logging offline to %s; upload later with `%s`",
                offline,
                Path(self.run.dir).parent,
                wandb_sync_command(self.run),
            )

    def start(self, requested: str, options: Dict[str, Any], resume_id: Optional[str]):
        """The W&B run and, when it logs offline, why. Online, a server that refuses the rewind gets the run continued
        without it; a server not reached within wandb_init_timeout() gives an offline run instead (its records are
        synced later), and the rest of this process goes offline too."""
        mode = wandb_mode(requested)
        if mode != "online":
            return self.init(mode, options), offline_reason(requested) if mode == "offline" else None
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if url in _unreachable:
            return self.init("offline", options), f"{url} failed earlier in this process ({_unreachable[url]})"
        run, error = self.try_online(options)
        if run is None and "resume_from" in options and unreachable_cause(error) is None:
            # rewind is a preview feature many servers refuse (Self-Managed has none): continue the run as before it
            log.warning(
                "W&B: %s would not rewind run %s to the checkpoint (%s); continuing it without the rewind, so the steps "
                "logged after the checkpoint may appear twice in the W&B UI (metrics.jsonl, CSV and TensorBoard hold each once)",
                url,
                resume_id,
                first_line(error),
            )
            options = {k: v for k, v in options.items() if k != "resume_from"} | {"id": resume_id, "resume": "allow"}
            run, error = self.try_online(options)
        if run is not None:
            return run, None
        cause = unreachable_cause(error)
        if cause:  # a refusal (a bad key, a project of someone else's) is this job's; the next job tries again
            _unreachable[url] = first_line(error)
        return self.init("offline", options), online_failure(url, error, cause)

    def try_online(self, options: Dict[str, Any]):
        """(run, None), or (None, why) when wandb.init failed online. wandb-core keeps a failed run's id in use,
        so it is shut down: the next try (the same id without the rewind, or offline) would be refused."""
        try:
            return self.init("online", options), None
        except Exception as e:
            self.wandb.teardown()
            return None, e

    def init(self, mode: str, options: Dict[str, Any]):
        settings = self.wandb.Settings(init_timeout=wandb_init_timeout(), console="off", silent=True)
        return self.wandb.init(**options, mode=mode, settings=settings)

    def log(self, metrics, step):
        self.run.log({**metrics, "step": step})

    def summary(self, metrics):
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self):
        self.run.finish()


class SafeTrackers:
    """Fans out to several trackers; one that raises is dropped with a single warning, training goes on."""

    def __init__(self, trackers: List[Any]):
        self.trackers = trackers
        self.record = trackers[0]  # metrics.jsonl: the run's own record, kept even if _each drops it

    @property
    def run_id(self) -> Optional[str]:
        return next((t.run_id for t in self.trackers if t.run_id), None)

    @property
    def failure(self) -> Optional[Exception]:
        """Why metrics.jsonl could not be written (the run's own record: the run must stop), or None."""
        return self.record.failure

    @property
    def unwritten(self) -> List[Dict[str, Any]]:
        """metrics.jsonl records not written yet (a checkpoint carries them to the resumed run)."""
        return self.record.unwritten

    def _each(self, method: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a tracker must never stop training
                log.warning(
                    "tracker %s failed in %s (%s: %s); it is switched off for the rest of the run",
                    type(t).__name__,
                    method,
                    type(e).__name__,
                    e,
                )
                self.trackers.remove(t)
                if method != "finish":
                    try:  # close it anyway, so a W&B run does not stay open into the next job of a sweep
                        t.finish()
                    except Exception:
                        pass

    def log(self, metrics, step):
        self._each("log", metrics, step)

    def summary(self, metrics):
        self._each("summary", metrics)

    def finish(self):
        self._each("finish")


def open_trackers(
    cfg: TrackerConfig,
    run_dir: Path,
    config: Dict[str, Any],
    job: Dict[str, Any],
    is_main: bool,
    resume_id: Optional[str] = None,
    start_step: int = 0,
):
    """The trackers of this process: JSONL plus the configured backends on the main process, nothing elsewhere.
    `resume_id`, `start_step`: the W&B run and the step of the checkpoint this run resumed from (0: a fresh start)."""
    if not is_main:
        return NullTracker()
    config = scrub(config)
    trackers: List[Any] = [JsonlTracker(run_dir)]
    factories = {
        "csv": lambda: CsvTracker(run_dir),
        "tensorboard": lambda: TensorBoardTracker(run_dir, config, start_step),
        "wandb": lambda: WandbTracker(cfg, run_dir, config, job, resume_id),
    }
    for name in cfg.backends:
        if name == "wandb" and cfg.mode == "disabled":
            continue
        try:
            with masked_argv():  # W&B records the command line in its run files, which `wandb sync` uploads
                trackers.append(factories[name]())
        except Exception as e:
            log.warning("tracker %s could not start (%s: %s); the run goes on without it", name, type(e).__name__, e)
    return SafeTrackers(trackers)
