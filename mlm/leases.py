"""Device slots of a node: a job that runs alone leases one (a GPU, or a CPU slot) for as long as it runs.

Several single-process jobs on one machine (a joblib sweep, reused workers, jobs of different users' sweeps) each
take a slot that no running job holds; mlm.job.Job holds a job's lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from mlm.config import UserError

log = logging.getLogger(__name__)


def lease_dir() -> Path:
    """Lock files of the device slots of this node (MLM_LEASE_DIR; default: one per user in /tmp)."""
    return Path(os.environ.get("MLM_LEASE_DIR") or Path(tempfile.gettempdir()) / f"mlm-device-leases-{os.getuid()}")


class DeviceLease:
    """One slot of a node-wide pool, held with an flock from `acquire()` to `release()`.

    The kernel drops an flock when its process dies, so a killed job never keeps a slot; a job
    that fails releases it when it leaves its `mlm.job.Job`. The slot is chosen by what is free at that
    moment, not by job number, so joblib's dynamic dispatch and reused workers cannot make two
    running jobs share one.
    """

    def __init__(self, names: List[str], directory: Optional[Path] = None, poll_s: float = 0.2):
        self.names, self.dir, self.poll_s = names, Path(directory or lease_dir()), poll_s
        self.slot: Optional[int] = None
        self._fd: Optional[int] = None
        self._since = 0.0

    def acquire(self, owner: str = "") -> int:
        _private_dir(self.dir)
        waited = False
        while True:
            for i, name in enumerate(self.names):
                fd = _open_own(self.dir / f"{name}.lock", os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.slot, self._fd, self._since, self.owner = i, fd, time.time(), owner
                return i
            if not waited:
                log.info("all %d device slots are taken (%s); waiting for one", len(self.names), self.dir)
                waited = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.names[self.slot].startswith("cuda-"):
                _free_cuda_cache()
            # the history of who held which slot when (lease.jsonl): for the tests, and for "which job used GPU 3"
            record = {
                "slot": self.slot,
                "name": self.names[self.slot],
                "acquired": self._since,
                "released": time.time(),
                "pid": os.getpid(),
                "owner": self.owner,
            }
            with os.fdopen(_open_own(self.dir / "lease.jsonl", os.O_WRONLY | os.O_APPEND), "a") as f:
                f.write(json.dumps(record) + "\n")
        # a symlink planted, a full /tmp, a sticky CUDA error: the slot is released all the same
        except (UserError, OSError, RuntimeError) as e:
            log.warning("device slot %s: %s", self.names[self.slot], e)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def slot_names(device_slots: int) -> List[str]:
    """The pool: the visible CUDA devices, named by their UUID, or `device_slots` CPU slots when set on
    a machine without a GPU. A UUID names the physical GPU whatever a job sees: under SLURM's cgroups
    every job sees its GPU as device 0 (and CUDA_VISIBLE_DEVICES=0), so index-named locks would make
    jobs on different GPUs wait for each other. Reading the UUIDs initialises CUDA in this process."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [f"cuda-{torch.cuda.get_device_properties(i).uuid}" for i in range(min(device_slots or n, n))]
    return [f"cpu-{i}" for i in range(device_slots)]


def _free_cuda_cache() -> None:
    """Give back the memory PyTorch cached on the leased GPU, so a reused worker leasing another one
    does not keep it. The CUDA context (a few hundred MB) stays on that GPU until the worker exits."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _private_dir(path: Path) -> None:
    """The lease directory: created 0o700; one that is a symlink or another user's is refused (its lock
    and history files would be theirs to plant)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        raise UserError(
            f"device lease directory {path} is a symlink or belongs to uid {st.st_uid}, not you; "
            "remove it or set MLM_LEASE_DIR to a directory of your own"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _open_own(path: Path, flags: int) -> int:
    """Open (or create) a file of the lease directory without following a symlink planted in its place."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symlink; remove it (device lease files are never followed)") from None
        raise
