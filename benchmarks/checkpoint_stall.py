"""What a checkpoint stalls training, with trainer.async_checkpoint off and on (docs/performance.md).

    .venv/bin/python benchmarks/checkpoint_stall.py [--steps 40] [--every 10] [--repeats 2] [overrides ...]

Trains the default run (or the one the overrides make) in this process, alternately with the option off and on,
and records when each optimizer step is booked and how long the loop is inside each periodic checkpoint's save.
Reported per setting (medians over the checkpoints, then over the runs):
  step    the median time from one step's booking to the next, away from checkpoints
  stall   the time the training loop is held by a checkpoint (off: the whole write; on: the copy to host memory)
  excess  the time from a checkpoint's step to the next checkpoint's minus as many median steps: the stall plus what
          a background write costs the steps it overlaps (on a CPU the writer and the steps share the cores); noisy
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from mlm import train as training
from mlm.overrides import compose


def timed_run(overrides, run_dir: Path):
    """(perf_counter at each step's booking, seconds the loop spent inside each checkpoint's save) of one run."""
    times, saves = [], []
    count_step, save = training.count_step, training.save

    def booked(*args, **kwargs):
        count_step(*args, **kwargs)
        times.append(time.perf_counter())

    def saved(*args, **kwargs):
        start = time.perf_counter()
        save(*args, **kwargs)
        saves.append(time.perf_counter() - start)

    training.count_step, training.save = booked, saved
    try:
        training.train(compose(overrides), run_dir)
    finally:
        training.count_step, training.save = count_step, save
    return times, saves[:-1]  # the last is the final checkpoint, after training


def figures(times, saves, every: int):
    """(median step, median time blocked in a checkpoint's save, median excess to the next checkpoint)."""
    intervals = [b - a for a, b in zip(times, times[1:])]  # intervals[i]: from step i+1's booking to step i+2's
    after = [i for i in range(len(intervals)) if (i + 1) % every == 0]  # holds the checkpoint of step i+1
    normal = statistics.median(d for i, d in enumerate(intervals) if not any(i - j in after for j in range(every // 2)))
    excess = [sum(intervals[i : i + every]) - every * normal for i in after if i + every <= len(intervals)]
    return normal, statistics.median(saves), statistics.median(excess)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="trainer.checkpoint_every")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args()
    base = [
        f"trainer.max_steps={args.steps}",
        f"trainer.checkpoint_every={args.every}",
        f"trainer.eval_every={10 * args.steps}",
        f"trainer.log_every={10 * args.steps}",
        "trainer.progress_bar=false",
        "trainer.save_model=false",
        "trainer.keep_checkpoints=1",
        "trainer.max_eval_blocks=16",
        *args.overrides,
    ]
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for on in (False, True):
                times, saves = timed_run(
                    [*base, f"trainer.async_checkpoint={str(on).lower()}"], Path(tmp) / f"{r}-{on}"
                )
                rows[on].append(figures(times, saves, args.every))
                print(
                    f"async_checkpoint={str(on).lower():5}: step {rows[on][-1][0]:.3f} s | stall {rows[on][-1][1]:.3f} s | "
                    f"excess {rows[on][-1][2]:+.3f} s",
                    flush=True,
                )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for on, found in rows.items():
        print(
            f"async_checkpoint={str(on).lower():5}: median step {statistics.median(f[0] for f in found):.3f} s | "
            f"stall {statistics.median(f[1] for f in found):.3f} s | excess {statistics.median(f[2] for f in found):+.3f} s"
        )
    print(
        "command: .venv/bin/python benchmarks/checkpoint_stall.py "
        + " ".join([f"--steps {args.steps}", f"--every {args.every}", f"--repeats {args.repeats}", *args.overrides])
    )


if __name__ == "__main__":
    main()
