"""Writes that survive a kill at any byte: a file or directory appears complete or not at all.

Every file a run writes for others to read (results.json, final/, checkpoints, summaries,
plots) goes through here: written under a temporary name beside its destination, flushed to
disk, then renamed over it. A rename within one directory is atomic on POSIX filesystems, so a
reader, or a rerun after a kill, sees either the old version or the new one, never half of one.
The temporary names start with "." so nothing that lists a run directory mistakes them for output.

Nothing here writes through a symbolic link: a file is created or appended with O_NOFOLLOW (a link
planted under its name is an error, its target untouched), and a rename replaces a link at the
destination rather than following it. mlm.rundir refuses a run directory holding links up front;
this is the second line, for a link planted while a run writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import threading
from pathlib import Path
from typing import Any, Iterator, Optional


def default_cache_root() -> str:
    """Where the harness caches what it builds (token blocks, mlm.flops's CPU matmul peak): $MLM_CACHE, else ~/.cache/mlm-harness."""
    return os.environ.get("MLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlm-harness"))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a power cut otherwise may undo it; a kill never does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_new(path: Path, mode: str = "w", **kwargs):
    """open(path, mode) for writing from the start ("w" or "wb"), never through a link: an existing
    file (not a link) is truncated; a link there raises OSError (ELOOP) and its target is untouched."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
    return os.fdopen(fd, mode, **kwargs)


def open_append(path: Path, mode: str = "a", **kwargs):
    """open(path, "a") never through a link (OSError ELOOP instead): for metrics.jsonl, the CSVs, the log."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
    return os.fdopen(fd, mode, **kwargs)


class NoFollowFileHandler(logging.FileHandler):
    """The run log's handler (conf/hydra/job_logging/mlm.yaml): logging.FileHandler, but a link planted
    as the log file is never appended to. The log then goes to the console only: Hydra opens the log
    before a sweep job's run-dir check (mlm.rundir.refuse_links), which then refuses the job in one line."""

    def _open(self):
        try:
            return open_append(self.baseFilename, encoding=self.encoding, errors=self.errors)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            return open(os.devnull, "a", encoding=self.encoding)


class NotRegularFile(ValueError):
    """read_regular's refusal: not a regular file, or larger than asked."""


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a file someone else may have put there: opened without following a link (OSError ELOOP), without
    blocking on a pipe, read only if it is a regular file of at most `limit` bytes (else NotRegularFile)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotRegularFile("is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotRegularFile(f"is larger than {limit} bytes")
    return data


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write and fsync, in place: for files inside a directory that is itself renamed into place."""
    with open_new(path) as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _tmp_name(path: Path, writer: str = "") -> Path:
    return path.with_name(f".tmp-{path.name}{writer}")


def atomic_write_text(path: Path, text: str, shared: bool = False) -> None:
    """Replace `path` with `text` in one rename (costs one fsync: milliseconds, once per file). `shared`: several
    writers may write it at once (a parallel sweep's jobs), so each has a temporary file of its own; with one, a
    writer could remove another's before its rename and every rename could fail."""
    path = Path(path)
    tmp = _tmp_name(path, f"-{os.getpid()}-{threading.get_ident()}" if shared else "")
    _remove(tmp)  # left over by a run killed mid-write, or a link planted there: removed, never written through
    try:
        with open_new(tmp) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)  # a full disk must not be kept full by our own leftovers
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write a file or directory into; it replaces `path` on success.

    A directory cannot be renamed over a non-empty one, so an old version is moved aside first
    and deleted after: a kill between the two renames leaves `path` missing (never half-written),
    which reads as "not written yet" and is redone by the rerun that completes the run.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    _remove(tmp)  # left over by a run killed mid-write
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
    replace(tmp, path)


def replace(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` (file or directory) to `path`, moving an old directory aside first."""
    old = path.with_name(f".old-{path.name}")
    _remove(old)
    if path.is_dir():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    _remove(old)


class _RecordingFile:
    """A file object for torch.save that keeps the OSError of a failed write: torch replaces it with
    a RuntimeError that does not say why ("unexpected pos 704 vs 598" on a full disk)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def torch_save(obj: Any, path: Path) -> None:
    """torch.save, raising the OSError behind a failed write (a full disk, a read-only filesystem)."""
    import torch

    with open_new(path, "wb") as f:
        recording = _RecordingFile(f)
        try:
            torch.save(obj, recording)
        except RuntimeError as e:
            if recording.error is not None:
                raise recording.error from e
            raise


def os_error_of(e: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: `e` itself, or the one a library folded into its message
    (safetensors: "... (os error 28)", torch.distributed.checkpoint: "[Errno 28] ..."); None when `e` is not a failed write."""
    if isinstance(e, OSError):
        return e
    code = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(e))
    if code:
        number = int(code[1] or code[2])
        return OSError(number, os.strerror(number))
    return None


def write_error(what: str, path: Path, e: BaseException) -> Exception:
    """The one-line UserError (Resumable) for a failed write of `what` to `path` (call only when os_error_of(e) is set)."""
    from mlm.config import Resumable

    err = os_error_of(e)
    return Resumable(f"cannot write {what} {path}: {err.strerror or err} ({os_error_advice(err)})")


def os_error_advice(e: OSError) -> str:
    """What to do about a failed write, from its errno: the advice differs for a full disk and a collision."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space, then resume"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "fix the permissions, then resume"
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link planted in the run directory
        return "a symbolic link is in its place; remove it, then resume"
    if e.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY):
        return "something else changed the run directory during the write; is another process writing into it?"
    return "then resume"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
