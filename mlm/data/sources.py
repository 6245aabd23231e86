"""Where text comes from (the gensim sample, a hub dataset, local files), and the text column of their raw examples.

`iter_documents` yields a corpus's documents one at a time in source order, reading files
incrementally (local files never pass through memory as a whole). `blocks.build_blocks` and
`streaming` build on it.

Rows are text or a clear error: a list of strings is joined with spaces (as the HF guide joins
`answers.text`), any other value is refused with its file and row; rows without the text field are
counted in one warning (in every row: an error); binary files and UTF-16/32 text are refused, a UTF-8
byte-order mark is dropped; `dataset.split` slices local files as `datasets` slices a hub split.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import itertools
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import datasets
from datasets import Dataset

from mlm.config import DatasetConfig, UserError
from mlm.hub import hub_reachable, offline_mode

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# leading bytes of compressed files: such a file named .txt or .jsonl is refused, not read as text (parquet's own are PAR1)
COMPRESSED = {
    "gzip": re.compile(rb"\x1f\x8b"),
    "bzip2": re.compile(rb"BZh[1-9]1AY&SY"),
    "xz": re.compile(rb"\xfd7zXZ\x00"),
    "zstd": re.compile(rb"\x28\xb5\x2f\xfd"),
}
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")  # read as UTF-8 text (parquet is binary by design)
# a text file in another encoding is refused with the fix, never read as UTF-8 with NULs (UTF-32 LE first: it starts like UTF-16 LE)
WIDE_BOMS = [
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
]
BINARY_MAGIC = {
    "a PNG image": b"\x89PNG\r\n\x1a\n",
    "a JPEG image": b"\xff\xd8\xff",
    "a GIF image": b"GIF8",
    "a PDF": b"%PDF-",
    "a zip archive (docx, xlsx, ...)": b"PK\x03\x04",
}
BINARY_HEAD = 8000  # a NUL byte in the first 8000 bytes makes a file binary (git's test); text never holds one


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
        texts += [
            line.strip() for line in _gensim_test_file("lee_background.cor").read_text().splitlines() if line.strip()
        ]
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
    with CR line endings is many examples, not one. A UTF-8 byte-order mark is not text: it is dropped.
    """
    bad = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            if n == 0:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            for part in raw.rstrip(b"\r\n").split(b"\r"):
                try:
                    line = part.decode("utf-8")
                except UnicodeDecodeError:
                    line, bad = part.decode("utf-8", errors="replace"), bad + 1
                if line.strip():
                    yield line
    if bad:
        log.warning("%s: %d line(s) had bytes that are not UTF-8; they were replaced with U+FFFD", path, bad)


def _read_error(files: List[str], e: Exception) -> UserError:
    """What a failed read of local files tells the user: the first malformed JSON line if there is
    one (the file and its line number), else the reader's own first line."""
    where = (
        next(filter(None, map(_bad_json_line, files)), None)
        if Path(files[0]).suffix.lower() in (".json", ".jsonl")
        else None
    )
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
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # json.loads refuses one; the reader skips it
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
        _check_readable(f, suffix)
    return files, suffix


def _check_readable(f: str, suffix: str) -> None:
    """Refuse, in one line naming the file, what would otherwise be read as garbage: an empty file, a
    compressed one, text in UTF-16/32, or binary data (an image renamed .txt) in a text format."""
    if os.path.getsize(f) == 0:
        raise UserError(f"data file {f} is empty")
    with open(f, "rb") as fh:
        head = fh.read(BINARY_HEAD)
    kind = next((name for name, magic in COMPRESSED.items() if magic.match(head)), None)
    if kind:
        raise UserError(
            f"data file {f} is {kind}-compressed, not a plain {suffix} file; decompress it first (e.g. {kind} -dc {f} > plain{suffix})"
        )
    if suffix not in TEXT_SUFFIXES:
        return
    utf8 = f"{Path(f).with_suffix('')}.utf8{suffix}"
    encoding = next((name for bom, name in WIDE_BOMS if head.startswith(bom)), None)
    if encoding:
        raise UserError(
            f"data file {f} is {encoding} text (it starts with a {encoding} byte-order mark); data files are read as UTF-8: "
            f"convert it first (iconv -f {encoding} -t UTF-8 {f} > {utf8})"
        )
    what, nul = next((name for name, magic in BINARY_MAGIC.items() if head.startswith(magic)), None), head.find(b"\0")
    if what or nul >= 0:
        # ASCII in UTF-16: big-endian puts the NUL first, little-endian second
        wide = "UTF-16BE" if nul % 2 == 0 else "UTF-16LE"
        why = (
            what
            or f"a NUL byte at offset {nul}: binary data, or {wide} text without a byte-order mark (iconv -f {wide} -t UTF-8 {f} > {utf8})"
        )
        raise UserError(f"data file {f} is not text ({why}); point dataset.path at {suffix} text files")


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
        log.warning(
            "dataset.path=%r: %d path(s) are links to files already listed; each file is read once",
            path,
            len(files) - len(unique),
        )
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def join_texts(values: list, field: str, source: str, first_row: int) -> List[str]:
    """One string per row: text as is, a list of strings joined with spaces (as the HF guide joins
    `answers.text`: " ".join), a missing value (None) as '' (it is counted by `_FieldTally`).

    Anything else is refused with its file and row: the guide's join raises on it too, and str() of a
    number, an object or a nested list (its Python repr) is not text to train on.
    """
    out = []
    for row, value in enumerate(values, first_row):
        if value is None:
            out.append("")
        elif isinstance(value, str):
            out.append(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out.append(" ".join(value))
        else:
            inner = next((v for v in value if not isinstance(v, str)), None) if isinstance(value, list) else None
            what = f"a list holding {_json_kind(inner)}" if isinstance(value, list) else _json_kind(value)
            raise UserError(
                f"{_row_name(source, row)}: text field {field!r} is {what} ({_short(value)}), not text or a list of texts; "
                "fix that row, or point dataset.text_field at a text field"
            )
    return out


def _json_kind(value) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list", bytes: "bytes"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_name(source: str, row: int) -> str:
    """'<file>, row N' (rows counted from 1 as the reader yields them); a JSON-lines file adds the line, which blank lines shift."""
    suffix = Path(source).suffix.lower()
    if not os.path.isfile(source) or not _is_json_lines(source, suffix):
        return f"{source}, row {row}"
    with open(source, "rb") as f:
        lines = (n for n, raw in enumerate(f, 1) if raw.strip())
        line = next(itertools.islice(lines, row - 1, None), None)
    return f"{source}, row {row}" + (f" (line {line})" if line else "")


class _FieldTally:
    """The text field's values batch by batch, counting the rows of each source that lack it (absent or null).

    A field absent from the whole first batch read is most likely a wrong name: that is an error at once,
    before the rest is read (a corpus whose first tokenize_batch_size rows all lack it is refused too). A field missing in all rows read is an error at the end; in some, one warning.
    """

    def __init__(self, field: str):
        self.field, self.rows, self.missing, self.fields = field, Counter(), Counter(), []

    def values(self, source: str, batch: Dict[str, list]) -> list:
        n, values = _batch_len(batch), _lookup(batch, self.field)
        if values is None and not self.rows:
            raise UserError(
                f"text field {self.field!r} does not exist in the first {n} row(s) of {source}; "
                f"the data has fields {sorted(_flat_fields(batch))} (set dataset.text_field)"
            )
        self.fields = self.fields or sorted(_flat_fields(batch))
        values = [None] * n if values is None else values
        self.rows[source] += n
        self.missing[source] += sum(v is None for v in values)
        return values

    def report(self) -> None:
        total, missing = sum(self.rows.values()), sum(self.missing.values())
        if not missing:
            return
        sources = [s for s in self.rows if self.missing[s]]
        where = ", ".join(f"{s}: {self.missing[s]} of {self.rows[s]}" for s in sources[:3])
        where += f" and {len(sources) - 3} more file(s)" if len(sources) > 3 else ""
        if missing == total:
            raise UserError(
                f"text field {self.field!r} is missing or null in all {total} rows ({where}); "
                f"the data has fields {self.fields} (set dataset.text_field)"
            )
        _warn_once(
            f"text field {self.field!r} is missing or null in {missing} of {total} rows ({where}); those rows are skipped"
        )


# a streamed corpus is read by every shard, pass after pass: each warning is logged once per process
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


# ---------------------------------------------------------------- documents one at a time


def iter_documents(cfg: DatasetConfig, streaming: bool = False) -> Iterator[str]:
    """The non-empty texts of the corpus in source order, one at a time, without holding the corpus in memory.

    Local files are read incrementally, file by file so that a bad row is named by its file and row
    (text and JSON lines by our own readers, csv/parquet/JSON arrays through `datasets` streaming). A hub dataset is read from
    the Hugging Face cache (memory-mapped Arrow), or with streaming=True straight from the hub. The
    gensim sample is tiny and built in memory. `dataset.split` slices a hub dataset as `datasets`
    does, and local files (one split, 'train') the same way here; then `max_examples` keeps the first N rows.
    """
    rows, seen, tally = _row_range(cfg, streaming), 0, _FieldTally(cfg.text_field)
    for source, first_row, batch in _sliced(_raw_batches(cfg, streaming), rows):
        if cfg.max_examples:
            batch = {k: v[: cfg.max_examples - seen] for k, v in batch.items()}
        values = tally.values(source, batch)
        seen += len(values)
        for text in join_texts(values, cfg.text_field, source, first_row):
            if text.strip():
                yield text
        if cfg.max_examples and seen >= cfg.max_examples:
            break
    tally.report()


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last one shorter) from any iterable, read lazily."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _batch_len(batch: Dict[str, list]) -> int:
    return len(next(iter(batch.values()), []))


def _row_range(cfg: DatasetConfig, streaming: bool) -> range:
    """The rows `dataset.split` selects of a local (or gensim) corpus, whose one split is 'train':
    'train[:1000]', 'train[10%:]', 'train[-50:]' mean what they mean to `datasets` (the same rounding).
    A hub dataset is sliced by `datasets` itself. Percent and negative bounds count the rows first (one more read)."""
    if cfg.kind == "hub" or cfg.split == "train":
        return range(sys.maxsize)
    if streaming:
        raise UserError(f"dataset.split={cfg.split!r}: a streamed dataset cannot be sliced; use dataset.max_examples")
    fix = f"{'local files are' if cfg.kind == 'local' else 'this dataset is'} one split, 'train': use dataset.split=train or a slice of it (train[:1000], train[10%:])"
    try:
        instruction = datasets.ReadInstruction.from_spec(cfg.split)
        # also checks the split name before anything is read
        if len(instruction.to_absolute({"train": sys.maxsize})) != 1:
            raise ValueError("one slice only")
        n_rows = (
            sum(_batch_len(b) for _, _, b in _raw_batches(cfg, streaming))
            if "%" in cfg.split or "-" in cfg.split
            else sys.maxsize
        )
        (part,) = instruction.to_absolute({"train": n_rows})
    except (ValueError, AssertionError) as e:
        raise UserError(f"dataset.split={cfg.split!r}: {_first_line(e).rstrip('.')}; {fix}") from e
    return range(part.from_, part.to)


def _sliced(
    batches: Iterable[Tuple[str, int, Dict[str, list]]], rows: range
) -> Iterator[Tuple[str, int, Dict[str, list]]]:
    """The (source, first row, batch) items cut to the rows `rows` of the whole sequence; stops reading after the last."""
    at = 0
    for source, first_row, batch in batches:
        n = _batch_len(batch)
        lo, hi = max(rows.start - at, 0), min(rows.stop - at, n)
        if hi > lo:
            yield source, first_row + lo, batch if (lo, hi) == (0, n) else {k: v[lo:hi] for k, v in batch.items()}
        at += n
        if at >= rows.stop:
            return


def _numbered(source: str, batches: Iterable[Dict[str, list]]) -> Iterator[Tuple[str, int, Dict[str, list]]]:
    """(source, number of the batch's first row in that source, batch)."""
    row = 1
    for batch in batches:
        yield source, row, batch
        row += _batch_len(batch)


def _raw_batches(cfg: DatasetConfig, streaming: bool) -> Iterator[Tuple[str, int, Dict[str, list]]]:
    size = cfg.tokenize_batch_size
    if cfg.kind == "local":
        yield from _local_batches(cfg.path, size)
        return
    if cfg.kind == "hub":
        if streaming and "[" in cfg.split:
            raise UserError(
                f"dataset.split={cfg.split!r}: a streamed hub dataset cannot be sliced; use dataset.max_examples"
            )
        source = load_hub(cfg, streaming=streaming)
    else:
        source = load_gensim_wiki(cfg)
    yield from _numbered(cfg.path or str(cfg.kind), source.iter(batch_size=size))


def _local_batches(path: str, size: int) -> Iterator[Tuple[str, int, Dict[str, list]]]:
    """Batches of raw rows of the local files, file by file, each numbered within its file."""
    files, suffix = _checked_local_files(path)
    shards = _datasets_shards([f for f in files if suffix != ".txt" and not _is_json_lines(f, suffix)], suffix)
    any_rows = False
    for f in files:
        if suffix == ".txt":  # our own line reader: the bad-byte count, CR line ends, no BOM
            batches = ({"text": lines} for lines in batched(_read_text_file(f), size))
        elif f in shards:
            batches = _datasets_batches(f, shards[f], size)
        else:
            batches = (_columns(rows) for rows in batched(_json_lines(f), size))
        for item in _numbered(f, batches):
            any_rows = True
            yield item
    if not any_rows:
        raise UserError(f"data file(s) {files} contain no text")


def _datasets_shards(files: List[str], suffix: str) -> Dict[str, datasets.IterableDataset]:
    """Each file read by `datasets` (csv, parquet, a .json document), streamed: one shard per file, in order."""
    if not files:
        return {}
    try:
        source = datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=files, split="train", streaming=True)
    except Exception as e:
        raise _read_error(files, e) from e
    if source.num_shards != len(files):  # not one shard per file: open each file on its own (slower: ~50 ms a file)
        return {
            f: datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=[f], split="train", streaming=True)
            for f in files
        }
    return {f: source.shard(len(files), i) for i, f in enumerate(files)}


def _datasets_batches(f: str, shard: datasets.IterableDataset, size: int) -> Iterator[Dict[str, list]]:
    try:
        yield from shard.iter(batch_size=size)  # a malformed row fails here, mid-stream
    except Exception as e:
        raise _read_error([f], e) from e


def _is_json_lines(f: str, suffix: str) -> bool:
    """A .jsonl file, or a .json file whose first line is a JSON object on its own (not an array or one multi-line document)."""
    if suffix == ".jsonl":
        return True
    if suffix != ".json":
        return False
    with open(f, "rb") as fh:
        start = fh.read(BINARY_HEAD).removeprefix(codecs.BOM_UTF8).lstrip()
        if not start.startswith(b"{"):  # an array, perhaps all on one (long) line: for `datasets`
            return False
        fh.seek(0)
        first = next((line for line in fh if line.strip()), b"").removeprefix(codecs.BOM_UTF8)
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _json_lines(path: str) -> Iterator[dict]:
    """The rows of a JSON-lines file, one object per non-blank line, read lazily.

    Read here rather than by `datasets`: each row keeps its own fields and types (pyarrow casts every
    later row, and file, to the first rows' schema, so a field that first appears late fails the read,
    and a blank line next to mixed types crashes it), and a bad line is named at once.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield _json_row(path, n, raw)


def _json_row(path: str, n: int, raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise UserError(f"{path}, line {n}: bytes that are not UTF-8; fix or remove that line") from None
    except ValueError as e:
        raise UserError(
            f"{path}, line {n}, column {e.colno}: not valid JSON ({e.msg.removesuffix(' at')}); fix or remove that line"
        ) from None
    if not isinstance(value, dict):
        raise UserError(
            f"{path}, line {n}: a JSON {type(value).__name__}, not an object with a text field; fix or remove that line"
        )
    return value


def _columns(rows: List[dict]) -> Dict[str, list]:
    """Rows -> a batch of columns, as `datasets` gives them; a field a row lacks is None there."""
    return {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}


def _lookup(batch: Dict[str, list], field: str) -> Optional[list]:
    """The values of `field` in a batch of raw rows, or None if no row has it; a dotted field reaches into structs (dicts)."""
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
        names += (
            [f"{name}.{sub}" for sub in _flat_fields({k: [v] for k, v in first.items()})]
            if isinstance(first, dict)
            else [name]
        )
    return names
