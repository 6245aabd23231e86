"""Stop signals: finish the optimizer step, write a checkpoint, exit in one line; the rerun resumes.

SLURM warns a job before it preempts it or its time runs out (SIGTERM, or the signal given with
`--signal`; submitit asks for SIGUSR2), torchrun forwards SIGTERM to its ranks, Ctrl-C is SIGINT,
a closed terminal or ssh session is SIGHUP. The first of SIGTERM, SIGINT, SIGHUP, SIGUSR1 or
SIGUSR2 only sets a flag; the loop reads it at the next step boundary (every rank: the flag rides
on the step's one all-reduce, so all ranks stop after the same step), saves a checkpoint and
raises `Interrupted`. After the last step the flag is read between the end-of-run stages (final
checkpoint, final/ and results.json, each downstream fine-tune step), so a run never outlives a
scheduler's grace period by minutes. An eval gives up at its next batch (`Abandoned`: every rank at the
same batch, nothing of it logged). The first signal says in one line what will happen. Before training
(data, cache build, model, checkpoint load) there is nothing to save: the first signal stops at once. A
second signal stops at once too, in one line (`stopped at once by a second SIGINT; the newest checkpoint
is ...`), exit code 128 + signal, no traceback. A handler that was there before (submitit's, which
requeues the job) is called after the checkpoint is written, and is what a signal that acts at once calls.

A parallel sweep (hydra/launcher=parallel or joblib: jobs in worker processes) is stopped as a
whole: `SweepParent` takes the parent's stop signals and writes `<sweep dir>/stopped.txt`; every
worker (`sweep_worker`, run as the workers' initializer) takes its own stop signals as one request,
however many arrive (Ctrl-C reaches the parent and the workers), and a thread of it watches that
file and the parent's pid (a parent that died, even by SIGKILL, stops its workers too). A stopped
worker's job checkpoints at its next step and returns; queued jobs do not start; the parent writes
the summary of what finished and exits `128 + signal`. A second signal to the parent acts at once
(joblib then ends its workers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOPPED = "stopped.txt"  # in a sweep directory: the parent was stopped, by the signal named inside
WATCH_S = 0.5  # how often a sweep worker looks at the stop file and its parent (one stat, one getppid)

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The run stopped at a step boundary for a signal, with a checkpoint written."""

    def __init__(self, signum: Optional[int], message: str):
        super().__init__(message)
        self.signum = signum or signal.SIGTERM  # a rank told by another rank exits as if it had been sent SIGTERM

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


def signal_name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum else "a stop signal on another process"


_active: Optional["StopSignals"] = None  # the running job's, while installed (read by downstream fine-tunes)
_sweep: Optional["SweepStop"] = None  # this process's part in a parallel sweep (its parent or a worker), if any


def stop_requested() -> Optional[int]:
    """The signal that asked the running job (or this sweep process) to stop, or None."""
    if _active is not None:
        return _active.signum
    return _sweep.signum if _sweep is not None else None


class Abandoned(Exception):
    """An eval given up for a stop signal, on every process at the same batch (nothing of it was logged)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"{done} of {total} batches")
        self.done, self.total = done, total


def stop_agreed(accelerator) -> bool:
    """Whether a stop was asked of any process of the run: every process calls this at the same point and
    gets the same answer (one one-element all-reduce when there are several)."""
    from mlm.checkpoint import any_process

    return any_process(accelerator, stop_requested() is not None)


@contextlib.contextmanager
def plan(text: str) -> Iterator[None]:
    """While inside: what the first stop signal says it will do (one line, e.g. that it abandons the eval)."""
    stop = _active
    if stop is None:
        yield
        return
    before, stop.plan = stop.plan, text
    try:
        yield
    finally:
        stop.plan = before


def _say(line: str) -> None:
    # os.write, not print: the main thread may be inside a write to stderr, which a print here would re-enter
    os.write(sys.stderr.fileno(), (line + "\n").encode())


class StopSignals:
    """Installed for one run (main thread only: Python delivers signals there); `restore()` puts the old handlers back.

    `plan` is what the first signal says it will do; while it is None (before training: nothing to save) the
    first signal stops at once, like a second. `newest()` names the newest checkpoint for that line. Only the
    `main` process writes these lines (under torchrun every rank gets the signal).
    In a parallel sweep's process the sweep's handlers stay in place and their request is this run's."""

    def __init__(
        self,
        main: bool = True,
        newest: Callable[[], Optional[Path]] = lambda: None,
        plan: Optional[str] = "stopping after this step with a checkpoint",
    ):
        self.received: Optional[int] = None
        self.previous: Dict[int, Callable] = {}
        self.main, self.newest, self.plan = main, newest, plan

    @property
    def signum(self) -> Optional[int]:
        return self.received or (_sweep.signum if _sweep is not None else None)

    def install(self) -> "StopSignals":
        global _active
        _active = self
        self.pid = os.getpid()
        if _sweep is None and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked worker (data loading, tokenizing): its parent decides, and ends it
            return
        if self.received is not None or self.plan is None:
            self._stop_at_once(signum, second=self.received is not None)
            return
        self.received = signum
        if self.main:
            name = signal_name(signum)
            _say(f"{name}: {self.plan} (a second {name} stops at once, saving nothing more)")

    def _stop_at_once(self, signum: int, second: bool) -> None:
        """SystemExit(128 + signum) from the handler, after one line: the run's `finally` blocks still release its lock."""
        previous = self.previous.get(signum)
        self.restore()
        # submitit's: it requeues the job and exits
        if callable(previous) and previous is not signal.default_int_handler:
            signal.raise_signal(signum)
            return
        if self.main:
            newest = self.newest()
            _say(
                "stopped: stopped at once by "
                + (f"a second {signal_name(signum)}" if second else f"{signal_name(signum)} before training began")
                + (
                    f"; the newest checkpoint is {newest}"
                    if newest
                    else "; no checkpoint was written, the rerun starts over"
                )
            )
        raise SystemExit(128 + signum)

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    def restore(self) -> None:
        global _active
        if _active is self:
            _active = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def hand_on(self) -> None:
        """After the checkpoint: call the handler the signal had before ours, if it was a function (submitit requeues the job there)."""
        handler = self.previous.get(self.signum) if self.signum else None
        self.restore()
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)


# ---------------------------------------------------------------- a parallel sweep


class SweepStop:
    """The stop request of a parallel sweep as seen by one of its processes."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)
        self.signum: Optional[int] = None
        self.previous: Dict[int, Callable] = {}


class SweepParent(SweepStop):
    """The sweep's own process: the first stop signal writes the marker its workers watch; a second acts at once."""

    def install(self) -> "SweepParent":
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        from mlm.files import atomic_write_text

        try:
            atomic_write_text(self.marker, signal.Signals(signum).name + "\n")
        except OSError as e:  # the workers still stop if the parent is then killed (they watch its pid)
            log.warning("could not write %s: %s", self.marker, e)
        # os.write, not print: the main thread may be inside a write to stderr, which a print here would re-enter
        os.write(
            sys.stderr.fileno(),
            f"{signal.Signals(signum).name}: stopping the sweep: running jobs checkpoint after their step, "
            "no new job starts (a second signal ends it at once)\n".encode(),
        )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class SweepWorker(SweepStop):
    """A worker process: any number of stop signals is one request (Ctrl-C reaches it and its parent, which passes
    the stop on through the marker), taken also from the marker and from the parent's end."""

    def install(self) -> "SweepWorker":
        self.parent = os.getppid()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, name="mlm-sweep-watch", daemon=True).start()
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            if self.signum is None and self.marker.exists():
                self.signum = marker_signal(self.marker)
            time.sleep(WATCH_S)
        log.warning("the sweep's process %d is gone: stopping this worker's job with a checkpoint", self.parent)
        self.signum = self.signum or signal.SIGTERM
        # Nothing will ask this worker for more (it would wait for the next job until its idle timeout): once its
        # job has checkpointed and returned (a job not yet training has nothing to save), it leaves.
        while _active is not None:
            time.sleep(WATCH_S)
        time.sleep(1.0)  # the job's last lines: its "stopped:" message, the lock's release
        os._exit(128 + self.signum)


def marker_signal(marker: Path) -> int:
    try:
        return int(signal.Signals[marker.read_text().strip()])
    except (OSError, KeyError):
        return int(signal.SIGTERM)


def sweep_worker(marker: str) -> None:
    """The initializer of a parallel sweep's worker processes (before any job: an idle worker survives a Ctrl-C)."""
    global _sweep
    _sweep = SweepWorker(Path(marker)).install()


def start_parallel_sweep(sweep_dir: Path) -> None:
    """In a parallel sweep's process, before its workers start: take its stop signals, and make every worker
    joblib starts (the loky backend, which the Hydra joblib launcher uses) run `sweep_worker` first."""
    global _sweep
    from joblib import register_parallel_backend
    from joblib._parallel_backends import LokyBackend

    marker = Path(sweep_dir) / STOPPED
    marker.unlink(missing_ok=True)  # from the last launch
    _sweep = SweepParent(marker).install()
    register_parallel_backend("loky", functools.partial(LokyBackend, initializer=sweep_worker, initargs=(str(marker),)))


def in_sweep() -> bool:
    """Whether this process is a parallel sweep's (its parent, or a worker): a stopped job returns, the parent ends the sweep."""
    return _sweep is not None


def end_parallel_sweep() -> Optional[int]:
    """In the sweep's process, once its jobs have returned: put the handlers back; the signal that stopped it, or None."""
    global _sweep
    from joblib import register_parallel_backend
    from joblib._parallel_backends import LokyBackend

    if not isinstance(_sweep, SweepParent):
        return None
    stopped, _sweep = _sweep, None
    stopped.restore()
    register_parallel_backend("loky", LokyBackend)
    return stopped.signum
