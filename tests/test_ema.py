"""The weight average (trainer.ema_decay): its update rule, its evals, final_ema/, and exact resume, replicated and sharded.

The reference for the average's values is the plain formula ema = d * ema + (1 - d) * w in float64,
applied to the start weights (built again from the seed) and to the weights every checkpoint holds."""

import json
import logging
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file, load_model

from mlm.config import UserError
from mlm.ema import WeightAverage, weight_average
from mlm.parallel import Replicated
from tests.conftest import TINY_RUN, compose, run_cli, run_in_process

DECAY = 0.9
# fp32 without dropout noise mattering for the formula; a checkpoint after every step, evals at 0, 2 and 3
RUN = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    f"trainer.ema_decay={DECAY}",
    "trainer.max_steps=3",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=5",
]
TIMING = ("perf/",)


# 1. The update rule and the swap, on tensors small enough to compute by hand


def toy_model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([4.0, -2.0]))
    model.frozen = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)
    model.a = torch.nn.Linear(2, 2, bias=False)
    model.b = torch.nn.Linear(2, 2, bias=False)
    model.b.weight = model.a.weight  # tied, as a decoder is to the word embeddings
    return model


def test_update_rule_matches_a_hand_computation():
    model = toy_model()
    ema = WeightAverage(model, decay=0.75)
    assert ema.names == ["w", "a.weight"]  # trainable only, a tied weight once
    # decay 0.75: ema = 0.75 * ema + 0.25 * w; every value below is exact in binary
    for weights, expected in (
        ([8.0, 2.0], [5.0, -1.0]),
        ([0.0, -4.0], [3.75, -1.75]),
        ([16.0, 0.0], [6.8125, -1.3125]),
    ):
        with torch.no_grad():
            model.w.copy_(torch.tensor(weights))
        ema.update()
        assert ema.state_dict()["w"].tolist() == expected
    assert ema.state_dict()["w"].dtype == torch.float32
    assert set(ema.state_dict()) == {"w", "a.weight"}


def test_the_swap_exchanges_weights_and_average_and_restores_both_bit_for_bit():
    model = toy_model()
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 1.0 / 3]))
        model.a.weight.mul_(3.0)
    ema.update()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = {n: t.clone() for n, t in ema.state_dict().items()}
    with ema.swapped_in(Replicated()):
        assert torch.equal(model.w, average["w"]) and torch.equal(model.b.weight, average["a.weight"])
        assert torch.equal(model.frozen, weights["frozen"])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(ema.state_dict()[n], average[n]) for n in average)
    with pytest.raises(RuntimeError, match="mid-eval"), ema.swapped_in(Replicated()):  # an error inside swaps back too
        raise RuntimeError("mid-eval")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_off_is_none_and_a_decay_too_slow_for_the_run_warns(caplog):
    assert weight_average(toy_model(), 0.0, 100) is None
    with caplog.at_level(logging.WARNING, logger="mlm.ema"):
        weight_average(toy_model(), 0.9, 1000)
        assert not caplog.records  # 0.9 ** 1000: the start weights are forgotten
        weight_average(toy_model(), 0.999, 100)
    assert (
        "start weights still make up 90% of the average" in caplog.text
        and "lower trainer.ema_decay to 0.97 or less" in caplog.text
    )


def test_a_saved_average_of_other_parameters_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mlm.parallel import Piece

    ema = WeightAverage(toy_model(), decay=0.5)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ema.safetensors"))
    with pytest.raises(
        UserError, match=r"its ema does not fit the one built here \(missing \['a.weight'\], unexpected"
    ):
        Replicated().load(tmp_path, {"ema": Piece(ema, "layout")}, "cpu")


# 2. End to end: evals, results.json, final_ema/, against the formula over the checkpointed weights


def trainable(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def start_weights(cfg) -> Dict[str, torch.Tensor]:
    """The weights a run starts from, built again from its config and seed."""
    from mlm.models import build_model

    return trainable(build_model(cfg.model, cfg.block_size, cfg.seed)[0])


def checkpoint_weights(cfg, ckpt: Path) -> Dict[str, torch.Tensor]:
    from mlm.models import build_model

    model = build_model(cfg.model, cfg.block_size, cfg.seed)[0]
    load_model(model, str(ckpt / "model.safetensors"), strict=False)  # the tied decoder is stored once
    return trainable(model)


def formula(
    start: Dict[str, torch.Tensor], updates: List[Dict[str, torch.Tensor]], decay: float
) -> Dict[str, torch.Tensor]:
    ema = {k: v.double() for k, v in start.items()}
    for weights in updates:
        ema = {k: decay * ema[k] + (1 - decay) * weights[k].double() for k in ema}
    return ema


def assert_matches(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert set(expected) <= set(actual)
    for k in expected:
        torch.testing.assert_close(actual[k].double(), expected[k], rtol=1e-6, atol=1e-7, msg=k)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{step:08d}"


def records(run_dir: Path):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same 3-step run with the average (ema) and without it (plain)."""
    from mlm.train import train

    root = tmp_path_factory.mktemp("ema")
    for name, decay in (("ema", DECAY), ("plain", 0.0)):
        train(compose([*RUN, f"trainer.ema_decay={decay}", f"dataset.path={corpus}"]), root / name)
    return root / "ema", root / "plain"


def test_each_eval_scores_the_average_and_results_report_it(runs):
    run_dir, plain = runs
    evals = [r for r in records(run_dir) if "eval/perplexity" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert evals[0]["eval/ema_perplexity"] == evals[0]["eval/perplexity"]  # at the start the average is the weights
    for r in evals[1:]:
        assert math.isfinite(r["eval/ema_perplexity"]) and r["eval/ema_perplexity"] != r["eval/perplexity"]
        assert r["eval/ema_loss"] == pytest.approx(math.log(r["eval/ema_perplexity"]))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["ema_perplexity"] == evals[-1]["eval/ema_perplexity"] != results["perplexity"]
    assert results["ema_bits_per_char"] == evals[-1]["eval/ema_bits_per_char"] != results["bits_per_char"]
    assert json.loads((plain / "results.json").read_text())["ema_perplexity"] is None
    assert not any("eval/ema_perplexity" in r for r in records(plain))


def test_final_ema_is_a_fill_mask_model_holding_the_average(runs, corpus):
    from transformers import pipeline

    run_dir, _ = runs
    cfg = compose([*RUN, f"dataset.path={corpus}"])
    weights = [start_weights(cfg)] + [checkpoint_weights(cfg, ckpt(run_dir, s)) for s in (1, 2, 3)]
    assert not torch.equal(
        weights[0]["bert.embeddings.word_embeddings.weight"], weights[3]["bert.embeddings.word_embeddings.weight"]
    )
    for step in (1, 2, 3):  # every checkpoint holds the average so far, keyed by the model's parameter names
        saved = load_file(str(ckpt(run_dir, step) / "ema.safetensors"))
        assert set(saved) == set(weights[0])
        assert_matches(saved, formula(weights[0], weights[1 : step + 1], DECAY))

    fill = pipeline("fill-mask", model=str(run_dir / "final_ema"))
    assert len(fill(f"The cat sat on the {fill.tokenizer.mask_token}.", top_k=3)) == 3
    model = fill.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert_matches(trainable(model), formula(weights[0], weights[1:], DECAY))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    averaged = load_file(str(run_dir / "final_ema" / "model.safetensors"))
    assert averaged.keys() == final.keys()
    assert any(not torch.equal(averaged[k], final[k]) for k in final)


def test_the_average_does_not_change_training(runs):
    run_dir, plain = runs
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, plain))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert not (plain / "final_ema").exists() and not (ckpt(plain, 3) / "ema.safetensors").exists()
    assert (
        json.loads((run_dir / "results.json").read_text())["perplexity"]
        == json.loads((plain / "results.json").read_text())["perplexity"]
    )


@pytest.mark.slow
def test_killed_and_resumed_the_average_is_bit_for_bit_that_of_an_uninterrupted_run(runs, corpus, tmp_path):
    reference, _ = runs
    run_dir = tmp_path / "run"
    args = [*RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    # killed after step 3's update, before its checkpoint; then, resumed at 2, killed with final_ema/ half-saved
    for point, resumes_at in (("step:3", None), ("final:1", 2)):
        proc = run_cli(args, env={"MLM_FAULT_KILL_AT": point})
        assert proc.returncode == -9, proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert (resumes_at is None and "resumed from" not in out) or f"at step {resumes_at}\n" in out, out[-3000:]
    assert not (run_dir / "final_ema").exists()
    done = run_in_process(args)  # only the kills need a process
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 3\n" in done.stdout + done.stderr
    for name in ("final_ema", "final"):
        a, b = (load_file(str(d / name / "model.safetensors")) for d in (run_dir, reference))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert records(run_dir) == records(reference)
    assert (
        json.loads((run_dir / "results.json").read_text())["ema_perplexity"]
        == json.loads((reference / "results.json").read_text())["ema_perplexity"]
    )


def test_resuming_a_run_without_the_average_with_it_is_refused(runs, corpus):
    from omegaconf import OmegaConf

    from mlm.rundir import check_resume_settings, flat_settings

    _, plain = runs
    asked = flat_settings(OmegaConf.structured(compose([*RUN, "trainer.max_steps=5", f"dataset.path={corpus}"])))
    with pytest.raises(UserError, match=r"was trained with other settings \(trainer\.ema_decay=0\.0 there, 0\.9 now\)"):
        check_resume_settings(plain, "auto", 5, asked)


def test_a_checkpoint_without_the_average_named_by_hand_starts_it_from_its_weights(runs, corpus, tmp_path, caplog):
    from mlm.train import train

    _, plain = runs
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)
    train(compose([*RUN, f"resume={ckpt(plain, 2)}", f"dataset.path={corpus}"]), run_dir)
    assert (
        f"checkpoint {ckpt(plain, 2)} holds no weight average; the average (trainer.ema_decay=0.9) starts from its weights"
        in caplog.text
    )
    cfg = compose([*RUN, f"dataset.path={corpus}"])
    w2, w3 = (
        checkpoint_weights(cfg, ckpt(plain, s)) for s in (2, 3)
    )  # the resumed run trains step 3 as the plain run did
    assert_matches(checkpoint_weights(cfg, run_dir / "final_ema"), formula(w2, [w3], DECAY))


# 3. Steps that did not update the weights do not update the average


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one configuration per process; these runs choose their own precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision, skipped_by", [("no", "on_nonfinite=skip"), ("fp16", "the loss scaler")])
def test_a_skipped_update_leaves_the_average_alone(
    fresh_accelerate_state, corpus, tmp_path, monkeypatch, precision, skipped_by
):
    import mlm.train

    real_step, calls = mlm.train.train_step, []

    def infinite_gradient_at_step_2(objective, *args, **kwargs):
        calls.append(1)
        weight = next(p for p in objective.parameters() if p.requires_grad)
        hook = weight.register_hook(lambda g: g * float("inf")) if len(calls) == 2 else None
        try:
            return real_step(objective, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    monkeypatch.setattr(mlm.train, "train_step", infinite_gradient_at_step_2)
    cfg = compose([*RUN, f"runtime.mixed_precision={precision}", "trainer.on_nonfinite=skip", f"dataset.path={corpus}"])
    results = mlm.train.train(cfg, tmp_path)
    assert (results["skipped_steps"], results["overflow_steps"]) == ((1, 0) if precision == "no" else (0, 1)), (
        skipped_by
    )
    w0, w1, w3 = (
        start_weights(cfg),
        checkpoint_weights(cfg, ckpt(tmp_path, 1)),
        checkpoint_weights(cfg, ckpt(tmp_path, 3)),
    )
    expected = formula(w0, [w1, w3], DECAY)  # steps 1 and 3 only
    assert_matches(load_file(str(ckpt(tmp_path, 3) / "ema.safetensors")), expected)
    with pytest.raises(AssertionError):  # what an update at step 2 (with the unchanged weights w1) would have given
        assert_matches(load_file(str(ckpt(tmp_path, 3) / "ema.safetensors")), formula(w0, [w1, w1, w3], DECAY))


# 4. Sharded: every rank averages its shard; saved, resharded and resumed like the model


@pytest.mark.slow
def test_sharded_average_matches_the_replicated_one_and_resumes_exactly(fsdp_runs):
    """tests/test_sharding.py's run (its eval split over the ranks included) with the weight average, sharded and
    replicated on 2 processes, and the sharded one resumed on 2 and on 3 (the shared `fsdp_runs`)."""
    from transformers import pipeline

    from mlm.dcp_reader import SafeReader
    from tests.test_sharding import max_difference

    fsdp, ddp = fsdp_runs["fsdp_ema"], fsdp_runs["ddp"]
    assert all(
        f"trainer.ema_decay={DECAY}" in fsdp_runs.args(d, name) for d, name in ((fsdp, "fsdp_ema"), (ddp, "ddp"))
    )
    assert (
        any(
            k.startswith("ema.") for k in SafeReader(str(ckpt(fsdp, 4) / "sharded")).read_metadata().state_dict_metadata
        )
        and not (ckpt(fsdp, 4) / "ema.safetensors").exists()
    )
    average = load_file(str(fsdp / "final_ema" / "model.safetensors"))
    assert max_difference(average, load_file(str(ddp / "final_ema" / "model.safetensors"))) <= 1e-5
    assert max_difference(average, load_file(str(fsdp / "final" / "model.safetensors"))) > 1e-4
    # each eval of the average sees the averaged shards, not a copy of the weights FSDP kept gathered
    for a, b in zip(*(([r for r in records(d) if "eval/ema_perplexity" in r]) for d in (fsdp, ddp))):
        assert a["eval/ema_perplexity"] == pytest.approx(b["eval/ema_perplexity"], rel=1e-4)
        assert a["eval/perplexity"] == pytest.approx(b["eval/perplexity"], rel=1e-4)
    fill = pipeline("fill-mask", model=str(fsdp / "final_ema"))
    assert fill.model.get_output_embeddings().weight is fill.model.get_input_embeddings().weight
    assert len(fill(f"The cat sat on the {fill.tokenizer.mask_token}.", top_k=3)) == 3

    # resumed from the sharded step-2 checkpoint: the same average, on 2 processes and on 3 reading 2's shards
    resumed = fsdp_runs["fsdp_ema_resumed_on_2"]
    assert "resumed from" in fsdp_runs.output["fsdp_ema_resumed_on_2"]
    assert max_difference(load_file(str(resumed / "final_ema" / "model.safetensors")), average) == 0.0
    resumed = fsdp_runs["fsdp_ema_resumed_on_3"]
    assert "resumed from" in fsdp_runs.output["fsdp_ema_resumed_on_3"]
    assert max_difference(load_file(str(resumed / "final_ema" / "model.safetensors")), average) <= 1e-6
