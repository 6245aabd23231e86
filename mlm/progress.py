"""What a run tells the person watching it: the start banner, the training bar, the projected total, the
train log lines and the end line; and one console copy of each log line under several processes.

The training bar's rate (hence its ETA) counts training steps only: the time of an eval is taken out of
its clock (`TrainBar.exclude`). Under trainer.budget_minutes the bar counts seconds of the budget.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Dict, List, Optional

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PROJECT_AFTER = 5  # steps measured before the projected total is said (or the first log_every, if sooner)
LONG_RUN_S = 30 * 60  # a projection past this on a CPU suggests a time budget


def log_lines(lines: List[str]) -> None:
    """Log each line (so the banner lands in run.log as well as on the console)."""
    for line in lines:
        log.info(line)


def banner_lines(
    *,
    model: str,
    trainable: int,
    total: int,
    global_batch: int,
    block_size: int,
    batch_parts: str,
    steps: int,
    start_step: int,
    budget_minutes: Optional[float],
    precision: str,
    device: str,
    processes: int,
    run_dir,
    resume: str,
) -> List[str]:
    """The start banner: what trains, on what, how long, and how to resume (`resume`: the command)."""
    tokens_per_step = global_batch * block_size
    length = f"{steps:,} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} training tokens"
    if start_step:
        length += f" (resuming at step {start_step:,})"
    if budget_minutes:
        length += f", or trainer.budget_minutes={budget_minutes:g} of training time if that is spent first"
    return [
        f"model: {model}, {trainable:,} trainable parameters of {total:,}",
        f"global batch: {global_batch} blocks x {block_size} tokens = {tokens_per_step:,} tokens per step ({batch_parts})",
        f"length: {length}",
        f"precision: {precision}",
        f"device: {device}, {processes} process{'es' if processes > 1 else ''}",
        f"run directory: {run_dir}",
        f"to resume: {resume}",
    ]


def batch_parts(per_device: int, processes: int, accumulation: int) -> str:
    return f"{per_device} per device x {processes} process{'es' if processes > 1 else ''} x {accumulation} micro-batch{'es' if accumulation > 1 else ''}"


def count_parameters(model) -> tuple:
    """(trainable, total) parameter counts; tied weights count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def train_line(step: int, steps: int, metrics: Dict[str, float], budget: Optional[tuple] = None) -> str:
    """`step 20/1000: loss 5.213, lr 4.0e-05, grad norm 1.23, 1,850 tokens/s`: the run.log line of each log_every.
    `budget`: (seconds spent, seconds of budget)."""
    line = (
        f"step {step}/{steps}: loss {metrics['train/loss']:.3f}, lr {metrics['train/lr']:.1e}, "
        f"grad norm {metrics['train/grad_norm']:.2f}, {metrics['perf/tokens_per_s']:,.0f} tokens/s"
    )
    if budget:
        line += f", {budget[0]:.0f}/{budget[1]:.0f} s of the time budget"
    return line


def end_line(
    step: int, steps: int, max_steps: int, epochs: float, budget_s: Optional[float], train_seconds: float
) -> str:
    """What ended training (a stop signal's line is the stop message itself)."""
    if budget_s is not None and train_seconds >= budget_s:
        return (
            f"training ended at step {step}/{steps}: the time budget of {budget_s / 60:g} min was spent "
            f"(trainer.budget_minutes={budget_s / 60:g}; {train_seconds:.0f} s of training)"
        )
    if max_steps > 0:
        return f"training ended at step {step}/{steps}: trainer.max_steps={max_steps} reached"
    return f"training ended at step {step}/{steps}: trainer.epochs={epochs:g} done"


def evals_left(step: int, last: int, eval_every: int) -> int:
    """Evals still to run after `step` when training ends at step `last`: every eval_every steps before it, and the final one."""
    return max((last - 1) // eval_every - step // eval_every, 0) + 1


def duration(seconds: float) -> str:
    """0.4 s, 12 s, 4.5 min, 3.2 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def projection_line(
    step: int,
    steps: int,
    step_seconds: float,
    eval_seconds: Optional[float],
    eval_every: int,
    budget_s: Optional[float],
    train_seconds: float,
    on_cpu: bool,
) -> str:
    """The projected rest of the run after measuring a few steps: training at the measured rate (up to the time budget),
    plus the evals still to come at the measured eval time; where that is long on a CPU, the time-budget setting."""
    train_left = (steps - step) * step_seconds
    if budget_s is not None and budget_s - train_seconds < train_left:  # the budget ends training first
        train_left = max(budget_s - train_seconds, 0.0)
        more = math.ceil(train_left / step_seconds) if step_seconds > 0 else 0
        training = f"the time budget's {duration(train_left)} left (about {more:,} steps at {step_seconds:.2f} s/step)"
    else:
        more = steps - step
        training = f"{more:,} steps at {step_seconds:.2f} s/step ({duration(train_left)})"
    n = evals_left(step, step + more, eval_every)
    evals = f"{n} eval{'s' if n != 1 else ''}"
    if eval_seconds is None:
        evals, total = f"{evals}, not timed yet", train_left
    else:
        evals, total = (
            f"{evals} at {duration(eval_seconds)} ({duration(n * eval_seconds)})",
            train_left + n * eval_seconds,
        )
    line = f"projected: {duration(total)} more for this run: {training} and {evals}"
    if on_cpu and budget_s is None and total > LONG_RUN_S:
        line += (
            "; that is long for this CPU: add trainer.budget_minutes=30 to train for 30 minutes "
            "(the LR and mask schedules follow the budget), or lower trainer.max_steps"
        )
    return line


class TrainBar:
    """The training bar: steps to max_steps, or under a time budget seconds of it; its clock skips evals."""

    def __init__(self, steps: int, step: int, budget_s: Optional[float], train_seconds: float, show: bool, **tqdm_args):
        self.budget_s = budget_s
        if budget_s is None:
            self.bar = tqdm(total=steps, initial=step, desc="train", disable=not show, dynamic_ncols=True, **tqdm_args)
        else:
            self.bar = tqdm(
                total=budget_s,
                initial=min(train_seconds, budget_s),
                desc="train",
                unit="s",
                disable=not show,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the "
                "time budget [{elapsed}<{remaining}{postfix}]",
                **tqdm_args,
            )
        self.steps, self.start_step, self.start_seconds = steps, step, train_seconds
        self.shown = show
        self._redirect = self.redirect_logging()
        self._redirect.__enter__()  # until close(): the bar stays under the log lines
        self.eval_seconds: Optional[float] = None  # the last eval's, measured in this process
        self.projected = False

    def update(self, train_seconds: float) -> None:
        """After a step; `train_seconds`: the run's training time so far (what the budget bar shows)."""
        if self.budget_s is None:
            self.bar.update(1)
        else:
            self.bar.update(min(train_seconds, self.budget_s) - self.bar.n)

    def set_postfix(self, **values) -> None:
        if self.budget_s is not None:
            values = {"step": f"{values.pop('step')}/{self.steps}", **values}
        else:
            values.pop("step", None)
        self.bar.set_postfix(values)  # in this order (keyword arguments would be sorted)

    def exclude(self, seconds: float) -> None:
        """Take `seconds` (an eval's) out of the bar's clock: tqdm's rate is the EMA of (steps since the
        last print) / (time since the last print), and its elapsed time runs from start_t; both move past the gap."""
        if not self.bar.disable:
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def eval_took(self, seconds: float) -> None:
        self.eval_seconds = seconds
        self.exclude(seconds)

    def projection_due(self, step: int, log_every: int) -> bool:
        """True once: at the first log_every boundary or PROJECT_AFTER steps into this process, whichever comes first."""
        if self.projected or step >= self.steps:
            return False
        self.projected = step - self.start_step >= PROJECT_AFTER or step % log_every == 0
        return self.projected

    def step_seconds(self, step: int, train_seconds: float) -> float:
        """Mean training seconds per step in this process so far."""
        return (train_seconds - self.start_seconds) / max(step - self.start_step, 1)

    def close(self) -> None:
        """Idempotent (train() closes it after the loop and again on the way out)."""
        self.bar.close()
        if self._redirect is not None:
            self._redirect, redirect = None, self._redirect
            redirect.__exit__(None, None, None)

    def redirect_logging(self):
        """While the bar shows, log lines print above it instead of through it."""
        if self.bar.disable:
            return nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(tqdm_class=tqdm)


class MainProcessConsole(logging.Filter):
    """The console handler's filter: the main process's lines, and other processes' errors tagged with their rank
    (under torchrun every process logs the same lines; one copy is enough)."""

    def __init__(self, name: str = ""):
        super().__init__(name)
        from mlm.placement import rank

        self.rank = rank()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.ERROR:
            return False
        # its file handler on this rank writes /dev/null: the tag harms nothing
        if not str(record.msg).startswith("[rank "):
            record.msg = f"[rank {self.rank}] {record.msg}"
        return True
