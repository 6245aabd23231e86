"""slurm/train_multinode.sbatch without SLURM: bash runs it with stand-in `srun` and `scontrol` first on
PATH, one node, torchrun with 2 CPU processes (gloo). slurm/wandb_agents.sbatch with a stand-in `wandb`.
Not run: a real cluster, GPUs, several nodes, the W&B server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, sentences

SCRIPT = ROOT / "slurm" / "train_multinode.sbatch"
AGENTS_SCRIPT = ROOT / "slurm" / "wandb_agents.sbatch"

# srun: records its arguments, drops its own options and runs the command once, as the only task of a 1-node step
FAKE_SRUN = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_LOG"
while [[ "$1" == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=1
exec "$@"
"""
# scontrol: the node list is this machine; anything else (requeue) is only recorded
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $@" >> "$FAKE_SLURM_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi
"""


def fake_slurm(tmp_path, job_id: str):
    """(env, args, log, run root): the stand-ins first on PATH, a 1-node job's variables, a tiny run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(300)))
    log, runs = tmp_path / "slurm.log", tmp_path / "runs"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(log),
        "SLURM_JOB_ID": job_id,
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "MLM_REPO": str(ROOT),
        "MLM_RUN_ROOT": str(runs),
        "PYTHON": sys.executable,
        "NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "0",
    }
    args = [*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=4", "trainer.save_model=false"]
    return env, args, log, runs


@pytest.mark.slow
def test_sbatch_script_runs_one_node_of_two_processes_usr1_stops_it_with_a_checkpoint_and_requeues_find_the_run(
    tmp_path,
):
    """The script runs one node of two processes in the job's run directory. SLURM signals the batch shell only
    (--signal=B:USR1@...): the script stops the step with SIGTERM (every rank finishes its step and they checkpoint),
    then asks for a requeue; the requeued job (the same job id) finds the same directory, resumes and finishes; requeued
    again, it finds the finished run."""
    env, args, log, runs = fake_slurm(tmp_path, "4343")
    # 150 steps: the signal, sent after step 10, stops the run within a few steps (6 here, at ~0.03 s a step)
    args = [*args, "trainer.max_steps=150", "trainer.eval_every=100"]
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = runs / "slurm-4343" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (
        not (metrics.exists() and metrics.read_text().count("train/loss") >= 10)
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)  # some steps trained under torchrun
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    calls = log.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames node001"
    assert (
        calls[1].startswith("--kill-on-bad-exit=1 ")
        and "--rdzv_endpoint 127.0.0.1:" in calls[1]
        and "--rdzv_id 4343" in calls[1]
    )
    assert "requeueing (it resumes in" in out and "scontrol requeue 4343" in calls
    assert "stopped by SIGTERM after step" in err and not (runs / "slurm-4343" / "results.json").exists()
    state = json.loads(next((runs / "slurm-4343" / "checkpoints").glob("ckpt-*/state.json")).read_text())
    assert 10 <= state["step"] < 150 and state["world_size"] == 2

    again = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {runs / 'slurm-4343' / 'checkpoints'}" in again.stdout + again.stderr
    results = json.loads((runs / "slurm-4343" / "results.json").read_text())
    assert results["processes"] == 2 and results["steps"] == 150
    assert [p.name for p in runs.iterdir()] == ["slurm-4343"]  # both processes wrote into the one run directory

    # the job requeued after it finished: the same job id finds the same directory and the finished run
    finished = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "already finished (150 steps" in finished.stdout
    assert json.loads((runs / "slurm-4343" / "results.json").read_text()) == results


def fake_wandb(tmp_path: Path, sleep: bool) -> dict:
    """A `wandb` first on PATH that records each agent's arguments, CUDA_VISIBLE_DEVICES and a TERM it receives."""
    log = tmp_path / "agents.log"
    script = tmp_path / "bin" / "wandb"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        "#!/bin/bash\n"
        'echo "start $CUDA_VISIBLE_DEVICES $*" >> "$FAKE_LOG"\n'
        'trap \'echo "TERM $CUDA_VISIBLE_DEVICES" >> "$FAKE_LOG"; exit 0\' TERM\n'
        + ("while true; do sleep 0.1; done\n" if sleep else "")
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}


def test_the_agents_script_starts_one_agent_per_gpu_of_the_job(tmp_path):
    env = fake_wandb(tmp_path, sleep=False)
    env |= {"CUDA_VISIBLE_DEVICES": "4,5,6", "SLURM_JOB_ID": "77", "MLM_REPO": str(tmp_path), "TRIALS_PER_AGENT": "3"}
    proc = subprocess.run(["bash", str(AGENTS_SCRIPT), "ent/proj/abc123"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted((tmp_path / "agents.log").read_text().splitlines()) == [
        f"start {gpu} agent --count 3 --forward-signals ent/proj/abc123" for gpu in (4, 5, 6)
    ]
    assert sorted(p.name for p in tmp_path.glob("wandb-agent-*.log")) == [f"wandb-agent-77-{i}.log" for i in range(3)]

    missing = subprocess.run(["bash", str(AGENTS_SCRIPT)], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: sbatch slurm/wandb_agents.sbatch" in missing.stderr


def test_term_before_the_time_limit_reaches_every_agent(tmp_path):
    """SLURM signals the batch shell (--signal=B:TERM@...): the script passes TERM to each agent (which forwards it to
    its trial) and waits for them all."""
    env = fake_wandb(tmp_path, sleep=True) | {"MLM_REPO": str(tmp_path), "SLURM_GPUS_ON_NODE": "2"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(["bash", str(AGENTS_SCRIPT), "ent/proj/abc123"], env=env, stdout=subprocess.PIPE, text=True)
    log = tmp_path / "agents.log"
    deadline = time.monotonic() + 60
    while (not log.exists() or log.read_text().count("start") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopping the agents" in out
    assert sorted(log.read_text().splitlines()) == [
        "TERM 0",
        "TERM 1",
        "start 0 agent --count 4 --forward-signals ent/proj/abc123",
        "start 1 agent --count 4 --forward-signals ent/proj/abc123",
    ]
