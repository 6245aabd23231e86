"""Text corpora -> train/test splits of fixed-length token blocks. No masking here (see masking.py).

Steps: (1) a loader from the registry returns a `DatasetDict` of raw examples with one `text`
column, split into train/test before tokenization so that no document straddles the split;
(2) batched tokenization (each document gets the tokenizer's special tokens, as in the HF guide);
(3) all token ids are concatenated and cut into `block_size` blocks in one linear numpy pass.
The blocks are saved with `datasets` under a key of every setting that changes them, so a second
run with the same settings memory-maps them instead of redoing the work.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from mlm.config import DatasetConfig, UserError
from mlm.hub import hub_reachable, offline_mode

log = logging.getLogger(__name__)

BLOCKS_FORMAT_VERSION = 1  # bump when the block layout changes, so old caches are not reused
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ---------------------------------------------------------------- loaders: DatasetConfig -> raw text


def _gensim_test_file(name: str) -> Path:
    try:
        import gensim
    except ImportError as e:  # pragma: no cover - gensim is a dependency
        raise UserError("dataset=wiki needs the gensim package: pip install gensim") from e
    return Path(gensim.__file__).parent / "test" / "test_data" / name


_WIKI_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # ''italic'' and '''bold''' quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == Heading == -> Heading
    (re.compile(r"^[:*#;]+\s*", re.M), ""),  # indentation and list markers
    (re.compile(r"\n{2,}"), "\n"),
]


def _wiki_articles() -> List[str]:
    """Articles of the English Wikipedia sample in the gensim wheel, parsed with gensim's wiki parser."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    with bz2.open(path) as f:
        for _title, markup, _page_id in extract_pages(f, filter_namespaces=("0",)):
            text = filter_wiki(markup)
            if text.lstrip().lower().startswith("#redirect"):
                continue
            for pattern, repl in _WIKI_MARKUP:
                text = pattern.sub(repl, text)
            text = text.strip()
            if len(text.split()) >= 20:
                articles.append(text)
    return articles


def load_gensim_wiki(cfg: DatasetConfig) -> Dataset:
    texts = _wiki_articles()
    if cfg.include_news:  # one news story per line
        texts += [line.strip() for line in _gensim_test_file("lee_background.cor").read_text().splitlines() if line.strip()]
    return Dataset.from_dict({"text": texts})


def load_hub(cfg: DatasetConfig) -> Dataset:
    """A dataset from the Hugging Face hub (parquet/json/csv repos; datasets 5 runs no loading scripts)."""
    if not offline_mode() and not hub_reachable():
        raise UserError(
            f"dataset {cfg.path!r}: the Hugging Face hub is unreachable; use dataset=local dataset.path=<file>, "
            "or HF_HUB_OFFLINE=1 if it is in your Hugging Face cache"
        )
    try:
        return datasets.load_dataset(cfg.path, cfg.config_name, split=cfg.split)
    except Exception as e:  # the hub client raises many types: offline, 404, gated, script datasets
        raise UserError(f"could not load dataset {cfg.path!r}: {type(e).__name__}: {_first_line(e)}") from e


def _read_text_file(path: str) -> List[str]:
    """Lines of a text file; non-UTF-8 bytes are replaced by U+FFFD and counted, not fatal."""
    lines, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line, bad = raw.decode("utf-8", errors="replace"), bad + 1
            if line.strip():
                lines.append(line.rstrip("\r\n"))
    if bad:
        log.warning("%s: %d line(s) had bytes that are not UTF-8; they were replaced with U+FFFD", path, bad)
    return lines


def load_local(cfg: DatasetConfig) -> Dataset:
    """The user's own files: txt (one example per non-empty line), json/jsonl, csv, parquet."""
    files = _local_files(cfg.path)
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1:
        raise UserError(f"dataset.path={cfg.path!r} mixes file types {sorted(suffixes)}; point it at one type")
    suffix = suffixes.pop()
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"data file {f} is empty")
    if suffix == ".txt":
        lines = [line for f in files for line in _read_text_file(f)]
        if not lines:
            raise UserError(f"data file(s) {files} contain no text")
        return Dataset.from_dict({"text": lines})
    try:
        return datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=files, split="train")
    except Exception as e:
        raise UserError(f"could not read {files}: {type(e).__name__}: {_first_line(e)}") from e


def _local_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if Path(f).suffix.lower() in LOCAL_BUILDERS)
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if os.path.isfile(path) else [])
    if not files:
        raise UserError(f"dataset.path={path!r}: no such file (or no {'/'.join(LOCAL_BUILDERS)} files there)")
    unsupported = [f for f in files if Path(f).suffix.lower() not in LOCAL_BUILDERS]
    if unsupported:
        raise UserError(f"{unsupported[0]}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)}")
    return files


LOADERS: Dict[str, Callable[[DatasetConfig], Dataset]] = {
    "gensim_wiki": load_gensim_wiki,
    "hub": load_hub,
    "local": load_local,
}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# ---------------------------------------------------------------- raw examples -> text column


def select_text(ds: Dataset, field: str) -> Dataset:
    """Keep one text column. A dotted field reaches into structs; a list of strings is joined with spaces."""
    if field not in ds.column_names and "." in field:
        ds = ds.flatten()  # struct `answers` -> columns `answers.text`, `answers.score`, ...
    if field not in ds.column_names:
        raise UserError(f"text field {field!r} does not exist; the data has fields {ds.column_names} (set dataset.text_field)")

    def join(batch):
        out = []
        for value in batch[field]:
            if value is None:
                out.append("")
            elif isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out.append(" ".join(str(v) for v in value if v))
            else:
                raise UserError(f"text field {field!r} holds {type(value).__name__} values, not text or lists of text")
        return {"text": out}

    return ds.map(join, batched=True, remove_columns=ds.column_names, desc="select text")


def load_text(cfg: DatasetConfig) -> DatasetDict:
    """Raw examples -> {'train', 'test'} with one `text` column, split with a fixed seed."""
    ds = LOADERS[_registered(cfg.kind)](cfg)
    if cfg.max_examples:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    ds = select_text(ds, cfg.text_field)
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, desc="drop empty")
    if len(ds) < 2:
        raise UserError(f"the dataset has {len(ds)} non-empty example(s); it needs at least 2 to split off a test set")
    return ds.train_test_split(test_size=cfg.test_size, seed=cfg.split_seed, shuffle=True)


def _registered(kind: str) -> str:
    if kind not in LOADERS:
        raise UserError(f"dataset.kind={kind!r} is unknown; choose one of {sorted(LOADERS)}")
    return kind


# ---------------------------------------------------------------- text -> token blocks


def group_blocks(ids: np.ndarray, block_size: int, remainder: str, pad_id: int) -> np.ndarray:
    """Cut one long 1-D array of token ids into rows of `block_size`, in O(n).

    remainder='drop' discards the last partial block (as the HF guide does); 'keep' pads it with `pad_id`.
    """
    n_full = len(ids) // block_size
    blocks = ids[: n_full * block_size].reshape(n_full, block_size)
    rest = len(ids) - n_full * block_size
    if remainder == "keep" and rest:
        last = np.full((1, block_size), pad_id, dtype=ids.dtype)
        last[0, :rest] = ids[n_full * block_size :]
        blocks = np.concatenate([blocks, last])
    return blocks


def tokenize(texts: Dataset, tokenizer, cfg: DatasetConfig) -> Dataset:
    def encode(batch):
        # verbose=False: documents longer than the model's maximum are fine here, they get cut into blocks
        return {"input_ids": tokenizer(batch["text"], verbose=False)["input_ids"]}

    return texts.map(
        encode, batched=True, batch_size=cfg.tokenize_batch_size, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=texts.column_names, desc="tokenize",
    )


def flat_token_ids(tokenized: Dataset) -> np.ndarray:
    """All token ids of a tokenized dataset as one array, read straight from Arrow (no Python lists)."""
    column = tokenized.data.column("input_ids")
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int32)
    values = pc.list_flatten(column)
    return values.to_numpy().astype(np.int32, copy=False) if len(values) else np.zeros(0, dtype=np.int32)


def build_blocks(cfg: DatasetConfig, tokenizer, block_size: int, cache_root: str | None = None) -> DatasetDict:
    """Load, split, tokenize and group; cached on disk under a hash of every input that changes the result."""
    cache_root = cache_root or os.environ.get("MLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlm-harness"))
    key = _cache_key(cfg, tokenizer, block_size)
    path = os.path.join(cache_root, "blocks", key)
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        log.info("reusing cached blocks %s", path)
        return datasets.load_from_disk(path)
    datasets.disable_progress_bars()  # we log one line per split instead
    texts = load_text(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks = {}
    for split, ds in texts.items():
        ids = flat_token_ids(tokenize(ds, tokenizer, cfg))
        grouped = group_blocks(ids, block_size, cfg.remainder, pad_id)
        if len(grouped) == 0:
            raise UserError(
                f"the {split} split has {len(ids)} tokens, not enough for one block of block_size={block_size}; "
                "use a smaller block_size, more data, or dataset.remainder=keep"
            )
        # int32 halves the disk and memory of int64; the collator widens to int64 per batch
        log.info("%s: %d examples, %d tokens -> %d blocks of %d", split, len(ds), len(ids), len(grouped), block_size)
        blocks[split] = Dataset.from_dict({"input_ids": grouped}, features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}))
    result = DatasetDict(blocks)
    _save_atomically(result, path)
    return datasets.load_from_disk(path)


def _save_atomically(dsd: DatasetDict, path: str) -> None:
    """Write to a temporary directory, then rename: a killed run never leaves a half-written cache."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        dsd.save_to_disk(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.exists(os.path.join(path, "dataset_dict.json")):
                raise  # a real write error; otherwise another process saved the same blocks first
    except OSError as e:
        raise UserError(f"cannot write the block cache to {path}: {e.strerror} (set MLM_CACHE to a writable directory)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_key(cfg: DatasetConfig, tokenizer, block_size: int) -> str:
    settings = {k: v for k, v in vars(cfg).items() if k not in ("num_proc", "tokenize_batch_size")}
    source = {}
    if cfg.kind == "local":  # the files' identity: a changed file must not reuse stale blocks
        source = {f: (os.path.getsize(f), os.path.getmtime(f)) for f in _local_files(cfg.path)}
    tok = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps([BLOCKS_FORMAT_VERSION, settings, source, block_size, datasets.__version__], sort_keys=True, default=str)
    return hashlib.sha256((blob + tok).encode()).hexdigest()[:16]
