"""The data's identity is part of a run: an edited corpus is refused on resume and on rerun, another
spelling of the same file is not; a damaged block cache entry is built again with one warning."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mlm.config import DatasetConfig, UserError
from mlm.data import build_blocks
from mlm.data.identity import changed_data, file_sha256
from tests.conftest import TINY_RUN, compose, sentences

RUN = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "trainer.checkpoint_every=2",
    "trainer.eval_every=100",
    "trainer.save_model=false",
]


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A block cache of this test's own: damaging it must not touch the entries other tests share."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLM_CACHE", str(cache))
    return cache


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n".join(sentences(300, seed=5)))
    return path


def guard(run_dir: Path, overrides):
    """What `run.py` checks before it writes anything, in-process (the run dir's lock released after)."""
    from mlm.rundir import guard as rundir_guard, release_run_dir

    try:
        return rundir_guard(run_dir, OmegaConf.structured(compose(overrides)))
    finally:
        release_run_dir(run_dir)


def tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit(path: Path) -> None:
    """Another corpus under the same name: one word changed, the same size."""
    text = path.read_text()
    assert " the " in text
    path.write_text(text.replace(" the ", " xyz ", 1))


@pytest.fixture(scope="module")
def trained_to_2(tmp_path_factory):
    """A run stopped after step 2 of 4 (trained to 2, asked for 4 now), trained once for the module: checkpoint ckpt-2
    to resume from, and the corpus it read (at the path its records name)."""
    from mlm.train import train

    root = tmp_path_factory.mktemp("stopped")
    data_file = root / "data" / "corpus.txt"
    data_file.parent.mkdir()
    data_file.write_text("\n".join(sentences(300, seed=5)))
    run_dir, args = root / "run", [*RUN, f"dataset.path={data_file}", "trainer.max_steps=2"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLM_CACHE", str(root / "cache"))
        assert guard(run_dir, args) is None  # as run.py does: the lock file marks the directory as a run's
        train(compose(args), run_dir)
    return run_dir, data_file


@pytest.fixture
def stopped_run(trained_to_2, tmp_path, own_cache) -> Path:
    """This test's copy of the stopped run."""
    return shutil.copytree(trained_to_2[0], tmp_path / "run", symlinks=True)


@pytest.fixture
def run_data(trained_to_2):
    """The corpus the stopped run read: put back as it was (and its folder as it was) after a test edits it."""
    data_file = trained_to_2[1]
    text, names = data_file.read_text(), set(data_file.parent.iterdir())
    yield data_file
    data_file.write_text(text)
    for path in set(data_file.parent.iterdir()) - names:
        path.unlink()


def test_an_edited_corpus_is_refused_on_resume_and_the_checkpoints_stay(stopped_run, run_data, tmp_path, caplog):
    from mlm.train import train

    before = tree_digest(stopped_run / "checkpoints")
    edit(run_data)
    args = [*RUN, f"dataset.path={run_data}", "trainer.max_steps=4"]
    with pytest.raises(UserError) as refused:
        guard(stopped_run, args)
    line = str(refused.value)
    assert line.startswith("the training data changed since checkpoint ckpt-00000002: ")
    assert f"{run_data} has other content (sha256 " in line and "\n" not in line
    assert f"resume={stopped_run.resolve() / 'checkpoints' / 'ckpt-00000002'}" in line and "resume=never" not in line
    with pytest.raises(UserError, match="the training data changed since checkpoint ckpt-00000002"):
        train(compose(args), stopped_run)  # train() itself refuses too (e.g. called in-process, without the guard)
    assert tree_digest(stopped_run / "checkpoints") == before
    # the way out the line names: a branch into a new run dir trains on the new data, with a warning
    branch = tmp_path / "branch"
    ckpt = stopped_run / "checkpoints" / "ckpt-00000002"
    old = json.loads((stopped_run / "results.json").read_text())  # measured on the corpus before the edit
    with caplog.at_level(logging.WARNING, logger="mlm.train"):
        results = train(compose([*args, f"resume={ckpt}"]), branch)
    assert results["steps"] == 4 and results["branched_from"]["step"] == 2
    assert "on other data than it trained on" in caplog.text
    assert tree_digest(stopped_run / "checkpoints") == before
    # its numbers are of the new corpus only: no "before" or "best" carried from the old one
    assert "ckpt-00000002's evals (perplexity before" in caplog.text and "not carried over" in caplog.text
    assert (
        results["perplexity_before"] is None
        and results["best_perplexity"] == results["perplexity"] != old["best_perplexity"]
    )
    assert any(str(run_data) in d for d in results["branched_from"]["other_data"])
    assert json.loads((branch / "results.json").read_text())["perplexity_before"] is None
    assert old["bits_per_char_before"] is not None and results["bits_per_char_before"] is None  # per character likewise
    from mlm.cli import summary_text

    line = summary_text(compose([*args, f"resume={ckpt}"]), branch, results).splitlines()[1]
    assert line.startswith(
        f"perplexity: none before on this data (started from a checkpoint trained on other data) -> {results['perplexity']:.2f} after"
    )
    assert f"{old['perplexity_before']:.2f}" not in line


def test_a_finished_run_rerun_on_an_edited_corpus_is_refused(stopped_run, run_data):
    args = [*RUN, f"dataset.path={run_data}", "trainer.max_steps=2"]
    assert guard(stopped_run, args)["steps"] == 2  # unchanged data: already finished
    edit(run_data)
    with pytest.raises(UserError, match=r"holds a finished run trained on other data \(.*corpus.txt has other content"):
        guard(stopped_run, args)


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"sources": [["only-one"]]}, '"data.sources" is not a list of [path, sha256] pairs'),
        ("abc", '"data" is a JSON str, not an object'),
        (7, '"data" is a JSON int, not an object'),
        ("tokenizer", '"data.tokenizer" is not a sha256 string'),
    ],
)
def test_a_finished_run_whose_results_hold_a_malformed_data_record_is_one_line(stopped_run, run_data, data, problem):
    results = json.loads((stopped_run / "results.json").read_text())
    results["data"] = {**results["data"], "tokenizer": 5} if data == "tokenizer" else data
    (stopped_run / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError) as refused:
        guard(stopped_run, [*RUN, f"dataset.path={run_data}", "trainer.max_steps=2"])
    line = str(refused.value)
    assert (
        line.startswith(f"{stopped_run / 'results.json'} is not what this harness writes: its {problem}; ")
        and "\n" not in line
    )


@pytest.mark.parametrize("results", [["a list"], {"steps": 2, "config": "abc"}])
def test_a_results_json_that_is_not_an_object_of_results_is_one_line(stopped_run, run_data, results):
    (stopped_run / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match=r"results\.json is not what this harness writes \(not an object of results"):
        guard(stopped_run, [*RUN, f"dataset.path={run_data}", "trainer.max_steps=2"])


def test_a_checkpoint_with_a_malformed_data_record_is_set_aside_not_a_traceback(stopped_run, run_data):
    from mlm.train import train
    from tests.test_untrusted import edit_state

    (stopped_run / "results.json").unlink()  # killed before it finished: ckpt-2 is what a resume reads
    edit_state(stopped_run / "checkpoints" / "ckpt-00000002", lambda s: s["data"].update(sources=[["only-one"]]))
    args = [*RUN, f"dataset.path={run_data}", "trainer.max_steps=4"]
    assert (
        guard(stopped_run, args) is None
    )  # run.py's checks before training leave it to the resume, which sets it aside
    with pytest.raises(
        UserError,
        match=r"^no checkpoint in .* loads \(ckpt-00000002: CorruptCheckpoint: state\.json's \"data\.sources\" is not",
    ):
        train(compose(args), stopped_run)
    assert (stopped_run / "checkpoints" / "corrupt-ckpt-00000002").is_dir()


def test_the_same_file_under_another_spelling_resumes(stopped_run, run_data, monkeypatch, caplog):
    from mlm.train import train

    monkeypatch.chdir(run_data.parent)
    relative = [*RUN, "dataset.path=./corpus.txt"]
    assert guard(stopped_run, [*relative, "trainer.max_steps=2"])["steps"] == 2  # the finished run is recognised
    assert guard(stopped_run, [*relative, "trainer.max_steps=4"]) is None  # and resumes
    before = json.loads((stopped_run / "results.json").read_text())["perplexity_before"]
    with caplog.at_level(logging.INFO, logger="mlm.train"):
        results = train(compose([*relative, "trainer.max_steps=4"]), stopped_run)
    assert "resumed from" in caplog.text and results["steps"] == 4
    assert (
        results["perplexity_before"] == before is not None and "not carried over" not in caplog.text
    )  # the same data: kept
    link = run_data.parent / "link.txt"
    link.symlink_to(run_data)
    assert guard(stopped_run, [*RUN, f"dataset.path={link}", "trainer.max_steps=4"])["steps"] == 4


def test_an_edit_that_keeps_size_and_mtime_is_still_hashed_again(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("one two three\n")
    first = file_sha256(str(path), str(tmp_path / "memo"))
    stat = path.stat()
    path.write_text("one two tree!\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime: only the ctime tells
    assert file_sha256(str(path), str(tmp_path / "memo")) != first


def test_an_unchanged_file_is_not_hashed_again(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("one two three\n")
    digest = file_sha256(str(path), str(tmp_path / "memo"))
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: pytest.fail("an unchanged file is read again"))
    assert file_sha256(str(path), str(tmp_path / "memo")) == digest


def test_a_link_planted_in_a_shared_hash_cache_is_not_written_through(tmp_path):
    from mlm.data import identity

    path, cache, victim = tmp_path / "f.txt", tmp_path / "cache", tmp_path / "victim"
    path.write_text("one two three\n")
    victim.write_text("keep me")
    memo = Path(identity._memo_path(str(path.resolve()), str(cache)))
    memo.parent.mkdir(parents=True)
    Path(f"{memo}.tmp-{os.getpid()}").symlink_to(victim)
    assert file_sha256(str(path), str(cache)) == hashlib.sha256(b"one two three\n").hexdigest()
    assert victim.read_text() == "keep me" and not memo.exists()


def test_changed_data_names_the_tokenizer_and_files_added_or_gone():
    saved = {"sources": [["/d/a.txt", "1" * 64], ["/d/b.txt", "2" * 64]], "tokenizer": "a" * 64}
    now = {"sources": [["/d/a.txt", "1" * 64], ["/d/c.txt", "3" * 64]], "tokenizer": "b" * 64}
    assert changed_data(saved, now) == [
        "/d/b.txt is no longer read",
        "/d/c.txt is new",
        "the tokenizer has another vocabulary or rules (sha256 aaaaaaaaaaaa there, bbbbbbbbbbbb now)",
    ]
    moved = {"sources": [["/e/a.txt", "1" * 64], ["/e/b.txt", "2" * 64]]}  # the same contents elsewhere: the same data
    assert changed_data(saved, moved) == [] and changed_data(None, now) == []


# ---------------------------------------------------------------- the block cache's own check


def entry(cache: Path) -> Path:
    (found,) = [p for p in (cache / "blocks").iterdir() if ".tmp-" not in p.name]
    return found


def flip_ids(arrow: Path, count: int = 64) -> None:
    """Overwrite `count` token ids of the first block in place, keeping the file's size and layout."""
    from datasets import Dataset

    first = np.asarray(Dataset.from_file(str(arrow))[0]["input_ids"], dtype=np.int32)
    data = bytearray(arrow.read_bytes())
    at = data.find(first[:8].tobytes())
    assert at >= 0
    n = min(count, len(first))
    data[at : at + 4 * n] = ((first[:n] + 7) % 1000 + 1000).astype(np.int32).tobytes()
    size = arrow.stat().st_size
    arrow.write_bytes(bytes(data))
    assert arrow.stat().st_size == size


def test_flipped_ids_in_a_cached_test_split_are_rebuilt_and_score_as_clean(tmp_path, data_file, own_cache, caplog):
    from mlm.train import train

    args = [*RUN, f"dataset.path={data_file}", "trainer.max_steps=2"]
    clean = train(compose(args), tmp_path / "clean")
    test_arrow = entry(own_cache) / "test.arrow"
    original = test_arrow.read_bytes()
    flip_ids(test_arrow)
    with caplog.at_level(logging.WARNING, logger="mlm.data.blocks"):
        again = train(compose(args), tmp_path / "again")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "mlm.data.blocks"]
    assert (
        len(warnings) == 1
        and "test.arrow changed after it was written" in warnings[0]
        and "building them again" in warnings[0]
    )
    assert test_arrow.read_bytes() == original
    assert again["perplexity"] == clean["perplexity"] and again["perplexity_before"] == clean["perplexity_before"]


def test_a_truncated_cached_train_split_is_rebuilt(tmp_path, data_file, tokenizer, caplog):
    cfg = DatasetConfig(kind="local", path=str(data_file))
    cache = tmp_path / "cache"
    first = build_blocks(cfg, tokenizer, 32, cache_root=str(cache))
    reference = [list(b) for b in first["train"]["input_ids"]]
    train_arrow = entry(cache) / "train.arrow"
    with open(train_arrow, "r+b") as f:
        f.truncate(train_arrow.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="mlm.data.blocks"):
        again = build_blocks(cfg, tokenizer, 32, cache_root=str(cache))
    assert [list(b) for b in again["train"]["input_ids"]] == reference
    assert caplog.text.count("building them again") == 1 and "train.arrow has " in caplog.text
    assert [p.name for p in (cache / "blocks").iterdir()] == [
        entry(cache).name
    ]  # the damaged entry is gone, not kept beside


def test_an_unreadable_blocks_json_is_rebuilt(tmp_path, data_file, tokenizer, caplog):
    cfg = DatasetConfig(kind="local", path=str(data_file))
    cache = tmp_path / "cache"
    build_blocks(cfg, tokenizer, 32, cache_root=str(cache))
    (entry(cache) / "blocks.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mlm.data.blocks"):
        build_blocks(cfg, tokenizer, 32, cache_root=str(cache))
    assert "blocks.json is unreadable" in caplog.text
    assert json.loads((entry(cache) / "blocks.json").read_text())["files"]["train.arrow"]["sha256"]


def test_another_spelling_of_the_path_reuses_the_cache_entry(tmp_path, data_file, tokenizer, monkeypatch):
    import mlm.data.blocks

    cache = tmp_path / "cache"
    build_blocks(DatasetConfig(kind="local", path=str(data_file)), tokenizer, 32, cache_root=str(cache))
    monkeypatch.chdir(data_file.parent)
    monkeypatch.setattr(
        mlm.data.blocks, "iter_documents", lambda *_: pytest.fail("the same file must reuse its blocks")
    )
    build_blocks(DatasetConfig(kind="local", path="./corpus.txt"), tokenizer, 32, cache_root=str(cache))


def test_a_streaming_run_records_and_checks_its_files(tmp_path, data_file, own_cache):
    from mlm.train import train

    args = [
        *RUN,
        f"dataset.path={data_file}",
        "dataset.streaming=true",
        "dataset.streaming_eval_docs=50",
        "trainer.max_steps=2",
    ]
    run_dir = tmp_path / "stream"
    assert guard(run_dir, args) is None
    results = train(compose(args), run_dir)
    assert [path for path, _ in results["data"]["sources"]] == [str(data_file.resolve())]
    edit(data_file)
    with pytest.raises(UserError, match="the training data changed since checkpoint ckpt-00000002"):
        guard(run_dir, [*args[:-1], "trainer.max_steps=4"])
