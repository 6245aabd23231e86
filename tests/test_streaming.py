"""dataset.streaming=true: shards that partition the stream, global block indices, exact resume."""

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from mlm.config import DatasetConfig, UserError
from mlm.data import iter_documents
from mlm.data.streaming import BlockStream, shard_batches, shard_blocks, stream_eval_blocks, stream_loader
from tests.conftest import TINY_RUN, compose, torchrun_command


def stream_cfg(path, **kw):
    return DatasetConfig(
        kind="local", path=str(path), streaming=True, streaming_eval_docs=40, tokenize_batch_size=9, **kw
    )


def test_two_shards_read_every_training_document_once(text_file):
    cfg = stream_cfg(text_file)
    training = list(iter_documents(cfg))[cfg.streaming_eval_docs :]
    shards = [[doc for batch in shard_batches(cfg, s, 2) for doc in batch] for s in (0, 1)]
    assert shards[0] and shards[1]
    assert sorted(shards[0] + shards[1]) == sorted(training)  # each document in exactly one shard
    assert not set(shards[0]) & set(shards[1])


def test_two_shards_make_disjoint_blocks_of_their_own_documents(text_file, tokenizer):
    cfg = stream_cfg(text_file, remainder="keep")
    seen = {}
    for shard in (0, 1):
        mine = [tokenizer(batch, verbose=False)["input_ids"] for batch in shard_batches(cfg, shard, 2)]
        expected = np.concatenate([np.asarray(ids, dtype=np.int32) for batch in mine for ids in batch])
        n_blocks = -(-len(expected) // 32)  # one pass, the last block padded
        blocks = list(itertools.islice(shard_blocks(cfg, tokenizer, 32, shard, 2), n_blocks))
        tokens = np.concatenate([b for _, b in blocks])
        assert np.array_equal(tokens[: len(expected)], expected)  # this shard's documents, in order, nothing else
        seen[shard] = [i for i, _ in blocks]
    assert seen[0] == list(range(0, 2 * len(seen[0]), 2)) and seen[1] == list(
        range(1, 2 * len(seen[1]), 2)
    )  # global indices, no clash


def test_eval_documents_are_held_out(text_file, tokenizer):
    cfg = stream_cfg(text_file)
    docs = list(iter_documents(cfg))
    eval_ids = np.concatenate([np.asarray(ids) for ids in tokenizer(docs[:40], verbose=False)["input_ids"]])
    ev = np.array(stream_eval_blocks(cfg, tokenizer, 32)["input_ids"])
    assert np.array_equal(ev.ravel(), eval_ids[: ev.size])
    first_train = next(shard_batches(cfg, 0, 1))
    assert first_train[0] == docs[40]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_where_it_stopped(text_file, tokenizer, workers):
    cfg = stream_cfg(text_file)

    def batches(start, n):
        stream = BlockStream(cfg, tokenizer, 32, micro_batch=3, rank=0, world_size=1, start_batches=start)
        return list(itertools.islice(stream_loader(stream, lambda b: b, workers), n))

    full = batches(0, 9)
    for start in (4, 5):  # with 2 workers: a resume at an even and at an odd micro-batch
        resumed = batches(start, 9 - start)
        assert len(resumed) == 9 - start
        for a, b in zip(full[start:], resumed):
            assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["input_ids"], b["input_ids"])
    indices = np.concatenate([b["index"] for b in full])
    assert len(set(indices.tolist())) == len(indices)  # every block has its own index (hash-based masks)


@pytest.mark.parametrize("eval_docs", [400, 1000])  # as many documents as the stream has, and more
def test_an_eval_split_that_takes_every_document_names_streaming_eval_docs(text_file, tokenizer, eval_docs):
    cfg = replace(stream_cfg(text_file), streaming_eval_docs=eval_docs)  # text_file: 400 one-line documents
    with pytest.raises(UserError) as err:
        stream_eval_blocks(cfg, tokenizer, 32)
    assert str(err.value) == (
        f"dataset.streaming_eval_docs={eval_docs} holds out the first {eval_docs} documents for eval, and the "
        "stream has 400: none is left to train on; set dataset.streaming_eval_docs below 400 (e.g. 40)"
    )
    assert (
        len(stream_eval_blocks(replace(cfg, streaming_eval_docs=399), tokenizer, 32)["input_ids"]) > 0
    )  # one left: trains


def test_stream_starts_a_new_pass_with_new_indices(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(f"line number {i} of a tiny corpus" for i in range(60)))
    cfg = DatasetConfig(kind="local", path=str(path), streaming=True, streaming_eval_docs=10)
    blocks = list(itertools.islice(shard_blocks(cfg, tokenizer, 16, 0, 1), 200))  # more than one pass holds
    assert [i for i, _ in blocks] == list(range(200))


def test_streaming_needs_max_steps():
    cfg = compose([*TINY_RUN, "dataset.path=x.txt", "dataset.streaming=true", "trainer.max_steps=-1"])
    with pytest.raises(UserError, match="dataset.streaming=true needs trainer.max_steps > 0"):
        cfg.validate()


@pytest.mark.slow
def test_streaming_run_resumes_exactly(tmp_path, text_file, caplog):
    """Train 4 streamed steps; resume a second run from the step-2 checkpoint: the same weights and losses.
    With the default head recipe: its unigram bias needs token counts a stream lacks, so it says so and starts at zero."""
    from safetensors.torch import load_file

    from mlm.train import train

    common = [
        *(a for a in TINY_RUN if not a.startswith("experiment=")),
        f"dataset.path={text_file}",
        "dataset.streaming=true",
        "dataset.streaming_eval_docs=50",
        "runtime.mixed_precision=no",
        "trainer.checkpoint_every=2",
        "trainer.save_model=true",
    ]
    full = tmp_path / "full"
    train(compose(common), full)
    assert "head_bias_init=unigram counts the training split's tokens, which a stream does not have" in caplog.text
    resumed = tmp_path / "resumed"
    train(compose([*common, f"resume={full / 'checkpoints' / 'ckpt-00000002'}"]), resumed)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)

    def losses(run):
        return {
            r["step"]: r["train/loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r
        }

    assert losses(resumed) == {s: v for s, v in losses(full).items() if s > 2}
    state = json.loads((full / "checkpoints" / "ckpt-00000002" / "state.json").read_text())
    assert state["stream_shards"] == 1 and state["train_state"]["step"] == 2


def test_hub_kind_streams_through_datasets(tmp_path, monkeypatch):
    """kind=hub with streaming: datasets' streaming reader (a local directory stands in for a hub repo: no network here)."""
    import pandas as pd

    import mlm.data.sources
    from tests.conftest import sentences

    repo = tmp_path / "repo"
    repo.mkdir()
    pd.DataFrame({"body": sentences(30)}).to_parquet(repo / "train.parquet")
    monkeypatch.setattr(mlm.data.sources, "hub_reachable", lambda: True)
    cfg = DatasetConfig(kind="hub", path=str(repo), text_field="body", tokenize_batch_size=7)
    assert list(iter_documents(cfg, streaming=True)) == list(iter_documents(cfg, streaming=False)) == sentences(30)
    with pytest.raises(UserError, match="cannot be sliced"):
        next(iter_documents(DatasetConfig(kind="hub", path=str(repo), split="train[:10]"), streaming=True))


@pytest.mark.slow
def test_two_processes_stream_what_one_process_with_two_workers_streams(tmp_path, text_file):
    """Shards are (rank, worker) pairs: 2 torchrun ranks read shards 0 and 1 in every step, as one
    process with 2 dataloader workers and 2 micro-batches does; same blocks, same masks, same losses."""
    import os
    import subprocess

    from mlm.train import train
    from tests.test_distributed import RTOL, curves

    common = [
        *TINY_RUN,
        f"dataset.path={text_file}",
        "dataset.streaming=true",
        "dataset.streaming_eval_docs=50",
        "dataset.tokenize_batch_size=20",
        "runtime.mixed_precision=no",
        "model.dropout=0",
        "trainer.per_device_batch_size=4",
    ]
    one = tmp_path / "one"
    train(compose([*common, "runtime.num_workers=2", "trainer.gradient_accumulation_steps=2"]), one)
    work = tmp_path / "two"
    work.mkdir()
    cmd = torchrun_command(
        29541,
        *common,
    )
    proc = subprocess.run(
        cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (two,) = list((work / "outputs" / "runs").iterdir())
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    loss1, eval1 = curves(one)
    loss2, eval2 = curves(two)
    assert loss1.keys() == loss2.keys() == set(range(1, 5))
    for step in loss1:
        assert loss2[step] == pytest.approx(loss1[step], rel=RTOL), step
    assert eval2 == pytest.approx(eval1, rel=RTOL)
