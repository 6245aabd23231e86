"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, compose, run_cli, sentences, torchrun_command

pytestmark = pytest.mark.slow

# global batch 8 = 4 per device x 2 processes x 1 micro-batch  |  4 per device x 1 process x 2 micro-batches
COMMON = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "model.dropout=0",
    "trainer.per_device_batch_size=4",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.log_every=1",
    "trainer.max_eval_blocks=37",
    "trainer.checkpoint_every=3",
]
# fp32 sums in a different order (all-reduce of two halves vs accumulation) differ in the last bits;
# over 6 Adam steps that stays below 1e-5 relative, while a different mask or batch changes the
# loss by more than 1e-2.
RTOL = 1e-5


def curves(run_dir: Path):
    loss, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            loss[r["step"]] = r["train/loss"]
        if "eval/perplexity" in r:
            evals[r["step"]] = r["eval/perplexity"]
    return loss, evals


def test_two_processes_match_one_process(tmp_path):
    from mlm.train import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(500)))
    one = tmp_path / "one"
    train(compose([*COMMON, "trainer.gradient_accumulation_steps=2", f"dataset.path={corpus}"]), one)  # the reference

    work = tmp_path / "two"
    work.mkdir()
    cmd = torchrun_command(
        29533,
        *COMMON,
        "trainer.gradient_accumulation_steps=1",
        f"dataset.path={corpus}",
    )
    proc = subprocess.run(
        cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on one run directory
    two = runs[0]
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    assert len(list(two.glob("*.log"))) == 1  # one log file, from the main process
    assert proc.stdout.count("perplexity:") == 1  # one summary, from the main process
    for line in (
        "trainable parameters of",
        "eval at step 0: perplexity",
        "step 1/6: loss",
        "projected: ",
        "training ended at step 6/6",
    ):
        assert proc.stdout.count(line) == 1, line  # one console copy of each log line: the main process's
    assert sorted(p.name for p in (two / "checkpoints" / "ckpt-00000006").glob("rng-*.json")) == [
        "rng-0.json",
        "rng-1.json",
    ]

    loss1, eval1 = curves(one)
    loss2, eval2 = curves(two)
    assert loss1.keys() == loss2.keys() == set(range(1, 7))
    for step in loss1:
        assert loss2[step] == pytest.approx(loss1[step], rel=RTOL), step
    assert eval1.keys() == eval2.keys() == {0, 3, 6}
    for step in eval1:
        assert eval2[step] == pytest.approx(eval1[step], rel=RTOL), step
    # the eval set (37 blocks, odd) was split 18/19 over the ranks: every masked token counted once
    m1 = [
        json.loads(l)["eval/masked_tokens"]
        for l in (one / "metrics.jsonl").read_text().splitlines()
        if "eval/masked_tokens" in l
    ]
    m2 = [
        json.loads(l)["eval/masked_tokens"]
        for l in (two / "metrics.jsonl").read_text().splitlines()
        if "eval/masked_tokens" in l
    ]
    assert m1 == m2


# --- sweeps whose jobs are process groups (submitit tasks, SLURM tasks, torchrun around -m) ---------------

DEBUG_RUN = [*TINY_RUN, "model.dropout=0", "runtime.mixed_precision=no", "trainer.per_device_batch_size=2"]


def job_results(sweep: Path):
    return {
        p.name: json.loads((p / "results.json").read_text())
        for p in sorted(sweep.iterdir())
        if (p / "results.json").exists()
    }


def test_submitit_local_two_tasks_per_job_train_one_job_together(tmp_path):
    from mlm.train import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(300)))
    two, one = tmp_path / "two", tmp_path / "one"
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            *DEBUG_RUN,
            f"dataset.path={corpus}",
            "optimizer.lr=1e-4,3e-4",
            f"hydra.sweep.dir={two}",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in enumerate(("1e-4", "3e-4")):  # the reference: each job in one process, trained here
        train(
            compose(
                [*DEBUG_RUN, "trainer.gradient_accumulation_steps=2", f"dataset.path={corpus}", f"optimizer.lr={lr}"]
            ),
            one / str(job),
        )
    r2, r1 = job_results(two), job_results(one)
    assert r2.keys() == r1.keys() == {"0", "1"}
    for job in ("0", "1"):
        assert r2[job]["processes"] == 2 and r1[job]["processes"] == 1
        assert r2[job]["perplexity"] == pytest.approx(r1[job]["perplexity"], rel=1e-3)
        steps = [
            json.loads(line)["step"]
            for line in (two / job / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line
        ]
        assert steps == [1, 2, 3, 4]  # every record once, from rank 0
        assert len(list((two / job).glob("*.log"))) == 1 and (two / job / "final").is_dir()
    assert r2["0"]["perplexity"] != pytest.approx(r2["1"]["perplexity"], rel=1e-3)  # the jobs really differ
    outs = list((two / ".submitit").glob("*/*_log.out"))
    assert sum(p.read_text().count("perplexity:") for p in outs) == 2  # one summary per job, from its rank 0


def test_slurm_tasks_set_by_hand_form_one_group(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(300)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "31337",
        "MASTER_PORT": "29571",
        "HYDRA_FULL_ERROR": "0",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *DEBUG_RUN, "trainer.max_steps=2", f"dataset.path={corpus}"],
            cwd=tmp_path,
            env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert [r.name for r in runs] == ["slurm-31337.0"]  # both tasks agreed on the run directory (job 31337, step 0)
    assert json.loads((runs[0] / "results.json").read_text())["processes"] == 2
    assert [o.count("perplexity:") for o, _ in outs] == [1, 0]  # the summary comes from rank 0 only


def test_torchrun_around_multirun_a_failure_on_one_rank_fails_that_job_on_all(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(300)))
    sweep = tmp_path / "sweep"
    cmd = torchrun_command(
        29537,
        "-m",
        *DEBUG_RUN,
        "trainer.max_steps=4",
        f"dataset.path={corpus}",
        "runtime.mixed_precision=no,bf16",
        "optimizer.lr=1e-4,2e-4",
        f"hydra.sweep.dir={sweep}",
    )
    # job 0 fails on rank 1 only, after its second step; the other three jobs (bf16 too) must run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLM_TEST_FAIL": "0:1:2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-4000:]  # a job failed: rank 0 exits 1 after the summary
    results = job_results(sweep)
    assert sorted(results) == ["1", "2", "3"] and all(r["processes"] == 2 for r in results.values())
    error = (sweep / "0" / "error.txt").read_text()
    assert error.startswith("rank 1: RuntimeError: injected failure")  # the cause first, then what rank 0 saw
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 3 and "failed: rank 1: RuntimeError: injected failure" in summary
    assert proc.stdout.count("sweep summary:") == 1
