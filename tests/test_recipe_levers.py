"""The recipe levers a fine-tune can choose (head init, head learning rate, layer-wise rates, frozen
layers) and the host-memory switch: each does what its option says."""

import math

import numpy as np
import pytest
import torch

from mlm.config import MaskingConfig, UserError
from mlm.masking import MLMCollator
from mlm.models import (
    MLMObjective,
    build_model,
    encoder_layers,
    head_parameters,
    init_unigram_bias,
    new_head_parameters,
)
from mlm.optim import build_optimizer
from tests.conftest import TINY_RUN, compose


def batch_of(tokenizer, seed: int = 0, rows: int = 8, length: int = 64):
    ids = np.random.default_rng(seed).integers(1000, 20000, (rows, length))
    return MLMCollator(tokenizer, MaskingConfig(), seed=0, stream=seed)({"input_ids": ids, "index": np.arange(rows)})


def one_step(objective, optimizer, batch):
    loss, n, _ = objective(**batch)
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


# ---------------------------------------------------------------- head initialisation


def test_identity_transform_changes_only_the_new_head():
    """The packaged MiniLM has no MLM head: its transform starts as the identity, pretrained weights untouched."""
    plain, _ = build_model(compose(["model.head_transform_init=random"]).model, 128, seed=0)
    model, _ = build_model(compose(["model.head_transform_init=identity"]).model, 128, seed=0)
    dense = model.cls.predictions.transform.dense
    assert torch.equal(dense.weight, torch.eye(dense.in_features)) and not dense.bias.any()
    assert not torch.equal(plain.cls.predictions.transform.dense.weight, dense.weight)
    new = set(new_head_parameters(model))
    assert "cls.predictions.transform.dense.weight" in new and not any(n.startswith("bert.") for n in new)
    for name, p in plain.base_model.named_parameters():  # the pretrained encoder is the same either way
        assert torch.equal(p, model.base_model.get_parameter(name)), name


def test_the_new_head_recipe_is_the_default_experiment_and_model_changes_only_the_model():
    default, other_model, plain = compose(), compose(["model=distilroberta"]), compose(["experiment=none"])
    assert (default.model.head_transform_init, default.model.head_bias_init) == ("identity", "unigram")
    assert default.masking.train_probability > default.masking.mlm_probability == 0.15
    assert (
        other_model.model.head_transform_init,
        other_model.model.head_bias_init,
        other_model.masking.train_probability,
        other_model.optimizer.new_head_lr_scale,
    ) == ("identity", "unigram", 0.3, 10)
    assert (
        other_model.model.name_or_path == "distilbert/distilroberta-base" and other_model.optimizer == default.optimizer
    )
    assert (plain.model.head_transform_init, plain.model.head_bias_init, plain.masking.train_probability) == (
        "random",
        "zero",
        None,
    )
    assert plain.optimizer.new_head_lr_scale == 1.0 < default.optimizer.new_head_lr_scale


def test_unigram_bias_is_the_smoothed_log_frequency():
    model, tokenizer = build_model(compose(["model=tiny"]).model, 64, seed=0)
    vocab = model.config.vocab_size
    counts = torch.zeros(vocab, dtype=torch.int64)
    counts[1000], counts[1001], counts[tokenizer.cls_token_id] = 30, 10, 50
    init_unigram_bias(model, counts, tokenizer.all_special_ids)
    bias = model.cls.predictions.bias
    total = 40 + vocab  # special tokens count 0, every token gets +1
    assert bias[1000].item() == pytest.approx(math.log(31 / total), rel=1e-6)
    assert bias[1001].item() == pytest.approx(math.log(11 / total), rel=1e-6)
    assert bias[tokenizer.cls_token_id].item() == pytest.approx(math.log(1 / total), rel=1e-6)
    assert torch.exp(bias.double()).sum().item() == pytest.approx(1.0, rel=1e-6)


def test_unigram_bias_leaves_a_pretrained_head_alone():
    model, tokenizer = build_model(compose(["model=tiny"]).model, 64, seed=0)
    model.mlm_new_weights = frozenset()  # as if every weight came from a checkpoint
    before = model.cls.predictions.bias.detach().clone()
    init_unigram_bias(model, torch.ones(10), tokenizer.all_special_ids)
    assert torch.equal(model.cls.predictions.bias, before)


def test_unigram_bias_lowers_the_starting_perplexity(corpus, tmp_path):
    """Run end to end: the eval before training sees the corpus's frequencies instead of a uniform guess."""
    from mlm.train import train

    before = {}
    for init in ("zero", "unigram"):
        args = [*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=2", f"model.head_bias_init={init}"]
        before[init] = train(compose([*args, "trainer.save_model=false"]), tmp_path / init)["perplexity_before"]
    # the tiny corpus has ~90 distinct words: a unigram guess is far better than ~1/30522
    assert before["unigram"] < before["zero"] / 20


# ---------------------------------------------------------------- head learning rate, layer-wise rates, frozen layers


def test_new_head_lr_scale_puts_the_head_in_its_own_groups():
    cfg = compose(["model=tiny", "optimizer.new_head_lr_scale=10", "optimizer.lr=1e-3"])
    model, _ = build_model(cfg.model, 64, seed=0)
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    head = {id(p) for p in head_parameters(model).values()}
    assert head and model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert id(model.get_input_embeddings().weight) not in head  # the tied decoder is the encoder's table
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head or not ids & head
        assert group["lr"] == pytest.approx(1e-2 if ids <= head else 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in objective.parameters() if p.requires_grad
    )
    model.mlm_new_weights = frozenset()  # a head that came with the checkpoint keeps the encoder's rate
    assert {g["lr"] for g in build_optimizer(MLMObjective(model, sparse=True), cfg.optimizer).param_groups} == {1e-3}


def test_param_group_order_is_what_checkpoints_were_saved_with():
    """A checkpoint's optimizer state lists its groups in order: the encoder's rate first (decayed, then
    not), then the new head's; layer_lr_decay=1 must leave that as it was before the option existed."""
    cfg = compose(["model=tiny", "optimizer.new_head_lr_scale=10", "optimizer.lr=1e-3", "optimizer.weight_decay=0.01"])
    model, _ = build_model(cfg.model, 64, seed=0)
    groups = build_optimizer(MLMObjective(model, sparse=True), cfg.optimizer).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0), (1e-2, 0.01), (1e-2, 0.0)]


def test_layer_lr_decay_moves_each_layer_at_its_own_rate(tokenizer):
    """Adam's first step moves a weight by about its group's rate (|g| >> eps, so eps is tiny here): the top layer by lr,
    the layer below by lr * decay, the embeddings (the tied table too) by lr * decay^2; the new head keeps its scale."""
    cfg = compose(
        [
            "model=tiny",
            "model.dropout=0",
            "optimizer.lr=1e-3",
            "optimizer.weight_decay=0",
            "optimizer.layer_lr_decay=0.5",
            "optimizer.new_head_lr_scale=4",
            "optimizer.eps=1e-12",
        ]
    )
    model, _ = build_model(cfg.model, 64, seed=0)
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in objective.parameters() if p.requires_grad
    )
    before = snapshot(model)
    loss, n, _ = objective(**batch_of(tokenizer))
    (loss / n).backward()
    largest_grad = {name: p.grad.abs().max().item() for name, p in model.named_parameters()}
    optimizer.step()

    assert len(encoder_layers(model)) == 2
    rates = {"bert.encoder.layer.1.": 1e-3, "bert.encoder.layer.0.": 5e-4, "bert.embeddings.": 2.5e-4, "cls.": 4e-3}
    moved = [
        name for name, g in largest_grad.items() if g > 1e-8
    ]  # attention key biases get none (softmax shift invariance)
    assert len(moved) >= len(largest_grad) - 2
    for name in moved:  # every tensor with a gradient: its largest move is its rate
        rate = next(r for prefix, r in rates.items() if name.startswith(prefix))
        assert (model.get_parameter(name) - before[name]).abs().max().item() == pytest.approx(rate, rel=0.02), name
    with pytest.raises(UserError, match="layer_lr_decay"):
        compose(["optimizer.layer_lr_decay=0"]).validate()


def test_frozen_layers_skip_their_backward(tokenizer):
    cfg = compose(["model=tiny", "model.dropout=0", "model.freeze_layers=1"])
    model, _ = build_model(cfg.model, 64, seed=0)
    layers = encoder_layers(model)
    assert not any(p.requires_grad for p in layers[0].parameters()) and all(
        p.requires_grad for p in layers[1].parameters()
    )
    seen = []
    layers[1].register_forward_hook(lambda m, args, out: seen.append(args[0].requires_grad))
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    before = snapshot(model)
    one_step(objective, optimizer, batch_of(tokenizer))
    assert seen == [False]  # the first trainable layer's input carries no graph: nothing below it runs backward
    after = snapshot(model)
    assert all(
        torch.equal(before[k], after[k]) for k in before if k.startswith(("bert.encoder.layer.0.", "bert.embeddings."))
    )
    assert not torch.equal(
        before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"]
    )


def test_freezing_every_layer_is_refused():
    with pytest.raises(UserError, match="would freeze all 2 encoder layers"):
        build_model(compose(["model=tiny", "model.freeze_layers=2"]).model, 64, seed=0)


FAULTS_SCRIPT = """
import resource, sys, torch
from mlm.allocator import reuse_host_memory
if sys.argv[1] == "on":
    assert reuse_host_memory()
faults = []
for k in range(5):  # later (slightly smaller) tensors reuse what earlier ones freed, or fault in fresh pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones((50_000_000 - k * 1_000_000) // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


def test_reuse_host_memory_stops_fresh_pages_per_step():
    """A ~50 MB tensor allocated again after a free: ~12k page faults every time with glibc's defaults, none with reuse.

    The sizes shrink a little each round, as tensor sizes vary in training: glibc's aligned
    allocation of exactly the size just freed asks for a few bytes more than the freed chunk and
    may grow the heap instead of reusing it (seen here in about half the runs with equal sizes)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for mode in ("off", "on")
    }
    assert faults["off"] > 10_000 and faults["on"] < 1_000, faults
