"""Loading, splitting, tokenizing and grouping into blocks."""

import json

import numpy as np
import pytest

from mlm.config import DatasetConfig, UserError
from mlm.data import (
    build_blocks,
    flat_token_ids,
    group_blocks,
    iter_documents,
    pack_blocks,
    split_indices,
)
from tests.data_reference import load_text, tokenize


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 1000, 1024])
def test_group_blocks_lengths_and_no_token_lost(n):
    ids = np.arange(n, dtype=np.int32)
    dropped = group_blocks(ids, 128, "drop", fill=-1)
    assert dropped.shape == (n // 128, 128)
    assert np.array_equal(dropped.ravel(), ids[: (n // 128) * 128])  # order kept, only the remainder dropped
    kept = group_blocks(ids, 128, "keep", fill=-1)
    assert kept.shape[1] == 128 and kept.shape[0] == -(-n // 128)
    assert np.array_equal(kept.ravel()[kept.ravel() != -1], ids)  # every token, in order, plus padding


def test_grouping_equals_the_guides_group_texts(tokenizer, text_file):
    """Same blocks as the HF guide's group_texts (run over the whole corpus as one batch)."""
    texts = load_text(DatasetConfig(kind="local", path=str(text_file)))["train"]
    tokenized = tokenize(texts, tokenizer, DatasetConfig())
    ids = list(tokenized["input_ids"])
    concatenated = sum(ids, [])  # the guide's (quadratic) concatenation, fine at this size
    total = (len(concatenated) // 64) * 64
    guide = [concatenated[i : i + 64] for i in range(0, total, 64)]
    ours = group_blocks(flat_token_ids(tokenized), 64, "drop", tokenizer.pad_token_id)
    assert ours.tolist() == guide


def test_eli5_schema_flatten_and_join(eli5_file):
    splits = load_text(DatasetConfig(kind="local", path=str(eli5_file), text_field="answers.text", test_size=0.2))
    assert set(splits) == {"train", "test"} and len(splits["test"]) == 12 and len(splits["train"]) == 48
    rows = [json.loads(line) for line in eli5_file.read_text().splitlines()]
    expected = {" ".join(r["answers"]["text"]) for r in rows}
    assert (
        set(list(splits["train"]["text"])) | set(list(splits["test"]["text"])) == expected
    )  # each example's answers joined


def test_split_is_fixed_by_the_seed(text_file):
    a = load_text(DatasetConfig(kind="local", path=str(text_file)))
    b = load_text(DatasetConfig(kind="local", path=str(text_file)))
    c = load_text(DatasetConfig(kind="local", path=str(text_file), split_seed=7))
    assert list(a["test"]["text"]) == list(b["test"]["text"]) != list(c["test"]["text"])


def test_missing_text_field_names_the_fields_that_exist(eli5_file):
    with pytest.raises(UserError, match=r"'answer\.txt' does not exist.*answers\.text"):
        load_text(DatasetConfig(kind="local", path=str(eli5_file), text_field="answer.txt"))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_local_tabular_formats(tmp_path, fmt):
    import pandas as pd

    from tests.conftest import sentences

    df = pd.DataFrame({"body": sentences(20), "n": range(20)})
    path = tmp_path / f"data.{fmt}"
    {
        "csv": lambda: df.to_csv(path, index=False),
        "parquet": lambda: df.to_parquet(path),
        "jsonl": lambda: df.to_json(path, orient="records", lines=True),
    }[fmt]()
    splits = load_text(DatasetConfig(kind="local", path=str(path), text_field="body"))
    assert sorted(list(splits["train"]["text"]) + list(splits["test"]["text"])) == sorted(df["body"])


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line one\nbad \xff\xfe line\nanother good line\nlast good line here\n")
    splits = load_text(DatasetConfig(kind="local", path=str(path), test_size=0.25))
    texts = list(splits["train"]["text"]) + list(splits["test"]["text"])
    assert "bad \ufffd\ufffd line" in texts and len(texts) == 4
    assert "1 line(s) had bytes that are not UTF-8" in caplog.text


@pytest.mark.parametrize("content,match", [(None, "no such file"), (b"", "is empty"), (b"\n\n  \n", "contain no text")])
def test_missing_or_empty_file(tmp_path, content, match):
    path = tmp_path / "x.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_text(DatasetConfig(kind="local", path=str(path)))


def test_corpus_too_small_for_one_block(tmp_path, tokenizer):
    path = tmp_path / "small.txt"
    path.write_text("a few words\nand a few more\n")
    with pytest.raises(UserError, match="not enough for one block of block_size=128"):
        build_blocks(DatasetConfig(kind="local", path=str(path), test_size=0.5), tokenizer, 128)


def test_blocks_are_cached_and_reused(tmp_path, text_file, tokenizer, monkeypatch):
    cfg = DatasetConfig(kind="local", path=str(text_file))
    first = build_blocks(cfg, tokenizer, 32, cache_root=str(tmp_path))
    import mlm.data.blocks

    monkeypatch.setattr(
        mlm.data.blocks, "iter_documents", lambda *_: pytest.fail("a cached build must not reload the text")
    )
    second = build_blocks(cfg, tokenizer, 32, cache_root=str(tmp_path))
    assert list(second["train"]["input_ids"]) == list(first["train"]["input_ids"])
    assert first["train"].column_names == ["input_ids"]  # no stored labels copy: the collator makes them
    monkeypatch.undo()
    other = build_blocks(cfg, tokenizer, 48, cache_root=str(tmp_path))  # a changed setting is a new cache entry
    assert len(other["train"][0]["input_ids"]) == 48


@pytest.fixture(scope="module")
def wiki_splits():
    """load_text of the default corpus, the gensim sample (its parse takes a second or two), for the module's tests."""
    return load_text(DatasetConfig())


def test_gensim_wiki_default_corpus(wiki_splits):
    splits = wiki_splits
    assert len(splits["train"]) > 50 and len(splits["test"]) > 10
    text = " ".join(list(splits["train"]["text"])[:5])
    assert "'''" not in text and "==" not in text  # wiki markup is gone


# ---------------------------------------------------------------- flat-memory build vs the in-memory reference


def reference_blocks(cfg, tokenizer, block_size):
    """What build_blocks returned before it streamed: the whole split in memory, grouped in one numpy pass."""
    return {
        split: group_blocks(
            flat_token_ids(tokenize(texts, tokenizer, cfg)), block_size, cfg.remainder, tokenizer.pad_token_id
        )
        for split, texts in load_text(cfg).items()
    }


@pytest.mark.parametrize("remainder", ["drop", "keep"])
@pytest.mark.parametrize("corpus", ["text_file", "eli5_file"])
def test_blocks_identical_to_the_in_memory_reference(request, tmp_path, tokenizer, monkeypatch, remainder, corpus):
    import mlm.data.blocks

    path = request.getfixturevalue(corpus)
    field = "answers.text" if corpus == "eli5_file" else "text"
    # small batches and chunks: many worker batches (2 processes) and many carried remainders per split
    monkeypatch.setattr(mlm.data.blocks, "CHUNK_TOKENS", 200)
    cfg = DatasetConfig(
        kind="local", path=str(path), text_field=field, remainder=remainder, tokenize_batch_size=7, num_proc=2
    )
    ours = build_blocks(cfg, tokenizer, 48, cache_root=str(tmp_path))
    expected = reference_blocks(cfg, tokenizer, 48)
    for split in ("train", "test"):
        assert np.array_equal(np.array(ours[split]["input_ids"]), expected[split]), split
    assert ours["train"].cache_files, "the blocks are memory-mapped from the cache, not held in memory"


def test_split_indices_are_the_permutation_of_train_test_split():
    from datasets import Dataset

    for n, test_size, seed in [(2, 0.2, 42), (7, 0.5, 1), (401, 0.2, 42), (1000, 0.013, 7)]:
        ref = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=test_size, seed=seed)
        ours = split_indices(n, test_size, seed)
        assert ours["train"].tolist() == ref["train"]["i"] and ours["test"].tolist() == ref["test"]["i"]


@pytest.mark.parametrize("remainder", ["drop", "keep"])
def test_pack_blocks_carries_remainders_across_pieces(remainder):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(1, 1000, size=n).astype(np.int32) for n in [0, 5, 31, 1, 64, 0, 100, 17, 3, 250]]
    packed = np.concatenate(list(pack_blocks(pieces, 32, remainder, fill=0)))
    assert np.array_equal(
        packed, group_blocks(np.concatenate(pieces), 32, remainder, fill=0)
    )  # no token lost at a piece boundary


def test_documents_shorter_than_a_block_still_make_blocks(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(f"word {i} here" for i in range(300)))  # ~6 tokens per document, blocks of 64
    blocks = build_blocks(DatasetConfig(kind="local", path=str(path)), tokenizer, 64, cache_root=str(tmp_path))
    assert len(blocks["train"]) > 10 and len(blocks["test"]) > 2
    first = blocks["train"][0]["input_ids"]
    assert first.count(tokenizer.cls_token_id) > 5  # one block packs many documents


def test_iter_documents_match_load_text(eli5_file, text_file, wiki_splits):
    for cfg in (
        DatasetConfig(kind="local", path=str(eli5_file), text_field="answers.text", max_examples=33),
        DatasetConfig(kind="local", path=str(text_file), max_examples=250),
        DatasetConfig(),
    ):
        splits = wiki_splits if cfg == DatasetConfig() else load_text(cfg)  # the default's documents read again here
        docs = list(iter_documents(cfg))
        assert sorted(docs) == sorted(list(splits["train"]["text"]) + list(splits["test"]["text"]))


def test_missing_field_in_a_streamed_file_names_the_fields(eli5_file):
    with pytest.raises(UserError, match=r"'answer\.txt' does not exist.*answers\.text"):
        next(iter_documents(DatasetConfig(kind="local", path=str(eli5_file), text_field="answer.txt")))
