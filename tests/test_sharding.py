"""FSDP2 on 2 CPU processes (gloo) trains what DDP trains, keeps tied weights tied, and resumes exactly
from sharded checkpoints; every rank runs the same number of eval batches."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from mlm.batching import eval_batch_count, eval_shard
from tests.conftest import ROOT, TINY_RUN, sentences, torchrun_command


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_runs_the_same_number_of_eval_batches(world):
    for num_blocks in range(0, 70):
        for batch_size in (1, 5, 16):
            shards = [eval_shard(num_blocks, batch_size, r, world) for r in range(world)]
            count = eval_batch_count(num_blocks, batch_size, world)
            assert max(len(s) for s in shards) == count  # the padding never adds a batch nobody needed
            assert sorted(i for s in shards for b in s for i in b) == list(range(num_blocks))  # each block once
    assert [len(eval_shard(33, 16, r, 2)) for r in range(2)] == [1, 2] and eval_batch_count(33, 16, 2) == 2


def test_accelerate_configs_are_all_usable_on_gpus():
    """No Accelerate config that cannot work: sharding is runtime.sharding=fsdp (our FSDP2), not Accelerate's
    FSDP/DeepSpeed plugins, which would wrap the model a second time; and no multi-CPU config, because
    `accelerate launch` starts several CPU processes only through mpirun and otherwise runs one (torchrun
    is the CPU launcher)."""
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
    assert files
    for path in files:
        raw = yaml.safe_load(path.read_text())
        assert raw["distributed_type"] in ("MULTI_GPU", "NO"), path.name
        load_config_from_file(str(path))  # Accelerate itself accepts it


# 33 eval blocks in batches of 16: the ranks hold 16 and 17 blocks, so 1 and 2 batches without padding
RUN = [
    *TINY_RUN,
    "model.dropout=0",
    "runtime.mixed_precision=no",
    "trainer.checkpoint_every=2",
    "trainer.max_steps=4",
    "trainer.max_eval_blocks=33",
    "trainer.eval_batch_size=16",
]


def torchrun(args, cwd: Path, port: int, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = torchrun_command(port, *args, processes=processes)
    proc = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_args(corpus: Path, run_dir: Path, sharding: str, per_device: int = 6):
    return [
        *RUN,
        f"dataset.path={corpus}",
        f"hydra.run.dir={run_dir}",
        f"runtime.sharding={sharding}",
        f"trainer.per_device_batch_size={per_device}",
    ]


def ddp_and_fsdp_weights(tmp_path: Path, extra: list, port: int):
    """The same tiny run with `extra` settings, replicated and FSDP2-sharded on 2 processes (torchrun at `port` and
    `port + 1`): its corpus, and each one's final weights ({"none": ..., "fsdp": ...})."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(500)))
    weights = {}
    for port, sharding in enumerate(("none", "fsdp"), start=port):
        torchrun([*run_args(corpus, tmp_path / sharding, sharding), *extra], tmp_path, port)
        weights[sharding] = load_file(str(tmp_path / sharding / "final" / "model.safetensors"))
    return corpus, weights


# the shared runs: name -> (runtime.sharding, with the weight average, torchrun's port, processes, resumed)
SHARED = {
    "ddp": ("none", True, 29541, 2, False),
    "fsdp": ("fsdp", False, 29542, 2, False),
    "fsdp_ema": ("fsdp", True, 29546, 2, False),
    "fsdp_ema_resumed_on_2": ("fsdp", True, 29543, 2, True),
    "fsdp_ema_resumed_on_3": ("fsdp", True, 29544, 3, True),
}


class SharedRuns(dict):
    """RUN under torchrun, each run trained on first use under `root` and then shared (the tests only read them): on 2
    processes "ddp" (runtime.sharding=none) and "fsdp_ema" with the weight average (trainer.ema_decay=0.9), "fsdp"
    without it; and copies of "fsdp_ema" resumed from its sharded step-2 checkpoint on 2 processes and on 3 (x 4
    blocks, the same global batch of 12) reading 2 processes' shards (`output`: what these launches printed). The
    replicated run with the average is the reference of both sharded runs, and the resumes of the one with it check
    its weights as well as its average: the average changes no weight (test_ema's
    test_the_average_does_not_change_training; test_fsdp_matches_ddp_ties_weights_and_resumes_exactly compares "fsdp"
    with "ddp" and with "fsdp_ema")."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.corpus = root / "c.txt"
        self.corpus.write_text("\n".join(sentences(500)))
        self.output = {}

    def args(self, run_dir: Path, name: str) -> list:
        sharding, ema, _, processes, _ = SHARED[name]
        extra = ["trainer.ema_decay=0.9"] if ema else []
        return [*run_args(self.corpus, run_dir, sharding, per_device=12 // processes), *extra]

    def __missing__(self, name: str) -> Path:
        _, _, port, processes, resumed = SHARED[name]
        run_dir = self.root / name
        shutil.rmtree(run_dir, ignore_errors=True)  # what a launch that failed for an earlier test left: its own error
        if resumed:  # what a kill just after the step-2 checkpoint leaves
            shutil.copytree(self["fsdp_ema"], run_dir)
            drop_last_checkpoint(run_dir)
        proc = torchrun(self.args(run_dir, name), self.root, port, processes)
        self.output[name] = proc.stdout + proc.stderr
        self[name] = run_dir
        return run_dir

    def copy(self, name: str, to: Path) -> Path:
        shutil.copytree(self[name], to)
        return to


def drop_last_checkpoint(run_dir: Path) -> None:
    """What a kill just after the step-2 checkpoint leaves (a rerun then resumes from step 2)."""
    shutil.rmtree(run_dir / "checkpoints" / "ckpt-00000004")
    for name in ("final", "final_ema"):
        shutil.rmtree(run_dir / name, ignore_errors=name == "final_ema")  # final_ema/: a run with the weight average
    (run_dir / "results.json").unlink()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_fsdp_matches_ddp_ties_weights_and_resumes_exactly(fsdp_runs, tmp_path):
    runs = {"none": fsdp_runs["ddp"], "fsdp": fsdp_runs["fsdp"]}  # the replicated run with the weight average
    results = {k: json.loads((d / "results.json").read_text()) for k, d in runs.items()}
    assert results["fsdp"]["sharding"] == "fsdp" and results["fsdp"]["processes"] == 2
    assert results["none"]["sharding"] == "none" and results["none"]["processes"] == 2
    assert results["fsdp"]["perplexity"] == pytest.approx(results["none"]["perplexity"], rel=1e-3)

    fsdp = runs["fsdp"]
    assert (fsdp / "checkpoints" / "ckpt-00000004" / "sharded" / ".metadata").exists()
    weights = load_file(str(fsdp / "final" / "model.safetensors"))
    # same names as the unsharded model's (the tied decoder stored once), same values
    assert max_difference(weights, load_file(str(runs["none"] / "final" / "model.safetensors"))) <= 1e-5

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(fsdp / "final"))
    model = fill.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(fill(f"The cat sat on the {fill.tokenizer.mask_token}.", top_k=3)) == 3

    # Resume from the sharded step-2 checkpoint (of the run with the weight average, which changes no weight: its
    # weights are those of the run without it): the same command ends with the same weights ...
    assert max_difference(load_file(str(fsdp_runs["fsdp_ema"] / "final" / "model.safetensors")), weights) <= 1e-6
    resumed = fsdp_runs["fsdp_ema_resumed_on_2"]
    assert "resumed from" in fsdp_runs.output["fsdp_ema_resumed_on_2"]
    assert max_difference(load_file(str(resumed / "final" / "model.safetensors")), weights) <= 1e-6
    # ... and so does 3 processes x 4 blocks (the same global batch of 12) reading 2 processes' shards
    resumed = fsdp_runs["fsdp_ema_resumed_on_3"]
    assert "resumed from" in fsdp_runs.output["fsdp_ema_resumed_on_3"]
    assert max_difference(load_file(str(resumed / "final" / "model.safetensors")), weights) <= 1e-6
    # Run again, it is finished on every rank: all exit at once, none waits for the others in a process group
    again = fsdp_runs.copy("fsdp_ema_resumed_on_3", tmp_path / "again")
    proc = torchrun(fsdp_runs.args(again, "fsdp_ema_resumed_on_3"), tmp_path, 29545, processes=3)
    assert proc.stdout.count("already finished") == 3
