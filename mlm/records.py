"""What a run records about the data it read, checked before use: records are read back from files
(results.json, a checkpoint's state.json) that others may have written. A leaf module: mlm.checkpoint,
mlm.rundir, mlm.report and mlm.data.identity all read records, and none of them needs the others for it."""

from __future__ import annotations

from typing import Any, List, Optional


def malformed_data(record: Any) -> Optional[str]:
    """Why a recorded data identity (a run's "data", mlm/data/identity.py) is not what data_identity writes, or None: it is, or there is none
    (None: a run of an older version). Records are read from files others may have written: checked before use.
    Here, not in mlm.data.identity, so that mlm.report and mlm.checkpoint read records without importing the data stack."""
    if record is None:
        return None
    if not isinstance(record, dict):
        return f'"data" is a JSON {type(record).__name__}, not an object'
    sources, tokenizer = record.get("sources"), record.get("tokenizer")
    if sources is not None and not (
        isinstance(sources, list)
        and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in sources)
    ):
        return '"data.sources" is not a list of [path, sha256] pairs'
    if tokenizer is not None and not isinstance(tokenizer, str):
        return '"data.tokenizer" is not a sha256 string'
    return None


def content_hashes(record: Any) -> Optional[List[str]]:
    """The content hashes of a well-formed data record's source files in reading order (as changed_data compares
    them), or None (not recorded, not local files, or malformed): the data a run read, whatever its paths are called."""
    if malformed_data(record) is not None or not isinstance(record, dict) or record.get("sources") is None:
        return None
    return [h for _, h in record["sources"]]
