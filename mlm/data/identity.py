"""What a run trained on, by content: the SHA-256 of each source file and of the tokenizer.

A run records `data_identity` in its checkpoints (state.json) and results.json under "data"; a
resume or a rerun of a finished run compares it with the data it is given now (`changed_data`),
so a corpus edited in place under the same name is refused, and the same files under another
spelling of their path (`./corpus.txt`, a link) are the same data.

Hashing a large corpus on every start would cost a full read of it (~1.5 GB/s from the page
cache), so a file's hash is kept in `<cache root>/hashes/` with the file's stat signature (device,
inode, size, mtime and ctime in ns) and reused while that is unchanged: a restart costs one stat and
one small read per file. Any write to a file changes its ctime, which no user can set back, so an
edited file is always hashed again. The block cache key uses the same hashes (blocks.py): one hash
per file version, shared by both.

Hub datasets and the gensim sample shipped in a package are not content-checked (sources: null):
the settings that name them (dataset.path, config_name, split) are compared as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from mlm.data.sources import _local_files
from mlm.records import malformed_data

HASHES = "hashes"  # under the cache root: one small JSON per hashed file


def _stat_signature(st: os.stat_result) -> List[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_sha256(path: str, cache_root: str) -> str:
    """The SHA-256 of a file's content, hashed only when the file changed since it was last hashed (see above)."""
    real = os.path.realpath(path)
    memo = _memo_path(real, cache_root)
    before = _stat_signature(os.stat(real))
    try:
        with open(memo) as f:
            saved = json.load(f)
        if saved["path"] == real and saved["stat"] == before:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not hashed yet, or an unreadable memo: hash again
    with open(real, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _stat_signature(os.stat(real)) == before:  # a file written while it was read is not remembered
        _remember(memo, {"path": real, "stat": before, "sha256": digest})
    return digest


def remember_sha256(path: str, digest: str, cache_root: str) -> None:
    """Record the hash of a file this process just wrote and hashed (the block cache's), so its next open only stats it."""
    real = os.path.realpath(path)
    _remember(_memo_path(real, cache_root), {"path": real, "stat": _stat_signature(os.stat(real)), "sha256": digest})


def _memo_path(real: str, cache_root: str) -> str:
    return os.path.join(cache_root, HASHES, hashlib.sha256(real.encode()).hexdigest()[:24] + ".json")


def _remember(memo: str, record: Dict[str, Any]) -> None:
    tmp = f"{memo}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        # a cache may be shared: never write through a link planted at the temporary name
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as f:
            json.dump(record, f)
        os.replace(tmp, memo)
    except FileExistsError:  # another process of ours is writing it, or something planted: not ours to remove
        return
    except OSError:  # a read-only cache only costs hashing again next time
        with contextlib.suppress(OSError):
            os.remove(tmp)


def source_identity(cfg, cache_root: str) -> Optional[List[List[str]]]:
    """[[real path, sha256], ...] of the files a local dataset reads, in reading order; None for other kinds.
    `cfg` is a DatasetConfig or its DictConfig (kind and path are read)."""
    if cfg.kind != "local":
        return None
    return [[os.path.realpath(f), file_sha256(f, cache_root)] for f in _local_files(str(cfg.path))]


def tokenizer_serialization(tokenizer) -> str:
    """The tokenizer as text: everything that decides its ids (vocabulary, normalizer, pre-tokenizer, special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        # without the truncation and padding state, which the first call with default arguments clears
        # (the harness never truncates or pads when it makes blocks): a used tokenizer is the same tokenizer
        return json.dumps(
            {**json.loads(tokenizer.backend_tokenizer.to_str()), "truncation": None, "padding": None}, sort_keys=True
        )
    return repr(sorted(tokenizer.get_vocab().items()))


def data_identity(cfg, tokenizer, cache_root: str) -> Dict[str, Any]:
    """What a run trained on: {"sources": source_identity, "tokenizer": sha256 of its serialization}."""
    return {
        "sources": source_identity(cfg, cache_root),
        "tokenizer": hashlib.sha256(tokenizer_serialization(tokenizer).encode()).hexdigest(),
    }


def changed_data(saved: Optional[Dict[str, Any]], now: Dict[str, Any]) -> List[str]:
    """What differs between the data a run recorded and `now`, one phrase each; [] when the same (or not
    recorded: a run of an older version). Only keys both hold are compared (the guard knows no tokenizer).
    The same contents in the same order are the same data, whatever the paths are called."""
    if not isinstance(saved, dict):
        return []
    problem = malformed_data(saved)
    if problem:  # callers check first (read_state, check_same_data, each with its own one line): a bug if reached
        raise ValueError(problem)
    differ = []
    there, here = saved.get("sources"), now.get("sources")
    if there is not None and here is not None and [h for _, h in there] != [h for _, h in here]:
        differ = _changed_files(dict(there), dict(here))
    if saved.get("tokenizer") and now.get("tokenizer") and saved["tokenizer"] != now["tokenizer"]:
        differ.append(
            f"the tokenizer has another vocabulary or rules (sha256 {saved['tokenizer'][:12]} there, {now['tokenizer'][:12]} now)"
        )
    return differ


def _changed_files(there: Dict[str, str], here: Dict[str, str]) -> List[str]:
    shown = [
        f"{p} has other content (sha256 {there[p][:12]} there, {here[p][:12]} now)"
        for p in there
        if p in here and there[p] != here[p]
    ]
    shown += [f"{p} is no longer read" for p in there if p not in here]
    shown += [f"{p} is new" for p in here if p not in there]
    return shown or ["the files are read in another order"]
