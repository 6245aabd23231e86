"""dataset.document_attention: blocks that know where their documents start, and a model that attends within each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_RUN, compose, run_in_process, sentences


def _dataset_cfg(path, document_attention: bool, **extra):
    from mlm.config import DatasetConfig

    return DatasetConfig(kind="local", path=str(path), document_attention=document_attention, remainder="keep", **extra)


@pytest.fixture(scope="module")
def two_way_blocks(tokenizer, tmp_path_factory):
    """The same small corpus as blocks of 48 without and with document positions (remainder=keep: a padded last block)."""
    from mlm.data.blocks import build_blocks

    path = tmp_path_factory.mktemp("docs") / "c.txt"
    path.write_text("\n".join(sentences(40, seed=3)))
    cache = str(tmp_path_factory.mktemp("cache"))
    return {on: build_blocks(_dataset_cfg(path, on), tokenizer, 48, cache) for on in (False, True)}


def test_blocks_keep_the_same_tokens_and_mark_where_each_document_starts(two_way_blocks, tokenizer):
    off, on = two_way_blocks[False], two_way_blocks[True]
    assert off["train"].column_names == ["input_ids"]  # off: the blocks as they were
    for split in ("train", "test"):
        ids = np.array(on[split]["input_ids"])
        assert np.array_equal(ids, np.array(off[split]["input_ids"]))
        positions = np.array(on[split]["document_positions"])
        # a document starts at each [CLS] and where the block starts; it counts up from there; a pad is a document alone
        starts = (ids == tokenizer.cls_token_id) | (ids == tokenizer.pad_token_id)
        starts[:, 0] = True
        assert np.array_equal(positions == 0, starts)
        assert np.all((positions[:, 1:] == positions[:, :-1] + 1) | starts[:, 1:])
    assert (np.array(on["test"]["input_ids"])[-1] == tokenizer.pad_token_id).any()  # the padded case is covered


def test_the_cache_key_changes_with_the_setting(tmp_path, tokenizer):
    from mlm.data import blocks

    (tmp_path / "c.txt").write_text("\n".join(sentences(4)))
    off, on = _dataset_cfg(tmp_path / "c.txt", False), _dataset_cfg(tmp_path / "c.txt", True)
    key_off, key_on = (blocks._cache_key(c, tokenizer, 48, str(tmp_path)) for c in (off, on))
    assert key_off != key_on  # off keeps main's key: checked by hand (docs/data.md), it holds no copy of main's formula


def _tiny_model(model_type: str):
    from mlm.models import build_model

    overrides = ["model=tiny", f"model.arch.model_type={model_type}"]
    if model_type == "roberta":  # RoBERTa's positions start after its padding_idx: the table needs 2 more rows
        overrides.append("model.arch.max_position_embeddings=514")
    cfg = compose(overrides)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 48, seed=0)
    return model.eval()


def _logits_seen_by_the_loss(objective, batch, monkeypatch) -> torch.Tensor:
    """The vocabulary logits MLMObjective scores (its own forward, sparse or dense), as the loss receives them."""
    import torch.nn.functional as F

    seen, cross_entropy = [], F.cross_entropy
    monkeypatch.setattr(
        F, "cross_entropy", lambda logits, *a, **k: seen.append(logits) or cross_entropy(logits, *a, **k)
    )
    with torch.no_grad():
        objective(**batch)
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    return seen[0]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("sparse", [True, False])
def test_a_block_of_several_documents_gives_the_logits_of_each_document_run_alone(
    two_way_blocks, tokenizer, model_type, sparse, monkeypatch
):
    """The eval split's blocks through the harness's collator and MLMObjective equal each document's piece run as its
    own sequence (the model's own positions, no mask), masked position by masked position, in fp32."""
    from mlm.batching import IndexedBlocks
    from mlm.config import MaskingConfig
    from mlm.masking import EVAL_STREAM, MLMCollator
    from mlm.models import MLMObjective

    model = _tiny_model(model_type)
    objective = MLMObjective(model, sparse=sparse)
    blocks = two_way_blocks[True]["test"]
    collate = MLMCollator(tokenizer, MaskingConfig(), seed=0, stream=EVAL_STREAM)
    batch = collate(IndexedBlocks(blocks).__getitems__(list(range(len(blocks)))))
    assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() > 2 * len(blocks)  # several documents
    packed = _logits_seen_by_the_loss(objective, batch, monkeypatch)

    alone = []
    for row in range(len(blocks)):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for lo, hi in zip(starts, starts[1:]):
            piece = {key: batch[key][row : row + 1, lo:hi] for key in ("input_ids", "labels")}
            if (piece["labels"] != -100).any():  # a pad has no label: only pieces with masked tokens are scored
                alone.append(_logits_seen_by_the_loss(objective, piece, monkeypatch))
    alone = torch.cat(alone)
    assert packed.shape == alone.shape and packed.shape[0] > 10
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # and without it the documents do see each other: the test can tell
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    assert not torch.allclose(_logits_seen_by_the_loss(objective, plain, monkeypatch), alone, atol=1e-3)


def test_masking_does_not_change_with_the_setting(two_way_blocks, tokenizer):
    from mlm.batching import IndexedBlocks
    from mlm.config import MaskingConfig
    from mlm.masking import MLMCollator

    collate = MLMCollator(tokenizer, MaskingConfig(strategy="whole_word"), seed=5, stream=2)
    rows = list(range(len(two_way_blocks[False]["train"])))
    off, on = (collate(IndexedBlocks(two_way_blocks[k]["train"]).__getitems__(rows)) for k in (False, True))
    for key in ("input_ids", "labels", "masked_positions"):
        assert torch.equal(off[key], on[key])


def test_eager_attention_gives_the_logits_of_sdpa(two_way_blocks, tokenizer, monkeypatch):
    from mlm.batching import IndexedBlocks
    from mlm.config import MaskingConfig
    from mlm.masking import MLMCollator
    from mlm.models import MLMObjective

    model = _tiny_model("bert")
    batch = MLMCollator(tokenizer, MaskingConfig(), seed=0)(
        IndexedBlocks(two_way_blocks[True]["test"]).__getitems__([0])
    )
    sdpa = _logits_seen_by_the_loss(MLMObjective(model, sparse=True), batch, monkeypatch)
    model.config._attn_implementation = "eager"
    eager = _logits_seen_by_the_loss(MLMObjective(model, sparse=True), batch, monkeypatch)
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_streaming_and_unsupported_models_are_refused_in_one_line():
    from mlm.config import UserError
    from mlm.models import check_document_attention

    with pytest.raises(UserError, match="dataset.document_attention=true is not built for dataset.streaming=true"):
        compose(["dataset.document_attention=true", "dataset.streaming=true"]).validate()
    model = _tiny_model("bert")
    model.config.model_type = "modernbert"
    with pytest.raises(UserError, match="not built for model_type=modernbert"):
        check_document_attention(model)
    model.config.model_type = "bert"
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="model.attn_implementation=sdpa or eager"):
        check_document_attention(model)


@pytest.mark.slow
def test_a_run_trains_with_it_and_refuses_a_resume_with_it_changed(tmp_path, corpus):
    run = [*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={tmp_path}", "trainer.max_steps=4"]
    proc = run_in_process([*run, "dataset.document_attention=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_in_process([*run, "trainer.max_steps=6"])
    assert proc.returncode == 2
    assert "dataset.document_attention=True there, False now" in proc.stderr
