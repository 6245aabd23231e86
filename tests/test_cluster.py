"""Multi-process runs as clusters start them: resume under DDP, SLURM batch shells, run directories per node."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_RUN, sentences

DDP_RUN = [*TINY_RUN, "trainer.mixed_precision=no", "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.per_device_batch_size=2",
           "trainer.keep_checkpoints=3", "trainer.save_model=true"]


def torchrun(args, cwd, port, nnodes=1, node_rank=0, extra=(), timeout=900):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
           "--master_addr", "127.0.0.1", "--master_port", str(port), *extra, str(ROOT / "run.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_two_process_ddp_run_resumes_to_the_uninterrupted_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(300)))
    ref, run = tmp_path / "ref", tmp_path / "run"
    for run_dir, port in ((ref, 29581), (run, 29582)):
        rc, _, err = finish(torchrun([*DDP_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"], tmp_path, port))
        assert rc == 0, err[-3000:]
    # as if killed after the checkpoint of step 6: the newest checkpoint and the outputs are gone
    checkpoints = sorted((run / "checkpoints").glob("ckpt-*"))
    assert [c.name for c in checkpoints][-1] == "ckpt-00000008"
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(run / "final")
    (run / "results.json").unlink()
    rc, _, err = finish(torchrun([*DDP_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run}"], tmp_path, 29583))
    assert rc == 0, err[-3000:]
    assert "resumed from" in err + "".join(p.read_text() for p in run.glob("*.log"))
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
