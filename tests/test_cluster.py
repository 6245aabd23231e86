"""Multi-process runs as clusters start them: resume under DDP, SLURM batch shells, run directories per node."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_RUN, sentences

DDP_RUN = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "trainer.max_steps=8",
    "trainer.checkpoint_every=2",
    "trainer.per_device_batch_size=2",
    "trainer.keep_checkpoints=3",
    "trainer.save_model=true",
]


def torchrun(args, cwd, port, nnodes=1, node_rank=0, extra=(), timeout=900):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        *extra,
        str(ROOT / "run.py"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_two_process_ddp_run_resumes_to_the_uninterrupted_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(300)))
    run = tmp_path / "run"
    rc, _, err = finish(torchrun([*DDP_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run}"], tmp_path, 29581))
    assert rc == 0, err[-3000:]
    # the reference: this run's weights before the "kill" (copied: final/ is deleted and written again)
    uninterrupted = {k: v.clone() for k, v in load_file(run / "final" / "model.safetensors").items()}
    # as if killed after the checkpoint of step 6: the newest checkpoint and the outputs are gone
    checkpoints = sorted((run / "checkpoints").glob("ckpt-*"))
    assert [c.name for c in checkpoints][-1] == "ckpt-00000008"
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(run / "final")
    (run / "results.json").unlink()
    rc, _, err = finish(torchrun([*DDP_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run}"], tmp_path, 29583))
    assert rc == 0, err[-3000:]
    assert "resumed from" in err + "".join(p.read_text() for p in run.glob("*.log"))
    a, b = uninterrupted, load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


TWO_NODE_RUN = [*TINY_RUN, "runtime.mixed_precision=no", "trainer.max_steps=2", "trainer.per_device_batch_size=2"]


def two_nodes(args, cwds, port, extra=()):
    """torchrun --nnodes 2 as two agents (one process each) on this machine, node i started in cwds[i]."""
    procs = [
        torchrun(args, cwd, port, nnodes=2, node_rank=i, extra=["--nproc_per_node", "1", *extra])
        for i, cwd in enumerate(cwds)
    ]
    return [finish(p) for p in procs]


@pytest.mark.slow
def test_a_run_directory_that_differs_between_nodes_fails_at_the_start(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(200)))
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # two disks: the same relative run dir is two directories
    for n in nodes:
        n.mkdir()
    ends = two_nodes([*TWO_NODE_RUN, f"dataset.path={corpus}", "hydra.run.dir=run"], nodes, 29591)
    for rc, _, err in ends:
        assert rc != 0
        assert (
            "is not shared between the nodes (1 of 2 processes see another one); put it on a shared filesystem" in err
        ), err[-3000:]
    assert not (nodes[0] / "run" / "checkpoints").exists() and not (nodes[0] / "run" / "results.json").exists()


@pytest.mark.slow
def test_torchrun_on_two_nodes_without_a_run_dir_needs_a_rendezvous_id(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(200)))
    args = [*TWO_NODE_RUN, f"dataset.path={corpus}"]
    for rc, _, err in two_nodes(args, [tmp_path, tmp_path], 29592):
        assert (
            rc != 0
            and "need one run directory: set hydra.run.dir=<shared path> (with torchrun: or give --rdzv-id=<name>)"
            in err
        ), err[-3000:]
    assert not (tmp_path / "outputs").exists()
    for rc, _, err in two_nodes(args, [tmp_path, tmp_path], 29593, extra=["--rdzv-id", "exp7"]):
        assert rc == 0, err[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == ["torchrun-exp7"]
    assert (tmp_path / "outputs" / "runs" / "torchrun-exp7" / "results.json").exists()


@pytest.mark.slow
def test_a_plain_run_in_a_batch_shell_of_four_tasks_trains_as_one_process(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(200)))
    shell = {
        "SLURM_JOB_ID": "555",
        "SLURM_JOBID": "555",
        "SLURM_NTASKS": "4",
        "SLURM_NPROCS": "4",
        "SLURM_PROCID": "0",
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost",
        "SLURM_TASKS_PER_NODE": "4",
        "SLURM_CPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURMD_NODENAME": "localhost",
        "SLURM_CLUSTER_NAME": "test",
    }
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
        },
        **shell,
    }
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), *TWO_NODE_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run}"]
    # a rank 0 of 4 would wait 30 minutes for peers that never come: the timeout only ends such a hang
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["processes"] == 1
