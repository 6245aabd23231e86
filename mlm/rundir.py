"""The run directory's one owner: who may write there, whether its run is finished, whether a rerun
may resume it, and what starting over or finishing writes.

- `guard()` (called before anything is written): take the lock, refuse a foreign directory or a
  resume with other settings, and return the results of a run that already did what is asked.
- `start_from()`: after the resume decision, drop what a fresh start or a resume must not keep.
- `write_results()`: results.json, written last: its presence means the run is finished.

One writer per run directory: an exclusive lock on `<run dir>/run.lock`, held until the job ends.

The lock is `flock` on the file; the file also holds a record of the holder (host, pid, start
time, command) so that a refused second run can say who holds it. The kernel drops a flock when
its process dies, however it dies, so a crashed run never leaves a lock that blocks its resume:
the next run takes it over, and warns when the record shows the previous holder did not finish
cleanly (a clean exit empties the record).

What it can and cannot detect:
- Same host: any second process, whatever launched it (a second terminal, a resubmitted job, two
  sweeps with one sweep dir). Reliable on local disks.
- Several hosts sharing a filesystem: on NFSv4 (and NFSv3 with a lock manager), Linux turns flock
  into an NFS byte-range lock, which other hosts see; a client that loses its lease (network
  split) can lose the lock without its process noticing. Filesystems without flock support
  (some FUSE mounts, Lustre mounted without -o flock) make flock fail; then only the holder
  record is checked: a live process on this host is detected, a record from another host is
  taken as held (if that run is gone, delete the lock file), and two runs started in the same
  instant could both pass.
Only the main process of a multi-process job takes the lock; its ranks are one writer.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from mlm.config import UserError, blocking_changes
from mlm.files import NOFOLLOW, atomic_write_json, write_error
from mlm.placement import detect, is_main_process
from mlm.records import content_hashes, malformed_data
from mlm.schedules import WSD_KEYS, decay_branch, rate_jump
from mlm.tracking import scrub

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_held: Dict[Path, "RunLock"] = {}  # locks this process holds, by run dir (taking one twice is a no-op)


class RunDirLocked(UserError):
    """Another live process holds the run directory."""


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a record names still runs (on this host; the same pid reused later does not count)."""
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True  # exists but not ours, or an unreadable record: assume held
    start = _process_start(pid)
    return start is None or abs(start - float(holder.get("start", start))) < 2


def describe(holder: dict) -> str:
    started = holder.get("start")
    when = datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK_FILE
        self.fd: Optional[int] = None

    def _record(self) -> dict:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?"}

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"the run directory {self.run_dir} is a file; give the run a directory (hydra.run.dir=...)")
        refuse_links(self.run_dir)
        refuse_foreign(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        except OSError as e:
            raise write_error("the run directory's lock", self.path, e) from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._record()
            self._close()
            raise RunDirLocked(
                f"{self.run_dir} is in use by another run ({describe(holder)}); wait for it to end, "
                "or give this run its own directory (hydra.run.dir=... or hydra.sweep.dir=...)"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._close()
                raise
            holder = self._record()
            if holder and (holder.get("host") != socket.gethostname() or _alive(holder)):
                self._close()
                raise RunDirLocked(
                    f"{self.run_dir} is in use by another run ({describe(holder)}; this filesystem has no flock, so "
                    f"if that run is gone delete {self.path}); or give this run its own directory"
                ) from None
            log.warning(
                "%s: the filesystem does not support flock; the lock relies on its holder record only", self.path
            )
        previous = self._record()
        if previous:
            log.warning(
                "taking over %s from a run that did not end cleanly (%s; it is no longer running)",
                self.path,
                describe(previous),
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()) or time.time(),
            "command": " ".join(scrub(sys.argv))[:500],
        }
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(me).encode(), 0)
            os.fsync(self.fd)
        except OSError as e:  # e.g. a full disk: nothing else would be written there either
            self._close()
            raise write_error("the run directory's lock", self.path, e) from e
        return self

    def release(self) -> None:
        """Empty the record (a clean end) and unlock. The file stays: deleting it would let two runs lock two different files."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


# what Hydra writes into a directory before a job's lock is taken (and <job>.log)
HYDRA_OWN = (".hydra", "multirun.yaml")


def refuse_links(run_dir: Path) -> None:
    """A run (or sweep) directory whose own entries, or .hydra's, are symbolic links is refused before anything
    is written: the harness writes and truncates those names (run.lock, run.log, metrics.jsonl, checkpoints/,
    final/, ...), and a link would aim those writes at a file of someone else's. The directory itself may be a link."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / ".hydra"):  # a linked .hydra itself is found in the first
        if not folder.is_dir():
            continue
        links = sorted(p for p in folder.iterdir() if p.is_symlink())
        if links:
            raise UserError(link_line(links[0], len(links) - 1))


def link_line(link: Path, others: int = 0) -> str:
    more = f" (and {others} other link{'s' if others > 1 else ''})" if others else ""
    return (
        f"{link} is a symbolic link (to {os.readlink(link)}){more}; a run writes only real files in its directory "
        f"and leaves link targets alone: remove the link, or give the run a directory of its own (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)"
    )


def refuse_foreign(run_dir: Path) -> None:
    """The lock file marks a directory as a run's. One without it that holds anything but Hydra's own
    files is someone else's folder: refused before anything in it is touched or deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / LOCK_FILE).exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in HYDRA_OWN and not p.name.endswith(".log"))
    if foreign:
        raise UserError(
            f"{run_dir} holds files no run of this harness wrote ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}; "
            f"no {LOCK_FILE}); give the run a directory of its own (hydra.run.dir=... or hydra.sweep.dir=...)"
        )


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the lock on `run_dir` for this process (kept until release_run_dir or exit); RunDirLocked if held elsewhere."""
    key = Path(run_dir).resolve()
    if key not in _held:
        if not _held:
            atexit.register(_release_all)  # any exit short of a kill (sys.exit included) ends cleanly
        _held[key] = RunLock(key).acquire()
    return _held[key]


def _release_all() -> None:
    for run_dir in list(_held):
        release_run_dir(run_dir)


def release_run_dir(run_dir: Path) -> None:
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def lock_state(run_dir: Path) -> Tuple[str, Optional[dict]]:
    """What `run_dir`'s run.lock says of its holder, read without locking (a lock taken to look would refuse its real
    taker), and the holder's record: "none" (no run.lock: never started), "ended" (a clean end empties the record),
    "unreadable", "killed" (its process on this host no longer runs), or "held" (a live process on this host, or one
    on another host, which cannot be checked from here). mlm.report and the resume of an unfinished run both ask here."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text()
        holder = json.loads(text) if text.strip() else None
    except FileNotFoundError:
        return "none", None
    except (OSError, ValueError):
        return "unreadable", None
    if holder is None:
        return "ended", None
    if not isinstance(holder, dict):
        return "unreadable", None
    if holder.get("host") == socket.gethostname() and not _alive(holder):
        return "killed", holder
    return "held", holder


def held_elsewhere(run_dir: Path) -> bool:
    """Whether a process other than this one, or another rank of this launch (a sibling: same parent), holds
    `run_dir` (lock_state: held, or unreadable)."""
    state, holder = lock_state(run_dir)
    if state in ("none", "ended", "killed"):
        return False
    if holder is None:
        return True  # unreadable: assume held
    if holder.get("host") != socket.gethostname():
        return True
    if holder.get("pid") == os.getpid():
        return False
    try:
        import psutil

        return detect().world_size == 1 or psutil.Process(int(holder["pid"])).ppid() != os.getppid()
    except Exception:
        return True


def checkpoint_steps(run_dir: Path) -> List[int]:
    """The steps of `run_dir`'s complete checkpoints (checkpoints/ckpt-<step> with its manifest.json, written last),
    newest first, read by name without importing torch (mlm.checkpoint.list_checkpoints also checks each file's size)."""
    root = Path(run_dir) / "checkpoints"
    names = root.glob("ckpt-*") if root.is_dir() else []
    return sorted(
        (int(p.name[5:]) for p in names if p.name[5:].isdigit() and (p / "manifest.json").is_file()), reverse=True
    )


# ---------------------------------------------------------------- the command that resumes a run

# where a run without hydra.run.dir goes (conf/config.yaml; relative to the working directory)
RUNS_ROOT = Path("outputs/runs")
# a default run directory's name: its start time (mlm.cli.launch_stamp)
STAMP_NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")
MAKE_TARGET = "MLM_MAKE_TARGET"  # set by the Makefile's train target: the resume command is then `make train ARGS=...`


def resume_command(run_dir: Path, sweep_dir: Optional[Path] = None) -> str:
    """The command that resumes this run (or sweep): the command as given, secrets masked, plus hydra.run.dir (a sweep's
    job: hydra.sweep.dir) when it named none, since a default directory is new each time. Under `make train` it is
    `make train ARGS="..."`; under torchrun or accelerate launch a rank's argv is not the launcher's, so it says so."""
    sweep_dir = sweep_dir or _sweep_dir()
    key, where = ("hydra.sweep.dir", sweep_dir) if sweep_dir else ("hydra.run.dir", Path(run_dir))
    args = [a for a in sys.argv[1:] if scrub(a) == a]
    extra = [] if any(a.lstrip("+").startswith(key + "=") for a in args) else [f"{key}={Path(where).absolute()}"]
    if detect().world_size > 1:
        return "the same launch command (torchrun, accelerate launch, srun)" + (
            f" with {shlex.join(extra)} added" if extra else ""
        )
    target = os.environ.get(MAKE_TARGET)
    if target:
        return f"make {target} ARGS={_make_quote(shlex.join(args + extra))}" + _secrets_left_out()
    return shlex.join([python_name(), sys.argv[0], *args, *extra]) + _secrets_left_out()


def _secrets_left_out() -> str:
    """The command's arguments that hold a secret are left out of a printed command (masked, a pasted one would set the
    secret to ***): said after it, by their key."""
    held = [
        scrub(a).split("=")[0] + "=..." if "=" in a else "the argument holding a secret"
        for a in sys.argv[1:]
        if scrub(a) != a
    ]
    return f" (and add again, with its value: {', '.join(held)})" if held else ""


def _sweep_dir() -> Optional[str]:
    """The sweep directory when this process runs a multirun's job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _make_quote(text: str) -> str:
    """ARGS="..." as a user types it, unless the shell would expand something inside double quotes."""
    return f'"{text}"' if not re.search(r'["$`\\!]', text) else shlex.quote(text)


def python_name() -> str:
    """How to call this Python from the working directory: a relative path to a venv inside it, `python` when that
    is this interpreter, else its full path."""
    exe = sys.executable
    with contextlib.suppress(ValueError):
        return str(Path(exe).relative_to(Path.cwd()))
    return next((name for name in ("python", "python3") if shutil.which(name) == exe), exe)


def resume_note(run_dir: Path) -> str:
    """What error.txt adds after the error: the command that resumes the run, when it holds a checkpoint."""
    from mlm.checkpoint import list_checkpoints

    return f"resume with: {resume_command(run_dir)}\n" if list_checkpoints(run_dir) else ""


def unfinished_run(overrides: List[str], config: dict) -> Optional[Path]:
    """The newest default run (under RUNS_ROOT, named by its start time) that this command resumes exactly: started with the same overrides and settings (.hydra/overrides.yaml, .hydra/config.yaml),
    holding a complete checkpoint, no results.json (never a finished run) and no error.txt (a failed run needs a decision:
    its error.txt gives the command that resumes it where a rerun gets past the failure), and not in use by a live process.
    `config`: this run's settings as save_config_snapshot writes them (unresolved, secrets masked)."""
    import yaml

    if not RUNS_ROOT.is_dir():
        return None
    for run_dir in sorted((p for p in RUNS_ROOT.iterdir() if STAMP_NAME.fullmatch(p.name)), reverse=True):
        try:
            if (
                (run_dir / "results.json").exists()
                or (run_dir / "error.txt").exists()
                or not (run_dir / "checkpoints").is_dir()
            ):
                continue  # finished; failed (a decision: its error.txt says whether its command resumes it); never saved
            saved = run_dir / ".hydra"
            if (
                yaml.safe_load((saved / "overrides.yaml").read_text()) != overrides
                or yaml.safe_load((saved / "config.yaml").read_text()) != config
            ):
                continue
            if held_elsewhere(run_dir):
                continue
            if checkpoint_steps(run_dir):
                return run_dir
        except (OSError, ValueError, yaml.YAMLError):
            continue
    return None


def changed_settings(
    saved: dict, settings: dict, saved_processes: Optional[int], step: Optional[int] = None, may_change=()
) -> List[str]:
    """The settings whose change keeps a run from going on (mlm.config.blocking_changes: each setting's resume rule)
    between its saved flat config (trained on `saved_processes`, its checkpoint at `step`; None: finished) and this
    one's, as 'key=old there, new now', leaving out `may_change` (path_by_content). The batch split may change, the
    global batch may not."""
    shown = [
        f"{k}={saved.get(k)!r} there, {settings.get(k)!r} now"
        for k in blocking_changes(saved, settings, step)
        if k not in may_change
    ]
    before, now = global_batch(saved, saved_processes), global_batch(settings, detect().world_size)
    if before and now and before != now:
        shown.append(
            f"global batch (per_device_batch_size x gradient_accumulation_steps x processes)={before} there, {now} now"
        )
    return shown


def refuse_rate_jump(ckpt: Path, saved: dict, settings: dict, step: int) -> None:
    """A wsd checkpoint already in its decay resumed with a schedule that trains its next step at a higher rate (a longer
    run, a later decay: mlm.schedules.rate_jump) is refused, naming the newest checkpoint of its run before the decay
    began, which may branch into these settings."""
    jump = rate_jump(saved, settings, step)
    if jump is None:
        return
    before, after = jump
    from mlm.checkpoint import list_checkpoints

    changed = " ".join(f"{k}={settings[k]}" for k in WSD_KEYS if settings.get(k) != saved.get(k))
    stable = next((p for p in list_checkpoints(ckpt.parent.parent) if decay_branch(saved, settings, _step(p))), None)
    way = (
        f"branch from {stable.name}, before the decay began: hydra.run.dir=<new dir> resume={stable}"
        if stable
        else f"no checkpoint of {ckpt.parent.parent} before the decay is kept, so put back "
        + " ".join(f"{k}={saved.get(k)}" for k in WSD_KEYS)
    )
    raise UserError(
        f"{ckpt} is in its wsd decay (rate {before:.2f} x peak after step {step}) and {changed} would train step "
        f"{step + 1} at {after:.2f} x peak, jumping the rate back up; {way}"
    )


def _step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def global_batch(flat: dict, processes: Optional[int]) -> Optional[int]:
    try:
        return (
            int(flat["trainer.per_device_batch_size"])
            * int(flat["trainer.gradient_accumulation_steps"])
            * int(processes)
        )
    except (KeyError, TypeError, ValueError):
        return None


def finished_results(run_dir: Path, resume: str, max_steps: int, settings: Optional[dict]) -> Optional[dict]:
    """results.json of a run in `run_dir` that already did what is asked, else None.

    Only with resume=auto (never starts over; a checkpoint path continues from there). A run
    with more trainer.max_steps than it reached is not finished: it resumes and trains on.
    `settings` (the flat config; None: not known yet, so not decided) must match the finished run's, or a sweep rerun
    into the same directory with other values would get the old job's results: that is refused.
    """
    if resume != "auto" or settings is None:
        return None
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config") or {}, dict):
        raise UserError(
            f"{Path(run_dir) / 'results.json'} is not what this harness writes (not an object of results with "
            'a "config" object); give the run its own directory (hydra.run.dir=<new dir>)'
        )
    saved = results.get("config") or {}
    if results.get("stopped") == "budget":  # finished by its time budget: finished if asked the same budget
        if saved.get("trainer.budget_minutes") != settings.get("trainer.budget_minutes"):
            return None  # another budget: resume and train on (as with more max_steps)
    elif max_steps > 0 and results.get("steps") != max_steps:
        return None
    differ = changed_settings(saved, settings, results.get("processes"), None, path_by_content(results))
    if differ:
        raise UserError(
            f"{run_dir} holds a finished run with other settings ({'; '.join(differ)}); put them back "
            "to get its results, or give this run its own directory (hydra.run.dir=... or hydra.sweep.dir=...)"
        )
    return results


def check_resume_settings(run_dir: Path, resume: str, max_steps: int, settings: Optional[dict]) -> None:
    """Refuse to resume an unfinished run with result-affecting settings changed (UserError naming each one);
    with resume=<checkpoint path> (a branch the user asked for) only warn. A wsd checkpoint in its stable
    phase may change its decay either way (mlm.schedules.decay_branch).

    Reads the state.json of the checkpoint a resume would start from (the newest by its manifest;
    its content is verified later, before loading)."""
    from mlm.checkpoint import resume_candidates  # mlm.checkpoint -> mlm.parallel -> torch.distributed: on resume only

    if settings is None or resume == "never":
        return
    candidates = resume_candidates(resume, run_dir)
    if not candidates:
        return
    try:
        state = json.loads((candidates[0] / "state.json").read_text())
        saved, step = state["config"], int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable: resume sets it aside (checkpoint.read_state)
    if not isinstance(saved, dict) or malformed_data(state.get("data")):
        return  # not what this harness writes: resume sets it aside (checkpoint.read_state)
    differ = changed_settings(saved, settings, state.get("world_size"), step, path_by_content(state))
    if differ and resume == "auto":
        raise UserError(
            f"{candidates[0]} was trained with other settings ({'; '.join(differ)}); put them back to resume "
            f"it, or branch from it with these in a run directory of its own: hydra.run.dir=<new dir> resume={candidates[0]}"
        )
    refuse_rate_jump(candidates[0], saved, settings, step)
    if differ:  # a checkpoint named by hand: a branch from it is the user's choice, said once
        log.warning("resuming %s with other settings: %s", candidates[0], "; ".join(differ))
    if 0 < max_steps < step:
        raise UserError(
            f"trainer.max_steps={max_steps} is below the {step} steps {candidates[0]} already trained; raise "
            "trainer.max_steps to resume it, or give this run a directory of its own (hydra.run.dir=...)"
        )


def flat_settings(cfg: DictConfig) -> Optional[dict]:
    """The job's config as flat keys (what train() stores in results.json), or None if it does not resolve yet."""
    from mlm.tracking import flat_config

    try:
        tree = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except Exception:  # e.g. a ${hydra:...} value before Hydra has set up the job: run_job checks again
        return None
    return flat_config(tree)


def finished_line(run_dir: Path, results: dict) -> str:
    return (
        f"{run_dir} already finished ({results.get('steps')} steps, perplexity {results.get('perplexity', float('nan')):.2f}); "
        f"results in {Path(run_dir) / 'results.json'} (a run directory of its own, hydra.run.dir=<new dir>, trains again)"
    )


def guard(run_dir: Path, cfg) -> Optional[dict]:
    """Before anything of ours is written: take the run dir's lock (main process; RunDirLocked if another
    run holds it), refuse a resume with other settings, and return the results if the run is already finished. Every rank reads the same
    results.json and so decides the same: a rank that went on alone would wait for the others forever."""
    if is_main_process():
        lock_run_dir(run_dir)
    else:  # the same verdict as the main process's lock_run_dir, which refuses a foreign dir before it writes run.lock
        refuse_links(run_dir)
        refuse_foreign(run_dir)
    settings = flat_settings(cfg)
    results = finished_results(run_dir, cfg.resume, cfg.trainer.max_steps, settings)
    if results is None:
        check_resume_settings(run_dir, cfg.resume, cfg.trainer.max_steps, settings)
    if settings is not None:
        check_same_data(run_dir, cfg, results)
    return results


# ---------------------------------------------------------------- the data's identity (mlm/data/identity.py)


def path_by_content(record: dict) -> Tuple[str, ...]:
    """("dataset.path",) when a run's record (results.json or state.json) holds its files' content hashes:
    then the files are compared by resolved path and content (check_same_data), not dataset.path as a string."""
    return ("dataset.path",) if content_hashes(record.get("data")) is not None else ()


def check_same_data(run_dir: Path, cfg, results: Optional[dict]) -> None:
    """resume=auto: refuse to call a finished run done, or to resume the newest checkpoint, when the source files it
    recorded have other content now (one UserError naming each file). The tokenizer is compared in train.resume,
    which has it; a checkpoint named by hand (a branch) is checked there too, with a warning."""
    if cfg.resume != "auto":
        return
    if results is not None:
        record, where = results, None
        problem = malformed_data(results.get("data"))
        if problem:
            raise UserError(
                f"{Path(run_dir) / 'results.json'} is not what this harness writes: its {problem}; "
                "give the run its own directory (hydra.run.dir=<new dir>)"
            )
    else:
        from mlm.checkpoint import resume_candidates  # torch: not for a finished run's rerun

        candidates = resume_candidates("auto", run_dir)
        try:
            record, where = json.loads((candidates[0] / "state.json").read_text()), candidates[0]
        except (IndexError, OSError, ValueError):
            return  # nothing to resume, or unreadable (resume sets it aside)
        if not isinstance(record, dict) or malformed_data(record.get("data")):
            return  # not what this harness writes: resume sets it aside (checkpoint.read_state)
    if not path_by_content(record):
        return  # written before runs recorded their data, or not local files
    from mlm.files import default_cache_root
    from mlm.data.identity import changed_data, source_identity

    try:
        now = {"sources": source_identity(cfg.dataset, default_cache_root())}
    except UserError:
        return  # the files are gone: a finished run's results still stand; a resume says so when it reads them
    differ = changed_data(record["data"], now)
    if differ and where is None:
        raise UserError(
            f"{run_dir} holds a finished run trained on other data ({'; '.join(differ)}); "
            "give the run on this data its own directory (the finished run's results stay)"
        )
    if differ:
        raise data_changed(where, differ)


def data_changed(checkpoint: Path, differ: List[str]) -> UserError:
    """The refusal of resume=auto from `checkpoint` on other data, with the way out that keeps every checkpoint."""
    return UserError(
        f"the training data changed since checkpoint {checkpoint.name}: {'; '.join(differ)}; put the data back to resume, "
        f"or train on it in a new run directory branched from this checkpoint (hydra.run.dir=<new dir> "
        f"resume={checkpoint.resolve()}); the checkpoints here are kept"
    )


def start_from(run_dir: Path, resumed_step: Optional[int], unrecorded: List[Dict[str, Any]] = ()) -> None:
    """Main process, once the resume is decided: the trackers' records keep only the steps up to `resumed_step`
    (plus the ones the checkpoint carries), a recovered failure's error.txt goes, and a fresh start
    (`resumed_step` None) drops a previous run's results and checkpoints, which would pass for this one's."""
    from mlm.checkpoint import discard_checkpoints
    from mlm.tracking import rewind_records

    rewind_records(run_dir, -1 if resumed_step is None else resumed_step, unrecorded)
    (run_dir / "error.txt").unlink(missing_ok=True)
    if resumed_step is None:
        (run_dir / "results.json").unlink(missing_ok=True)
        discard_checkpoints(run_dir)


def write_results(run_dir: Path, results: Dict[str, Any]) -> None:
    try:
        atomic_write_json(Path(run_dir) / "results.json", results)
    except OSError as e:
        raise write_error("results", Path(run_dir) / "results.json", e) from e
