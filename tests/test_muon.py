"""optimizer=muon: which parameters Muon gets and which AdamW, the combined optimizer = torch's Muon + AdamW side by
side, its state_dict round trip, a tiny run that trains and resumes exactly, the step on FSDP2 shards."""

import io
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mlm.config import UserError
from mlm.optim import MuonWithAdamW, build_optimizer, param_groups
from tests.conftest import TINY_RUN, check_settings_as_run_py, compose


def tiny_model(overrides=()):
    from mlm.models import build_model

    cfg = compose([*TINY_RUN, "optimizer=muon", *overrides])
    cfg.optimizer.validate()
    return cfg, build_model(cfg.model, cfg.block_size, cfg.seed)[0]


def names_by_part(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    parts = {"muon": set(), "adamw": set()}
    for group in optimizer.param_groups:
        parts["muon" if "momentum" in group else "adamw"].update(names[id(p)] for p in group["params"])
    return parts


def test_encoder_layer_matrices_go_to_muon_everything_else_to_adamw():
    cfg, model = tiny_model()
    optimizer = build_optimizer(model, cfg.optimizer)
    parts = names_by_part(model, optimizer)
    kinds = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    assert parts["muon"] == {
        f"bert.encoder.layer.{i}.{'attention.self.' if k in kinds[:3] else ''}{k}.weight" for i in (0, 1) for k in kinds
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert parts["adamw"] == trainable - parts["muon"]  # every other parameter, each once
    assert {"bert.embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight"} <= parts["adamw"]
    muon_group, decayed, undecayed = optimizer.param_groups
    assert (muon_group["lr"], muon_group["momentum"], muon_group["adjust_lr_fn"]) == (
        cfg.optimizer.muon_lr,
        cfg.optimizer.muon_momentum,
        "match_rms_adamw",
    )
    # AdamW's groups are build_adamw's over the rest: its decay rules (matrices only), its rate, its kernel
    reference = param_groups(
        model, cfg.optimizer.weight_decay, cfg.optimizer.lr, skip=frozenset(map(id, muon_group["params"]))
    )
    assert [(g["lr"], g["weight_decay"], g["params"]) for g in (decayed, undecayed)] == [
        (g["lr"], g["weight_decay"], g["params"]) for g in reference
    ]
    assert muon_group["weight_decay"] == decayed["weight_decay"] == cfg.optimizer.weight_decay and decayed["fused"]


def test_frozen_layers_layer_rates_and_the_new_head_rate_apply_to_both_parts():
    overrides = ["model.freeze_layers=1", "optimizer.layer_lr_decay=0.5", "optimizer.new_head_lr_scale=3"]
    cfg, model = tiny_model(overrides)  # build_model freezes the embeddings and layer 0
    optimizer = build_optimizer(model, cfg.optimizer)
    parts = names_by_part(model, optimizer)
    assert not any(".layer.0." in n or "embeddings" in n for n in parts["muon"] | parts["adamw"])  # frozen: in neither
    muon_groups = [g for g in optimizer.param_groups if "momentum" in g]
    assert [g["lr"] for g in muon_groups] == [cfg.optimizer.muon_lr]  # only the top layer trains, at the top rate
    cfg, model = tiny_model(overrides[1:])
    optimizer = build_optimizer(model, cfg.optimizer)
    rates = {g["lr"] for g in optimizer.param_groups if "momentum" in g}
    assert rates == {cfg.optimizer.muon_lr, cfg.optimizer.muon_lr * 0.5}  # layer 1, then layer 0 at half
    assert max(g["lr"] for g in optimizer.param_groups if "momentum" not in g) == pytest.approx(cfg.optimizer.lr * 3)


def two_part_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def split_optimizers(model):
    """Muon for the two weight matrices, AdamW for biases and the norm: as torch's own two optimizers."""
    matrices = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    return muon, torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0, foreach=False)


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=gen) for _ in range(steps)]


def train_steps(model, optimizers, inputs):
    for x in inputs:
        for o in optimizers:
            o.zero_grad()
        model(x).square().mean().backward()
        for o in optimizers:
            o.step()


def test_the_combined_optimizer_steps_exactly_as_torchs_muon_and_adamw_side_by_side():
    ours, theirs = two_part_model(), two_part_model()
    train_steps(ours, [MuonWithAdamW(*split_optimizers(ours))], batches(4))
    train_steps(theirs, split_optimizers(theirs), batches(4))
    for a, b, before in zip(ours.parameters(), theirs.parameters(), two_part_model().parameters()):
        assert torch.equal(a, b) and not torch.equal(a, before)


def test_state_dict_round_trip_resumes_identically():
    history = batches(5)
    straight = two_part_model()
    train_steps(straight, [MuonWithAdamW(*split_optimizers(straight))], history)

    first = two_part_model()
    optimizer = MuonWithAdamW(*split_optimizers(first))
    train_steps(first, [optimizer], history[:3])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as mlm/parallel.py saves it
    buffer.seek(0)
    resumed = two_part_model(seed=5)
    resumed.load_state_dict(first.state_dict())
    again = MuonWithAdamW(*split_optimizers(resumed))
    again.load_state_dict(torch.load(buffer, weights_only=True))
    # the parts step with the loaded groups and state
    assert again.muon.param_groups[0] is again.param_groups[0] and again.muon.state is again.adamw.state is again.state
    assert float(again.adamw.state[resumed[1].weight]["step"]) == 3
    assert torch.equal(
        again.muon.state[resumed[0].weight]["momentum_buffer"], optimizer.state[first[0].weight]["momentum_buffer"]
    )
    train_steps(resumed, [again], history[3:])
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)  # bit for bit: momentum buffers, moments and step counts came back


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.muon_lr=0", r"optimizer.muon_lr=0.0 must be positive"),
        ("optimizer.muon_momentum=1", r"optimizer.muon_momentum=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_muon_settings_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        compose(["optimizer=muon", override]).validate()


# fp32, dropout off; checkpoints every 6 steps of 12
RUN = [
    *TINY_RUN,
    "optimizer=muon",
    "optimizer.lr=3e-3",
    "optimizer.muon_lr=3e-3",
    "runtime.mixed_precision=no",
    "model.dropout=0",
    "trainer.max_steps=12",
    "trainer.checkpoint_every=6",
    "trainer.eval_every=12",
    "trainer.log_every=1",
]


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_a_tiny_run_trains_and_resumes_exactly(corpus, tmp_path):
    from mlm.train import train

    cfg = compose([*RUN, f"dataset.path={corpus}"])
    reference = tmp_path / "ref"
    train(cfg, reference)
    losses = train_losses(reference)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # ln(vocab) ~ 10.3 at the start; it learns
    results = json.loads((reference / "results.json").read_text())
    assert results["config"]["optimizer.name"] == "muon"

    # what a kill after step 6's checkpoint leaves; the rerun resumes there and ends bit for bit where it did
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "ckpt-00000012")
    shutil.rmtree(run_dir / "final")
    (run_dir / "results.json").unlink()
    check_settings_as_run_py(cfg, run_dir)
    train(cfg, run_dir)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "results.json").read_text())["perplexity"] == results["perplexity"]
    assert train_losses(run_dir) == losses


SHARDED_STEP = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

dist.init_process_group("gloo")
mesh, bfloat16 = init_device_mesh("cpu", (2,)), torch.Tensor.bfloat16
for precision in ("fp32", "bf16"):
    # fp32: Newton-Schulz in fp32 instead of torch's bf16: the rounding aside, is the step the same?
    torch.Tensor.bfloat16 = torch.Tensor.float if precision == "fp32" else bfloat16
    worst = 0.0
    for shape in [(64, 32), (32, 64), (33, 16)]:  # tall, wide, and rows that do not split evenly
        gen = torch.Generator().manual_seed(0)
        start, grads = torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(3)]
        whole = torch.nn.Parameter(start.clone())
        shards = torch.nn.Parameter(distribute_tensor(start, mesh, [Shard(0)]))
        for p in (whole, shards):
            muon = torch.optim.Muon([p], lr=0.02, adjust_lr_fn="match_rms_adamw")
            for g in grads:
                p.grad = g.clone() if p is whole else distribute_tensor(g, mesh, [Shard(0)])
                muon.step()
        moved = (whole.detach() - start).abs().max()
        worst = max(worst, float((shards.detach().full_tensor() - whole.detach()).abs().max() / moved))
    if dist.get_rank() == 0:
        print(f"worst {precision} {worst}")
"""


@pytest.mark.slow
def test_torchs_muon_on_fsdp_shards_takes_the_whole_matrixs_step(tmp_path):
    """FSDP2 hands Muon DTensor shards: each product gathers what it needs, so the step is the whole matrix's, not
    one per shard; in bf16 (torch's Newton-Schulz) the sums over shards round otherwise. Both precisions in one
    launch of 2 processes."""
    import subprocess

    from tests.conftest import ROOT, torchrun_command

    script = tmp_path / "sharded_step.py"
    script.write_text(SHARDED_STEP)
    cmd = torchrun_command(29575)
    cmd[cmd.index(str(ROOT / "run.py"))] = str(script)  # torchrun runs this script instead
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = {line.split()[1]: float(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("worst ")}
    assert worst.keys() == {"fp32", "bf16"}, proc.stdout[-3000:]
    assert worst["fp32"] < 1e-5  # the same step (relative to the largest move)
    assert worst["bf16"] < 0.05  # rounding: orthogonalising each shard on its own lands ~25% of a move away


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_and_resumes_exactly(tmp_path):
    """2 CPU processes: FSDP2 ends where DDP does up to the bf16 rounding of the test above; its resume is exact."""
    from tests.test_ema import start_weights
    from tests.test_sharding import ddp_and_fsdp_weights, drop_last_checkpoint, max_difference, run_args, torchrun

    extra = [
        "optimizer=muon",
        "optimizer.muon_adjust_lr=match_rms_adamw",
        "optimizer.muon_lr=3e-3",
        "optimizer.lr=3e-3",
    ]
    corpus, weights = ddp_and_fsdp_weights(tmp_path, extra, 29571)
    start = start_weights(compose([*TINY_RUN, f"dataset.path={corpus}", "model.dropout=0", *extra]))
    moved = max_difference({k: weights["none"][k] for k in start}, start)
    # the bf16 rounding of the test above, 4 steps on: 7.7e-4 where the largest move is 7.5e-3
    assert max_difference(weights["fsdp"], weights["none"]) <= 0.15 * moved
    ppl = {k: json.loads((tmp_path / k / "results.json").read_text())["perplexity"] for k in weights}
    assert ppl["fsdp"] == pytest.approx(ppl["none"], rel=1e-3)
    fsdp = tmp_path / "fsdp"
    drop_last_checkpoint(fsdp)  # resumed from the sharded step-2 checkpoint: the same weights
    proc = torchrun([*run_args(corpus, fsdp, "fsdp"), *extra], tmp_path, 29573)
    assert "resumed from" in proc.stdout + proc.stderr
    assert max_difference(load_file(str(fsdp / "final" / "model.safetensors")), weights["fsdp"]) == 0
