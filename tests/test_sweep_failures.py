"""Sweeps whose jobs fail: the study goes on, the summary says so, the exit status says so."""

import json

import pytest

from tests.conftest import TINY_RUN, run_cli, run_in_process, torchrun_command
from tests.test_sweeps import summary_rows


def fake_job(sweep, num, results):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={num + 1}e-3\n")
    (d / "results.json").write_text(json.dumps(results))  # json writes nan and inf as NaN and Infinity
    return d


def test_a_nan_inf_or_missing_perplexity_is_a_failed_job(tmp_path):
    from mlm.report import collect_jobs, failure_line, summarize

    fake_job(tmp_path, 0, {"perplexity": float("nan"), "eval_loss": 0.0, "steps": 2})  # e.g. mlm_probability=1e-9
    fake_job(tmp_path, 1, {"perplexity": float("inf"), "steps": 2})
    fake_job(tmp_path, 2, {"steps": 2})
    fake_job(tmp_path, 3, {"perplexity": 40.0, "steps": 2})
    summary = summarize([tmp_path]).read_text()
    rows = summary_rows(summary)
    assert [r["job"] for r in rows] == ["3", "0", "1", "2"]  # the one that succeeded first
    assert [r["status"] for r in rows] == [
        "ok",
        "failed: perplexity nan in results.json",
        "failed: perplexity inf in results.json",
        "failed: no perplexity in results.json",
    ]
    assert "Best: `optimizer.lr=4e-3` with perplexity 40.00" in summary
    line = failure_line(collect_jobs([tmp_path]))
    assert line.startswith("3 of 4 job(s) failed: ") and str(tmp_path / "0" / "results.json") in line
    assert str(tmp_path / "3") not in line


def sweep_cli(corpus, sweep, *overrides, env=None, launch=run_cli):
    return launch(
        ["-m", *TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=2", *overrides, f"hydra.sweep.dir={sweep}"],
        env=env,
    )


@pytest.mark.slow
def test_a_failed_optuna_trial_is_recorded_and_the_study_goes_on(corpus, tmp_path):
    import yaml

    sweep = tmp_path / "optuna"
    proc = sweep_cli(
        corpus, sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=3", env={"MLM_TEST_FAIL": "1:0:1"}
    )  # trial 1 raises
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: 1 of 3 job(s) failed: {sweep / '1' / 'error.txt'}"
    # the sweeper logs this once it has told Optuna the trial FAILed (an RDB storage to look at the study
    # itself does not open here: optuna 2.10 with this SQLAlchemy)
    assert (proc.stdout + proc.stderr).count("Failed experiment: ") == 1
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((sweep / str(i) / "results.json").read_text())["bits_per_char"] for i in (0, 2)]
    assert best["best_value"] == pytest.approx(min(values))
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 2 and "failed: RuntimeError: injected failure" in summary


@pytest.mark.slow
def test_a_refused_rerun_leaves_multirun_yaml_and_exits_1(corpus, tmp_path):
    from mlm.rundir import RunLock

    sweep = tmp_path / "sweep"
    first = sweep_cli(corpus, sweep, "optimizer.lr=1e-3,2e-3", launch=run_in_process)  # the four sweeps: in process
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot, summary = (sweep / "multirun.yaml").read_text(), (sweep / "summary.md").read_text()
    # the same sweep with other values: every job holds a finished run with other settings and refuses
    rerun = sweep_cli(corpus, sweep, "optimizer.lr=5e-3,6e-3", launch=run_in_process)
    assert rerun.returncode == 1
    assert rerun.stderr.strip().splitlines()[-1] == f"error: 2 job(s) refused: {sweep / 'refused.txt'}"
    assert [line.split(":")[0] for line in (sweep / "refused.txt").read_text().splitlines()] == [
        str(sweep / "0"),
        str(sweep / "1"),
    ]
    assert (sweep / "multirun.yaml").read_text() == snapshot and "5e-3" not in snapshot
    assert (sweep / "summary.md").read_text() == summary
    # a second sweep into a sweep directory held by a live one stops before the sweeper writes anything
    held = RunLock(sweep).acquire()  # its own descriptor: the sweep's lock_run_dir in this process meets the flock
    try:
        locked = sweep_cli(corpus, sweep, "optimizer.lr=5e-3,6e-3", launch=run_in_process)
    finally:
        held.release()
    assert locked.returncode == 2 and "is in use by another run" in locked.stderr
    assert (sweep / "multirun.yaml").read_text() == snapshot
    # the first sweep again: both jobs finished with these settings, nothing refused or failed
    again = sweep_cli(corpus, sweep, "optimizer.lr=1e-3,2e-3", launch=run_in_process)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 2 and not (sweep / "refused.txt").exists()


@pytest.mark.slow
def test_a_trial_with_a_nan_loss_is_a_failed_trial(corpus, tmp_path):
    import yaml

    # lr 1e30 makes the loss NaN at step 2 (an error, not a value); the sampler seeded 4 gives trial 0 1e30 and
    # trial 1 1e-3. (An eval rate that masks nothing can no longer be searched: eval settings are refused.)
    sweep = tmp_path / "optuna"
    proc = sweep_cli(
        corpus,
        sweep,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=4",
        "optimizer.lr=choice(1e30,1e-3)",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    asked = {n: yaml.safe_load((sweep / n / ".hydra" / "overrides.yaml").read_text()) for n in ("0", "1")}
    assert "optimizer.lr=1e+30" in asked["0"] and "optimizer.lr=0.001" in asked["1"]
    assert (proc.stdout + proc.stderr).count("Failed experiment: ") == 1
    assert "non-finite training loss" in (sweep / "0" / "error.txt").read_text()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(json.loads((sweep / "1" / "results.json").read_text())["bits_per_char"])
    [row] = [r for r in summary_rows((sweep / "summary.md").read_text()) if r["job"] == "0"]
    assert row["status"].startswith("failed: ") and "non-finite training loss" in row["status"]


@pytest.mark.slow
def test_torchrun_around_an_optuna_study_a_trial_failing_on_one_rank_fails_on_all(corpus, tmp_path):
    import os
    import subprocess

    import yaml

    sweep = tmp_path / "optuna"
    cmd = torchrun_command(
        29541,
        "-m",
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=2",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLM_TEST_FAIL": "0:1:1"}  # trial 0 fails on rank 1 only
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-4000:]  # rank 0 exits 1 after the summary; torchrun passes it on
    assert f"error: 1 of 2 job(s) failed: {sweep / '0' / 'error.txt'}" in proc.stderr.splitlines()
    # each rank runs its own (seeded) sampler: both told it FAIL and asked the same next trial
    assert (proc.stdout + proc.stderr).count("Failed experiment: ") == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    result = json.loads((sweep / "1" / "results.json").read_text())
    assert result["processes"] == 2 and best["best_value"] == pytest.approx(result["bits_per_char"])
    assert (sweep / "0" / "error.txt").read_text().startswith("rank 1: RuntimeError: injected failure")
