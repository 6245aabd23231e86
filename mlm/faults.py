"""Fault injection for the crash tests, in one place: kill or stall the run at a named moment.

    MLM_FAULT_KILL_AT=<point>:<n>[,<point>:<n>...]   SIGKILL this process the n-th time it reaches <point>
    MLM_FAULT_CHECKPOINT_DELAY=<seconds>             hold every checkpoint write half-done that long
    MLM_TEST_FAIL=<job num>:<rank>:<step>            raise an error on one rank of one sweep job after that
                                                     step (a failure the other ranks must follow)
    MLM_TEST_FAIL_HOLD=1                             that rank then keeps its process group open and sleeps
                                                     instead of leaving: its peers see no connection close
                                                     (as on NCCL), only the failure on the job's store

Points (each marks a moment in a run's life; counts start at 1 in every process):
    startup     resume resolved and metrics truncated, before the first eval or step
    step        an optimizer step done, before its metrics are logged or a checkpoint taken
    eval        an evaluation computed, before it is logged
    checkpoint  a checkpoint half-written (weights and optimizer on disk, no manifest yet)
    metrics     a metrics.jsonl record half-written (the kill leaves a torn last line)
    final       the final model half-saved (weights written, tokenizer not)
    results     everything written except results.json
Unset (the normal case), every hook costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from typing import IO

POINTS = ("startup", "step", "eval", "checkpoint", "metrics", "final", "results")
_reached: Counter = Counter()


def _armed(point: str) -> bool:
    """Count this visit to `point`; True when MLM_FAULT_KILL_AT asks for a kill at this visit."""
    spec = os.environ.get("MLM_FAULT_KILL_AT")
    if not spec:
        return False
    _reached[point] += 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name not in POINTS:
            raise ValueError(f"MLM_FAULT_KILL_AT: unknown point {name!r} (one of {', '.join(POINTS)})")
        if name == point and int(n or 1) == _reached[point]:
            return True
    return False


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: what a crash or an OOM kill does


def reached(point: str) -> None:
    """A fault point: dies here if asked to; the checkpoint point also honours the delay."""
    if point == "checkpoint":
        delay = float(os.environ.get("MLM_FAULT_CHECKPOINT_DELAY", "0"))
        if delay > 0:
            time.sleep(delay)
    if _armed(point):
        _kill()


def write(f: IO[str], text: str, point: str) -> None:
    """f.write(text), or, when a kill is due at `point`, half of it flushed to disk and then the kill."""
    if _armed(point):
        f.write(text[: len(text) // 2])
        f.flush()
        _kill()
    f.write(text)


def fail_after_step(job_num: int, rank: int, step: int) -> None:
    """Raises where MLM_TEST_FAIL names this job, rank and step (the other ranks carry on into their
    next collective, which must then fail too)."""
    spec = os.environ.get("MLM_TEST_FAIL")
    if not spec:
        return
    j, r, s = (int(x) for x in spec.split(":"))
    if (job_num, rank, step) == (j, r, s):
        raise RuntimeError(f"injected failure (MLM_TEST_FAIL={spec})")


def hold_after_failure() -> None:
    """With MLM_TEST_FAIL_HOLD set, a rank that failed never leaves its process group (until killed)."""
    while os.environ.get("MLM_TEST_FAIL_HOLD"):
        time.sleep(60)
