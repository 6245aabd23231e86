"""Documents -> train/test splits of fixed-length token blocks, on disk, in flat memory.

`build_blocks` runs three passes, none of which holds the corpus in memory:
1. tokenize: documents are read one at a time (`sources.iter_documents`), tokenized in batches by
   `num_proc` worker processes, and their ids appended to one flat int32 file (plus one offset per
   document), each document with the tokenizer's special tokens, as in the HF guide; no tokenizer call
   sees more than ENCODE_CHARS characters (a longer document goes in pieces cut at whitespace, same ids);
2. split: the documents are split into train/test with the permutation `Dataset.train_test_split`
   draws (same seed, same documents), before grouping, so that no document straddles the split;
3. group: for each split, the documents' ids are read back in split order, a chunk of about a
   quarter of a million tokens at a time, concatenated and cut into `block_size` blocks; the tokens that do not
   fill a block are carried into the next chunk (no token is lost between chunks), and the blocks
   are appended to an Arrow file.
The result is the same blocks, token for token, as grouping the whole split in memory (tested).
Memory: a few chunks of tokens, plus 16 bytes per document (offsets and the split permutation).
The blocks are cached under a key of every setting that changes them and of the source files' content
(identity.py); a second run memory-maps them. blocks.json records each Arrow file's size and SHA-256,
checked when the entry is opened (the hash only when the file changed since its last check): an entry
that fails is built again, with one warning.
A build writes into `<key>.tmp-<host>-<pid>` and renames it when done; a killed build's is removed by the next.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections import deque
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from mlm import faults
from mlm.config import DatasetConfig, UserError
from mlm.data.identity import file_sha256, remember_sha256, source_identity, tokenizer_serialization
from mlm.data.sources import batched, iter_documents
from mlm.files import default_cache_root

log = logging.getLogger(__name__)

BLOCKS_FORMAT_VERSION = 3  # bump when the block layout changes, so old caches are not reused (2: one Arrow file per split; 3: content hashes)
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
# dataset.document_attention: each token's position in its document, counted from the block's piece of that document
DOCUMENT_POSITIONS = "document_positions"
DOCUMENT_BLOCK_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        DOCUMENT_POSITIONS: datasets.Sequence(datasets.Value("int32")),
    }
)
CHUNK_TOKENS = 1 << 18  # tokens grouped at a time: 1 MB of ids and 2 MB of gather index; touches <= 1 page per document
ENCODE_DOCS = 128  # documents per tokenizer call: the tokenizer's own buffers (~100 bytes a token) stay small
# characters per tokenizer call (~150 bytes of tokenizer memory each: ~40 MB); a longer document goes in pieces
ENCODE_CHARS = 1 << 18
META = "blocks.json"  # written last into the cache entry: split sizes, token counts, each Arrow file's size and SHA-256
SPLITS = ("train", "test")


# ---------------------------------------------------------------- grouping


def group_blocks(ids: np.ndarray, block_size: int, remainder: str, fill) -> np.ndarray:
    """Cut one long array of token ids into rows of `block_size`, in O(n).

    remainder='drop' discards the last partial block (as the HF guide does); 'keep' pads it with `fill` (the pad id).
    `ids` may carry a trailing axis of per-token values (ids and document positions, n x 2): then `fill`
    holds one fill value for each.
    """
    n_full = len(ids) // block_size
    blocks = ids[: n_full * block_size].reshape(n_full, block_size, *ids.shape[1:])
    rest = len(ids) - n_full * block_size
    if remainder == "keep" and rest:
        last = np.full((1, block_size, *ids.shape[1:]), fill, dtype=ids.dtype)
        last[0, :rest] = ids[n_full * block_size :]
        blocks = np.concatenate([blocks, last])
    return blocks


def pack_blocks(pieces: Iterable[np.ndarray], block_size: int, remainder: str, fill) -> Iterator[np.ndarray]:
    """Blocks of the concatenation of `pieces` (1-D id arrays, or n x 2 with document positions), a
    (k, block_size) array per piece (k x block_size x 2).

    The same blocks as `group_blocks(np.concatenate(pieces), ...)`: the tokens that do not fill a
    block are carried into the next piece, and only the very last remainder is dropped or padded.
    """
    carry = np.zeros(0, dtype=np.int32)
    for piece in pieces:
        ids = np.concatenate([carry, piece]) if len(carry) else piece
        n_full = len(ids) // block_size
        if n_full:
            yield ids[: n_full * block_size].reshape(n_full, block_size, *ids.shape[1:])
        carry = ids[n_full * block_size :]
    last = group_blocks(carry, block_size, remainder, fill)
    if len(last):
        yield last


# ---------------------------------------------------------------- tokenization


def flat_token_ids(tokenized: Dataset) -> np.ndarray:
    """All token ids of a tokenized dataset as one array, read straight from Arrow (no Python lists)."""
    column = tokenized.data.column("input_ids")
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int32)
    values = pc.list_flatten(column)
    return values.to_numpy().astype(np.int32, copy=False) if len(values) else np.zeros(0, dtype=np.int32)


def resolve_num_proc(num_proc: int) -> int:
    """dataset.num_proc=0 means every core this process may run on."""
    if num_proc > 0:
        return num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_TOKENIZER = None  # the tokenizer of the worker processes, inherited through fork


def _encode(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Texts -> (all their ids as one int32 array, one length per text).

    Each tokenizer call sees at most ENCODE_DOCS texts and about ENCODE_CHARS characters; a longer
    text is tokenized in pieces (`_encode_long`), so memory does not grow with a document's length.
    """
    arrays, lengths = [], []
    for group in _call_groups(texts):
        if len(group[0]) > ENCODE_CHARS:
            arrays.append(_encode_long(group[0]))
            lengths.append(len(arrays[-1]))
            continue
        # only input_ids: the attention mask and token types would be two more Python lists per token
        ids = _TOKENIZER(group, verbose=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths += map(len, ids)
        arrays.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(map(len, ids))))
    return (np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)), np.asarray(lengths, dtype=np.int64)


def _call_groups(texts: List[str]) -> Iterator[List[str]]:
    """Consecutive texts, at most ENCODE_DOCS and ENCODE_CHARS characters a group; a longer text alone."""
    group, chars = [], 0
    for text in texts:
        if group and (len(group) == ENCODE_DOCS or chars + len(text) > ENCODE_CHARS):
            yield group
            group, chars = [], 0
        group.append(text)
        chars += len(text)
    if group:
        yield group


def _encode_long(text: str) -> np.ndarray:
    """The ids of one long text, the same as tokenizing it whole: its pieces are tokenized without
    special tokens, and those are added around the whole document.

    Pieces are cut where a run of whitespace starts, which the tokenizer's pre-tokenizer splits at
    anyway (WordPiece, byte-level BPE and SentencePiece's Metaspace all do), so no token spans a cut;
    only a stretch of ENCODE_CHARS characters without any whitespace is cut mid-word.
    """
    pieces, lo = [], 0
    while lo < len(text):
        hi = _piece_end(text, lo, lo + ENCODE_CHARS)
        ids = _TOKENIZER(
            text[lo:hi],
            add_special_tokens=False,
            verbose=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        pieces.append(np.asarray(ids["input_ids"], dtype=np.int32))
        lo = hi
    before, after = _special_tokens_around()
    return np.concatenate([before, *pieces, after])


def _special_tokens_around() -> Tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer adds before and after one text ([CLS] and [SEP] for BERT), read off a probe."""
    full = _TOKENIZER("a", verbose=False)["input_ids"]
    plain = _TOKENIZER("a", add_special_tokens=False, verbose=False)["input_ids"]
    at = next(i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
    return np.asarray(full[:at], dtype=np.int32), np.asarray(full[at + len(plain) :], dtype=np.int32)


def _piece_end(text: str, lo: int, hi: int) -> int:
    """The start of the last whitespace run in text[lo:hi] that follows a non-space (hi if none, or if hi is the end)."""
    if hi >= len(text):
        return len(text)
    cut = hi
    while cut > lo and not text[cut].isspace():
        cut -= 1
    while cut > lo and text[cut - 1].isspace():
        cut -= 1
    return cut if cut > lo else hi


def _quiet_worker() -> None:
    # each worker is one core's worth of tokenization; the tokenizer's own thread pool would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # the pool ends its workers with SIGTERM (a build given up for a stop signal): not the handler the fork copied
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def encode_batches(
    batches: Iterable[List[str]], tokenizer, num_proc: int = 1
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(ids, lengths) of each batch of texts, in order; with num_proc > 1 batches are tokenized by a
    pool of forked workers, at most 2 x num_proc batches in flight (so memory does not grow with the corpus)."""
    global _TOKENIZER
    _TOKENIZER = tokenizer
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    if num_proc <= 1 or len(head) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_encode, itertools.chain(head, batches))  # one batch: starting workers costs more than it saves
        return
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=_quiet_worker) as pool:
        pending: deque = deque()
        for texts in itertools.chain(head, batches):
            pending.append(pool.apply_async(_encode, (texts,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class TokenFile:
    """The ids of every document in source order, on disk: one flat int32 file and one offset per document.

    Reads go through a memory map whose pages are handed back after each chunk (madvise DONTNEED),
    so the process's resident memory does not grow with the file.
    """

    def __init__(self, path: str, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else None
        self.ids = np.frombuffer(self._map, dtype=np.int32) if self._map is not None else np.zeros(0, dtype=np.int32)

    @classmethod
    def write(cls, path: str, doc_batches: Iterable[List[str]], tokenizer, num_proc: int) -> "TokenFile":
        lengths = []
        with open(path, "wb") as f, tqdm(desc="tokenize", unit=" docs", delay=2, mininterval=2) as bar:
            for ids, lens in encode_batches(doc_batches, tokenizer, num_proc):
                f.write(ids.tobytes())
                lengths.append(lens)
                bar.update(len(lens))
                faults.reached("tokenize")
        offsets = np.zeros(sum(map(len, lengths)) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(path, offsets)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def chunks(self, order: np.ndarray, positions: bool = False) -> Iterator[np.ndarray]:
        """The ids of the documents `order`, concatenated in that order, about CHUNK_TOKENS at a time.
        positions=True: an n x 2 array, each id beside its position in its document (0 at the document's start)."""
        starts, ends = self.offsets[order], self.offsets[order + 1]
        cum = np.cumsum(ends - starts)
        bounds = np.searchsorted(
            cum, np.arange(CHUNK_TOKENS, int(cum[-1]) if len(cum) else 0, CHUNK_TOKENS), side="right"
        )
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            if lo == hi:
                continue
            s, e = starts[lo:hi], ends[lo:hi]
            lens = e - s
            # a gather index: document j's positions s_j .. e_j - 1, all documents back to back
            index = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(s - (np.cumsum(lens) - lens), lens)
            ids = self.ids[index]  # a copy; the mapped pages can go
            if positions:  # a token's place in its document: its gather index less its document's start
                in_doc = index - np.repeat(s, lens)
                ids = np.stack([ids, in_doc.astype(np.int32)], axis=1)
            yield ids
            if self._map is not None:
                self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self.ids
        if self._map is not None:
            self._map.close()
        self._file.close()


def split_indices(num_docs: int, test_size: float, seed: int) -> Dict[str, np.ndarray]:
    """Document indices of each split, in split order: the permutation `Dataset.train_test_split(test_size,
    seed=seed)` draws for a dataset of `num_docs` rows (checked against it in the tests)."""
    n_test = int(np.ceil(test_size * num_docs))
    permutation = np.random.default_rng(seed).permutation(num_docs)
    return {"train": permutation[n_test:], "test": permutation[:n_test]}


# ---------------------------------------------------------------- the cached build


def build_blocks(cfg: DatasetConfig, tokenizer, block_size: int, cache_root: str | None = None) -> DatasetDict:
    """Read, tokenize, split and group; cached on disk under a hash of every input that changes the result."""
    cache_root = cache_root or default_cache_root()
    path = os.path.join(cache_root, "blocks", _cache_key(cfg, tokenizer, block_size, cache_root))
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"  # a killed run never leaves a half-written cache entry
    if os.path.exists(os.path.join(path, META)):
        blocks = _open_checked(path, cache_root, tmp)
        if blocks is not None:
            log.info("reusing cached blocks %s", path)
            return blocks
    _remove_stale_builds(os.path.dirname(path))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        start = time.perf_counter()
        log.info(
            "building the token blocks of %s (once per data, tokenizer and block size; cached in %s)",
            cfg.path or cfg.kind,
            path,
        )
        meta = _write_blocks(cfg, tokenizer, block_size, tmp)
        seconds = time.perf_counter() - start
        tokens = sum(m["tokens"] for m in meta["splits"].values())
        log.info("preprocessed %d tokens in %.1f s (%.0f tokens/s)", tokens, seconds, tokens / max(seconds, 1e-9))
        try:
            os.replace(tmp, path)
            for name, record in meta["files"].items():  # hashed while written: the first open only stats them
                remember_sha256(os.path.join(path, name), record["sha256"], cache_root)
        except OSError:
            if not os.path.exists(os.path.join(path, META)):
                raise  # a real write error; otherwise another process saved the same blocks first
    except OSError as e:
        raise UserError(
            f"cannot write the block cache to {path}: {e.strerror} (set MLM_CACHE to a writable directory)"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open_blocks(path)


def _remove_stale_builds(blocks_dir: str) -> None:
    """Delete the `<key>.tmp-<host>-<pid>` directories of builds on this host whose process is gone
    (killed mid-build: its `finally` never ran). A live builder's, or another host's (the cache may be
    a shared file system, where a pid means nothing here), are left alone. `<key>.tmp-<pid>` is the
    older name, from this host."""
    host = socket.gethostname()
    for name in os.listdir(blocks_dir) if os.path.isdir(blocks_dir) else []:
        _, sep, owner = name.partition(".tmp-")
        owner_host, _, pid = owner.rpartition("-") if "-" in owner else (host, "", owner)
        if sep and owner_host == host and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a build that was killed", os.path.join(blocks_dir, name))
            shutil.rmtree(os.path.join(blocks_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


def pad_id_of(tokenizer) -> int:
    """The id a short last block is padded with (remainder=keep); the attention mask hides it."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _write_blocks(cfg: DatasetConfig, tokenizer, block_size: int, out: str) -> Dict[str, Any]:
    positions = cfg.document_attention
    # a padded last block's pad tokens are at position 0: each its own document, seen by no real token
    fill, features = (
        ((pad_id_of(tokenizer), 0), DOCUMENT_BLOCK_FEATURES) if positions else (pad_id_of(tokenizer), BLOCK_FEATURES)
    )
    docs = batched(iter_documents(cfg), cfg.tokenize_batch_size)
    tokens = TokenFile.write(os.path.join(out, "tokens.bin"), docs, tokenizer, resolve_num_proc(cfg.num_proc))
    if tokens.num_docs < 2:
        raise UserError(
            f"the dataset has {tokens.num_docs} non-empty example(s); it needs at least 2 to split off a test set"
        )
    meta = {}
    try:
        for split, order in split_indices(tokens.num_docs, cfg.test_size, cfg.split_seed).items():
            n_tokens = int((tokens.offsets[order + 1] - tokens.offsets[order]).sum())
            writer = ArrowWriter(features=features, path=os.path.join(out, f"{split}.arrow"))
            n_blocks = 0
            with tqdm(
                total=n_tokens, desc=f"group {split}", unit=" tokens", unit_scale=True, delay=2, mininterval=2
            ) as bar:
                for blocks in pack_blocks(tokens.chunks(order, positions), block_size, cfg.remainder, fill):
                    writer.write_table(_blocks_table(blocks))
                    n_blocks += len(blocks)
                    bar.update(len(blocks) * block_size)
            writer.finalize()
            if n_blocks == 0:
                raise UserError(
                    f"the {split} split has {n_tokens} tokens, not enough for one block of block_size={block_size}; "
                    "use a smaller block_size, more data, or dataset.remainder=keep"
                )
            log.info("%s: %d examples, %d tokens -> %d blocks of %d", split, len(order), n_tokens, n_blocks, block_size)
            meta[split] = {"documents": len(order), "tokens": n_tokens, "blocks": n_blocks}
    finally:
        tokens.close()
    os.remove(tokens.path)
    files = {f"{split}.arrow": _file_record(os.path.join(out, f"{split}.arrow")) for split in SPLITS}
    record = {"format": BLOCKS_FORMAT_VERSION, "block_size": block_size, "splits": meta, "files": files}
    with open(os.path.join(out, META), "w") as f:
        json.dump(record, f)
    return record


def _file_record(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        return {"size": os.path.getsize(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _blocks_table(blocks: np.ndarray) -> pa.Table:
    """A (k, block_size) int32 array as an Arrow list column, without going through Python lists; a
    (k, block_size, 2) one (ids and positions in their documents) as two, the positions restarted in each block."""
    k, size = blocks.shape[:2]
    offsets = pa.array(np.arange(0, (k + 1) * size, size, dtype=np.int32))

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.int32, copy=False)))

    if blocks.ndim == 2:
        return pa.table({"input_ids": column(blocks)})
    return pa.table({"input_ids": column(blocks[..., 0]), DOCUMENT_POSITIONS: column(block_positions(blocks[..., 1]))})


def block_positions(in_document: np.ndarray) -> np.ndarray:
    """(k, L) positions of tokens in their documents -> the same, counted from where each document enters its block:
    a block that starts mid-document starts at 0, as if the document's piece in it were run alone."""
    starts = in_document == 0
    starts[:, 0] = True
    columns = np.arange(in_document.shape[1])
    return columns - np.maximum.accumulate(np.where(starts, columns, 0), axis=1)


def _open_blocks(path: str) -> DatasetDict:
    """Memory-mapped: opening costs nothing however large the splits are."""
    return DatasetDict({split: Dataset.from_file(os.path.join(path, f"{split}.arrow")) for split in SPLITS})


def _open_checked(path: str, cache_root: str, aside: str) -> DatasetDict | None:
    """The cached blocks at `path` if every Arrow file has the size and SHA-256 blocks.json records and opens;
    else None, with one warning, and the entry moved to `aside` (this build's temporary name, removed before it builds)."""
    problem = _entry_problem(path, cache_root)
    if problem is None:
        try:
            return _open_blocks(path)
        except Exception as e:  # pyarrow raises its own types for a damaged file
            problem = f"cannot be opened ({type(e).__name__}: {str(e)[:200]})"
    log.warning("cached blocks %s: %s; building them again", path, problem)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process moved it first
        pass
    except OSError as e:
        raise UserError(
            f"cannot move the damaged block cache entry {path} aside: {e.strerror}; delete it, "
            "or set MLM_CACHE to a writable directory"
        ) from e
    return None


def _entry_problem(path: str, cache_root: str) -> str | None:
    """None if each split's Arrow file matches blocks.json (a stat, plus a hash when the file changed since its
    last check: identity.file_sha256), else what is wrong."""
    try:
        with open(os.path.join(path, META)) as f:
            files = json.load(f)["files"]
        for split in SPLITS:
            name, record = f"{split}.arrow", files[f"{split}.arrow"]
            size = os.path.getsize(os.path.join(path, name))
            if size != record["size"]:
                return f"{name} has {size} bytes, {META} records {record['size']}"
            if file_sha256(os.path.join(path, name), cache_root) != record["sha256"]:
                return f"{name} changed after it was written (its SHA-256 differs from {META})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, KeyError, TypeError):
        return f"{META} is unreadable or has no content hashes"
    return None


def _cache_key(cfg: DatasetConfig, tokenizer, block_size: int, cache_root: str) -> str:
    # settings that change speed or only the streaming path do not change the blocks
    unused = ("num_proc", "tokenize_batch_size", "streaming", "streaming_eval_docs") + (
        ("path",) if cfg.kind == "local" else ()
    )
    # off, the key is the one it was before the setting existed: the same blocks, byte for byte, need no rebuild
    unused += () if cfg.document_attention else ("document_attention",)
    settings = {k: v for k, v in vars(cfg).items() if k not in unused}
    # a local dataset is its files' content, in reading order: a changed file gets new blocks; another spelling of its path does not
    sources = source_identity(cfg, cache_root)
    content = [sha for _, sha in sources] if sources is not None else None
    blob = json.dumps(
        [BLOCKS_FORMAT_VERSION, settings, content, block_size, datasets.__version__], sort_keys=True, default=str
    )
    return hashlib.sha256((blob + tokenizer_serialization(tokenizer)).encode()).hexdigest()[:16]
