"""Sweeps whose jobs fail: the study goes on, the summary says so, the exit status says so."""

import json

import pytest

from tests.conftest import TINY_RUN, run_cli, sentences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(sentences(300)))
    return path


def fake_job(sweep, num, results):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={num + 1}e-3\n")
    (d / "results.json").write_text(json.dumps(results))  # json writes nan and inf as NaN and Infinity
    return d


def test_a_nan_inf_or_missing_perplexity_is_a_failed_job(tmp_path):
    from mlm.report import collect_jobs, failure_line, summarize

    fake_job(tmp_path, 0, {"perplexity": float("nan"), "eval_loss": 0.0, "steps": 2})  # e.g. mlm_probability=1e-9
    fake_job(tmp_path, 1, {"perplexity": float("inf"), "steps": 2})
    fake_job(tmp_path, 2, {"steps": 2})
    fake_job(tmp_path, 3, {"perplexity": 40.0, "steps": 2})
    summary = summarize([tmp_path]).read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "optimizer.lr" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["3", "0", "1", "2"]  # the one that succeeded first
    assert rows[0].endswith("| ok |") and summary.count("| ok |") == 1
    assert "failed: perplexity nan in results.json" in rows[1] and "failed: perplexity inf" in rows[2]
    assert "failed: no perplexity in results.json" in rows[3]
    assert "Best: `optimizer.lr=4e-3` with perplexity 40.00" in summary
    line = failure_line(collect_jobs([tmp_path]))
    assert line.startswith("3 of 4 job(s) failed: ") and str(tmp_path / "0" / "results.json") in line
    assert str(tmp_path / "3") not in line
