"""One writer per run directory: an exclusive lock on `<run dir>/run.lock`, held until the job ends.

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
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

from mlm.config import UserError
from mlm.files import write_error

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
        refuse_foreign(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
            log.warning("%s: the filesystem does not support flock; the lock relies on its holder record only", self.path)
        previous = self._record()
        if previous:
            log.warning("taking over %s from a run that did not end cleanly (%s; it is no longer running)", self.path, describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()) or time.time(),
              "command": " ".join(sys.argv)[:500]}
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


HYDRA_OWN = (".hydra", "multirun.yaml")  # what Hydra writes into a directory before a job's lock is taken (and <job>.log)


def refuse_foreign(run_dir: Path) -> None:
    """The lock file marks a directory as a run's. One without it that holds anything but Hydra's own
    files is someone else's folder: refused before anything in it is touched or deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / LOCK_FILE).exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in HYDRA_OWN and not p.name.endswith(".log"))
    if foreign:
        raise UserError(f"{run_dir} holds files no run of this harness wrote ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}; "
                        f"no {LOCK_FILE}); give the run a directory of its own (hydra.run.dir=... or hydra.sweep.dir=...)")


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
