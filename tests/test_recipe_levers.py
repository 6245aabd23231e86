"""The first-run recipe levers (head init, head learning rate, head-only steps, frozen layers) and
the CPU speed switches (sparse embedding gradient, fast dropout): each does what its option says."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mlm.config import MaskingConfig, UserError
from mlm.dropout import FastDropout, fast_dropout, keep_mask, use_fast_dropout
from mlm.masking import MLMCollator
from mlm.models import (MLMObjective, build_model, encoder_layers, head_parameters, init_unigram_bias, new_head_parameters,
                        untie_decoder)
from mlm.optim import build_optimizer
from tests.conftest import TINY_RUN, compose, run_cli, sentences


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


def test_the_new_head_recipe_comes_with_the_default_model_only():
    default, guide = compose(), compose(["model=distilroberta"])
    assert (default.model.head_transform_init, default.model.head_bias_init) == ("identity", "unigram")
    assert default.masking.train_probability > default.masking.mlm_probability == 0.15
    assert (guide.model.head_transform_init, guide.model.head_bias_init, guide.masking.train_probability) == ("random", "zero", None)
    assert guide.optimizer.new_head_lr_scale == 1.0 < default.optimizer.new_head_lr_scale


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


def test_unigram_bias_refuses_a_pretrained_head():
    model, tokenizer = build_model(compose(["model=tiny"]).model, 64, seed=0)
    model.mlm_new_weights = frozenset()  # as if every weight came from a checkpoint
    with pytest.raises(UserError, match="no new output bias"):
        init_unigram_bias(model, torch.ones(10), tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(sentences(400)))
    return path


def test_unigram_bias_lowers_the_starting_perplexity(corpus, tmp_path):
    """Run end to end: the eval before training sees the corpus's frequencies instead of a uniform guess."""
    before = {}
    for init in ("zero", "unigram"):
        run_dir = tmp_path / init
        proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}", "trainer.max_steps=2",
                        f"model.head_bias_init={init}", "trainer.save_model=false"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        before[init] = json.loads((run_dir / "results.json").read_text())["perplexity_before"]
    # the tiny corpus has ~90 distinct words: a unigram guess is far better than ~1/30522
    assert before["unigram"] < before["zero"] / 20


# ---------------------------------------------------------------- head learning rate, head-only steps, frozen layers


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
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in objective.parameters() if p.requires_grad)
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
    cfg = compose(["model=tiny", "model.dropout=0", "optimizer.lr=1e-3", "optimizer.weight_decay=0",
                   "optimizer.layer_lr_decay=0.5", "optimizer.new_head_lr_scale=4", "optimizer.eps=1e-12"])
    model, _ = build_model(cfg.model, 64, seed=0)
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in objective.parameters() if p.requires_grad)
    before = snapshot(model)
    loss, n, _ = objective(**batch_of(tokenizer))
    (loss / n).backward()
    largest_grad = {name: p.grad.abs().max().item() for name, p in model.named_parameters()}
    optimizer.step()

    assert len(encoder_layers(model)) == 2
    rates = {"bert.encoder.layer.1.": 1e-3, "bert.encoder.layer.0.": 5e-4, "bert.embeddings.": 2.5e-4, "cls.": 4e-3}
    moved = [name for name, g in largest_grad.items() if g > 1e-8]  # attention key biases get none (softmax shift invariance)
    assert len(moved) >= len(largest_grad) - 2
    for name in moved:  # every tensor with a gradient: its largest move is its rate
        rate = next(r for prefix, r in rates.items() if name.startswith(prefix))
        assert (model.get_parameter(name) - before[name]).abs().max().item() == pytest.approx(rate, rel=0.02), name
    with pytest.raises(UserError, match="layer_lr_decay"):
        compose(["optimizer.layer_lr_decay=0"]).validate()


def test_head_only_step_updates_the_head_alone(tokenizer):
    cfg = compose(["model=tiny", "model.dropout=0"])
    model, _ = build_model(cfg.model, 64, seed=0)
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    head = set(head_parameters(model))
    before = snapshot(model)
    objective.set_head_only(True)
    loss, n, _ = objective(**batch_of(tokenizer))
    (loss / n).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name not in head)  # no encoder backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)
    assert all(not torch.equal(before[k], after[k]) for k in head)
    objective.set_head_only(False)  # the next step trains everything
    one_step(objective, optimizer, batch_of(tokenizer, seed=1))
    for name in ("bert.encoder.layer.0.output.dense.weight", "bert.embeddings.word_embeddings.weight"):
        assert not torch.equal(after[name], model.get_parameter(name)), name


def test_head_only_steps_in_a_run(corpus, tmp_path):
    proc = run_cli([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={tmp_path}", "trainer.max_steps=4",
                    "trainer.head_only_steps=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=5", "trainer.save_model=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    weights = {s: load_file(str(tmp_path / "checkpoints" / f"ckpt-{s:08d}" / "model.safetensors")) for s in (1, 2, 3)}
    layer = "bert.encoder.layer.1.output.dense.weight"
    head = "cls.predictions.transform.dense.weight"
    assert torch.equal(weights[1][layer], weights[2][layer])  # steps 1-2: the encoder waits
    assert not torch.equal(weights[1][head], weights[2][head])  # ... and the head learns
    assert not torch.equal(weights[2][layer], weights[3][layer])  # step 3 trains everything


def test_untied_decoder_trains_apart_from_the_frozen_table(tokenizer, tmp_path):
    from transformers import AutoModelForMaskedLM

    cfg = compose(["model=tiny", "model.dropout=0", "model.freeze_embeddings=true", "model.untie_decoder=true"])
    plain, _ = build_model(compose(["model=tiny", "model.dropout=0"]).model, 64, seed=0)
    model, _ = build_model(cfg.model, 64, seed=0)
    table, decoder = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert decoder is not table and torch.equal(decoder, table) and decoder.requires_grad and not table.requires_grad
    assert "cls.predictions.decoder.weight" in head_parameters(model)
    batch = batch_of(tokenizer)
    plain.eval(), model.eval()
    with torch.no_grad():  # the copy starts where the tied projection was: same predictions
        assert torch.equal(MLMObjective(plain, sparse=True)(**batch)[0], MLMObjective(model, sparse=True)(**batch)[0])
    model.train()
    objective = MLMObjective(model, sparse=True)
    table_before, decoder_before = table.detach().clone(), decoder.detach().clone()
    one_step(objective, build_optimizer(objective, cfg.optimizer), batch)
    assert torch.equal(table, table_before) and not torch.equal(decoder, decoder_before)
    model.save_pretrained(tmp_path)  # both tables are saved and reload untied, the output bias still tied
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, loaded(input_ids=batch["input_ids"]).logits)
    with pytest.raises(UserError, match="not tied to its word embeddings"):
        untie_decoder(model)


def test_frozen_layers_skip_their_backward(tokenizer):
    cfg = compose(["model=tiny", "model.dropout=0", "model.freeze_layers=1"])
    model, _ = build_model(cfg.model, 64, seed=0)
    layers = encoder_layers(model)
    assert not any(p.requires_grad for p in layers[0].parameters()) and all(p.requires_grad for p in layers[1].parameters())
    seen = []
    layers[1].register_forward_hook(lambda m, args, out: seen.append(args[0].requires_grad))
    objective = MLMObjective(model, sparse=True)
    optimizer = build_optimizer(objective, cfg.optimizer)
    before = snapshot(model)
    one_step(objective, optimizer, batch_of(tokenizer))
    assert seen == [False]  # the first trainable layer's input carries no graph: nothing below it runs backward
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("bert.encoder.layer.0.", "bert.embeddings.")))
    assert not torch.equal(before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"])


def test_freezing_every_layer_is_refused():
    with pytest.raises(UserError, match="would freeze all 2 encoder layers"):
        build_model(compose(["model=tiny", "model.freeze_layers=2"]).model, 64, seed=0)


# ---------------------------------------------------------------- speed switches


def test_fast_dropout_drops_at_the_rate_and_scales():
    torch.manual_seed(0)
    x = torch.ones(1 << 20, requires_grad=True)
    y = fast_dropout(x, 0.1, training=True)
    dropped = (y == 0).double().mean().item()
    assert dropped == pytest.approx(round(0.1 * 65536) / 65536, abs=3 * math.sqrt(0.1 * 0.9 / (1 << 20)))
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the same mask and scale flow back
    for lane in keep_mask((1 << 20,), 0.5, "cpu").view(-1, 4).T:  # each 16-bit lane of a draw is uniform
        assert lane.double().mean().item() == pytest.approx(0.5, abs=0.005)
    assert torch.equal(fast_dropout(x, 0.1, training=False), x)


def test_fast_dropout_follows_the_seed():
    torch.manual_seed(3)
    a = keep_mask((64, 33), 0.1, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((64, 33), 0.1, "cpu"))
    assert not torch.equal(a, keep_mask((64, 33), 0.1, "cpu"))


def test_fast_dropout_swaps_every_dropout_module(tokenizer):
    model, _ = build_model(compose(["model=tiny", "model.dropout=0.1"]).model, 64, seed=0)
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == plain > 0
    assert all(type(m) is not nn.Dropout for m in model.modules())
    objective = MLMObjective(model, sparse=True)
    objective.train()
    torch.manual_seed(0)
    a = objective(**batch_of(tokenizer))[0]
    torch.manual_seed(0)
    assert torch.equal(a, objective(**batch_of(tokenizer))[0])  # reproducible from the seed
    b = objective(**batch_of(tokenizer))[0]
    assert not torch.equal(a, b)  # and really random
    objective.eval()
    assert torch.equal(objective(**batch_of(tokenizer))[0], objective(**batch_of(tokenizer))[0])
    assert isinstance(next(m for m in model.modules() if isinstance(m, nn.Dropout)), FastDropout)


def test_keep_layers_reads_a_lower_layer(tokenizer):
    full, _ = build_model(compose(["model=tiny", "model.dropout=0"]).model, 64, seed=0)
    cut, _ = build_model(compose(["model=tiny", "model.dropout=0", "model.keep_layers=1"]).model, 64, seed=0)
    assert len(encoder_layers(cut)) == cut.config.num_hidden_layers == 1
    ids = batch_of(tokenizer)["input_ids"]
    full.eval(), cut.eval()
    with torch.no_grad():
        below = full.base_model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(cut.base_model(input_ids=ids).last_hidden_state, below)
    with pytest.raises(UserError, match="only 2 encoder layers"):
        build_model(compose(["model=tiny", "model.keep_layers=3"]).model, 64, seed=0)


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

    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("off", "on")}
    assert faults["off"] > 10_000 and faults["on"] < 1_000, faults
