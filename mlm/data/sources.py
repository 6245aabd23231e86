"""Where text comes from: a registry of loaders, and the text column of their raw examples.

Two ways to read a corpus:
- `load_text` returns a `DatasetDict` of train/test text, split by document before tokenization
  (the whole corpus as one in-memory or memory-mapped `Dataset`; the reference for small corpora);
- `iter_documents` yields the same documents one at a time in source order, reading files
  incrementally (local files never pass through memory as a whole). `blocks.build_blocks` and
  `streaming` build on it.
"""

from __future__ import annotations

import bz2
import glob
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import datasets
from datasets import Dataset, DatasetDict

from mlm.config import DatasetConfig, UserError
from mlm.hub import hub_reachable, offline_mode

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# leading bytes of compressed files: such a file named .txt or .jsonl is refused, not read as text (parquet's own are PAR1)
COMPRESSED = {"gzip": re.compile(rb"\x1f\x8b"), "bzip2": re.compile(rb"BZh[1-9]1AY&SY"), "xz": re.compile(rb"\xfd7zXZ\x00"),
              "zstd": re.compile(rb"\x28\xb5\x2f\xfd")}


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


def load_hub(cfg: DatasetConfig, streaming: bool = False) -> Dataset:
    """A dataset from the Hugging Face hub (parquet/json/csv repos; datasets 5 runs no loading scripts)."""
    if not offline_mode() and not hub_reachable():
        raise UserError(
            f"dataset {cfg.path!r}: the Hugging Face hub is unreachable; use dataset=local dataset.path=<file>, "
            "or HF_HUB_OFFLINE=1 if it is in your Hugging Face cache"
        )
    try:
        return datasets.load_dataset(cfg.path, cfg.config_name, split=cfg.split, streaming=streaming)
    except Exception as e:  # the hub client raises many types: offline, 404, gated, script datasets
        raise UserError(f"could not load dataset {cfg.path!r}: {type(e).__name__}: {_first_line(e)}") from e


def _read_text_file(path: str) -> Iterator[str]:
    """Non-empty lines of a text file, read lazily; non-UTF-8 bytes are replaced by U+FFFD and counted, not fatal.

    Lines end at LF, CRLF or a lone CR (old Mac files), as in Python's universal newlines: a file
    with CR line endings is many examples, not one.
    """
    bad = 0
    with open(path, "rb") as f:
        for raw in f:
            for part in raw.rstrip(b"\r\n").split(b"\r"):
                try:
                    line = part.decode("utf-8")
                except UnicodeDecodeError:
                    line, bad = part.decode("utf-8", errors="replace"), bad + 1
                if line.strip():
                    yield line
    if bad:
        log.warning("%s: %d line(s) had bytes that are not UTF-8; they were replaced with U+FFFD", path, bad)


def load_local(cfg: DatasetConfig) -> Dataset:
    """The user's own files: txt (one example per non-empty line), json/jsonl, csv, parquet."""
    files, suffix = _checked_local_files(cfg.path)
    if suffix == ".txt":
        lines = [line for f in files for line in _read_text_file(f)]
        if not lines:
            raise UserError(f"data file(s) {files} contain no text")
        return Dataset.from_dict({"text": lines})
    try:
        return datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=files, split="train")
    except Exception as e:
        raise _read_error(files, e) from e


def _read_error(files: List[str], e: Exception) -> UserError:
    """What a failed read of local files tells the user: the first malformed JSON line if there is
    one (the file and its line number), else the reader's own first line."""
    where = next(filter(None, map(_bad_json_line, files)), None) if Path(files[0]).suffix.lower() in (".json", ".jsonl") else None
    if where:
        return UserError(f"{where}; fix or remove that line")
    shown = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
    return UserError(f"could not read {shown}: {type(e).__name__}: {_first_line(e)}")


def _bad_json_line(path: str) -> Optional[str]:
    """'<path>, line N: <why>' for the first line of a JSON-lines file that is not a JSON object, or None.

    A .json file whose first line is not JSON on its own is one JSON document (an array): it is parsed whole.
    """
    first = True
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as e:
                if first and path.lower().endswith(".json"):
                    return _bad_json_document(path)
                return f"{path}, line {n}, column {e.colno}: not valid JSON ({e.msg.removesuffix(' at')})"
            if not isinstance(value, dict):
                return f"{path}, line {n}: a JSON {type(value).__name__}, not an object with a text field"
            first = False
    return None


def _bad_json_document(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            json.load(f)
    except ValueError as e:
        return f"{path}, line {getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)})"
    return None


def _checked_local_files(path: str) -> Tuple[List[str], str]:
    """The files behind dataset.path and their one suffix; empty, compressed and mixed types are user errors."""
    files = _local_files(path)
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1:
        raise UserError(f"dataset.path={path!r} mixes file types {sorted(suffixes)}; point it at one type")
    suffix = suffixes.pop()
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"data file {f} is empty")
        with open(f, "rb") as fh:
            head = fh.read(10)
        kind = next((name for name, magic in COMPRESSED.items() if magic.match(head)), None)
        if kind:
            raise UserError(f"data file {f} is {kind}-compressed, not a plain {suffix} file; decompress it first (e.g. {kind} -dc {f} > plain{suffix})")
    return files, suffix


def _local_files(path: str) -> List[str]:
    """The data files behind dataset.path (a file, a glob or a directory), sorted, each real file once."""
    if os.path.isdir(path):
        files = sorted(f for f in _walk(path) if Path(f).suffix.lower() in LOCAL_BUILDERS)
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if os.path.isfile(path) else [])
    if not files:
        raise UserError(f"dataset.path={path!r}: no such file (or no {'/'.join(LOCAL_BUILDERS)} files there)")
    unsupported = [f for f in files if Path(f).suffix.lower() not in LOCAL_BUILDERS]
    if unsupported:
        raise UserError(f"{unsupported[0]}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)}")
    unique = list({os.path.realpath(f): f for f in reversed(files)}.values())[::-1]  # the first name of each real file
    if len(unique) < len(files):
        log.warning("dataset.path=%r: %d path(s) are links to files already listed; each file is read once", path, len(files) - len(unique))
    return unique


def _walk(root: str) -> Iterator[str]:
    """Every non-hidden file under root, following directory links but entering each real directory once
    (a link back up the tree would otherwise repeat its files at every depth)."""
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (os.path.join(folder, n) for n in names if not n.startswith("."))


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
        return {"text": join_texts(batch[field], field)}

    return ds.map(join, batched=True, remove_columns=ds.column_names, desc="select text")


def join_texts(values: list, field: str) -> List[str]:
    """One string per example: text as is, a list of strings joined with spaces, None as ''."""
    out = []
    for value in values:
        if value is None:
            out.append("")
        elif isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.append(" ".join(str(v) for v in value if v))
        else:
            raise UserError(f"text field {field!r} holds {type(value).__name__} values, not text or lists of text")
    return out


def load_text(cfg: DatasetConfig) -> DatasetDict:
    """Raw examples -> {'train', 'test'} with one `text` column, split with a fixed seed."""
    ds = LOADERS[cfg.kind](cfg)
    if cfg.max_examples:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    ds = select_text(ds, cfg.text_field)
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, desc="drop empty")
    if len(ds) < 2:
        raise UserError(f"the dataset has {len(ds)} non-empty example(s); it needs at least 2 to split off a test set")
    return ds.train_test_split(test_size=cfg.test_size, seed=cfg.split_seed, shuffle=True)


# ---------------------------------------------------------------- documents one at a time


def iter_documents(cfg: DatasetConfig, streaming: bool = False) -> Iterator[str]:
    """The non-empty texts of the corpus in source order, one at a time: the same documents, in the
    same order, as `load_text` before its split, without holding the corpus in memory.

    Local files are read incrementally (text line by line, json/csv/parquet through `datasets`
    streaming). A hub dataset is read from the Hugging Face cache (memory-mapped Arrow), or with
    streaming=True straight from the hub. The gensim sample is tiny and built in memory.
    """
    seen = 0
    for batch in _raw_batches(cfg, streaming):
        values = _field_values(batch, cfg.text_field)
        if cfg.max_examples:
            values = values[: cfg.max_examples - seen]
        seen += len(values)
        for text in join_texts(values, cfg.text_field):
            if text.strip():
                yield text
        if cfg.max_examples and seen >= cfg.max_examples:
            return


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last one shorter) from any iterable, read lazily."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _raw_batches(cfg: DatasetConfig, streaming: bool) -> Iterator[Dict[str, list]]:
    size = cfg.tokenize_batch_size
    if cfg.kind == "local":
        files, suffix = _checked_local_files(cfg.path)
        if suffix == ".txt":  # our own line reader: the same lines as load_local, and the bad-byte count
            lines = (line for f in files for line in _read_text_file(f))
            yield from ({"text": batch} for batch in batched(lines, size))
            return
        try:
            source = datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=files, split="train", streaming=True)
            yield from source.iter(batch_size=size)  # a malformed row fails here, mid-stream
        except Exception as e:
            raise _read_error(files, e) from e
        return
    if cfg.kind == "hub":
        if streaming and "[" in cfg.split:
            raise UserError(f"dataset.split={cfg.split!r}: a streamed hub dataset cannot be sliced; use dataset.max_examples")
        source = load_hub(cfg, streaming=streaming)
    else:
        source = LOADERS[cfg.kind](cfg)
    yield from source.iter(batch_size=size)


def _field_values(batch: Dict[str, list], field: str) -> list:
    """The values of `field` in a batch of raw examples; a dotted field reaches into structs (dicts)."""
    values = _lookup(batch, field)
    if values is None:
        raise UserError(f"text field {field!r} does not exist; the data has fields {sorted(_flat_fields(batch))} (set dataset.text_field)")
    return values


def _lookup(batch: Dict[str, list], field: str) -> Optional[list]:
    if field in batch:
        return batch[field]
    head, _, rest = field.partition(".")
    values = batch.get(head)
    if not rest or values is None or not all(v is None or isinstance(v, dict) for v in values):
        return None
    rows = [v or {} for v in values]
    return _lookup({k: [r.get(k) for r in rows] for r in rows for k in r}, rest)


def _flat_fields(batch: Dict[str, list]) -> List[str]:
    names = []
    for name, values in batch.items():
        first = next((v for v in values if v is not None), None)
        names += [f"{name}.{sub}" for sub in _flat_fields({k: [v] for k, v in first.items()})] if isinstance(first, dict) else [name]
    return names
