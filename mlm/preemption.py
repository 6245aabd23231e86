"""Stop signals: finish the optimizer step, write a checkpoint, exit in one line; the rerun resumes.

SLURM warns a job before it preempts it or its time runs out (SIGTERM, or the signal given with
`--signal`; submitit asks for SIGUSR2), torchrun forwards SIGTERM to its ranks, Ctrl-C is SIGINT.
The first of SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 only sets a flag; the loop reads it at the next
step boundary (every rank: the flag rides on the step's one all-reduce, so all ranks stop after the
same step), saves a checkpoint and raises `Interrupted`. A second signal acts at once, as it
would have without this module. A handler that was there before (submitit's, which requeues the
job) is called after the checkpoint is written.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(Exception):
    """The run stopped at a step boundary for a signal, with a checkpoint written."""

    def __init__(self, signum: Optional[int], message: str):
        super().__init__(message)
        self.signum = signum or signal.SIGTERM  # a rank told by another rank exits as if it had been sent SIGTERM

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


class StopSignals:
    """Installed for one run (main thread only: Python delivers signals there); `restore()` puts the old handlers back."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: Dict[int, Callable] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: what it would have done without us
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal on another process"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def hand_on(self) -> None:
        """After the checkpoint: call the handler the signal had before ours, if it was a function (submitit requeues the job there)."""
        handler = self.previous.get(self.signum) if self.signum else None
        self.restore()
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)
