"""End to end through run.py and the predict CLI, as a user runs them."""

import json
import re

import pytest

from mlm.precision import native_bf16
from tests.conftest import ROOT, TINY_RUN, run_cli, run_in_process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import sentences

    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(sentences(400)))
    run_dir = tmp / "out"
    proc = run_in_process([*TINY_RUN, f"dataset.path={corpus}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_run_writes_results_metrics_and_model(tiny_run):
    run_dir, proc = tiny_run
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("eval_loss", "perplexity", "perplexity_before", "train_tokens", "train_seconds"):
        assert key in results
    assert results["train_tokens"] == 4 * 4 * 32  # steps x batch x block
    assert results["mixed_precision"] == ("bf16" if native_bf16("cpu") else "no")  # the default, auto, as resolved here
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert all(0 <= r["perf/data_wait"] <= 1 and r["perf/tokens_per_s"] > 0 for r in records if "train/loss" in r)
    assert 0 <= results["data_wait"] <= 1 and f"{results['data_wait']:.0%} of it waiting for data" in proc.stdout
    assert [r["step"] for r in records if "eval/perplexity" in r] == [0, 2, 4]
    assert (run_dir / "final" / "model.safetensors").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    curves = (run_dir / "curves.png").read_bytes()
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 5000
    assert "perplexity:" in proc.stdout and "The cat sat on the [MASK]." in proc.stdout


def test_run_log_has_the_banner_the_train_lines_the_projection_and_the_end(tiny_run):
    run_dir, _ = tiny_run
    log = (run_dir / "run.log").read_text()
    for line in (
        "trainable parameters of",
        "global batch: 4 blocks x 32 tokens = 128 tokens per step",
        "length: 4 steps x 128 tokens",
        "precision: ",
        f"run directory: {run_dir}",
        "to resume: ",
    ):
        assert log.count(line) == 1, line
    assert log.index("to resume: ") < log.index(
        "eval at step 0: scoring 16 held-out blocks"
    )  # said before the first eval
    assert [line.split(" - ")[1].split(":")[0] for line in log.splitlines() if ": loss " in line] == [
        f"step {s}/4" for s in (1, 2, 3, 4)
    ]
    assert "step 1/4: loss " in log and ", lr " in log and " tokens/s" in log
    assert (
        log.count("projected: ") == 1 and "3 steps at " in log and "2 evals at " in log
    )  # after step 1 (log_every=1): 2, 4
    assert "training ended at step 4/4: trainer.max_steps=4 reached" in log


def readme_mask_examples() -> list:
    """The README's texts with a mask: quoted in commands, and the probe lines of its output blocks."""
    text = (ROOT / "README.md").read_text()
    quoted = re.findall(r'"([^"\n]*(?:<mask>|\[MASK\])[^"\n]*)"', text)
    probes = re.findall(r"^([A-Z][^|`\n]*(?:<mask>|\[MASK\])[^|`\n]*?\.) {2,}\S", text, flags=re.M)
    return quoted + probes


def test_saved_model_round_trips_through_fill_mask_pipeline(tiny_run):
    """The README's mask examples, as written, work in Hugging Face's pipeline on a run's final/ (the default tokenizer)."""
    from transformers import pipeline

    from mlm.config import ModelConfig
    from mlm.models import build_pretrained, load_tokenizer
    from mlm.predict import fill_mask

    run_dir, _ = tiny_run
    pipe = pipeline("fill-mask", model=str(run_dir / "final"), top_k=5)
    examples = readme_mask_examples()
    assert "The Milky Way is a [MASK] galaxy." in examples and len(examples) >= 4
    for example in examples:
        assert len(pipe(example)) == 5, example  # raises on a mask token not the model's (<mask> for the default)
    reference = pipe(examples[0])
    cfg = ModelConfig(name_or_path=str(run_dir / "final"))
    tokenizer = load_tokenizer(cfg)
    mine = fill_mask(build_pretrained(cfg, tokenizer), tokenizer, "The milky way is a <mask> galaxy.", top_k=5)[0]
    assert [c["token"] for c in mine] == [r["token_str"] for r in reference]
    for c, r in zip(mine, reference):
        assert c["score"] == pytest.approx(r["score"], rel=1e-4)


def test_predict_cli(tiny_run):
    run_dir, _ = tiny_run
    proc = run_in_process(
        [str(run_dir / "final"), "The Milky Way is a <mask> galaxy.", "--top-k", "3"], module="mlm.predict"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "The Milky Way is a <mask> galaxy." and len(lines) == 4
    assert lines[1].lstrip().startswith("1. ") and "the milky way is a" in lines[1]


@pytest.mark.parametrize(
    "text,message", [("No mask in this text.", "no mask"), (" ".join(["[MASK]"] * 9), "at most 8")]
)
def test_predict_cli_bad_text_exits_2(tiny_run, text, message):
    run_dir, _ = tiny_run
    proc = run_in_process([str(run_dir / "final"), text], module="mlm.predict")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def long_text(n_words: int = 700) -> str:
    """n_words one-token words, then a sentence ending in the mask: too long for 512 positions."""
    words = "the cat sat on a mat and the dog ran to the park".split()
    return " ".join(words[i % len(words)] for i in range(n_words)) + " The sky is [MASK]."


def test_long_text_keeps_a_window_around_the_mask_like_the_pipeline_on_that_window(tiny_run):
    from transformers import pipeline

    from mlm.config import ModelConfig
    from mlm.models import build_pretrained, load_tokenizer
    from mlm.predict import encode, fill_mask

    run_dir, _ = tiny_run
    cfg = ModelConfig(name_or_path=str(run_dir / "final"))
    tokenizer = load_tokenizer(cfg)
    text = long_text()
    assert len(tokenizer(text, verbose=False)["input_ids"]) == 700 + 5 + 2  # every word one token
    enc, positions = encode(tokenizer, text)
    assert enc["input_ids"].shape[1] == 512 and enc["input_ids"][0, positions[0]] == tokenizer.mask_token_id
    # the window is the last 510 tokens: 505 words and "the sky is [MASK] ."
    window = " ".join(text.split()[-(505 + 4) :])
    mine = fill_mask(build_pretrained(cfg, tokenizer), tokenizer, text, top_k=5)[0]
    reference = pipeline("fill-mask", model=str(run_dir / "final"), top_k=5)(window)
    assert [c["token"] for c in mine] == [r["token_str"] for r in reference]
    for c, r in zip(mine, reference):
        assert c["score"] == pytest.approx(r["score"], rel=1e-4)


def test_predict_cli_long_text_says_where_it_looked(tiny_run):
    run_dir, _ = tiny_run
    proc = run_in_process(
        [str(run_dir / "final"), long_text().replace("[MASK]", "<mask>"), "--top-k", "2"], module="mlm.predict"
    )
    assert proc.returncode == 0, proc.stderr
    assert "no mask" not in proc.stderr and "is 707 tokens, more than the 512" in proc.stderr
    first = proc.stdout.splitlines()[1]
    assert first.lstrip().startswith("1. ") and f"the sky is {first.split()[1]}." in first


def test_finished_run_run_again_prints_one_line_and_changes_nothing(tiny_run):
    run_dir, first = tiny_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = run_cli(first.args[2:])  # the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == again.stdout.strip().splitlines()[0] and again.stderr == ""
    assert f"{run_dir} already finished (4 steps" in again.stdout and str(run_dir / "results.json") in again.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == {
        p: t for p, t in before.items() if p.name != "run.lock"
    }


def test_distilroberta_offline_fails_with_one_clear_line(tmp_path):
    proc = run_in_process(["model=distilroberta", "block_size=256", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "distilbert/distilroberta-base" in errors[0] and "model.name_or_path" in errors[0]
    assert not (tmp_path / "checkpoints").exists()


def test_cfg_job_prints_the_recipe():
    proc = run_in_process(["model=distilroberta", "block_size=256", "--cfg", "job"])
    assert proc.returncode == 0
    assert "name_or_path: distilbert/distilroberta-base" in proc.stdout and "block_size: 256" in proc.stdout


def test_finished_run_asked_with_other_settings_is_refused(tiny_run):
    run_dir, first = tiny_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    other = run_in_process([*first.args[2:], "optimizer.lr=0.123"])
    assert other.returncode == 2 and other.stdout == ""
    assert other.stderr.strip().splitlines() == [
        f"error: {run_dir} holds a finished run with other settings "
        "(optimizer.lr=0.0004 there, 0.123 now); put them back to get its results, or give this run its own "
        "directory (hydra.run.dir=... or hydra.sweep.dir=...)"
    ]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_resume_never_in_a_finished_dir_starts_over(tiny_run):
    run_dir, first = tiny_run
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    again = run_in_process([*first.args[2:], "resume=never"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" not in again.stdout and "perplexity:" in again.stdout
    assert "deleting 1 checkpoint(s) of the previous run" in again.stdout + again.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(records)  # started over, not appended
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4


def test_one_question_decides_new_finished_or_refused(tmp_path, corpus):
    """mlm.cli.decide_run_dir, what RunDirGuard (a single run) and run_job (a sweep's job) both ask, in process."""
    from omegaconf import OmegaConf

    from mlm.cli import decide_run_dir
    from mlm.rundir import RunDirLocked, flat_settings, release_run_dir
    from tests.conftest import compose

    def asked(*overrides):
        return OmegaConf.structured(compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=2", *overrides]))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        assert decide_run_dir(run_dir, asked()) is None  # nothing there: train
        results = {"steps": 2, "perplexity": 9.5, "config": flat_settings(asked())}
        (run_dir / "results.json").write_text(json.dumps(results))
        assert decide_run_dir(run_dir, asked()) == results  # finished with these settings: its results
        assert decide_run_dir(run_dir, asked("trainer.max_steps=3")) is None  # more steps: train on
        with pytest.raises(RunDirLocked, match=r"holds a finished run with other settings \(optimizer.lr="):
            decide_run_dir(run_dir, asked("optimizer.lr=0.123"))  # not this job's directory
    finally:
        release_run_dir(run_dir)
