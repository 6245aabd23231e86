"""Rows are text or a clear error: each case is a small generated file read through `iter_documents`,
the function a run reads its corpus with (the block build and the streaming path both go through it)."""

from __future__ import annotations

import codecs
import json
import logging
import re
import shutil
import subprocess
import zlib

import datasets
import numpy as np
import pytest

from mlm.config import DatasetConfig, UserError
from mlm.data import build_blocks, iter_documents
from tests.conftest import compose, sentences
from tests.data_reference import load_text


def _jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")  # a blank line: rows and lines no longer have the same numbers
    path.write_text("\n".join(lines) + "\n")
    return path


def _docs(path, **kw):
    return list(iter_documents(DatasetConfig(kind="local", path=str(path), **kw)))


# ---------------------------------------------------------------- values of the text field


def test_a_list_of_strings_is_joined_as_the_guide_joins_answers_text(tmp_path):
    rows = [{"text": ["first answer", "second answer"]}, {"text": "plain text"}, {"text": ["a", "", "b"]}, {"text": []}]
    path = _jsonl(tmp_path / "lists.jsonl", rows)
    guide = [
        " ".join(x) if isinstance(x, list) else x for x in (r["text"] for r in rows)
    ]  # the guide's preprocess_function
    assert _docs(path) == [t for t in guide if t.strip()] == ["first answer second answer", "plain text", "a  b"]


def test_a_list_of_lists_is_refused_with_file_and_row(tmp_path):
    """The issue's case: a nested list trained on its Python repr. The guide's " ".join raises on it too."""
    rows = [{"text": "fine"}, {"text": ["also", "fine"]}, {"text": [[" way away "], [" x "]]}, {"text": "never read"}]
    path = _jsonl(tmp_path / "nested.jsonl", rows, blank_after=1)
    with pytest.raises(TypeError):
        " ".join(rows[2]["text"])
    for streaming in (False, True):  # the block build's read and the streaming path's
        with pytest.raises(
            UserError,
            match=r"nested.jsonl, row 3 \(line 4\): text field 'text' is a list holding a list \(\[\[\" way away",
        ):
            list(iter_documents(DatasetConfig(kind="local", path=str(path)), streaming=streaming))


@pytest.mark.parametrize(
    "value,what",
    [
        ({"body": "x"}, "an object"),
        (5, "a number"),
        (2.5, "a number"),
        (True, "a boolean"),
        (["a", None, "b"], "a list holding null"),
        (["a", 3], "a list holding a number"),
        (["a", {"b": 1}], "a list holding an object"),
    ],
)
def test_other_values_are_refused_with_file_and_row(tmp_path, value, what):
    path = _jsonl(tmp_path / "odd.jsonl", [{"text": t} for t in sentences(5)] + [{"text": value}] + [{"text": "after"}])
    with pytest.raises(
        UserError,
        match=rf"odd.jsonl, row 6 \(line 6\): text field 'text' is {what} \(.*\), not text or a list of texts",
    ):
        _docs(path)


def test_a_number_column_of_a_csv_is_refused(tmp_path):
    path = tmp_path / "nums.csv"
    path.write_text("text,n\n" + "\n".join(f"{i},{i}" for i in range(5)) + "\n")
    with pytest.raises(UserError, match=r"nums.csv, row 1: text field 'text' is a number \(0\)"):
        _docs(path)


def test_a_bad_row_in_the_second_file_is_named_by_that_file(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sentences(30)])
    _jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"text": {"not": "text"}}])
    with pytest.raises(UserError, match=r"b.jsonl, row 2 \(line 2\): text field 'text' is an object"):
        _docs(tmp_path, tokenize_batch_size=7)


# ---------------------------------------------------------------- rows without the text field


def test_rows_missing_the_field_are_counted_in_one_warning(tmp_path, caplog):
    rows = [{"text": t} for t in sentences(10)]
    rows[2], rows[5], rows[9] = {"title": "no text here"}, {"text": None, "title": "null text"}, {"title": "none"}
    path = _jsonl(tmp_path / "some.jsonl", rows)
    other = _jsonl(tmp_path / "other.jsonl", [{"text": "one"}, {"title": "missing"}])
    with caplog.at_level(logging.WARNING):
        docs = _docs(tmp_path, tokenize_batch_size=4)
    assert docs == ["one", *(r["text"] for r in rows if r.get("text"))]
    (warning,) = [r.message for r in caplog.records if "missing" in r.message]
    assert (
        f"text field 'text' is missing or null in 4 of 12 rows ({other}: 1 of 2, {path}: 3 of 10); those rows are skipped"
        == warning
    )


def test_a_file_without_the_field_is_counted_too(tmp_path, caplog):
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sentences(5)])
    _jsonl(tmp_path / "b.jsonl", [{"meta": i} for i in range(3)])  # e.g. a metadata file in the same folder
    with caplog.at_level(logging.WARNING):
        assert _docs(tmp_path) == sentences(5)
    assert f"missing or null in 3 of 8 rows ({tmp_path / 'b.jsonl'}: 3 of 3)" in caplog.text


def test_the_field_missing_in_every_row_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "none.jsonl", [{"text": None, "body": "a"}] + [{"body": t} for t in sentences(20)])
    with pytest.raises(
        UserError,
        match=r"text field 'text' is missing or null in all 21 rows \(.*none.jsonl: 21 of 21\); "
        r"the data has fields \['body', 'text'\] \(set dataset.text_field\)",
    ):
        _docs(path, tokenize_batch_size=5)


def test_a_field_that_first_appears_late_in_a_big_file_is_read(tmp_path, caplog):
    """`datasets` casts every later chunk to the first chunk's columns and fails (CastError); rows are read one by one here."""
    rows = [{"title": "x" * 200}] * 60_000 + [{"text": t} for t in sentences(5)]  # > 10 MB: several pyarrow chunks
    path = tmp_path / "late.json"  # a .json file of JSON lines is read as JSON lines too
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    with caplog.at_level(logging.WARNING):
        assert _docs(path, tokenize_batch_size=100_000) == sentences(5)
    assert "missing or null in 60000 of 60005 rows" in caplog.text


def test_a_first_batch_without_the_field_is_refused_at_once(tmp_path):
    path = _jsonl(tmp_path / "typo.jsonl", [{"body": t} for t in sentences(30)])
    with pytest.raises(
        UserError,
        match=rf"text field 'text' does not exist in the first 7 row\(s\) of {path}; the data has fields \['body'\]",
    ):
        _docs(path, tokenize_batch_size=7)


def test_a_dotted_field_missing_in_some_rows_is_counted(tmp_path, caplog):
    rows = [
        {"answers": {"text": ["x y", "z"]}},
        {"answers": None},
        {"answers": {"score": [1]}},
        {"answers": {"text": ["w"]}},
    ]
    path = _jsonl(tmp_path / "eli5.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert _docs(path, text_field="answers.text") == ["x y z", "w"]
    assert "text field 'answers.text' is missing or null in 2 of 4 rows" in caplog.text


# ---------------------------------------------------------------- dataset.split on local files


def test_split_slices_a_text_file_as_datasets_slices_it(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(55)) + "\n")
    for split in ("train[:10]", "train[10%:]", "train[-7:]", "train[5:12]", "train[33%:67%]"):
        guide = datasets.load_dataset("text", data_files=str(path), split=split)[
            "text"
        ]  # what datasets reads for the same slice
        assert _docs(path, split=split) == list(guide), split


def test_split_from_the_command_line_slices_the_run_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(40)))
    cfg = compose(
        ["dataset=local", f"dataset.path={path}", "dataset.split='train[25%:50%]'"]
    )  # quoted: Hydra reads [ as a list
    cfg.validate()
    assert list(iter_documents(cfg.dataset)) == sentences(40)[10:20]


def test_split_slices_across_files_then_max_examples(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sentences(20)])
    _jsonl(tmp_path / "b.jsonl", [{"text": t} for t in sentences(20, seed=1)])
    every = sentences(20) + sentences(20, seed=1)
    assert _docs(tmp_path, split="train[15:25]", tokenize_batch_size=4) == every[15:25]
    assert _docs(tmp_path, split="train[50%:]", max_examples=3) == every[20:23]
    guide = datasets.load_dataset("json", data_files=sorted(map(str, tmp_path.glob("*.jsonl"))), split="train[-10%:]")[
        "text"
    ]
    assert _docs(tmp_path, split="train[-10%:]") == list(guide)


@pytest.mark.parametrize(
    "split,why",
    [
        ("test", r"Unknown split \"test\".*local files are one split, 'train'"),
        ("train[:10]+train[-10:]", "one slice only"),
        ("train[:x]", "Unrecognized instruction format"),
    ],
)
def test_a_split_local_files_do_not_have_is_refused(tmp_path, split, why):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(20)))
    with pytest.raises(UserError, match=rf"dataset.split={re.escape(repr(split))}: .*{why}"):
        _docs(path, split=split)


def test_a_sliced_local_split_cannot_be_streamed(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(20)))
    with pytest.raises(
        UserError, match=r"dataset.split='train\[:10\]': a streamed dataset cannot be sliced; use dataset.max_examples"
    ):
        next(iter_documents(DatasetConfig(kind="local", path=str(path), split="train[:10]"), streaming=True))


def test_a_sliced_split_builds_blocks_of_that_slice_only(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(300)) + "\n")
    half = build_blocks(
        DatasetConfig(kind="local", path=str(path), split="train[:50%]"), tokenizer, 32, cache_root=str(tmp_path)
    )
    whole = build_blocks(DatasetConfig(kind="local", path=str(path)), tokenizer, 32, cache_root=str(tmp_path))
    first = tmp_path / "first.txt"
    first.write_text("\n".join(sentences(150)) + "\n")
    reference = build_blocks(DatasetConfig(kind="local", path=str(first)), tokenizer, 32, cache_root=str(tmp_path))
    assert np.array_equal(np.array(half["train"]["input_ids"]), np.array(reference["train"]["input_ids"]))
    assert len(whole["train"]) > 1.8 * len(half["train"])


# ---------------------------------------------------------------- binary files and byte-order marks


def _png() -> bytes:
    """A real 1x1 PNG image, made by hand (no imaging library needed)."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name,content,why",
    [
        ("image.txt", _png(), r"a PNG image"),
        (
            "blob.jsonl",
            b'{"text": "a"}\n' + bytes(range(256)),
            r"a NUL byte at offset 14: binary data, or UTF-16BE text without a byte-order mark",
        ),
        (
            "nobom.txt",
            "no byte-order mark\n".encode("utf-16-le"),
            r"a NUL byte at offset 1: .*iconv -f UTF-16LE -t UTF-8",
        ),
        (
            "nobom_be.txt",
            "no byte-order mark\n".encode("utf-16-be"),
            r"a NUL byte at offset 0: .*iconv -f UTF-16BE -t UTF-8",
        ),
    ],
    ids=["png", "nul", "utf16le-no-bom", "utf16be-no-bom"],
)
def test_a_binary_file_is_refused_naming_it(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"data file {path} is not text \({why}.*\); point dataset.path at"):
        _docs(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_a_utf8_bom_is_not_text(tmp_path, suffix):
    texts = sentences(6)
    body = {
        ".txt": "\n".join(texts),
        ".jsonl": "\n".join(json.dumps({"text": t}) for t in texts),
        ".csv": "text,n\n" + "\n".join(f"{t},{i}" for i, t in enumerate(texts)),
    }[suffix]
    (tmp_path / f"a{suffix}").write_bytes(codecs.BOM_UTF8 + body.encode())
    (tmp_path / f"b{suffix}").write_bytes(codecs.BOM_UTF8 + body.encode())  # a second file with one too
    assert _docs(tmp_path) == texts + texts  # no U+FEFF in the first text, the CSV header's first column is 'text'


@pytest.mark.parametrize("encoding,name", [("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32-le", "UTF-32")])
def test_utf16_and_utf32_with_a_bom_are_refused_with_the_fix(tmp_path, encoding, name):
    path = tmp_path / "wide.txt"
    texts = sentences(8)
    path.write_bytes(codecs.lookup(encoding).encode("\ufeff" + "\n".join(texts))[0])
    with pytest.raises(
        UserError,
        match=rf"data file {path} is {name} text .*convert it first \(iconv -f {name} -t UTF-8 {path} > {tmp_path / 'wide.utf8.txt'}\)",
    ):
        _docs(path)
    if shutil.which("iconv"):  # the advised command gives a file that reads as the same lines
        subprocess.run(f"iconv -f {name} -t UTF-8 {path} > {tmp_path / 'wide.utf8.txt'}", shell=True, check=True)
        assert _docs(tmp_path / "wide.utf8.txt") == texts


def test_a_json_error_after_a_bom_names_the_bad_line_not_the_first(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(UserError, match=r"bom.jsonl, line 2, column \d+: not valid JSON"):
        _docs(path)


def test_downstream_csv_with_a_bom_has_its_text_column(tmp_path):
    """Excel writes a BOM: the first header cell must still be 'text', not '\\ufefftext'."""
    from mlm.downstream.tasks import load_local

    path = tmp_path / "t.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"text,label\ngood film,pos\nbad film,neg\n")
    examples = load_local(compose(["downstream=local", f"downstream.path={path}"]).downstream)
    assert examples.texts == [("good film",), ("bad film",)] and examples.classes == ["neg", "pos"]


def test_load_text_reads_what_iter_documents_reads(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"text": ["a b", "c"]}, {"x": 1}] + [{"text": t} for t in sentences(10)])
    splits = load_text(DatasetConfig(kind="local", path=str(path), split="train[:8]"))
    assert sorted(list(splits["train"]["text"]) + list(splits["test"]["text"])) == sorted(["a b c", *sentences(6)])
