"""Bad input data: each case is one clear error naming the file (and line), or is read correctly."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mlm.data.blocks as blocks_mod
from mlm.config import DatasetConfig, UserError
from mlm.data import build_blocks, iter_documents
from mlm.data.sources import _local_files
from tests.conftest import ROOT, TINY_RUN, compose, run_in_process, sentences
from tests.data_reference import load_text
from tests.test_errors import assert_clean_failure


def _jsonl_with_bad_row(path, bad_line: int, row: str = '{"text": "cut off'):
    rows = [json.dumps({"text": t}) for t in sentences(300)]
    rows.insert(bad_line - 1, row)
    path.write_text("\n".join(rows) + "\n")
    return path


# ---------------------------------------------------------------- malformed rows


@pytest.mark.parametrize("row,why", [('{"text": "cut off', "not valid JSON"), ('["a", "list"]', "not an object")])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, row, why):
    path = _jsonl_with_bad_row(tmp_path / "rows.jsonl", 101, row)
    cfg = DatasetConfig(kind="local", path=str(path))
    with pytest.raises(UserError, match=rf"rows.jsonl, line 101\b.*{why}"):
        list(iter_documents(cfg))  # the build's path: the row fails mid-stream
    with pytest.raises(UserError, match=rf"rows.jsonl, line 101\b.*{why}"):
        load_text(cfg)


def test_malformed_json_document_names_its_line(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two"\n  {"text": "three"}\n]\n')  # a missing comma
    with pytest.raises(UserError, match=r"doc.json, line 4: not valid JSON"):
        list(iter_documents(DatasetConfig(kind="local", path=str(path))))


def test_the_bad_file_of_several_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in sentences(50)))
    _jsonl_with_bad_row(tmp_path / "b.jsonl", 7)
    with pytest.raises(UserError, match=r"b.jsonl, line 7,"):
        list(iter_documents(DatasetConfig(kind="local", path=str(tmp_path))))


# ---------------------------------------------------------------- compressed files under a text name


@pytest.mark.parametrize("name,compress,kind", [("c.txt", gzip.compress, "gzip"), ("c.jsonl", bz2.compress, "bzip2")])
def test_compressed_file_under_a_text_name_is_refused(tmp_path, name, compress, kind):
    path = tmp_path / name
    path.write_bytes(compress("\n".join(sentences(100)).encode()))
    with pytest.raises(UserError, match=rf"{name} is {kind}-compressed, not a plain .*decompress it"):
        list(iter_documents(DatasetConfig(kind="local", path=str(path))))


def test_text_that_starts_like_a_magic_number_is_text(tmp_path):
    path = tmp_path / "bz.txt"
    path.write_text("BZh is how this line starts\nand a second line\n")
    assert len(list(iter_documents(DatasetConfig(kind="local", path=str(path))))) == 2


# ---------------------------------------------------------------- links: each real file once


def test_symlink_loop_reads_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("\n".join(sentences(40)))
    (tmp_path / "sub" / "b.txt").write_text("\n".join(sentences(10, seed=1)))
    os.symlink("..", tmp_path / "sub" / "up")  # a loop: sub/up/sub/up/... is the same folder
    os.symlink("a.txt", tmp_path / "same.txt")  # a second name for a.txt
    assert _local_files(str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    assert list(iter_documents(DatasetConfig(kind="local", path=str(tmp_path)))) == sentences(40) + sentences(
        10, seed=1
    )
    assert _local_files(str(tmp_path / "*.txt")) == [str(tmp_path / "a.txt")]  # a glob, too


def test_linked_data_folder_is_followed(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.txt").write_text("\n".join(sentences(20)))
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "store", tmp_path / "data" / "shared")
    assert list(iter_documents(DatasetConfig(kind="local", path=str(tmp_path / "data")))) == sentences(20)


# ---------------------------------------------------------------- line endings


@pytest.mark.parametrize("newline", ["\r", "\r\n"])
def test_cr_line_endings_are_lines(tmp_path, newline):
    path = tmp_path / "mac.txt"
    path.write_bytes(newline.join(sentences(50)).encode())
    cfg = DatasetConfig(kind="local", path=str(path))
    assert list(iter_documents(cfg)) == sentences(50)
    splits = load_text(cfg)
    assert sorted(list(splits["train"]["text"]) + list(splits["test"]["text"])) == sorted(sentences(50))


# ---------------------------------------------------------------- long documents


def _encoded(tokenizer, texts):
    blocks_mod._TOKENIZER = tokenizer
    ids, lengths = blocks_mod._encode(texts)
    return ids.tolist(), lengths.tolist()


def test_ordinary_documents_give_the_same_ids(tokenizer):
    texts = sentences(300)
    ids, lengths = _encoded(tokenizer, texts)
    reference = tokenizer(texts)["input_ids"]
    assert ids == [i for r in reference for i in r] and lengths == list(map(len, reference))


def test_long_document_is_tokenized_in_pieces_to_the_same_ids(tokenizer, monkeypatch):
    long = " ".join(sentences(200, seed=5)).replace(" the ", " the  \t ")  # runs of mixed whitespace at some cuts
    texts = ["Short one.", long, "Another short one."]
    calls = []
    monkeypatch.setattr(blocks_mod, "ENCODE_CHARS", 500)

    def spy(batch, **kw):
        calls.append(sum(map(len, batch)) if isinstance(batch, list) else len(batch))
        return tokenizer(batch, **kw)

    blocks_mod._TOKENIZER = spy
    ids, lengths = blocks_mod._encode(texts)
    assert max(calls) <= 500 and len(calls) > len(long) // 500  # no call saw more than ENCODE_CHARS characters
    reference = tokenizer(texts)["input_ids"]
    assert ids.tolist() == [i for r in reference for i in r] and lengths.tolist() == list(map(len, reference))


def test_long_document_builds_the_same_blocks(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "long.txt"
    path.write_text(" ".join(sentences(300)) + "\n" + "\n".join(sentences(50, seed=2)) + "\n")
    cfg = DatasetConfig(kind="local", path=str(path))
    whole = build_blocks(cfg, tokenizer, 32, cache_root=str(tmp_path / "a"))
    monkeypatch.setattr(blocks_mod, "ENCODE_CHARS", 300)
    pieces = build_blocks(cfg, tokenizer, 32, cache_root=str(tmp_path / "b"))
    for split in ("train", "test"):
        assert np.array_equal(np.array(whole[split]["input_ids"]), np.array(pieces[split]["input_ids"]))


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("override", ["seed=-1", f"seed={2**64}", f"seed={2**32}", "dataset.split_seed=-3"])
def test_out_of_range_seed_is_a_config_error(override):
    cfg = compose([*TINY_RUN, "dataset.path=corpus.txt", override])
    with pytest.raises(
        UserError, match=rf"{override.split('=')[0]}=.* is out of range; a seed must be in \[0, 2\*\*32\)"
    ):
        cfg.validate()


def test_largest_seed_is_valid():
    compose([*TINY_RUN, "dataset.path=corpus.txt", f"seed={2**32 - 1}", "dataset.split_seed=0"]).validate()


# ---------------------------------------------------------------- a build killed midway


KILLED_BUILD = """
import os, signal, sys
import mlm.data.blocks as b
from mlm.config import DatasetConfig, ModelConfig
from mlm.models import load_tokenizer

def die(cfg, tokenizer, block_size, out):
    open(os.path.join(out, "tokens.bin"), "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a preempted job would

b._write_blocks = die
b.build_blocks(DatasetConfig(kind="local", path=sys.argv[1]), load_tokenizer(ModelConfig()), 32, cache_root=sys.argv[2])
"""


@pytest.mark.slow
def test_killed_build_leftovers_are_removed_by_the_next_build(tmp_path, text_file, tokenizer):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(text_file), str(cache)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    (left,) = (cache / "blocks").iterdir()
    assert ".tmp-" in left.name and (left / "tokens.bin").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:  # a build that is still running here, and one on another host: neither may be touched
        live = cache / "blocks" / f"other.tmp-{socket.gethostname()}-{sleeper.pid}"
        remote = cache / "blocks" / f"other.tmp-elsewhere-{left.name.rpartition('-')[2]}"  # the killed build's pid
        older = cache / "blocks" / f"old.tmp-{left.name.rpartition('-')[2]}"  # the name before the host was in it
        live.mkdir(), remote.mkdir(), older.mkdir()
        build_blocks(DatasetConfig(kind="local", path=str(text_file)), tokenizer, 32, cache_root=str(cache))
        assert not left.exists() and not older.exists() and live.exists() and remote.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- as a user sees it


@pytest.mark.slow
@pytest.mark.parametrize("case", ["row", "nested", "png", "gzip", "seed"])
def test_bad_data_via_cli(tmp_path, text_file, case):
    run_dir = tmp_path / "run"
    if case == "row":
        args, needles = [f"dataset.path={_jsonl_with_bad_row(tmp_path / 'rows.jsonl', 101)}"], ["rows.jsonl, line 101"]
    elif case == "nested":  # once trained on the Python repr of the lists
        args = [
            f"dataset.path={_jsonl_with_bad_row(tmp_path / 'rows.jsonl', 101, json.dumps({'text': [['a b'], ['c']]}))}"
        ]
        needles = ["rows.jsonl, row 101 (line 101): text field 'text' is a list holding a list"]
    elif case == "png":  # once trained on after a "non-UTF-8 lines" warning
        (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
        args, needles = [f"dataset.path={tmp_path / 'image.txt'}"], ["image.txt is not text (a PNG image)"]
    elif case == "gzip":
        (tmp_path / "z.txt").write_bytes(gzip.compress(text_file.read_bytes()))
        args, needles = [f"dataset.path={tmp_path / 'z.txt'}"], ["z.txt is gzip-compressed"]
    else:
        args, needles = [f"dataset.path={text_file}", "seed=-1"], ["seed=-1 is out of range"]
    assert_clean_failure(run_in_process([*TINY_RUN, *args, f"hydra.run.dir={run_dir}"]), run_dir, *needles)
