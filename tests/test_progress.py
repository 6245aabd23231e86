"""What a run tells the person watching it (mlm.progress): the training bar's clock and budget, the projected total,
the end line, the banner, and one console copy of each log line under several processes."""

import io
import logging

import pytest

from mlm import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_clocked_bar(budget_s=None, steps=100):
    bar = progress.TrainBar(steps, 0, budget_s, 0.0, True, file=io.StringIO(), mininterval=0, miniters=1)
    clock = Clock()
    bar.bar._time = clock
    bar.bar.start_t = bar.bar.last_print_t = clock()
    return bar, clock


@pytest.mark.parametrize("excluded", [True, False])
def test_the_training_bar_rate_counts_training_steps_only(excluded):
    """A 100 s eval between 1 s steps: the bar's rate stays 1 step/s and its ETA that of the steps left."""
    bar, clock = fake_clocked_bar()
    try:
        clock.now += 100  # the step-0 eval
        if excluded:
            bar.eval_took(100)
        for step in range(1, 11):
            clock.now += 1
            bar.update(float(step))
            if step == 5:  # an eval in the middle
                clock.now += 100
                if excluded:
                    bar.eval_took(100)
        meter = bar.bar.format_dict
        if excluded:
            assert meter["rate"] == pytest.approx(1.0)
            assert meter["elapsed"] == pytest.approx(10.0)  # training time
            assert "[00:10<01:30" in str(bar.bar)  # 90 steps left at 1 s
            assert bar.eval_seconds == 100
        else:  # what tqdm alone shows: the evals land in the steps after them
            assert meter["rate"] < 0.5
    finally:
        bar.close()


def test_under_a_time_budget_the_bar_counts_seconds_of_it():
    bar, clock = fake_clocked_bar(budget_s=30.0, steps=100000)
    try:
        clock.now += 2.5
        bar.update(2.5)
        bar.set_postfix(step=1, loss="9.000")
        assert bar.bar.n == 2.5 and bar.bar.total == 30.0
        text = str(bar.bar)
        assert "2/30 s of the time budget" in text and "step=1/100000, loss=9.000" in text
        bar.update(31.0)  # the last step overshoots the budget: the bar ends full, not past it
        assert bar.bar.n == 30.0
    finally:
        bar.close()


def test_the_end_line_says_what_ended_training():
    assert (
        progress.end_line(1000, 1000, 1000, 1.0, None, 3000.0)
        == "training ended at step 1000/1000: trainer.max_steps=1000 reached"
    )
    assert progress.end_line(57, 57, 0, 2.0, None, 30.0) == "training ended at step 57/57: trainer.epochs=2 done"
    budget = progress.end_line(42, 1000, 1000, 1.0, 30.0, 30.4)
    assert budget.startswith(
        "training ended at step 42/1000: the time budget of 0.5 min was spent (trainer.budget_minutes=0.5"
    )
    # a budget that was not spent did not end it
    assert "max_steps=1000 reached" in progress.end_line(1000, 1000, 1000, 1.0, 600.0, 30.0)


def test_evals_left_counts_the_periodic_ones_and_the_final_one():
    assert progress.evals_left(5, 1000, 500) == 2  # at 500, and the final one at 1000
    assert progress.evals_left(500, 1000, 500) == 1
    assert progress.evals_left(1, 12, 2) == 6  # 2, 4, 6, 8, 10 and 12
    assert progress.evals_left(3, 3, 2) == 1


def test_the_projection_adds_the_evals_and_on_a_slow_cpu_names_the_time_budget():
    line = progress.projection_line(5, 1000, 3.0, 200.0, 500, None, 15.0, on_cpu=True)
    # 995 steps x 3 s = 2985 s, plus the evals at 500 and 1000 x 200 s
    assert line.startswith(
        "projected: 56.4 min more for this run: 995 steps at 3.00 s/step (49.8 min) and 2 evals at 3.3 min (6.7 min)"
    )
    assert "trainer.budget_minutes=30" in line
    assert "budget" not in progress.projection_line(
        5, 1000, 3.0, 200.0, 500, None, 15.0, on_cpu=False
    )  # a GPU: no advice
    assert "budget" not in progress.projection_line(5, 100, 0.1, 2.0, 500, None, 0.5, on_cpu=True)  # short: no advice


def test_the_projection_under_a_time_budget_stops_at_the_budget():
    line = progress.projection_line(5, 100000, 2.0, 10.0, 500, 600.0, 10.0, on_cpu=True)
    # 590 s of budget left at 2 s/step: ~295 steps, ending before step 500: only the final eval
    assert line == (
        "projected: 10.0 min more for this run: the time budget's 9.8 min left (about 295 steps at 2.00 s/step) "
        "and 1 eval at 10 s (10 s)"
    )
    assert "not timed yet" in progress.projection_line(
        105, 200, 1.0, None, 100, None, 0.0, on_cpu=True
    )  # a resume: no eval yet


def test_the_projection_is_said_once_at_the_first_log_step_or_after_five_steps():
    bar = progress.TrainBar(1000, 20, None, 40.0, False)
    assert [s for s in range(21, 40) if bar.projection_due(s, 10)] == [25]  # 5 steps into this process
    bar = progress.TrainBar(1000, 0, None, 0.0, False)
    assert [s for s in range(1, 40) if bar.projection_due(s, 2)] == [2]
    assert bar.step_seconds(4, 8.0) == 2.0


def test_the_banner_says_what_trains_how_long_and_how_to_resume(tmp_path):
    lines = progress.banner_lines(
        model="tiny",
        trainable=1_000_000,
        total=1_200_000,
        global_batch=16,
        block_size=128,
        batch_parts=progress.batch_parts(8, 2, 1),
        steps=1000,
        start_step=0,
        budget_minutes=None,
        precision="fp32: this CPU has no native bf16 (runtime.mixed_precision=auto)",
        device="cpu (2 threads)",
        processes=2,
        run_dir=tmp_path,
        resume=f"python run.py hydra.run.dir={tmp_path}",
    )
    text = "\n".join(lines)
    for part in (
        "1,000,000 trainable parameters of 1,200,000",
        "16 blocks x 128 tokens = 2,048 tokens per step (8 per device x 2 processes x 1 micro-batch)",
        "1,000 steps x 2,048 tokens = 2,048,000 training tokens",
        "fp32: this CPU has no native bf16",
        "cpu (2 threads), 2 processes",
        f"run directory: {tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ):
        assert part in text, part
    lines = progress.banner_lines(
        model="tiny",
        trainable=1,
        total=1,
        global_batch=16,
        block_size=128,
        batch_parts="",
        steps=1000,
        start_step=300,
        budget_minutes=30,
        precision="",
        device="cpu",
        processes=1,
        run_dir=tmp_path,
        resume="make train ARGS=...",
    )
    assert "(resuming at step 300), or trainer.budget_minutes=30 of training time if that is spent first" in lines[2]
    assert lines[-1] == "to resume: make train ARGS=..."


def test_the_precision_line_says_why(monkeypatch):
    from mlm import precision

    monkeypatch.setattr(precision, "device_kind", lambda: "cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda kind: False)
    assert (
        precision.precision_reason("auto", "no") == "fp32: this CPU has no native bf16 (runtime.mixed_precision=auto)"
    )
    assert precision.precision_reason("bf16", "bf16").startswith(
        "bf16, emulated: this CPU has no native bf16, far slower than fp32"
    )
    monkeypatch.setattr(precision, "native_bf16", lambda kind: True)
    assert precision.precision_reason("auto", "bf16") == "bf16: this CPU has native bf16 (runtime.mixed_precision=auto)"
    assert precision.precision_reason("no", "no") == "fp32: runtime.mixed_precision=no"


def record(level, msg):
    return logging.LogRecord("mlm.train", level, __file__, 1, msg, None, None)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_console_shows_the_main_process_lines_and_other_ranks_errors_tagged(monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    console = progress.MainProcessConsole()
    info, error = record(logging.INFO, "eval at step 0"), record(logging.ERROR, "out of memory")
    if rank == "0":
        assert console.filter(info) and console.filter(error) and error.getMessage() == "out of memory"
    else:
        assert not console.filter(info) and not console.filter(record(logging.WARNING, "w"))
        assert console.filter(error) and error.getMessage() == "[rank 1] out of memory"
