"""Hydra multirun, failing jobs, Optuna, the submitit launcher, sweep summaries, experiments."""

import json

import pytest

from tests.conftest import TINY_RUN, run_cli


def job_dirs(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").exists())


def multirun(corpus, sweep, *overrides, returncode=0):
    """A tiny multirun through run.py (exit 0: every job succeeded, 1: some failed); returns its job directories."""
    proc = run_cli(["-m", *TINY_RUN, f"dataset.path={corpus}", *overrides, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return job_dirs(sweep)


@pytest.mark.slow
def test_2x2_multirun_with_a_failing_job_and_summary(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    # block_size=600 exceeds the model's 512 positions: those jobs fail, the others still run
    jobs = multirun(corpus, sweep, "optimizer.lr=1e-3,3e-3", "block_size=32,600", "trainer.max_steps=3", returncode=1)
    assert len(jobs) == 4
    ok = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "error.txt").exists()]
    assert len(ok) == 2 and len(failed) == 2
    assert all("block_size=600" in (j / "error.txt").read_text() for j in failed)
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 2 and summary.count("failed: block_size=600") == 2
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "optimizer.lr" in line]
    ppl = [float(r.split("|")[3]) for r in rows if "| ok |" in r]
    assert ppl == sorted(ppl)  # sorted by perplexity
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_multirun_all_ok_2x2(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    jobs = multirun(corpus, sweep, "optimizer.lr=1e-3,3e-3", "block_size=16,32", "trainer.max_steps=2")
    assert len(jobs) == 4 and all((j / "results.json").exists() for j in jobs)
    assert (sweep / "summary.md").exists() and (sweep / "summary.png").exists()


@pytest.mark.slow
def test_optuna_sweep_of_3_trials_reports_best_params(corpus, tmp_path):
    sweep = tmp_path / "optuna"
    jobs = multirun(corpus, sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "trainer.max_steps=2")
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "scheduler.warmup_ratio", "optimizer.weight_decay", "masking.mlm_probability"}
    values = [json.loads((j / "results.json").read_text())["perplexity"] for j in jobs]
    assert len(values) == 3 and best["best_value"] == pytest.approx(min(values))


@pytest.mark.slow
def test_submitit_local_runs_one_job(corpus, tmp_path):
    sweep = tmp_path / "submitit"
    [job] = multirun(corpus, sweep, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "trainer.max_steps=2")
    assert json.loads((job / "results.json").read_text())["steps"] == 2
    assert list((sweep / ".submitit").glob("*/*_log.out"))


def test_slurm_launcher_config_composes():
    proc = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "--cfg", "hydra"])
    assert proc.returncode == 0, proc.stderr
    assert "submitit_launcher.SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout and "gpus_per_node: 4" in proc.stdout


def test_report_cli_on_run_dirs(tmp_path):
    from mlm.report import main

    for i, ppl in enumerate([30.0, 20.0]):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={i + 1}e-3\n")
        (d / "results.json").write_text(json.dumps({"perplexity": ppl, "best_perplexity": ppl, "tokens_per_s": 100.0, "train_seconds": 1.0,
                                                    "config": {"optimizer.lr": (i + 1) / 1000}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 5 - s, "eval/perplexity": ppl + 10 - s}) + "\n" for s in range(3)))
    assert main([str(tmp_path)]) == 0
    table = [l for l in (tmp_path / "summary.md").read_text().splitlines() if "optimizer.lr" in l]
    assert "optimizer.lr=2e-3" in table[0] and "optimizer.lr=1e-3" in table[1]
    assert (tmp_path / "0" / "curves.png").exists() and (tmp_path / "summary.png").exists()
    # a sweep rerun into the same dir with other values: Hydra rewrites overrides.yaml, the job refuses to
    # run, and the summary still shows the values its results were trained with
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=5e-3\n")
    assert main([str(tmp_path)]) == 0
    table = [l for l in (tmp_path / "summary.md").read_text().splitlines() if "optimizer.lr" in l]
    assert "optimizer.lr=2e-3" in table[0] and "optimizer.lr=0.001" in table[1] and "5e-3" not in table[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_mixed_precision_is_sweepable_in_one_process(corpus, tmp_path, launcher):
    # joblib with one worker runs both jobs in the same (reused) process, like the basic launcher
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"] if launcher == "joblib" else []
    jobs = multirun(corpus, tmp_path / "sweep", *extra, "runtime.mixed_precision=no,bf16", "trainer.max_steps=2")
    assert len(jobs) == 2 and not any((j / "error.txt").exists() for j in jobs)
    assert [json.loads((j / "results.json").read_text())["steps"] for j in jobs] == [2, 2]


@pytest.mark.slow
def test_parallel_jobs_each_lease_a_slot_of_their_own(corpus, tmp_path):
    sweep, leases = tmp_path / "sweep", tmp_path / "leases"
    # 3 workers share 2 slots: one job always waits; job 0 fails after its first step and must give its slot back
    proc = run_cli(["-m", *TINY_RUN, f"dataset.path={corpus}", "hydra/launcher=parallel", "hydra.launcher.n_jobs=3",
                    "runtime.device_slots=2", "runtime.num_threads=1", "trainer.max_steps=3", "optimizer.lr=1e-4,2e-4,3e-4,4e-4",
                    f"hydra.sweep.dir={sweep}"], env={"MLM_LEASE_DIR": str(leases), "MLM_TEST_FAIL": "0:0:1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: 1 of 4 job(s) failed: {sweep / '0' / 'error.txt'}"
    records = [json.loads(line) for line in (leases / "lease.jsonl").read_text().splitlines()]
    assert sorted(r["owner"] for r in records) == [str(sweep / str(i)) for i in range(4)]
    assert {r["slot"] for r in records} <= {0, 1}
    overlapping = [(a, b) for i, a in enumerate(records) for b in records[i + 1:] if a["acquired"] < b["released"] and b["acquired"] < a["released"]]
    assert overlapping  # jobs did run at the same time ...
    assert all(a["slot"] != b["slot"] for a, b in overlapping)  # ... never on the same slot
    assert (sweep / "0" / "error.txt").read_text().startswith("RuntimeError: injected failure")
    for i in range(1, 4):
        results = json.loads((sweep / str(i) / "results.json").read_text())
        owned = [r["slot"] for r in records if r["owner"] == str(sweep / str(i))]
        assert results["device"] == "cpu" and [results["device_slot"]] == owned
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 3 and summary.count("| cpu slot ") == 3


def test_a_one_point_curve_is_drawn_as_a_marker(tmp_path, monkeypatch):
    from mlm import report

    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    job = {"dir": tmp_path, "overrides": {}, "error": None, "results": {"perplexity": 9.0},
           "metrics": [{"step": 10, "train/loss": 2.5, "eval/perplexity": 9.0}]}  # a 10-step job logging every 10 steps
    report.plot_sweep([job], tmp_path / "summary.png")
    [line] = figures[0].axes[-1].lines  # the train-loss panel
    assert line.get_marker() == "o" and list(line.get_xdata()) == [10]
