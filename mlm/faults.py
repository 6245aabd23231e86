"""Fault injection for the crash tests, in one place: kill or stall the run at a named moment.

    MLM_FAULT_KILL_AT=<point>:<n>[,<point>:<n>...]   SIGKILL this process the n-th time it reaches <point>
    MLM_FAULT_SIGNAL_AT=<point>:<n>:<SIGNAL>[,...]    send this process SIGNAL (e.g. SIGTERM) the n-th time it reaches
                                                     <point>, and go on (a stop signal at that moment)
    MLM_FAULT_RANK=<rank>                            the two above only on that rank ($RANK; unset: every process)
    MLM_FAULT_CHECKPOINT_DELAY=<seconds>             hold every checkpoint write half-done that long
    MLM_FAULT_CHECKPOINT_HOLD_STEPS=<n>              hold every background checkpoint write (trainer.async_checkpoint)
                                                     half-done until the run has taken n more steps or waits for it
    MLM_TEST_FAIL=<job num>:<rank>:<step>            raise an error on one rank of one sweep job after that
                                                     step (a failure the other ranks must follow)
    MLM_TEST_FAIL_HOLD=1                             that rank then keeps its process group open and sleeps
                                                     instead of leaving: its peers see no connection close
                                                     (as on NCCL), only the failure on the job's store

Points (each marks a moment in a run's life; counts start at 1 in every process):
    startup     resume resolved and metrics truncated, before the first eval or step
    step        an optimizer step done, before its metrics are logged or a checkpoint taken
    eval_batch  a batch of an evaluation scored (the next batch looks for a stop signal)
    eval        an evaluation computed, before it is logged
    checkpoint  a checkpoint half-written (weights and optimizer on disk, no manifest yet; in the writer's
                thread with trainer.async_checkpoint)
    tokenize    a batch of documents tokenized while the block cache is built
    tokenizer   the run's own tokenizer about to be trained (tokenizer=wordpiece|bpe|unigram, not read from the cache)
    metrics     a metrics.jsonl record half-written (the kill leaves a torn last line)
    final       the final model half-saved (weights written, tokenizer not)
    results     everything written except results.json
    finetune    a downstream fine-tuning step done
Unset (the normal case), every hook costs two or three dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from typing import IO, Optional

POINTS = (
    *("startup", "step", "eval_batch", "eval", "checkpoint", "tokenize", "tokenizer"),
    *("metrics", "final", "results", "finetune"),
)
_reached: Counter = Counter()
_signalled: Counter = Counter()
_steps_taken = 0  # counted with MLM_FAULT_CHECKPOINT_HOLD_STEPS set, for the writer's thread to wait on
_step_done = threading.Condition()


def _due(variable: str, point: str, visits: Counter) -> Optional[str]:
    """Count this visit to `point`; the item of `variable` (<point>:<n>[:<extra>]) due at this visit, else None."""
    spec = os.environ.get(variable)
    if not spec or os.environ.get("MLM_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return None
    visits[point] += 1
    for item in spec.split(","):
        name, _, rest = item.strip().partition(":")
        if name not in POINTS:
            raise ValueError(f"{variable}: unknown point {name!r} (one of {', '.join(POINTS)})")
        n, _, extra = rest.partition(":")
        if name == point and int(n or 1) == visits[point]:
            return extra
    return None


def _armed(point: str) -> bool:
    """Count this visit to `point`; True when MLM_FAULT_KILL_AT asks for a kill at this visit."""
    return _due("MLM_FAULT_KILL_AT", point, _reached) is not None


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: what a crash or an OOM kill does


def reached(point: str) -> None:
    """A fault point: dies here if asked to; the checkpoint point also honours the delay."""
    hold = point in ("step", "checkpoint") and int(os.environ.get("MLM_FAULT_CHECKPOINT_HOLD_STEPS", "0"))
    if hold and (point == "step" or threading.current_thread() is not threading.main_thread()):
        _hold(point, hold)
    if point == "checkpoint":
        delay = float(os.environ.get("MLM_FAULT_CHECKPOINT_DELAY", "0"))
        if delay > 0:
            time.sleep(delay)
    if _armed(point):
        _kill()
    name = _due("MLM_FAULT_SIGNAL_AT", point, _signalled)
    if name is not None:
        os.kill(os.getpid(), signal.Signals[name or "SIGTERM"])  # its handler runs before the next line


def _hold(point: str, steps: int) -> None:
    """A step counts itself; a background checkpoint write waits for `steps` more, or for the loop to wait for it."""
    global _steps_taken
    with _step_done:
        if point == "step":
            _steps_taken += 1
            _step_done.notify_all()
        else:
            target, writer = _steps_taken + steps, threading.current_thread()
            _step_done.wait_for(lambda: _steps_taken >= target or getattr(writer, "awaited", False))


def waiting_for(writer: threading.Thread) -> None:
    """The training thread waits for this writer thread: its hold ends (else the two would wait on each other)."""
    if os.environ.get("MLM_FAULT_CHECKPOINT_HOLD_STEPS"):
        with _step_done:
            writer.awaited = True
            _step_done.notify_all()


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
