"""A local stand-in for `wandb agent`: runs a W&B sweep file's trials on this machine, without the W&B server.

    python launchers/wandb_local_agent.py sweeps/wandb.yaml --count 2 [--seed 0]

What the real agent does per trial (wandb 0.31, wandb/wandb_agent.py, Agent._command_run): the server hands it a
run id and the trial's parameter values; it writes them to wandb/sweep-<id>/config-<run id>.yaml, sets WANDB_RUN_ID,
WANDB_SWEEP_PARAM_PATH (and WANDB_SWEEP_ID, from the command line), expands the sweep file's `command` macros
(${env} ${program} ${args_no_hyphens} ...) and starts the process. This stand-in calls that same wandb code
(Agent._command_run) with a run command shaped as the server's, so the trial's command line and environment are the
real agent's. What it replaces is the server: the sweep id, the run ids and the parameter values (grid or random
sampling of the file's `parameters`; `bayes` is sampled at random, not W&B's Bayesian search), and the ranking
by the file's `metric` (each trial's best logged value, from its metrics.jsonl: an offline W&B run keeps no
readable summary until `wandb sync`). Not covered: the server's search, early termination, preempted runs handed out again, and uploads.

wandb's local controller (wandb.controller(...)) is no substitute: it needs the `sweeps` package (wandb[sweeps])
and still creates the sweep and reads its runs on the W&B server.

Agent._command_run is private wandb API: tests/test_launchers.py runs a 2-trial sweep through it, so a wandb that
changes it fails there first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import string
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def new_id(rng: random.Random, size: int = 8) -> str:
    """An id shaped as W&B's (lowercase letters and digits)."""
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(size))


def read_sweep_file(path: Path) -> Optional[Dict[str, Any]]:
    """The sweep file as `wandb sweep` reads it (PyYAML: YAML 1.1); None, with wandb's message, when unreadable."""
    from wandb.sdk.launch.sweeps.utils import load_sweep_config

    return load_sweep_config(str(path))


def sample_value(name: str, spec: Dict[str, Any], rng: random.Random) -> Any:
    """One value of a sweep parameter, as W&B's parameter spec defines it (the distributions this file's sweeps use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec["min"], spec["max"]
    for bound in (low, high):
        if not isinstance(bound, (int, float)):  # PyYAML reads 1e-4 as text (YAML 1.1 floats need a dot)
            sys.exit(f"error: sweep parameter {name}: bound {bound!r} is not a number (write 1.0e-4, not 1e-4)")
    both_ints = isinstance(low, int) and isinstance(high, int)
    distribution = spec.get("distribution", "int_uniform" if both_ints else "uniform")
    if distribution == "int_uniform":
        return rng.randint(low, high)
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":  # min and max are the values themselves
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "log_uniform":  # min and max are natural logs
        return math.exp(rng.uniform(low, high))
    sys.exit(f"error: the local stand-in does not sample parameter {name}'s distribution {distribution!r}")


def trial_values(sweep: Dict[str, Any], count: int, rng: random.Random) -> List[Dict[str, Any]]:
    """`count` parameter sets: the first of the file's grid (method: grid), else random samples (random and bayes)."""
    parameters = sweep.get("parameters", {})
    if sweep.get("method") == "grid":
        fixed = {k: v for k, v in parameters.items() if "value" not in v and "values" not in v}
        if fixed:
            sys.exit(f"error: a grid sweep needs `values` for every parameter; {', '.join(fixed)} has a distribution")
        names = list(parameters)
        choices = [parameters[n]["values"] if "values" in parameters[n] else [parameters[n]["value"]] for n in names]
        return [dict(zip(names, combo)) for combo in itertools.islice(itertools.product(*choices), count)]
    return [{name: sample_value(name, spec, rng) for name, spec in parameters.items()} for _ in range(count)]


def run_trial(sweep: Dict[str, Any], sweep_id: str, run_id: str, values: Dict[str, Any]) -> int:
    """Start one trial through wandb's own agent code and wait for it; its exit code."""
    from wandb.wandb_agent import Agent

    os.environ["WANDB_SWEEP_ID"] = sweep_id  # what `wandb agent <id>` sets (wandb_agent.run_agent)
    agent = Agent(api=None, queue=None, sweep_id=sweep_id)
    agent._sweep_command = list(sweep.get("command") or [])  # Agent.run() takes it from the server's sweep config
    command = {"type": "run", "run_id": run_id, "program": sweep["program"], "args": {}}
    command["args"] = {name: {"value": value} for name, value in values.items()}
    agent._command_run(command)
    return agent._run_processes[run_id].wait()


def trial_dir(run_id: str, root: Path = Path("outputs")) -> Optional[Path]:
    """The trial's run directory: where its W&B run folder (online run-*, offline offline-run-*) lies, in wandb/,
    under Hydra's outputs/ (the sweep file puts each trial in outputs/sweeps/<sweep id>/<run id>)."""
    found = sorted(root.rglob(f"wandb/*run-*-{run_id}*"))
    return found[-1].parent.parent if found else None


def trial_metric(run_dir: Optional[Path], metric: Dict[str, str]) -> Optional[float]:
    """The trial's best value of the sweep metric, from metrics.jsonl (the records the tracker logs to W&B, key for
    key; W&B's summary of eval/perplexity is its minimum, as mlm/tracking.py defines it)."""
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r[metric.get("name")] for r in records if isinstance(r.get(metric.get("name")), (int, float))]
    if not values:
        return None
    return max(values) if metric.get("goal") == "maximize" else min(values)


def ranked(trials: List[Dict[str, Any]], metric: Dict[str, str]) -> List[Dict[str, Any]]:
    """The trials best first by the sweep's metric, as the W&B UI sorts them; trials without it last."""
    sign = -1 if metric.get("goal") == "maximize" else 1
    scored = [t for t in trials if isinstance(t.get("metric"), (int, float))]
    return sorted(scored, key=lambda t: sign * t["metric"]) + [t for t in trials if t not in scored]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file", type=Path, help="a W&B sweep file (e.g. sweeps/wandb.yaml)")
    parser.add_argument("--count", type=int, default=1, help="trials to run, one after the other (wandb agent --count)")
    parser.add_argument("--seed", type=int, default=None, help="seeds the sampled values (ids are always new)")
    args = parser.parse_args(argv)
    sweep = read_sweep_file(args.sweep_file)
    if not sweep:
        return 2
    rng, ids = random.Random(args.seed), random.SystemRandom()  # a new sweep never reuses a run directory
    sweep_id = new_id(ids)
    metric = sweep.get("metric", {})
    trials = []
    for values in trial_values(sweep, args.count, rng):
        run_id = new_id(ids)
        print(f"sweep {sweep_id} trial {run_id}: {json.dumps(values)}", flush=True)
        code = run_trial(sweep, sweep_id, run_id, values)
        run_dir = trial_dir(run_id)
        trials.append({"run_id": run_id, "exit": code, "values": values, "metric": trial_metric(run_dir, metric)})
        print(f"sweep {sweep_id} trial {run_id}: exit {code}, run directory {run_dir}", flush=True)
    print(f"sweep {sweep_id} ranked by {metric.get('name')} ({metric.get('goal', 'minimize')}):")
    for trial in ranked(trials, metric):
        print(f"  {trial['run_id']}  {metric.get('name')} {trial['metric']}  {json.dumps(trial['values'])}")
    return 0 if all(t["exit"] == 0 for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
