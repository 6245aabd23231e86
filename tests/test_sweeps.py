"""Hydra multirun, failing jobs, Optuna, the submitit launcher, sweep summaries, experiments."""

import json

import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli, run_in_process


def job_dirs(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").exists())


def summary_rows(text):
    """summary.md's job table: one dict per row, by column name."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip()[2:-2].split(" | ")))))
    return rows


def multirun(corpus, sweep, *overrides, returncode=0, launch=run_in_process):
    """A tiny multirun through run.py (exit 0: every job succeeded, 1: some failed); returns its job directories.
    By default run.py runs in this process (Hydra's basic and joblib-with-one-worker launchers run the jobs in the
    process that starts the sweep); `launch=run_cli` starts it as a process."""
    proc = launch(["-m", *TINY_RUN, f"dataset.path={corpus}", *overrides, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return job_dirs(sweep)


@pytest.fixture(scope="module")
def sweep_2x3(corpus, tmp_path_factory):
    """One tiny 2x3 multirun for the two tests below (run.py in this process): two learning rates by three
    block sizes, of which 600 exceeds the model's 512 positions (those two jobs fail, the others still run) and 16 and
    32 are two evals. Returns the sweep directory, its job directories and summary.md."""
    sweep = tmp_path_factory.mktemp("sweep_2x3") / "sweep"
    jobs = multirun(
        corpus, sweep, "optimizer.lr=1e-3,3e-3", "block_size=16,32,600", "trainer.max_steps=2", returncode=1
    )
    return sweep, jobs, (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_a_multirun_with_failing_jobs_runs_the_others_and_ranks_them_by_perplexity(sweep_2x3):
    sweep, jobs, summary = sweep_2x3
    assert len(jobs) == 6
    ok = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "error.txt").exists()]
    assert len(ok) == 4 and len(failed) == 2
    assert all("block_size=600" in (j / "error.txt").read_text() for j in failed)
    assert summary.count("| ok |") == 4 and summary.count("failed: block_size=600") == 2
    rows = summary_rows(summary)
    assert [r["#"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["status"] == "ok" for r in rows] == [True] * 4 + [False] * 2  # the failed jobs last
    for label in ("A", "B"):  # sorted by perplexity within each eval
        ppl = [float(r["final ppl"]) for r in rows if r["status"] == "ok" and r["eval"] == label]
        assert len(ppl) == 2 and ppl == sorted(ppl)
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_multirun_over_block_size_ranks_its_two_evals_apart(sweep_2x3):
    sweep, jobs, summary = sweep_2x3
    assert (sweep / "summary.md").exists() and (sweep / "summary.png").exists()
    # two block sizes are two evals: ranked apart, no best across them
    assert "Not comparable: the jobs' evals differ in block_size;" in summary and "Best:" not in summary
    assert "- eval A (2 job(s)" in summary and "- eval B (2 job(s)" in summary


@pytest.mark.slow
def test_optuna_sweep_of_3_trials_reports_best_params(corpus, tmp_path):
    sweep = tmp_path / "optuna"
    proc = run_cli(
        [
            "-m",
            *TINY_RUN,
            f"dataset.path={corpus}",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            "trainer.max_steps=2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(sweep)
    # Optuna imports alembic, which logged 7 "[HYDRA] setup plugin alembic..." lines (conf/hparams_search/optuna.yaml sets its level)
    assert "setup plugin" not in proc.stdout + proc.stderr and "A new study created" in proc.stdout + proc.stderr
    import yaml

    from mlm.report import eval_settings

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "optimizer.lr",
        "scheduler.warmup_ratio",
        "optimizer.weight_decay",
        "masking.train_probability",
    }
    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    values = [r["bits_per_char"] for r in results]  # what Optuna minimises (mlm.cli.objective)
    assert len(values) == 3 and best["best_value"] == pytest.approx(min(values))
    # the trials train differently and are scored alike
    assert len({r["config"]["optimizer.lr"] for r in results}) == 3
    assert all(eval_settings(r["config"]) == eval_settings(results[0]["config"]) for r in results)
    summary = (sweep / "summary.md").read_text()
    assert (
        "Best: `" in summary and summary.count("trainer.max_steps=2") == 1
    )  # a setting every trial shares: said once, on top
    rows = summary_rows(summary)
    assert len(rows) == 3 and all(set(best["best_params"]) <= set(r) for r in rows)  # the searched keys are columns


@pytest.mark.slow
def test_submitit_local_runs_one_job(corpus, tmp_path):
    sweep = tmp_path / "submitit"
    [job] = multirun(  # a process, as a user starts it: submitit's local executor starts the job in one of its own
        corpus,
        sweep,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "trainer.max_steps=2",
        launch=run_cli,
    )
    assert json.loads((job / "results.json").read_text())["steps"] == 2
    assert list((sweep / ".submitit").glob("*/*_log.out"))


def test_slurm_launcher_config_composes():
    proc = run_cli(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "--cfg", "hydra"]
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "submitit_launcher.SlurmLauncher" in proc.stdout
        and "partition: gpu" in proc.stdout
        and "gpus_per_node: 4" in proc.stdout
    )


def test_report_cli_on_run_dirs(tmp_path):
    from mlm.report import main

    for i, ppl in enumerate([30.0, 20.0]):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={i + 1}e-3\n")
        (d / "results.json").write_text(
            json.dumps(
                {
                    "perplexity": ppl,
                    "best_perplexity": ppl,
                    "tokens_per_s": 100.0,
                    "train_seconds": 1.0,
                    "config": {"optimizer.lr": (i + 1) / 1000},
                }
            )
        )
        (d / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": s, "train/loss": 5 - s, "eval/perplexity": ppl + 10 - s}) + "\n" for s in range(3)
            )
        )
    assert main([str(tmp_path)]) == 0
    rows = summary_rows((tmp_path / "summary.md").read_text())
    assert [(r["job"], r["optimizer.lr"]) for r in rows] == [("1", "2e-3"), ("0", "1e-3")]
    assert (tmp_path / "0" / "curves.png").exists() and (tmp_path / "summary.png").exists()
    # a sweep rerun into the same dir with other values: Hydra rewrites overrides.yaml, the job refuses to
    # run, and the summary still shows the values its results were trained with
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=5e-3\n")
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert [(r["job"], r["optimizer.lr"]) for r in summary_rows(text)] == [
        ("1", "2e-3"),
        ("0", "0.001"),
    ] and "5e-3" not in text
    out = (
        tmp_path.parent / f"{tmp_path.name}-summary" / "new"
    )  # --out a directory that does not exist yet: made (was a traceback)
    assert main([str(tmp_path), "--out", str(out)]) == 0 and (out / "summary.md").exists()


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
    proc = run_cli(
        [
            "-m",
            *TINY_RUN,
            f"dataset.path={corpus}",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=3",
            "runtime.device_slots=2",
            "runtime.num_threads=1",
            "trainer.max_steps=3",
            "optimizer.lr=1e-4,2e-4,3e-4,4e-4",
            f"hydra.sweep.dir={sweep}",
        ],
        env={"MLM_LEASE_DIR": str(leases), "MLM_TEST_FAIL": "0:0:1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: 1 of 4 job(s) failed: {sweep / '0' / 'error.txt'}"
    records = [json.loads(line) for line in (leases / "lease.jsonl").read_text().splitlines()]
    assert sorted(r["owner"] for r in records) == [str(sweep / str(i)) for i in range(4)]
    assert {r["slot"] for r in records} <= {0, 1}
    overlapping = [
        (a, b)
        for i, a in enumerate(records)
        for b in records[i + 1 :]
        if a["acquired"] < b["released"] and b["acquired"] < a["released"]
    ]
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
    job = {
        "dir": tmp_path,
        "overrides": {},
        "error": None,
        "results": {"perplexity": 9.0},
        "metrics": [{"step": 10, "train/loss": 2.5, "eval/perplexity": 9.0}],
    }  # a 10-step job logging every 10 steps
    report.plot_sweep([job], tmp_path / "summary.png")
    [losses] = [ax for ax in figures[0].axes if ax.get_title().startswith("train loss")]
    [line] = losses.lines
    assert line.get_marker() == "o" and list(line.get_xdata()) == [10]


# ---------------------------------------------------------------- sweeps compare like with like

SHIPPED_OPTUNA = ROOT / "conf" / "hparams_search" / "optuna.yaml"
SHIPPED_WANDB = ROOT / "sweeps" / "wandb.yaml"


def shipped_search_spaces():
    """The keys each shipped search space varies: the Optuna sweeper's params and the W&B sweep's parameters."""
    import yaml

    optuna = yaml.safe_load(SHIPPED_OPTUNA.read_text())["hydra"]["sweeper"]["params"]
    wandb = yaml.safe_load(SHIPPED_WANDB.read_text())["parameters"]
    return {"optuna": sorted(optuna), "wandb": sorted(wandb)}


def test_shipped_search_spaces_vary_training_never_the_eval():
    from mlm.overrides import schema_keys
    from mlm.report import EVAL_KEYS, SPAN_EVAL_KEYS

    keys = schema_keys()
    eval_only = (
        set(EVAL_KEYS) | set(SPAN_EVAL_KEYS) | {"model.name_or_path"}
    )  # name_or_path gives the tokenizer when model.tokenizer is unset
    for name, space in shipped_search_spaces().items():
        assert space and all(k in keys for k in space), (name, space)  # real keys, not typos that a sweep would reject
        assert not eval_only & set(space), f"{name} searches eval settings {sorted(eval_only & set(space))}"
        assert (
            "masking.train_probability" in space and "optimizer.lr" in space
        )  # the mask rate it searches is training's


def composed_multirun(overrides):
    """The config (hydra node included) a `run.py -m <overrides>` sweep starts with, inside an initialized Hydra."""
    from hydra import compose, initialize_config_dir

    from mlm.cli import register
    from mlm.config import CONF

    register()
    init = initialize_config_dir(config_dir=str(CONF), version_base="1.3")
    init.__enter__()
    return init, compose(config_name="config", overrides=[*TINY_RUN, *overrides], return_hydra_config=True)


def test_an_optuna_space_over_eval_settings_is_refused_and_one_over_training_is_not():
    from omegaconf import open_dict

    from mlm.config import UserError
    from mlm.report import check_search_space, eval_sweeps, search_space

    init, cfg = composed_multirun(["hparams_search=optuna"])
    try:
        check_search_space(cfg)  # the shipped space: accepted
        assert "masking.train_probability=choice(0.15, 0.2, 0.3, 0.4)" in search_space(cfg)
        assert (
            eval_sweeps(
                [
                    "masking.strategy=choice(token,span)",
                    "optimizer=choice(adamw,stable_adamw)",
                    "seed=choice(1,2)",
                    "model=choice(tiny,tiny_modernbert)",
                    "masking.train_probability=interval(0.1,0.5)",
                    # the tokenizer alone: trials compare by bits per character, Optuna's objective
                    "model=choice(tiny,distilroberta)",
                    "model.name_or_path=choice(a,b)",
                    "model.tokenizer=choice(a,b)",
                ],
                cfg,
            )
            == []
        )
        refused = eval_sweeps(
            [
                "masking.mlm_probability=choice(0.1,0.2)",
                "block_size=interval(16,64)",
                "trainer.max_eval_blocks=choice(8,16)",
                "dataset=choice(local,wiki)",
            ],
            cfg,
        )
        assert refused == [
            "masking.mlm_probability=choice(0.1,0.2) (an eval setting, 0.15 in the config)",
            "block_size=interval(16,64) (an eval setting, 32 in the config)",
            "trainer.max_eval_blocks=choice(8,16) (an eval setting, 16 in the config)",
            "dataset (its options' evals differ in dataset.kind)",
        ]
        with open_dict(cfg):  # as `run.py -m hparams_search=optuna masking.mlm_probability=choice(0.1,0.2)` starts
            cfg.hydra.overrides.task.append("masking.mlm_probability=choice(0.1,0.2)")
        with pytest.raises(
            UserError,
            match=r"^hparams_search=optuna would rank trials scored on different evals: its search space varies "
            r"masking\.mlm_probability=choice\(0\.1,0\.2\) \(an eval setting, 0\.15 in the config\); give it one value",
        ):
            check_search_space(cfg)
    finally:
        init.__exit__(None, None, None)


def test_an_optuna_sweep_over_the_eval_rate_stops_before_any_trial(corpus, tmp_path):
    sweep = tmp_path / "optuna"
    proc = run_cli(
        [
            "-m",
            *TINY_RUN,
            f"dataset.path={corpus}",
            "hparams_search=optuna",
            "masking.mlm_probability=choice(0.1,0.2)",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: hparams_search=optuna would rank trials scored on different evals: "
            "its search space varies masking.mlm_probability="
        )
    )
    assert not (sweep.exists() and job_dirs(sweep))  # no trial ran
    assert not (sweep / "optimization_results.yaml").exists() and not (sweep / "multirun.yaml").exists()


@pytest.fixture(scope="module")
def flat_tiny():
    """The flat config a tiny job records in results.json ("config")."""
    from omegaconf import OmegaConf

    from mlm.tracking import flat_config
    from tests.conftest import compose

    from mlm.report import EVAL_KEYS, SPAN_EVAL_KEYS

    flat = flat_config(OmegaConf.to_container(OmegaConf.structured(compose(TINY_RUN)), enum_to_str=True))
    assert set(EVAL_KEYS + SPAN_EVAL_KEYS) <= set(flat)  # every eval key is one a job records
    return flat


def eval_job(sweep, name, flat, ppl, lr, snapshot_only=False, downstream=None, data=None):
    """A finished job as report.py reads it: overrides.yaml, results.json (with its flat config, or with only
    .hydra/config.yaml holding the config, as a job of an older version), metrics.jsonl."""
    import yaml

    from mlm.export import unflatten

    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n")
    flat = {**flat, "optimizer.lr": lr}
    results = {"perplexity": ppl, "best_perplexity": ppl, "train_seconds": 1.0, "train_tokens": 100, "config": flat}
    if data is not None:  # the data identity a run records (mlm/data/identity.py)
        results["data"] = data
    if snapshot_only:
        del results["config"]
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(unflatten(flat)))
    if downstream:
        results["downstream"] = {"task": downstream[0], "accuracy": downstream[1], "seeds": [0, 1, 2]}
    (d / "results.json").write_text(json.dumps(results))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 3.0, "eval/perplexity": ppl}) + "\n")
    return d


def test_a_summary_ranks_only_jobs_with_the_same_eval_and_names_what_differs(tmp_path, flat_tiny, monkeypatch):
    from mlm import report

    sweep = tmp_path / "sweep"
    eval_job(sweep, "0", flat_tiny, 30.0, "1e-3")
    eval_job(sweep, "1", flat_tiny, 20.0, "2e-3")
    eval_job(sweep, "2", flat_tiny, 25.0, "3e-3")
    eval_job(
        sweep, "3", {**flat_tiny, "masking.mlm_probability": 0.3}, 10.0, "4e-3"
    )  # the lowest number, scored at another mask rate
    eval_job(
        sweep, "4", {**flat_tiny, "block_size": 64}, 15.0, "5e-3", snapshot_only=True
    )  # its config only in .hydra/config.yaml
    (sweep / "5" / ".hydra").mkdir(parents=True)
    (sweep / "5" / "error.txt").write_text("RuntimeError: boom\n")
    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    text = report.summarize([sweep]).read_text()
    assert "Best:" not in text  # no job is best across evals
    assert (
        "Not comparable: the jobs' evals differ in block_size, masking.mlm_probability; each group is ranked on its own"
        in text
    )
    assert (
        "- eval A (3 job(s): 1, 2, 0): block_size=32 masking.mlm_probability=0.15; best `optimizer.lr=2e-3` with perplexity 20.00."
        in text
    )
    assert (
        "- eval B (1 job(s): 3): block_size=32 masking.mlm_probability=0.3; best `optimizer.lr=4e-3` with perplexity 10.00."
        in text
    )
    assert "- eval C (1 job(s): 4): block_size=64 masking.mlm_probability=0.15; best `optimizer.lr=5e-3`" in text
    rows = summary_rows(text)
    assert [(r["#"], r["job"], r["eval"]) for r in rows] == [
        ("1", "1", "A"),
        ("2", "2", "A"),
        ("3", "0", "A"),
        ("4", "3", "B"),
        ("5", "4", "C"),
        ("6", "5", "-"),
    ]
    fig = figures[0]  # summary.png: one colour per eval, and the title says not to compare across them
    assert len({tuple(c) for c in fig.axes[0].collections[0].get_facecolors()}) == 3
    assert "evals differ in block_size, masking.mlm_probability" in fig._suptitle.get_text()


def test_jobs_of_one_eval_get_one_best_line(tmp_path, flat_tiny):
    from mlm.report import summarize

    for i, ppl in enumerate([30.0, 20.0]):
        eval_job(tmp_path, str(i), flat_tiny, ppl, f"{i + 1}e-3")
    text = summarize([tmp_path]).read_text()
    assert "Best: `optimizer.lr=2e-3` with perplexity 20.00." in text and "Not comparable" not in text
    assert "| eval |" not in text


def test_a_key_missing_from_a_jobs_record_is_never_assumed_equal(tmp_path, flat_tiny):
    from mlm.report import summarize

    eval_job(tmp_path, "0", flat_tiny, 30.0, "1e-3")
    eval_job(
        tmp_path, "1", {k: v for k, v in flat_tiny.items() if k != "trainer.max_eval_blocks"}, 20.0, "2e-3"
    )  # an older job's record
    text = summarize([tmp_path]).read_text()
    assert "Best:" not in text and "differ in trainer.max_eval_blocks" in text
    assert "trainer.max_eval_blocks=(not recorded)" in text and "trainer.max_eval_blocks=16" in text


def test_budget_fronts_and_downstream_best_stay_within_one_eval(tmp_path, flat_tiny):
    from mlm.report import summarize

    for i, (ppl, rate, task, acc) in enumerate(
        [
            (30.0, 0.15, "polarity", 0.6),
            (20.0, 0.15, "polarity", 0.7),
            (25.0, 0.15, "sst2", 0.9),
            (5.0, 0.3, "polarity", 0.65),
        ]
    ):
        flat = {**flat_tiny, "masking.mlm_probability": rate, "downstream.task": task, "trainer.budget_minutes": i + 1}
        d = eval_job(tmp_path, str(i), flat, ppl, "1e-3", downstream=(task, acc))
        (d / ".hydra" / "overrides.yaml").write_text(f"- trainer.budget_minutes={i + 1}\n")
        results = json.loads((d / "results.json").read_text())
        (d / "results.json").write_text(json.dumps({**results, "train_seconds": 60.0 * (i + 1)}))
    text = summarize([tmp_path]).read_text()
    assert "The Pareto fronts below compare the jobs of eval A only (3 job(s))" in text
    fronts = text.split("Pareto front, ")[1:]
    assert len(fronts) == 2 and all("| 3 |" not in f for f in fronts)  # the 0.3-rate job (perplexity 5) is on no front
    assert (
        "(3 of 3 jobs" not in fronts[1] and "| 2 |" not in fronts[1]
    )  # the accuracy front is polarity's: sst2's 0.9 is not on it
    assert "Not comparable: the jobs' downstream evals differ in downstream.task" in text
    # downstream accuracy is its own eval: the 0.3-rate job competes there
    assert (
        "- downstream eval A (3 job(s): 1, 3, 0): downstream.task=polarity; best `trainer.budget_minutes=2` with polarity 0.700"
        in text
    )
    assert (
        "- downstream eval B (1 job(s): 2): downstream.task=sst2; best `trainer.budget_minutes=3` with sst2 0.900"
        in text
    )


def test_a_config_snapshot_is_read_as_text_never_resolved_nor_followed(tmp_path, flat_tiny, monkeypatch):
    import yaml

    from mlm.report import summarize

    monkeypatch.setenv("MLM_TEST_SECRET_VALUE", "s3cr3t-value-123")
    eval_job(tmp_path, "0", flat_tiny, 30.0, "1e-3")
    eval_job(
        tmp_path,
        "1",
        {**flat_tiny, "dataset.path": "${oc.env:MLM_TEST_SECRET_VALUE}"},
        20.0,
        "2e-3",
        snapshot_only=True,
    )
    linked = eval_job(tmp_path, "2", flat_tiny, 25.0, "3e-3", snapshot_only=True)
    (linked / ".hydra" / "config.yaml").unlink()
    (linked / ".hydra" / "config.yaml").symlink_to(tmp_path / "1" / ".hydra" / "config.yaml")  # a link: not read
    text = summarize([tmp_path]).read_text()
    assert "s3cr3t" not in text and "dataset.path=${oc.env:MLM_TEST_SECRET_VALUE}" in text
    assert "- eval C (1 job(s): 2): " in text and "dataset.path=(not recorded)" in text
    assert yaml.safe_load((tmp_path / "1" / ".hydra" / "config.yaml").read_text())["dataset"]["path"].startswith(
        "${oc.env"
    )


def test_jobs_are_compared_by_the_data_they_read_not_by_how_its_path_is_spelled(tmp_path, flat_tiny):
    from mlm.report import eval_settings, summarize

    corpus, content_a, content_b, tok = "/data/corpus.txt", "a" * 64, "b" * 64, "t" * 64
    eval_job(
        tmp_path,
        "0",
        {**flat_tiny, "dataset.path": "corpus.txt"},
        30.0,
        "1e-3",
        data={"sources": [[corpus, content_a]], "tokenizer": tok},
    )
    eval_job(
        tmp_path,
        "1",
        {**flat_tiny, "dataset.path": "corpus.txt"},
        20.0,
        "2e-3",  # the same name, edited: the lowest number
        data={"sources": [[corpus, content_b]], "tokenizer": tok},
    )
    eval_job(
        tmp_path,
        "2",
        {**flat_tiny, "dataset.path": "./corpus.txt"},
        25.0,
        "3e-3",
        data={"sources": [[corpus, content_a]], "tokenizer": tok},
    )
    text = summarize([tmp_path]).read_text()
    assert "Best:" not in text  # the edited job is best of nothing but its own eval
    assert "Not comparable: the jobs' evals differ in data.sources;" in text
    assert (
        f'- eval A (2 job(s): 2, 0): data.sources=["{content_a}"]; best `optimizer.lr=3e-3` with perplexity 25.00.'
        in text
    )
    assert (
        f'- eval B (1 job(s): 1): data.sources=["{content_b}"]; best `optimizer.lr=2e-3` with perplexity 20.00.' in text
    )
    # the tokenizer likewise: by its recorded hash, whatever name loaded it; a name alone where no hash was recorded
    named = {**flat_tiny, "model.tokenizer": "./tok"}
    assert eval_settings(named, {"sources": None, "tokenizer": tok}) == eval_settings(
        flat_tiny, {"sources": None, "tokenizer": tok}
    )
    assert eval_settings(named, {"sources": None, "tokenizer": None}) != eval_settings(
        flat_tiny, {"sources": None, "tokenizer": None}
    )
    assert eval_settings(flat_tiny, {"sources": None, "tokenizer": tok}) != eval_settings(
        flat_tiny, {"sources": None, "tokenizer": "u" * 64}
    )


@pytest.mark.parametrize(
    "data", [{"sources": [["only-one"]]}, {"sources": "abc"}, {"sources": 7}, {"tokenizer": 5}, "abc", 7]
)
def test_a_malformed_data_record_is_compared_by_its_settings_not_a_traceback(tmp_path, flat_tiny, data):
    from mlm.report import summarize

    eval_job(tmp_path, "0", flat_tiny, 30.0, "1e-3", data=data)
    eval_job(tmp_path, "1", flat_tiny, 20.0, "2e-3")
    assert "Best: `optimizer.lr=2e-3` with perplexity 20.00." in summarize([tmp_path]).read_text()


# ---------------------------------------------------------------- reports that read at scale

LONG_ERROR = (
    "RuntimeError: non-finite training loss (nan) at step 37: the learning rate or the data may be at fault; "
    "lower optimizer.lr or look at the batch at that step"
)
SIX_KEYS = {
    "optimizer.lr": [
        "0.00013927723945289018",
        "0.0008468008575248334",
        "0.011536162338241389",
        "0.0031986171822035612",
        "0.0011748439548007038",
        "0.0013481575603601424",
        "0.00031",
    ],  # as Optuna draws them
    "scheduler": ["linear", "cosine", "wsd", "linear", "cosine", "wsd", "linear"],
    "model": [
        "tiny",
        "tiny_modernbert",
        "scratch_distilroberta",
        "distilroberta",
        "tiny",
        "tiny_modernbert",
        "scratch_distilroberta",
    ],
    "masking.train_probability": ["0.15", "0.3", "0.15", "0.3", "0.15", "0.3", "0.15"],
    "optimizer.weight_decay": ["0.0", "0.01", "0.1", "0.0", "0.01", "0.1", "0.0"],
    "scheduler.warmup_ratio": ["0.0", "0.1", "0.0", "0.1", "0.0", "0.1", "0.0"],
}


def report_job(sweep, name, overrides, ppl=None, ema=None, error=None, steps=20, flat=None):
    """A job as report.py reads it: .hydra/overrides.yaml and metrics.jsonl, then results.json (perplexity `ppl`, the weight
    average's `ema`, the flat config `flat`) or error.txt; neither where both `ppl` and `error` are None (an unfinished job)."""
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    final = ppl or 100.0
    records = [
        {"step": s, "train/loss": 5 - s / steps + 0.3 * (-1) ** s, "train/lr": 1e-3 * (1 - s / steps)}
        for s in range(1, steps + 1)
    ]
    records += [
        {
            "step": s,
            "eval/perplexity": final * (1 + steps - s),
            **({"eval/ema_perplexity": ema * (1 + steps - s)} if ema else {}),
        }
        for s in range(0, steps + 1, 5)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    if error:
        (d / "error.txt").write_text(error + "\n")
    elif ppl is not None:
        (d / "results.json").write_text(
            json.dumps(
                {
                    "perplexity": ppl,
                    "best_perplexity": ppl,
                    "ema_perplexity": ema,
                    "train_seconds": 60.0,
                    "train_tokens": 1000,
                    **({"config": flat} if flat else {}),
                }
            )
        )
    return d


def six_key_sweep(sweep, keys=tuple(SIX_KEYS)):
    """Seven jobs over `keys` (of SIX_KEYS), all with trainer.max_steps=200: five finished (the first two with a weight
    average), the sixth failed with a long reason, the last stopped at step 6 with a checkpoint of step 5."""
    for i in range(7):
        overrides = {**{k: SIX_KEYS[k][i] for k in keys}, "trainer.max_steps": 200}
        if i < 5:
            report_job(sweep, str(i), overrides, ppl=100.0 + 10 * i, ema=95.0 + 10 * i if i < 2 else None)
        elif i == 5:
            report_job(sweep, str(i), overrides, error=LONG_ERROR)
        else:
            d = report_job(sweep, str(i), overrides, steps=6)
            (d / "run.lock").write_text("")  # released: a clean end (a stop signal) without results
            (d / "checkpoints" / "ckpt-5").mkdir(parents=True)
            (d / "checkpoints" / "ckpt-5" / "manifest.json").write_text("{}")


def test_a_summary_says_the_fixed_settings_once_and_gives_each_swept_key_a_column(tmp_path):
    from mlm.report import STATUS_WIDTH, summarize

    six_key_sweep(tmp_path)
    text = summarize([tmp_path]).read_text()
    assert "7 jobs: 5 ok, 1 failed, 1 unfinished." in text
    assert (
        text.count("trainer.max_steps=200") == 1
        and "Fixed settings (the overrides every job shares): `trainer.max_steps=200`" in text
    )
    rows = summary_rows(text)
    assert [r["#"] for r in rows] == [str(n) for n in range(1, 8)] and [r["job"] for r in rows] == [
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]
    assert all(set(SIX_KEYS) <= set(r) for r in rows) and [r["scheduler"] for r in rows] == SIX_KEYS["scheduler"]
    assert [r["optimizer.lr"] for r in rows] == [
        "0.0001393",
        "0.0008468",
        "0.01154",
        "0.003199",
        "0.001175",
        "0.001348",
        "0.00031",
    ]
    assert [r["EMA ppl"] for r in rows[:3]] == ["95.00", "105.00", "-"]  # the weight average's, where a job kept one
    # the long reason: cut at a word in its cell, whole in a numbered note below the table
    failed = rows[5]["status"]
    assert failed.startswith("failed: ") and failed.endswith(" ... (note 1)")
    cut = failed[len("failed: ") : -len(" ... (note 1)")]
    assert LONG_ERROR.startswith(cut + " ") and len(cut) <= STATUS_WIDTH
    assert f"\n1. row 6 (5): {LONG_ERROR}\n" in text
    assert rows[6]["status"] == "stopped: step 6 logged, checkpoint at step 5" and rows[6]["final ppl"] == "-"
    assert (
        "Best: `masking.train_probability=0.15 model=tiny optimizer.lr=0.00013927723945289018 optimizer.weight_decay=0.0 "
        in text
    )


def test_an_unfinished_job_says_whether_it_runs_stopped_or_was_killed(tmp_path):
    import subprocess
    import sys

    from mlm.report import collect_jobs, failure_line, unfinished_status
    from mlm.rundir import RunLock

    d = report_job(tmp_path, "0", {"optimizer.lr": "1e-3"}, steps=7)
    assert unfinished_status(d, []) == "not started (no run.lock)"
    (d / "run.lock").write_text("")
    lock = RunLock(d).acquire()  # this process holds it
    try:
        assert unfinished_status(d, [{"step": 7}]).startswith(f"running (pid {__import__('os').getpid()} on ")
    finally:
        lock.release()
    assert unfinished_status(d, [{"step": 7}]) == "stopped: step 7 logged, no checkpoint"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (d / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "start": 0}))
    assert unfinished_status(d, []) == "killed (its process ended without a word): no step logged, no checkpoint"
    from mlm.rundir import held_elsewhere

    assert not held_elsewhere(d)  # the resume of an unfinished run reads the same state (mlm.rundir.lock_state)
    (d / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": 0}))  # cannot be checked from here
    assert unfinished_status(d, []).startswith("running (pid 1 on elsewhere") and held_elsewhere(d)
    (d / "run.lock").write_text("{")
    assert unfinished_status(d, []).startswith("unfinished (its run.lock is unreadable)") and held_elsewhere(d)
    assert (
        collect_jobs([tmp_path]) == [] and failure_line(collect_jobs([tmp_path])) is None
    )  # not a failure of the sweep


def two_sweeps(tmp_path, flat):
    """Sweeps one/sweep and two/sweep, jobs 0 and 1 each; two/sweep's job 1 scored on blocks of 64 tokens."""
    a, b = tmp_path / "one" / "sweep", tmp_path / "two" / "sweep"
    report_job(a, "0", {"optimizer.lr": "1e-3"}, ppl=30.0, flat={**flat, "optimizer.lr": 1e-3})
    report_job(a, "1", {"optimizer.lr": "2e-3"}, ppl=20.0, flat={**flat, "optimizer.lr": 2e-3})
    report_job(b, "0", {"optimizer.lr": "3e-3"}, ppl=25.0, flat={**flat, "optimizer.lr": 3e-3})
    report_job(
        b,
        "1",
        {"optimizer.lr": "3e-3", "block_size": "64"},
        ppl=10.0,
        flat={**flat, "optimizer.lr": 3e-3, "block_size": 64},
    )
    return a, b


def test_two_sweeps_in_one_report_name_their_sweep_and_rank_only_comparable_jobs(tmp_path, flat_tiny, capsys):
    from mlm.report import main

    a, b = two_sweeps(tmp_path, flat_tiny)
    out = tmp_path / "merged" / "new"  # made
    assert main([str(a), str(b), "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert text.startswith(
        "# Summary of 2 sweeps\n\nSweeps: `one/sweep` = " + str(a) + " (2 jobs); `two/sweep` = " + str(b) + " (2 jobs)."
    )
    rows = summary_rows(text)
    assert [(r["#"], r["sweep"], r["job"], r["eval"]) for r in rows] == [
        ("1", "one/sweep", "1", "A"),
        ("2", "two/sweep", "0", "A"),
        ("3", "one/sweep", "0", "A"),
        ("4", "two/sweep", "1", "B"),
    ]
    assert [r["block_size"] for r in rows] == [
        "32",
        "32",
        "32",
        "64",
    ]  # a key one sweep set and the other did not: its config's value
    # the lowest perplexity (10, blocks of 64) is best of nothing but its own eval
    assert (
        "Best:" not in text
        and "Not comparable: the jobs' evals differ in block_size; each group is ranked on its own" in text
    )
    assert (
        "- eval A (3 job(s): one/sweep/1, two/sweep/0, one/sweep/0): block_size=32; best `optimizer.lr=2e-3` with perplexity 20.00."
        in text
    )
    assert (
        "- eval B (1 job(s): two/sweep/1): block_size=64; best `block_size=64 optimizer.lr=3e-3` with perplexity 10.00."
        in text
    )
    assert not (a / "summary.md").exists() and (out / "summary.png").exists()


def drawn_ticklabels(axis):
    """The axis's major tick labels within its view (those drawn; matplotlib also keeps one beyond each end)."""
    lo, hi = sorted(axis.get_view_interval())
    return [label for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels()) if lo <= loc <= hi]


def text_boxes(fig, axes):
    """The drawn window boxes of the figure's texts: the suptitle, the legends' texts, and each of `axes`' tick labels and axis labels."""
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] + [
        t for ax in fig.axes for legend in [ax.get_legend()] if legend for t in legend.get_texts()
    ]
    for ax in axes:
        texts += drawn_ticklabels(ax.xaxis) + drawn_ticklabels(ax.yaxis) + [ax.xaxis.label, ax.yaxis.label, ax.title]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("n", [1, 3, 6])
def test_summary_png_gives_each_swept_key_a_panel_whose_labels_never_overlap(tmp_path, monkeypatch, n):
    from mlm import report

    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    keys = list(SIX_KEYS)[:n]
    six_key_sweep(tmp_path, keys)
    report.summarize([tmp_path])
    fig = figures[0]
    fig.canvas.draw()
    panels = {ax.get_xlabel(): ax for ax in fig.axes if ax.get_xlabel() in keys}
    assert sorted(panels) == sorted(keys)
    first = panels[keys[0]]
    assert all(
        ax is first or first.get_shared_y_axes().joined(first, ax) for ax in panels.values()
    )  # one perplexity scale
    assert len({round(ax.get_position().y0, 3) for ax in panels.values()}) == -(
        -n // report.PANELS_PER_ROW
    )  # 3 to a row
    boxes = text_boxes(fig, list(panels.values()))
    overlaps = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :] if box.overlaps(other)]
    assert overlaps == []
    assert not any("10^" in t or "times" in t or "$" in t for t, _ in boxes)  # plain tick labels
    lr = [
        t.get_text() for t in drawn_ticklabels(panels["optimizer.lr"].xaxis)
    ]  # round values, not each draw's 19 digits
    assert panels["optimizer.lr"].get_xscale() == "log" and {"0.0002", "0.001", "0.01"} <= set(lr) and len(lr) <= 7
    if "model" in panels:  # four long names side by side would overlap: upright
        assert [t.get_text() for t in panels["model"].get_xticklabels()] == [
            "distilroberta",
            "scratch_distilroberta",
            "tiny",
            "tiny_modernbert",
        ]
        assert panels["model"].get_xticklabels()[0].get_rotation() == 90
    # the legend sits beside the curves, over no panel's data
    [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    data = [ax for ax in fig.axes if ax.axison]
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in data)
    labels = [t.get_text() for t in legend.get_texts()]
    assert "best: #1" in labels and "failed (1)" in labels and "unfinished (1)" in labels
    top = panels[
        keys[0]
    ].collections  # the finished jobs, the best one's ring, the failed and the unfinished job's marks
    assert [len(c.get_offsets()) for c in top] == [5, 1, 1, 1]
    assert "7 jobs: 5 ok, 1 failed, 1 unfinished" in fig._suptitle.get_text()


def test_curves_png_smooths_the_loss_draws_the_weight_average_and_is_titled_with_the_settings(tmp_path, monkeypatch):
    from mlm import report

    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    d = report_job(
        tmp_path, "3", {"optimizer.lr": "0.011536162338241389", "model": "tiny"}, ppl=950.0, ema=900.0, steps=40
    )
    report.plot_run(d, ["optimizer.lr"])  # as a sweep summary draws it: the swept key only
    report.plot_run(d)  # as the run draws it when it ends: every override
    swept, alone = figures
    assert swept._suptitle.get_text() == f"{tmp_path.name}/3: optimizer.lr=0.01154"
    assert alone._suptitle.get_text() == "3: optimizer.lr=0.01154, model=tiny"
    loss, ppl, lr = swept.axes
    raw, smooth = loss.lines
    assert raw.get_alpha() < 0.5 and [line.get_label() for line in loss.lines] == ["logged", "smoothed (EMA 0.6)"]
    assert list(smooth.get_ydata()) == report.smoothed(list(raw.get_ydata()), 0.6) != list(raw.get_ydata())
    assert [line.get_label() for line in ppl.lines] == [
        "model: 950.0 at step 40",
        "weight average (trainer.ema_decay): 900.0 at step 40",
    ]
    swept.canvas.draw()
    assert ppl.get_yscale() == "log"
    ticks = [t.get_text() for ax in (loss, ppl, lr) for t in drawn_ticklabels(ax.yaxis) if t.get_text()]
    assert ticks and not any("10^" in t or "times" in t or "$" in t for t in ticks)  # 1000, 5000, 0.0002: plain
    assert not any(
        ax.get_legend().get_window_extent().overlaps(ax.get_window_extent()) for ax in (loss, ppl)
    )  # below the panel


def test_smoothing_is_tensorboards_debiased_moving_average():
    from mlm.report import smoothed, smoothing_weight

    assert smoothed([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # debiased: no pull towards 0 at the start
    assert smoothed([2.0, 4.0], 0.5) == pytest.approx([2.0, (0.25 * 2 + 0.5 * 4) / 0.75])
    assert (
        smoothing_weight(8) == 0.6 and smoothing_weight(200) == pytest.approx(0.9) and smoothing_weight(10_000) == 0.98
    )
