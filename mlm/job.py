"""One job's processes acting as one: its device, its process group, and a failure on any rank failing all.

`Job` is the context around one job's training. A single-process job leases a device slot of its own
(mlm.leases), a multi-process job gets a fresh process group (one per job, so a failed job never poisons the
next one), and a failure on any rank, or a rank that stops answering, fails the job on every rank whatever the
backend (`PeerWatch`, a side channel on the launcher's store). Code that runs in a job is handed its Job
(`cache_builders_first`, `on_main_alone`); None there means outside one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mlm.config import UserError
from mlm.files import open_new
from mlm.leases import DeviceLease, slot_names
from mlm.placement import Placement, detect, is_main_process, lone_launch_note
from mlm.preemption import Interrupted

log = logging.getLogger(__name__)


class PeerFailed(RuntimeError):
    """Another rank of this job failed or went silent; this rank fails the job too."""


BEAT_S = 1.0  # heartbeat and poll period: one store write and one or two reads per rank per second
STALE_S = 5 * BEAT_S  # a failed collective plus a peer quiet this long: that peer is the cause
GRACE_S = 10.0  # after a verdict and an abort, how long the main thread may take to leave the job by itself


def export_placement() -> Placement:
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


class PeerWatch:
    """The job's side channel: a thread that beats, and watches the others, on the launcher's store.

    Backends do not tell a rank that a peer failed: an NCCL collective waits on for a peer that raised
    (or was stopped, or hung) until the group's timeout. So every rank (1) writes a heartbeat counter
    every BEAT_S, (2) reads the job's "failed" key, where the first failure is published, and (3) reads
    the others' counters: one that has not moved for `silent_after_s` is a stopped or lost process,
    which becomes the job's failure. On a failure the thread aborts the process group (pending NCCL
    collectives then raise, and the main thread leaves its Job); if the main thread is still
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


class Rendezvous:
    """This process's connection to its launcher's store (torchrun's agent store, or rank 0's), made by its first
    multi-process job and kept for the next ones: a process that runs several jobs (a multirun under torchrun)
    cannot host rank 0's store twice. The entry point makes one per process and hands it to every Job."""

    def __init__(self) -> None:
        self.store = None
        self.jobs = 0  # multi-process jobs started: every rank runs the same jobs in the same order, so they agree

    def next_job(self, p: Placement):
        """The store, and a key prefix of the next job's own: re-initialising on the same prefix after a failed
        job could read the old group's addresses; a per-job prefix costs nothing."""
        import torch.distributed as dist

        if self.store is None:
            self.store, _, _ = next(dist.rendezvous("env://", p.rank, p.world_size))
        self.jobs += 1
        return self.store, f"mlm-job-{self.jobs}/"


class Job:
    """Around one job's training (`with Job(run_dir, ...) as job:`): its device and process group; a failure on
    any rank fails all.

    Inside, `device` is the job's CUDA index (or None) and `slot` its device slot (or None). A failing rank
    writes error-rank<r>.json (the main process folds it into error.txt), publishes its failure on the job's
    store and tears the group down. The others learn of it from their PeerWatch within a second, whatever the
    backend (an NCCL collective does not notice a peer leaving), and raise PeerFailed; a rank that stops
    answering for `collective_timeout_minutes` fails the job the same way, named. A rank that finished waits
    for all others in one last all-reduce. `failure_time` stays after the job: when this rank failed.
    """

    def __init__(
        self,
        run_dir: Path,
        rendezvous: Optional[Rendezvous] = None,
        device_slots: int = 0,
        collective_timeout_minutes: float = 10,
    ):
        self.run_dir, self.device_slots = Path(run_dir), device_slots
        self.rendezvous = rendezvous or Rendezvous()  # a process that runs one job needs no other
        self.timeout = datetime.timedelta(minutes=collective_timeout_minutes)
        self.placement = Placement()
        self.device: Optional[int] = None
        self.slot: Optional[int] = None
        self.watch: Optional[PeerWatch] = None  # while a multi-process job runs
        self.failure_time: Optional[float] = None  # orders the ranks' messages in error.txt
        self._lease: Optional[DeviceLease] = None

    def __enter__(self) -> "Job":
        import torch

        self.failure_time = self.device = self.slot = None
        p = self.placement = export_placement()
        (self.run_dir / f"error-rank{p.rank}.json").unlink(missing_ok=True)  # from an earlier attempt of this job
        if p.world_size == 1:
            self._lease_device()
            return self
        if torch.cuda.is_available():
            self.device = p.local_rank % torch.cuda.device_count()
        try:
            self.watch = self._join_group()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind, error: Optional[BaseException], traceback) -> None:
        try:
            if error is None:
                self._finish()
            elif isinstance(error, (Interrupted, SystemExit)):
                # a stop signal: every rank stopped after the same step and saved; no failure to pass on
                self._leave_group()
            else:
                self._fail(error)
        finally:
            self._release()

    def _lease_device(self) -> None:
        """A device slot of this node's pool, for a job that runs alone (none where the pool is empty)."""
        import torch

        note = lone_launch_note()
        if note:
            log.warning(note)
        names = slot_names(self.device_slots)
        if not names:
            return
        self._lease = DeviceLease(names)
        self.slot = self._lease.acquire(str(self.run_dir))
        if names[self.slot].startswith("cuda-"):
            self.device = self.slot
            torch.cuda.set_device(self.slot)  # also right in a reused worker where CUDA is already initialised
            os.environ["ACCELERATE_TORCH_DEVICE"] = f"cuda:{self.slot}"
        log.info("device slot %d of %d: %s", self.slot, len(names), names[self.slot])

    def _join_group(self) -> PeerWatch:
        """A process group for this job, on a fresh key prefix of the launcher's store, and its watch."""
        import torch
        import torch.distributed as dist

        p = self.placement
        if dist.is_initialized():
            dist.destroy_process_group()  # one left by code outside a Job: this job gets its own
        store, prefix = self.rendezvous.next_job(p)
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(p.local_rank % torch.cuda.device_count())  # as Accelerate picks it
            backend = "nccl"
        _meet(dist.PrefixStore(prefix + "meet/", store), p.world_size)
        dist.init_process_group(
            backend, store=dist.PrefixStore(prefix, store), rank=p.rank, world_size=p.world_size, timeout=self.timeout
        )
        own = dist.TCPStore(store.host, store.port, is_master=False, timeout=datetime.timedelta(seconds=30))
        watch = dist.PrefixStore(prefix + "watch/", own)
        return PeerWatch(watch, p.rank, p.world_size, self.timeout.total_seconds(), self._end_stuck).start()

    def _finish(self) -> None:
        """A rank that finished waits for all others in one last all-reduce, then leaves the group."""
        if self.watch is None:
            return
        import torch
        import torch.distributed as dist

        try:
            dist.all_reduce(torch.zeros(1, device=f"cuda:{self.device}" if torch.cuda.is_available() else "cpu"))
        except BaseException as e:  # a peer failed after this rank's last step
            self._fail(e)
            raise
        self._leave_group()

    def _fail(self, e: BaseException) -> None:
        """This rank's failure `e`: published to the others (raises PeerFailed where another rank's came first)."""
        self.failure_time = time.time()
        if self.watch is None:
            return
        cause = self.watch.settle(e)
        p = self.placement
        _record_failure(
            self.run_dir, p.rank, f"PeerFailed: {cause}" if cause else f"{type(e).__name__}: {e}", self.failure_time
        )
        if cause is None:
            from mlm import faults

            faults.hold_after_failure()
        self._leave_group()
        if cause is not None:
            raise PeerFailed(cause) from None

    def _leave_group(self) -> None:
        import torch.distributed as dist

        if self.watch is None:
            return
        self.watch.leave()
        if dist.is_initialized():  # an abort has removed it already
            dist.destroy_process_group()

    def _release(self) -> None:
        self.watch = None
        os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _end_stuck(self, reason: str) -> None:
        """The watch's last resort: the main thread sits in a collective its backend does not end."""
        from mlm.files import atomic_write_text

        self.failure_time = time.time()
        message, rank = f"PeerFailed: {reason}", self.placement.rank
        log.error("this rank is stuck in a collective that does not end; exiting")
        _record_failure(self.run_dir, rank, message, self.failure_time)
        if rank == 0:
            with contextlib.suppress(OSError):
                report = failure_report(self.run_dir, message, self.failure_time)
                atomic_write_text(self.run_dir / "error.txt", report + "\n")
        print(f"error: {reason}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)

    def check_shared_run_dir(self) -> None:
        """Every rank of the job's process group must see rank 0's run directory: checkpoints, resume and
        "finished" are decided from it. Rank 0 writes a random token there and every rank reads it back;
        one that reads another (or none) fails the job on all ranks, now rather than at the first checkpoint.
        Two collectives; call it inside the job (nothing to do for one process)."""
        import secrets

        import torch
        import torch.distributed as dist

        p = self.placement
        if p.world_size == 1:
            return
        path = self.run_dir.absolute() / ".shared-check"
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
                f"run directory {self.run_dir} is not shared between the nodes ({int(differ.item())} of "
                f"{p.world_size} processes see another one); put it on a shared filesystem (hydra.run.dir=...)"
            )


def _meet(store, world_size: int) -> None:
    """Wait, without a time limit, until every rank has arrived (the group's own connect is bounded)."""
    store.add("arrived", 1)
    while int(store.add("arrived", 0)) < world_size:
        time.sleep(0.05)


def _record_failure(run_dir: Path, rank: int, message: str, failed_at: Optional[float]) -> None:
    """error-rank<r>.json of a rank other than 0 (the main process folds them into error.txt)."""
    if rank != 0:
        with contextlib.suppress(OSError):
            record = {"time": failed_at, "message": message}
            with open_new(Path(run_dir) / f"error-rank{rank}.json") as f:  # never through a link planted there
                f.write(json.dumps(record))


def failure_report(run_dir: Path, message: str, failed_at: Optional[float] = None) -> str:
    """error.txt of a job: the failures of all its ranks, the first one first (the others usually
    only saw a peer going away). `failed_at`: when the main process failed with `message` (its Job's
    failure_time; None: now)."""
    entries = [(failed_at or time.time(), message)]
    for f in Path(run_dir).glob("error-rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(f.read_text())
            if record["message"].endswith(message) or message.endswith(record["message"]):
                continue  # the same error on every rank (a bad setting): once is enough
            entries.append((record["time"], f"rank {f.stem.removeprefix('error-rank')}: {record['message']}"))
    if len(entries) == 1:
        return message
    return "\n".join(m for _, m in sorted(entries))


def _wait_for_key(watch: PeerWatch, key: str) -> None:
    """Poll the job's store for `key`, with no time limit: a peer that fails (or goes silent) while
    this rank waits ends the wait through the job's watch."""
    while not watch.has(key):
        if watch.reason is not None:
            raise PeerFailed(watch.reason)
        time.sleep(0.2)


def on_main_alone(key: str, work: Callable[[], Any], job: Optional[Job]) -> Any:
    """`work()` on the main process only (its value; None elsewhere). In a multi-process `job` the other ranks wait
    for it on the job's store, with no time limit (a collective would end them after
    runtime.collective_timeout_minutes), and a failure or silence of the main process still ends their wait."""
    watch = job.watch if job is not None else None
    if is_main_process():
        value = work()
        if watch is not None:
            watch.mark(key)
        return value
    if watch is not None:
        _wait_for_key(watch, key)
    return None


@contextlib.contextmanager
def cache_builders_first(accelerator, job: Optional[Job]) -> Iterator[None]:
    """Run the body on the global main process first, then on the first process of each other node,
    then everywhere: a shared disk gets the block cache built once, node-local disks once per node
    (the cache's atomic rename settles any leftover race).

    In a multi-process `job` the waits are keys on the job's store, not barriers: building a large cache may take
    longer than runtime.collective_timeout_minutes, which bounds collectives only."""
    watch = job.watch if job is not None else None
    if watch is None:  # one process, or a group made outside a Job: Accelerate's two barriers
        with accelerator.main_process_first(), accelerator.local_main_process_first():
            yield
        return
    p = detect()
    if p.rank != 0:
        _wait_for_key(watch, "cache/main")
    if p.local_rank != 0:
        _wait_for_key(watch, f"cache/node-{p.node_rank}")
    yield
    if p.rank == 0:
        watch.mark("cache/main")
    if p.local_rank == 0:
        watch.mark(f"cache/node-{p.node_rank}")
