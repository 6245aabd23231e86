"""Which process am I, which device is mine, and one process group per job, whatever the launcher.

Launchers describe a multi-process job in their own variables: torchrun and `accelerate launch` set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; SLURM tasks (srun, submitit's slurm launcher) get SLURM_*;
submitit's local tasks get SUBMITIT_LOCAL_*. Accelerate reads only the first kind, so `setup()`
exports the torch variables from the others before the Accelerator exists. Everything that asks
"am I the main process / how many processes / which device" asks this module.

Per job (`job()`): a single-process job leases a device slot of its own (`DeviceLease`), a
multi-process job gets a fresh process group (one per job, so a failed job never poisons the next
one), and a failure on any rank, or a rank that stops answering, fails the job on every rank
whatever the backend (`PeerWatch`, a side channel on the launcher's store).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional

from mlm.config import UserError
from mlm.files import open_new
from mlm.preemption import Interrupted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where this process sits in its job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | submitit_local | mpi
    job_id: Optional[str] = None  # SLURM or submitit job id, when there is one
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def detect(env: Optional[Mapping[str, str]] = None) -> Placement:
    """The placement this process's launcher describes (read only; see `setup()` to export it)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate launch, or a previous setup()
        launcher = env.get("MLM_LAUNCHER", "torchrun")  # setup() leaves its source here
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID") if launcher == "submitit_local" else env.get("SLURM_JOB_ID")
        return Placement(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            _int(env, "LOCAL_RANK", default=0),
            _int(env, "LOCAL_WORLD_SIZE", "WORLD_SIZE", default=1),
            _int(env, "GROUP_RANK", default=0),
            launcher,
            job_id,
            env.get("MASTER_ADDR"),
            _int(env, "MASTER_PORT", default=0) or None,
        )
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        n = _int(env, "SUBMITIT_LOCAL_NTASKS", default=1)
        return Placement(
            int(env["SUBMITIT_LOCAL_GLOBALID"]),
            n,
            _int(env, "SUBMITIT_LOCAL_LOCALID", default=0),
            n,
            0,
            "submitit_local",
            job_id,
            "127.0.0.1",
            _port(env, job_id),
        )
    # Only srun sets SLURM_STEP_NUM_TASKS, for the tasks it starts (submitit's slurm tasks too: its sbatch
    # script runs them under srun). A batch script's own shell has SLURM_NTASKS and SLURM_PROCID=0 of
    # the whole allocation but is one process: taking it for rank 0 of SLURM_NTASKS waits for peers forever.
    n = _int(env, "SLURM_STEP_NUM_TASKS", default=1)
    if "SLURM_PROCID" in env and n > 1:
        job_id = env.get("SLURM_JOB_ID", "0")
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        )
        return Placement(
            int(env["SLURM_PROCID"]),
            n,
            _int(env, "SLURM_LOCALID", default=0),
            max(1, n // max(nodes, 1)),
            _int(env, "SLURM_NODEID", default=0),
            "slurm",
            job_id,
            env.get("MASTER_ADDR") or slurm_hostnames(nodelist)[0],
            _port(env, job_id),
        )
    for prefix in (
        "OMPI_COMM_WORLD_",
        "PMI_",
        "MV2_COMM_WORLD_",
    ):  # mpirun (Accelerate's multi-CPU launches read these too)
        n = _int(env, prefix + "SIZE", default=1)
        if n > 1:
            local_n = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", default=n)
            return Placement(
                _int(env, prefix + "RANK", default=0),
                n,
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", default=0),
                local_n,
                0,
                "mpi",
                None,
                env.get("MASTER_ADDR") or ("127.0.0.1" if local_n == n else None),
                _int(env, "MASTER_PORT", default=29500),
            )
    return Placement()


def lone_launch_note(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """One line when `accelerate launch --num_processes N` (N > 1) started this process alone: without GPUs (or with
    --cpu) Accelerate 1.x runs the script once, with MASTER_ADDR/PORT set for N processes and no rank, unless under
    mpirun (--mpirun_hostfile). None otherwise."""
    env = os.environ if env is None else env
    if "ACCELERATE_USE_CPU" not in env or not env.get("MASTER_PORT") or detect(env).world_size > 1:
        return None
    return (
        "accelerate launch started this one process, not the --num_processes asked for (on CPU it starts several only "
        "under mpirun, --mpirun_hostfile); for several processes here: torchrun --nproc_per_node <N> run.py ..."
    )


PORTS = (
    20000,
    32768,
)  # derived rendezvous ports: below Linux's ephemeral range (32768-60999 by default), which outgoing connections take


def _port(env: Mapping[str, str], job_id: str) -> int:
    """MASTER_PORT if set, else one derived from the job id and step: every task of a job step computes
    the same, and two steps of one job (two sruns side by side) get different ones."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return PORTS[0] + zlib.crc32(f"{job_id}.{env.get('SLURM_STEP_ID', '')}".encode()) % (PORTS[1] - PORTS[0])


@functools.lru_cache(maxsize=8)
def slurm_hostnames(nodelist: str) -> List[str]:
    """Expand a SLURM node list ("gpu[01-03,07],login1"): scontrol when present, else the common forms."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            if out.split():
                return out.split()
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def setup() -> Placement:
    """Export the torch distributed variables for this process (idempotent); returns the placement."""
    p = detect()
    if p.launcher in ("slurm", "submitit_local", "mpi"):
        os.environ.update(
            RANK=str(p.rank),
            WORLD_SIZE=str(p.world_size),
            LOCAL_RANK=str(p.local_rank),
            LOCAL_WORLD_SIZE=str(p.local_world_size),
            GROUP_RANK=str(p.node_rank),
            MASTER_PORT=str(p.master_port),
            MLM_LAUNCHER=p.launcher,
        )
        if p.master_addr:  # mpirun across nodes: the user names rank 0's host (Accelerate says so if not)
            os.environ["MASTER_ADDR"] = p.master_addr
    if p.world_size > 1 and device_index(p.local_rank) not in (None, p.local_rank):
        # Accelerate takes its device as LOCAL_RANK % device_count but gives DDP (and its barriers)
        # device_ids=[LOCAL_RANK]: with one GPU per task (srun --gpus-per-task=1) local rank 1 would ask
        # for a device it cannot see. LOCAL_RANK becomes the device index, so both agree; every task
        # is then its node's "local main process" (the block cache's atomic rename settles that).
        os.environ["LOCAL_RANK"] = str(device_index(p.local_rank))
        p = detect()
    return p


def device_index(local_rank: int) -> Optional[int]:
    """The CUDA device of the process with this local rank, as Accelerate picks it: local rank modulo the
    GPUs this process sees (one per task: always 0). None without CUDA."""
    import torch

    return local_rank % torch.cuda.device_count() if torch.cuda.is_available() else None


def rank() -> int:
    return detect().rank


def is_main_process() -> bool:
    return rank() == 0


def launch_name() -> Optional[str]:
    """A run-directory name all tasks of one launch agree on, whatever their node: for SLURM tasks and
    torchrun on several nodes inside SLURM, the job (and step); for torchrun on several nodes elsewhere,
    its --rdzv-id. None on one node (the launch time serves); UserError where nothing is shared."""
    p = detect()
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID", "")
    if job and (p.launcher == "slurm" or p.world_size > p.local_world_size):
        return f"slurm-{job}" + (
            f".{step}" if step.isdigit() and int(step) < 2**31 else ""
        )  # batch/extern steps have huge ids
    if p.world_size > p.local_world_size:  # each node's start second differs: one run directory per node
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's --rdzv-id; "none" when not given
        if run_id == "none":
            raise UserError(
                f"{p.world_size} processes on {p.world_size // p.local_world_size} nodes need one run directory: "
                "set hydra.run.dir=<shared path> (with torchrun: or give --rdzv-id=<name>)"
            )
        return "torchrun-" + re.sub(r"[^\w.-]", "_", run_id)
    return None


def check_shared_run_dir(run_dir: Path) -> None:
    """Every rank of the job's process group must see rank 0's run directory: checkpoints, resume and
    "finished" are decided from it. Rank 0 writes a random token there and every rank reads it back;
    one that reads another (or none) fails the job on all ranks, now rather than at the first checkpoint.
    Two collectives; call it inside `job()` (nothing to do for one process)."""
    import secrets

    import torch
    import torch.distributed as dist

    p = detect()
    if p.world_size == 1:
        return
    path = Path(run_dir).absolute() / ".shared-check"
    token = [secrets.token_hex(16) if p.rank == 0 else None]
    if p.rank == 0:
        with open_new(path) as f:  # never through a link planted there
            f.write(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    differ = torch.tensor([float(seen != token[0])], device=device)
    dist.all_reduce(differ)
    if p.rank == 0:
        path.unlink(missing_ok=True)
    if differ.item():
        raise UserError(
            f"run directory {run_dir} is not shared between the nodes ({int(differ.item())} of {p.world_size} "
            "processes see another one); put it on a shared filesystem (hydra.run.dir=...)"
        )


# --- device slots -----------------------------------------------------------------------------------------


def lease_dir() -> Path:
    """Lock files of the device slots of this node (MLM_LEASE_DIR; default: one per user in /tmp)."""
    return Path(os.environ.get("MLM_LEASE_DIR") or Path(tempfile.gettempdir()) / f"mlm-device-leases-{os.getuid()}")


class DeviceLease:
    """One slot of a node-wide pool, held with an flock from `acquire()` to `release()`.

    The kernel drops an flock when its process dies, so a killed job never keeps a slot; a job
    that fails releases it in `job()`'s finally. The slot is chosen by what is free at that
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
        except (
            UserError,
            OSError,
            RuntimeError,
        ) as e:  # a symlink planted, a full /tmp, a sticky CUDA error: the slot is released all the same
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


# --- one job: lease, process group, failures in step -------------------------------------------------------


class PeerFailed(RuntimeError):
    """Another rank of this job failed or went silent; this rank fails the job too."""


_store = None  # the rendezvous store of this process (torchrun's agent store, or rank 0's), reused by every job
_groups_started = 0
_watch: Optional["PeerWatch"] = None  # the running multi-process job's watch (None outside one)

BEAT_S = 1.0  # heartbeat and poll period: one store write and one or two reads per rank per second
STALE_S = 5 * BEAT_S  # a failed collective plus a peer quiet this long: that peer is the cause
GRACE_S = 10.0  # after a verdict and an abort, how long the main thread may take to leave the job by itself


class PeerWatch:
    """The job's side channel: a thread that beats, and watches the others, on the launcher's store.

    Backends do not tell a rank that a peer failed: an NCCL collective waits on for a peer that raised
    (or was stopped, or hung) until the group's timeout. So every rank (1) writes a heartbeat counter
    every BEAT_S, (2) reads the job's "failed" key, where the first failure is published, and (3) reads
    the others' counters: one that has not moved for `silent_after_s` is a stopped or lost process,
    which becomes the job's failure. On a failure the thread aborts the process group (pending NCCL
    collectives then raise, and the main thread leaves through job()); if the main thread is still
    in the job GRACE_S later (a gloo collective, which an abort does not end), `on_stuck` ends the
    process. The thread uses a connection of its own, so a main thread blocked on the store (NCCL's
    set-up) never holds it up; a stopped process's sockets stay open, which is why silence is
    judged by counters, not connections. A live process whose GPU hangs keeps beating: the group's
    timeout (the same minutes) ends that one.
    """

    def __init__(self, store, rank: int, world_size: int, silent_after_s: float, on_stuck):
        self.store, self.rank, self.silent_after_s, self.on_stuck = store, rank, silent_after_s, on_stuck
        self.peers = [r for r in range(world_size) if r != rank]
        self.seen = {r: (None, time.monotonic()) for r in self.peers}  # last counter read, and when it last moved
        self.reason: Optional[str] = None
        self.left = threading.Event()  # the main thread has left the job
        self._lock = threading.Lock()  # one store request at a time on this connection
        self._thread = threading.Thread(target=self._run, name="mlm-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def _run(self) -> None:
        beats = 0
        while self.reason is None and not self.left.wait(BEAT_S):
            beats += 1
            with contextlib.suppress(Exception), self._lock:  # a store that does not answer is no news
                self.store.set(f"beat/{self.rank}", str(beats))
                self._poll()
        if self.reason is None or self.left.is_set():
            return
        with contextlib.suppress(Exception):
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()  # NCCL: the main thread's pending collective raises now
        if not self.left.wait(GRACE_S):
            self.on_stuck(self.reason)

    def _poll(self) -> None:
        """Under the lock: take a published failure, or judge the others' counters."""
        first = self._first_failure()
        if first is not None:
            if first["by"] != self.rank:
                self._conclude(first["reason"])
            return
        now = time.monotonic()
        for r in self.peers:
            key = f"beat/{r}"
            value = self.store.get(key) if self.store.check([key]) else None
            if value != self.seen[r][0]:
                self.seen[r] = (value, now)
        silent = self._silent(self.silent_after_s)
        if silent:
            self._conclude(self._publish(silent))

    def _conclude(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.error("%s; ending the job", reason)

    def _first_failure(self) -> Optional[dict]:
        return json.loads(self.store.get("failed")) if self.store.check(["failed"]) else None

    def _silent(self, quiet_s: float) -> Optional[str]:
        now = time.monotonic()
        quiet = {r: now - t for r, (_, t) in self.seen.items() if now - t > quiet_s}
        if not quiet:
            return None
        names = ", ".join(str(r) for r in quiet)
        return (
            f"rank {names} went silent: no heartbeat for {max(quiet.values()):.0f} s "
            "(a stopped or hung process, or a lost node)"
        )

    def _publish(self, reason: str) -> str:
        """Publish `reason` as the job's failure unless one came first; returns the first one."""
        record = json.dumps({"by": self.rank, "reason": reason})
        return json.loads(self.store.compare_set("failed", "", record))["reason"]

    def settle(self, e: BaseException) -> Optional[str]:
        """The main thread's failure `e`: publish it; the cause to report if another rank's failure
        (or silence) came first, None if `e` is the cause. A UserError stays itself (the same bad
        setting fails every rank at once)."""
        from mlm.config import UserError

        with self._lock:
            with contextlib.suppress(Exception):
                self._poll()
            silent = self._silent(STALE_S)  # a collective that failed on a quiet peer: that peer
            mine = silent or f"rank {self.rank} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})"
            try:
                first = self._publish(mine)
            except Exception:  # the store is gone with rank 0's process
                first = self.reason or mine
        if isinstance(e, UserError) or (first == mine and not silent):
            return None
        self._conclude(first)
        return first

    def leave(self) -> None:
        """Stop the watch and wait for its thread to end (each store request it may be in is bounded
        by the store's timeout). A daemon thread still inside a store call when the interpreter exits
        aborts the process ("terminate called without an active exception"), a finished rank's exit
        code -6 that fails the whole job."""
        self.left.set()
        self._thread.join()

    def has(self, key: str) -> bool:
        with self._lock:
            return self.store.check([key])

    def mark(self, key: str) -> None:
        with self._lock:
            self.store.set(key, "1")


def _record_failure(run_dir: Path, rank: int, message: str) -> None:
    """error-rank<r>.json of a rank other than 0 (the main process folds them into error.txt)."""
    if rank != 0:
        with contextlib.suppress(OSError):
            record = {"time": last_failure_time, "message": message}
            with open_new(Path(run_dir) / f"error-rank{rank}.json") as f:  # never through a link planted there
                f.write(json.dumps(record))


def _end_stuck(run_dir: Path, rank: int, reason: str) -> None:
    """The watch's last resort: the main thread sits in a collective its backend does not end."""
    global last_failure_time
    from mlm.files import atomic_write_text

    last_failure_time = time.time()
    message = f"PeerFailed: {reason}"
    log.error("this rank is stuck in a collective that does not end; exiting")
    _record_failure(run_dir, rank, message)
    if rank == 0:
        with contextlib.suppress(OSError):
            atomic_write_text(Path(run_dir) / "error.txt", failure_report(run_dir, message) + "\n")
    print(f"error: {reason}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def _meet(store, world_size: int) -> None:
    """Wait, without a time limit, until every rank has arrived (the group's own connect is bounded)."""
    store.add("arrived", 1)
    while int(store.add("arrived", 0)) < world_size:
        time.sleep(0.05)


def _init_group(p: Placement, timeout_minutes: float, run_dir: Path) -> PeerWatch:
    """A process group for one job, on a fresh key prefix of the launcher's store, and its watch.

    Re-initialising on the same prefix after a failed job could read the old group's addresses;
    a per-job prefix costs nothing. Every rank runs the same jobs in the same order, so the
    counter agrees across ranks.
    """
    global _store, _groups_started
    import torch
    import torch.distributed as dist

    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", p.rank, p.world_size))
    _groups_started += 1
    prefix = f"mlm-job-{_groups_started}/"
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(
            p.local_rank % torch.cuda.device_count()
        )  # as Accelerate picks it (one GPU per task, or all)
        backend = "nccl"
    _meet(dist.PrefixStore(prefix + "meet/", _store), p.world_size)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(
        backend, store=dist.PrefixStore(prefix, _store), rank=p.rank, world_size=p.world_size, timeout=timeout
    )
    own = dist.TCPStore(_store.host, _store.port, is_master=False, timeout=datetime.timedelta(seconds=30))
    return PeerWatch(
        dist.PrefixStore(prefix + "watch/", own),
        p.rank,
        p.world_size,
        timeout.total_seconds(),
        functools.partial(_end_stuck, run_dir, p.rank),
    ).start()


def _leave_group() -> None:
    import torch.distributed as dist

    if _watch is not None:
        _watch.leave()
    if dist.is_initialized():  # an abort has removed it already
        dist.destroy_process_group()


@contextlib.contextmanager
def job(
    run_dir: Path, device_slots: int = 0, owner: str = "", collective_timeout_minutes: float = 10
) -> Iterator[dict]:
    """Around one job's training: its device and process group; a failure on any rank fails all.

    Yields a dict with the job's "device" (a CUDA index or None) and "slot". A failing rank writes
    error-rank<r>.json (the main process folds it into error.txt), publishes its failure on the
    job's store and tears the group down. The others learn of it from their PeerWatch within a
    second, whatever the backend (an NCCL collective does not notice a peer leaving), and raise
    PeerFailed; a rank that stops answering for `collective_timeout_minutes` fails the job the same
    way, named. A rank that finished waits for all others in one last all-reduce.
    """
    global last_failure_time, _watch
    import torch
    import torch.distributed as dist

    last_failure_time = 0.0
    p = setup()
    (Path(run_dir) / f"error-rank{p.rank}.json").unlink(missing_ok=True)  # from an earlier attempt of this job
    info: dict = {"device": None, "slot": None}
    lease = None
    if p.world_size == 1:
        note = lone_launch_note()
        if note:
            log.warning(note)
        names = slot_names(device_slots)
        if names:
            lease = DeviceLease(names)
            info["slot"] = lease.acquire(owner or str(run_dir))
            if names[info["slot"]].startswith("cuda-"):
                info["device"] = info["slot"]
                torch.cuda.set_device(info["slot"])  # also right in a reused worker where CUDA is already initialised
                os.environ["ACCELERATE_TORCH_DEVICE"] = f"cuda:{info['slot']}"
            log.info("device slot %d of %d: %s", info["slot"], len(names), names[info["slot"]])
    elif torch.cuda.is_available():
        info["device"] = p.local_rank % torch.cuda.device_count()
    try:
        if p.world_size > 1:
            if dist.is_initialized():
                dist.destroy_process_group()  # one left by code outside job(): this job gets its own
            _watch = _init_group(p, collective_timeout_minutes, run_dir)
        try:
            yield info
            if p.world_size > 1:
                dist.all_reduce(torch.zeros(1, device=f"cuda:{info['device']}" if torch.cuda.is_available() else "cpu"))
        except (
            Interrupted,
            SystemExit,
        ):  # a stop signal: every rank stopped after the same step and saved; no failure to pass on
            if p.world_size > 1:
                _leave_group()
            raise
        except BaseException as e:
            last_failure_time = time.time()
            if p.world_size > 1:
                cause = _watch.settle(e)
                _record_failure(run_dir, p.rank, f"PeerFailed: {cause}" if cause else f"{type(e).__name__}: {e}")
                if cause is None:
                    from mlm import faults

                    faults.hold_after_failure()
                _leave_group()
                if cause is not None:
                    raise PeerFailed(cause) from None
            raise
        if p.world_size > 1:
            _leave_group()
    finally:
        _watch = None
        os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        if lease is not None:
            lease.release()


last_failure_time = 0.0  # when this process's last job failed (to order the ranks' messages)


def failure_report(run_dir: Path, message: str) -> str:
    """error.txt of a job: the failures of all its ranks, the first one first (the others usually
    only saw a peer going away)."""
    entries = [(last_failure_time or time.time(), message)]
    for f in Path(run_dir).glob("error-rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(f.read_text())
            if record["message"].endswith(message) or message.endswith(record["message"]):
                continue  # the same error on every rank (a bad setting): once is enough
            entries.append((record["time"], f"rank {f.stem.removeprefix('error-rank')}: {record['message']}"))
    if len(entries) == 1:
        return message
    return "\n".join(m for _, m in sorted(entries))


def _wait_for_key(key: str) -> None:
    """Poll the job's store for `key`, with no time limit: a peer that fails (or goes silent) while
    this rank waits ends the wait through the job's watch."""
    while not _watch.has(key):
        if _watch.reason is not None:
            raise PeerFailed(_watch.reason)
        time.sleep(0.2)


def on_main_alone(key: str, work: Callable[[], Any]) -> Any:
    """`work()` on the main process only (its value; None elsewhere). In a job() the other ranks wait for it
    on the job's store, with no time limit (a collective would end them after runtime.collective_timeout_minutes),
    and a failure or silence of the main process still ends their wait."""
    if is_main_process():
        value = work()
        if _watch is not None:
            _watch.mark(key)
        return value
    if _watch is not None:
        _wait_for_key(key)
    return None


@contextlib.contextmanager
def cache_builders_first(accelerator) -> Iterator[None]:
    """Run the body on the global main process first, then on the first process of each other node,
    then everywhere: a shared disk gets the block cache built once, node-local disks once per node
    (the cache's atomic rename settles any leftover race).

    In a job() the waits are keys on the job's store, not barriers: building a large cache may take
    longer than runtime.collective_timeout_minutes, which bounds collectives only."""
    if _watch is None:  # one process, or a group made outside job(): Accelerate's two barriers
        with accelerator.main_process_first(), accelerator.local_main_process_first():
            yield
        return
    p = detect()
    if p.rank != 0:
        _wait_for_key("cache/main")
    if p.local_rank != 0:
        _wait_for_key(f"cache/node-{p.node_rank}")
    yield
    if p.rank == 0:
        _watch.mark("cache/main")
    if p.local_rank == 0:
        _watch.mark(f"cache/node-{p.node_rank}")
