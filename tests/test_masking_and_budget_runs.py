"""Runs with the masking strategies, a mask-rate schedule, tiny ModernBERT, and a time budget."""

import json
import logging

import pytest

from tests.conftest import TINY_RUN, compose, torchrun_command


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "masking.strategy=span",
            "masking.schedule=linear",
            "masking.mlm_probability=0.3",
            "masking.final_probability=0.15",
        ],
        ["masking.strategy=whole_word", "model=tiny_modernbert"],
        ["masking.train_probability=0.4"],
    ],
    ids=["span-linear", "whole_word-modernbert", "train-rate"],
)
def test_run_with_strategy_and_schedule(corpus, tmp_path, overrides):
    from mlm.train import train

    results = train(compose([*TINY_RUN, f"dataset.path={corpus}", *overrides]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["steps"] == 4 and results["stopped"] == "steps"
    train = [r for r in records(tmp_path) if "train/loss" in r]
    rates = [r["train/mlm_probability"] for r in train]
    if "masking.schedule=linear" in overrides:  # the rate before step s is a function of (s - 1) / 4
        assert rates == pytest.approx([0.3, 0.2625, 0.225, 0.1875])
    elif "masking.train_probability=0.4" in overrides:
        assert rates == pytest.approx([0.4] * 4)
    else:
        assert rates == pytest.approx([0.15] * 4)
    evals = [r["eval/masked_tokens"] for r in records(tmp_path) if "eval/masked_tokens" in r]
    assert len(evals) == 3 and len(set(evals)) == 1  # evals keep the fixed rate and masks


@pytest.mark.slow
def test_time_budget_stops_training_and_resume_spends_the_rest(corpus, tmp_path, caplog):
    from mlm.train import train

    caplog.set_level(logging.INFO)  # the lines run.log gets

    common = [*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=100000", "trainer.eval_every=100000"]
    first = train(compose([*common, "trainer.budget_minutes=0.02"]), tmp_path)
    assert first["stopped"] == "budget" and 0 < first["steps"] < 100000
    assert first["train_seconds"] >= 0.02 * 60  # the stop rule, not a speed measurement
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert f"training ended at step {first['steps']}/100000: the time budget of 0.02 min was spent" in caplog.text
    # a larger budget on the same run directory resumes from the final checkpoint and spends the rest
    caplog.clear()
    second = train(compose([*common, "trainer.budget_minutes=0.04"]), tmp_path)
    assert "resumed from" in caplog.text
    assert json.loads((tmp_path / "results.json").read_text()) == second
    assert second["stopped"] == "budget" and second["steps"] > first["steps"]
    assert second["train_seconds"] >= 0.04 * 60 > first["train_seconds"]
    assert f"training ended at step {second['steps']}/100000: the time budget of 0.04 min was spent" in caplog.text


def test_scheduler_follows_the_spent_budget():
    """With a progress function the LR follows max(step / total, spent fraction): warmup, then decay to 0."""
    import torch

    from mlm.config import SchedulerConfig
    from mlm.optim import build_scheduler

    spent = [0.0]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name="linear", warmup_ratio=0.1), 100000, lambda: spent[0])
    lrs = []
    for fraction in (0.05, 0.1, 0.55, 1.0, 1.3):
        spent[0] = fraction
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0], abs=1e-4)
    # without one, the step-based schedule is unchanged
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name="linear", warmup_steps=2), 10)
    assert sched.get_last_lr()[0] == pytest.approx(0.5)


@pytest.mark.slow
def test_two_processes_stop_on_one_budget_clock(corpus, tmp_path):
    """torchrun, 2 CPU processes: both ranks stop at the same step (no hang), span masking included."""
    import os
    import subprocess

    cmd = torchrun_command(
        29547,
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=100000",
        "trainer.eval_every=100000",
        "trainer.budget_minutes=0.03",
        "masking.strategy=span",
    )
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped"] == "budget" and results["processes"] == 2
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert last.name == f"ckpt-{results['steps']:08d}"
    assert sorted(p.name for p in last.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]  # both ranks saved that step
