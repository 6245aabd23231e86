"""Warmup-stable-decay: the curve (hand-computed), its time-budget form, and decay branches from
stable-phase checkpoints, end to end: the branch follows the new schedule and ends where a fresh run
with its settings ends, bit for bit."""

import io
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlm.checkpoint import FORMAT
from tests.conftest import TINY_RUN, check_settings_as_run_py, compose, run_cli, run_in_process
from tests.test_failures import error_lines
from tests.test_resume import records

# --- the curve ---------------------------------------------------------------------------------------


def multipliers(overrides: dict, total: int, progress=None, base_lr: float = 2.0) -> list:
    """The rate after each of 0..total scheduler steps, over base_lr, as the run logs it (get_last_lr)."""
    from mlm.config import SchedulerConfig
    from mlm.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = build_scheduler(opt, SchedulerConfig(name="wsd", **overrides), total, progress)
    rates = [sched.get_last_lr()[0] / base_lr]
    for _ in range(total):
        opt.step()
        sched.step()
        rates.append(sched.get_last_lr()[0] / base_lr)
    return rates


def test_linear_decay_boundaries():
    """20 steps, 2 of warmup, decay_ratio 0.2: the decay starts after step 16 = 20 - round(0.2 * 20)."""
    rates = multipliers({"warmup_steps": 2, "decay_ratio": 0.2}, 20)
    assert rates[:2] == [0.5, 1.0]  # warmup: (step + 1) / 2; its last step reaches the peak
    assert rates[2:17] == [1.0] * 15  # flat at exactly the peak up to the decay's start (step 16 included)
    assert rates[17:] == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=1e-12)  # 1 - x, x = (step - 16) / 4
    assert rates[17] < 1.0 and rates[20] == 0.0  # the first decay step is below the peak; after the last step: 0


def test_one_minus_sqrt_decay_boundaries():
    rates = multipliers({"warmup_ratio": 0.1, "decay_ratio": 0.2, "decay_shape": "1-sqrt"}, 20)  # warmup round(2.0) = 2
    assert rates[:17] == [0.5] + [1.0] * 16
    assert rates[17:] == pytest.approx([1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0], abs=1e-12)
    assert rates[17] == pytest.approx(0.5)  # 1-sqrt falls faster at first than linear's 0.75


def test_decay_start_rounds_as_the_warmup_does():
    from mlm.schedules import decay_start, warmup_length

    assert (
        decay_start(10, 0.25) == 8 and warmup_length(0, 0.25, 10) == 2
    )  # round(2.5) = 2 for both (Python rounds halves to even)
    assert decay_start(10, 0.3) == 7 and decay_start(40, 0.25) == 30 and decay_start(20, 1.0) == 0
    rates = multipliers({"warmup_ratio": 0.0, "decay_ratio": 1.0}, 4)  # no warmup, all decay: a plain linear decay
    assert rates == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_a_wsd_that_does_not_fit_the_run_is_one_line():
    from mlm.config import UserError

    with pytest.raises(
        UserError,
        match=r"^5 warmup steps run past the start of the wsd decay after step 4 of 20 \(scheduler.decay_ratio=0.8\)",
    ):
        multipliers({"warmup_steps": 5, "decay_ratio": 0.8}, 20)
    with pytest.raises(
        UserError, match=r"^scheduler.decay_ratio=0.01 of 20 steps rounds to no decay step; raise it to at least 0.05"
    ):
        multipliers({"decay_ratio": 0.01}, 20)


def test_the_decay_starts_where_the_spent_budget_reaches_one_minus_decay_ratio():
    """Under a time budget the rate follows max(step / total, spent fraction): the peak until 0.8 of the
    budget (decay_ratio 0.2), then the shape over the last 0.2."""
    from mlm.config import SchedulerConfig
    from mlm.optim import build_scheduler

    for shape, half_way in (("linear", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        spent = [0.0]
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(
            opt,
            SchedulerConfig(name="wsd", warmup_ratio=0.1, decay_ratio=0.2, decay_shape=shape),
            100000,
            lambda: spent[0],
        )
        lrs = []
        for fraction in (0.05, 0.1, 0.5, 0.8, 0.8001, 0.9, 1.0, 1.3):
            spent[0] = fraction
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        assert lrs[:4] == pytest.approx([0.5, 1.0, 1.0, 1.0], abs=1e-4)  # warmup, then flat up to 0.8 of the budget
        assert lrs[4] < 1.0 and lrs[5:] == pytest.approx([half_way, 0.0, 0.0], abs=1e-4)
    # with the budget far from spent, the steps lead: 10 steps, the decay after step 8, the last step at half the peak
    rates = multipliers({"warmup_steps": 1, "decay_ratio": 0.2}, 10, progress=lambda: 0.0, base_lr=1.0)
    assert rates == [1.0] * 9 + [0.5, 0.0]


@pytest.mark.parametrize(
    "total, warmup, decay_ratio, shape", [(10, 0, 0.2, "linear"), (20, 3, 0.25, "1-sqrt"), (37, 5, 0.3, "linear")]
)
@pytest.mark.parametrize("budget", [False, True])
def test_the_rates_are_transformers_wsd_schedule_with_or_without_a_budget_the_steps_beat(
    total, warmup, decay_ratio, shape, budget
):
    """transformers.get_wsd_schedule is the reference: every optimizer step trains at its rate (from the end of warmup
    on: its warmup starts at 0, ours reaches the peak on warmup's last step), also under a time budget that the steps
    beat (it was one step ahead: the decay began a step early and the last step trained at 0)."""
    from mlm.schedules import decay_start
    from transformers import get_wsd_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hold = decay_start(total, decay_ratio)
    reference = get_wsd_schedule(
        opt,
        num_warmup_steps=warmup,
        num_decay_steps=total - hold,
        num_training_steps=total,
        decay_type="1-sqrt" if shape == "1-sqrt" else "linear",
    )
    expected = [reference.lr_lambdas[0](step) for step in range(total)]  # the rate step + 1 trains at
    ours = multipliers(
        {"warmup_steps": warmup, "warmup_ratio": 0.0, "decay_ratio": decay_ratio, "decay_shape": shape},
        total,
        progress=(lambda: 0.01) if budget else None,
        base_lr=1.0,
    )[:total]
    assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-12) and ours[-1] > 0.0
    assert ours[:warmup] == [(s + 1) / warmup for s in range(warmup)]


# --- which settings a checkpoint may change -----------------------------------------------------------

WSD = {
    "scheduler.name": "wsd",
    "scheduler.warmup_steps": 2,
    "scheduler.warmup_ratio": 0.06,
    "scheduler.decay_ratio": 0.25,
    "scheduler.decay_shape": "linear",
    "trainer.max_steps": 40,
    "trainer.budget_minutes": None,
    "optimizer.lr": 0.001,
    "seed": 1,
    "trainer.per_device_batch_size": 4,
    "trainer.gradient_accumulation_steps": 1,
}  # the decay starts after step 30


def write_checkpoint(run_dir: Path, step: int, settings: dict) -> Path:
    ckpt = run_dir / "checkpoints" / f"ckpt-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, "config": settings, "world_size": 1}))
    (ckpt / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return ckpt


def test_the_stable_phase_is_warmup_done_and_decay_not_begun():
    from mlm.schedules import in_stable_phase

    assert [s for s in range(42) if in_stable_phase(WSD, s)] == list(range(2, 31))
    assert not in_stable_phase({**WSD, "scheduler.name": "linear"}, 10)
    assert not in_stable_phase({**WSD, "trainer.budget_minutes": 5.0}, 10)  # the clock decides when the decay starts
    assert not in_stable_phase({**WSD, "trainer.max_steps": 0}, 10)  # counted in epochs: the length depends on the data
    assert not in_stable_phase(
        {k: v for k, v in WSD.items() if k != "scheduler.decay_ratio"}, 10
    )  # settings without the key (a file not written by this harness)


@pytest.mark.parametrize(
    "step, new, allowed",
    [
        (
            30,
            {"trainer.max_steps": 60, "scheduler.decay_ratio": 0.5},
            True,
        ),  # the last flat step of both (30 = 60 - 30)
        (
            10,
            {"trainer.max_steps": 20, "scheduler.decay_ratio": 0.5},
            True,
        ),  # a shorter branch whose decay starts right there
        (10, {"scheduler.decay_shape": "1-sqrt"}, True),
        (
            10,
            {"trainer.max_steps": 20, "scheduler.decay_ratio": 0.55},
            False,
        ),  # the new decay starts after step 9: too late
        (1, {"scheduler.decay_ratio": 0.5}, False),  # still warming up
        (10, {"scheduler.decay_ratio": 0.5, "scheduler.name": "linear"}, False),
    ],
)
def test_a_stable_checkpoint_may_change_its_decay_and_nothing_else(tmp_path, caplog, step, new, allowed):
    from mlm.config import UserError
    from mlm.rundir import check_resume_settings

    ckpt = write_checkpoint(tmp_path, step, WSD)
    settings = {**WSD, **new}
    changed = sorted(k for k in new if k.startswith("scheduler."))
    if allowed:
        check_resume_settings(
            tmp_path, "auto", settings["trainer.max_steps"], settings
        )  # the same run dir: extended, or another decay
        check_resume_settings(tmp_path, str(ckpt), settings["trainer.max_steps"], settings)  # a branch
        assert "other settings" not in caplog.text
        with pytest.raises(
            UserError, match=r"other settings \(optimizer.lr=0.001 there, 0.002 now\)"
        ):  # anything else still is drift
            check_resume_settings(tmp_path, "auto", settings["trainer.max_steps"], {**settings, "optimizer.lr": 0.002})
    else:
        shown = "; ".join(f"{k}={WSD[k]!r} there, {settings[k]!r} now" for k in changed)
        with pytest.raises(UserError) as err:
            check_resume_settings(tmp_path, "auto", settings["trainer.max_steps"], settings)
        assert str(err.value).startswith(
            f"{ckpt} was trained with other settings ({shown}); put them back to resume it"
        )
        check_resume_settings(tmp_path, str(ckpt), settings["trainer.max_steps"], settings)
        assert f"resuming {ckpt} with other settings: {shown}" in caplog.text


def test_a_checkpoint_in_its_decay_may_not_go_back_up_to_a_higher_rate(tmp_path, caplog):
    """Extending a decayed run in place, or branching a later decay from a decaying checkpoint, would jump the rate
    back up (from 0 to the peak for a finished run): one line naming the newest stable checkpoint to branch from."""
    from mlm.config import UserError
    from mlm.rundir import check_resume_settings

    write_checkpoint(tmp_path, 10, WSD)
    stable = write_checkpoint(tmp_path, 30, WSD)  # the last step at the peak
    done = write_checkpoint(tmp_path, 40, WSD)  # the end of the decay: rate 0
    longer = {
        **WSD,
        "trainer.max_steps": 80,
    }  # resume=auto in place with more steps: the decay would start after step 64
    with pytest.raises(UserError) as err:
        check_resume_settings(tmp_path, "auto", 80, longer)
    assert str(err.value) == (
        f"{done} is in its wsd decay (rate 0.00 x peak after step 40) and trainer.max_steps=80 would train "
        f"step 41 at 1.00 x peak, jumping the rate back up; branch from {stable.name}, before the decay "
        f"began: hydra.run.dir=<new dir> resume={stable}"
    )
    check_resume_settings(tmp_path, str(stable), 80, longer)  # the way out it names passes

    shutil.rmtree(done)
    decaying = write_checkpoint(tmp_path, 31, WSD)  # one step into the decay (0.9 x peak): a later decay, as a branch
    later = {**WSD, "trainer.max_steps": 80, "scheduler.decay_ratio": 0.5}
    with pytest.raises(
        UserError,
        match=r"^"
        + re.escape(
            f"{decaying} is in its wsd decay (rate 0.90 x peak after step 31) and "
            "trainer.max_steps=80 scheduler.decay_ratio=0.5 would train step 32 at 1.00"
        ),
    ):
        check_resume_settings(tmp_path, str(decaying), 80, later)
    assert "with other settings" not in caplog.text  # the refusal alone, no warning before it
    check_resume_settings(
        tmp_path, "auto", 40, WSD
    )  # resumed with its own schedule (a run killed in its decay) goes on
    check_resume_settings(
        tmp_path, str(decaying), 40, {**WSD, "scheduler.decay_ratio": 0.5}
    )  # a lower rate (0.45): a warning, as before
    assert f"resuming {decaying} with other settings" in caplog.text

    for ckpt in (stable, tmp_path / "checkpoints" / "ckpt-00000010"):
        shutil.rmtree(ckpt)
    with pytest.raises(
        UserError,
        match=r"no checkpoint of .* before the decay is kept, so put back trainer.max_steps=40 "
        r"scheduler.decay_ratio=0.25 scheduler.decay_shape=linear$",
    ):
        check_resume_settings(tmp_path, str(decaying), 80, later)


# --- end to end: a stable run, a decay branch, a fresh run with the branch's settings, an exact resume ---

FP32 = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "trainer.log_every=1",
    "trainer.eval_every=1000",
    "scheduler=wsd",
    "scheduler.warmup_steps=2",
    "optimizer.lr=5e-4",
]
LONG = [
    *FP32,
    "trainer.max_steps=40",
    "scheduler.decay_ratio=0.25",
    "trainer.checkpoint_every=10",
    "trainer.keep_checkpoints=4",
]
SHORT = [*FP32, "trainer.max_steps=20", "scheduler.decay_ratio=0.5"]  # the branch's settings: the decay after step 10
PEAK = 5e-4  # optimizer.lr


def lr_by_step(run_dir: Path) -> dict:
    return {r["step"]: r["train/lr"] for r in records(run_dir) if "train/lr" in r}


def expected_lr(step: int, total: int, decay_from: int, shape=lambda x: 1 - x) -> float:
    """The rate logged after `step` (hand-written, not the harness's code): 2 warmup steps, flat, then `shape`."""
    if step < 2:
        return PEAK * (step + 1) / 2
    return PEAK * (1.0 if step <= decay_from else shape((step - decay_from) / (total - decay_from)))


def train_here(args, run_dir: Path) -> str:
    """A run that is not killed, trained in process after the settings check run.py makes first (it raises on a
    settings drift): what it logged. (Its killed runs stay processes.)"""
    from mlm.train import train

    cfg = compose(args)
    check_settings_as_run_py(cfg, run_dir)
    logged = io.StringIO()
    handler, root = logging.StreamHandler(logged), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        train(cfg, run_dir)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return logged.getvalue()


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The long run killed after step 25 (checkpoints 10 and 20); a branch from its step 10, killed after step 15 and
    resumed from its own checkpoint; a fresh run with the branch's settings; the long run resumed in place with
    decay_shape=1-sqrt. The kills are processes; the rest trains in process."""
    root = tmp_path_factory.mktemp("wsd")
    data = f"dataset.path={corpus}"
    killed = run_cli([*LONG, data, f"hydra.run.dir={root / 'long'}"], env={"MLM_FAULT_KILL_AT": "step:25"})
    assert killed.returncode == -9 and not (root / "long" / "results.json").exists(), killed.stderr[-3000:]
    stable = root / "long" / "checkpoints" / "ckpt-00000010"
    into = [*SHORT, data, "trainer.checkpoint_every=6"]
    started = run_cli(
        [*into, f"hydra.run.dir={root / 'branch'}", f"resume={stable}"], env={"MLM_FAULT_KILL_AT": "step:5"}
    )  # killed after step 15 (checkpoint 12)
    assert started.returncode == -9, started.stderr[-3000:]
    branch = train_here(into, root / "branch")  # resume=auto: the branch's own step-12 checkpoint
    train_here([*SHORT, data], root / "fresh")
    extended = train_here([*LONG, data, "scheduler.decay_shape=1-sqrt"], root / "long")  # resume=auto from step 20
    return {"root": root, "stable": stable, "branch": (started.stderr, branch), "extended": extended}


@pytest.mark.slow
def test_a_wsd_run_logs_warmup_a_flat_peak_and_the_decay(runs):
    lrs = lr_by_step(runs["root"] / "fresh")
    assert sorted(lrs) == list(range(1, 21))
    assert [lrs[s] for s in range(1, 11)] == [PEAK] * 10  # flat at optimizer.lr, exactly
    assert [lrs[s] for s in range(1, 21)] == pytest.approx([expected_lr(s, 20, 10) for s in range(1, 21)], rel=1e-9)
    assert lrs[11] < PEAK and lrs[20] == 0.0


@pytest.mark.slow
def test_a_decay_branch_ends_where_a_fresh_run_with_its_settings_ends(runs):
    root, (started, resumed) = runs["root"], runs["branch"]
    assert "other settings" not in started  # a new decay from a stable checkpoint is no settings drift (nor in resumed)
    assert f"resumed from {root / 'branch' / 'checkpoints' / 'ckpt-00000012'}" in resumed
    results = json.loads((root / "branch" / "results.json").read_text())
    assert results["branched_from"] == {
        "checkpoint": str(runs["stable"].resolve()),
        "step": 10,
    }  # kept across its own resume
    assert results["steps"] == 20 and json.loads((root / "fresh" / "results.json").read_text())["branched_from"] is None
    lrs = lr_by_step(root / "branch")
    assert sorted(lrs) == list(range(11, 21))  # steps 1-10 are the stable run's, not logged again
    assert [lrs[s] for s in range(11, 21)] == pytest.approx([expected_lr(s, 20, 10) for s in range(11, 21)], rel=1e-9)
    # The stable run trained its first 10 steps as the fresh run did (same warmup, both flat through step 10),
    # so the branch, killed and resumed on the way, is that run: every value logged after step 10, and the
    # final weights, bit for bit.
    assert records(root / "branch") == [r for r in records(root / "fresh") if r["step"] > 10]
    a, b = (load_file(root / name / "final" / "model.safetensors") for name in ("branch", "fresh"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_a_run_resumed_in_place_from_a_stable_checkpoint_takes_the_new_decay_shape(runs):
    extended = runs["extended"]
    assert "resumed from" in extended  # and not refused for other settings: train_here would have raised
    lrs = lr_by_step(runs["root"] / "long")
    assert sorted(lrs) == list(range(1, 41))
    assert [lrs[s] for s in range(1, 41)] == pytest.approx(
        [expected_lr(s, 40, 30, shape=lambda x: 1 - math.sqrt(x)) for s in range(1, 41)], rel=1e-9
    )
    results = json.loads((runs["root"] / "long" / "results.json").read_text())
    assert results["branched_from"] is None and results["config"]["scheduler.decay_shape"] == "1-sqrt"


@pytest.mark.slow
def test_a_decaying_checkpoint_may_not_take_another_decay(runs, corpus):
    """The long run's newest checkpoint (step 40) is in its decay: extending it with another decay_ratio is refused,
    checkpoints untouched."""
    run_dir = runs["root"] / "long"
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_in_process(  # the command line's refusal, in process
        [
            *LONG,
            f"dataset.path={corpus}",
            f"hydra.run.dir={run_dir}",
            "trainer.max_steps=60",
            "scheduler.decay_ratio=0.5",
            "scheduler.decay_shape=1-sqrt",
        ]
    )
    assert proc.returncode == 2
    assert error_lines(proc)[-1] == (
        f"error: {run_dir / 'checkpoints' / 'ckpt-00000040'} was trained with other settings "
        "(scheduler.decay_ratio=0.25 there, 0.5 now); put them back to resume it, or branch from it with "
        f"these in a run directory of its own: hydra.run.dir=<new dir> resume={run_dir / 'checkpoints' / 'ckpt-00000040'}"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_a_wsd_run_killed_in_its_decay_resumes_exactly(runs, corpus, tmp_path):
    """Killed after step 15 (in the decay), resumed from its step-12 checkpoint: the same weights and records as the fresh run."""
    run_dir, data = tmp_path / "run", f"dataset.path={corpus}"
    killed = run_cli(
        [*SHORT, data, f"hydra.run.dir={run_dir}", "trainer.checkpoint_every=6"], env={"MLM_FAULT_KILL_AT": "step:15"}
    )
    assert killed.returncode == -9
    resumed = train_here([*SHORT, data, "trainer.checkpoint_every=6"], run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / 'ckpt-00000012'}" in resumed
    fresh = runs["root"] / "fresh"
    assert records(run_dir) == records(fresh)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (run_dir, fresh))
    assert all(a[k].equal(b[k]) for k in b)


def test_a_resume_with_another_peak_rate_trains_at_it():
    """Loading a checkpoint brings back its peak rates; keep_config_rates puts this config's back (a branch at another lr)."""
    from mlm.config import SchedulerConfig
    from mlm.optim import build_scheduler
    from mlm.train import keep_config_rates

    def optimizer_and_schedule(lr):
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW(
            [{"params": [weight], "lr": lr}, {"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr * 10}]
        )
        return optimizer, build_scheduler(optimizer, SchedulerConfig(name="wsd", warmup_steps=2, decay_ratio=0.5), 10)

    saved_optimizer, saved_schedule = optimizer_and_schedule(1e-3)
    for _ in range(4):
        saved_optimizer.step()
        saved_schedule.step()
    for lr in (1e-3, 3e-3):  # the same rate: left exactly as loaded; another: applied from step 4 on
        optimizer, schedule = optimizer_and_schedule(lr)
        optimizer.load_state_dict(saved_optimizer.state_dict())
        schedule.load_state_dict(saved_schedule.state_dict())
        keep_config_rates(optimizer, schedule, [lr, lr * 10])
        assert (
            schedule.get_last_lr() == [g["lr"] for g in optimizer.param_groups] == [lr, lr * 10]
        )  # step 4: the flat peak
        for _ in range(4):
            optimizer.step()
            schedule.step()
        assert schedule.get_last_lr() == pytest.approx([lr * 0.4, lr * 4])  # step 8: 2 of the 5 decay steps left
