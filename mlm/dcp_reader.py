"""torch.distributed.checkpoint directories read as data: `SafeReader` and `SafePlanner` for dcp.load.

Apart from mlm.untrusted because importing torch.distributed.checkpoint takes a second or more:
only the code that reads shards imports this module (inside its functions).
- torch's FileSystemReader.read_metadata unpickles `.metadata` with plain pickle.load; SafeReader's
  uses mlm.untrusted.MetadataUnpickler (DCP's own metadata classes only) and keeps every data file
  it names inside the checkpoint directory.
- torch's DefaultLoadPlanner torch.load-s non-tensor entries (an optimizer's param_groups) with
  weights_only=False; SafePlanner with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from mlm.untrusted import MetadataUnpickler, RefusedPickle, load_weights_only


class SafeReader(FileSystemReader):
    """FileSystemReader whose read_metadata unpickles only DCP metadata (torch's does pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = Path(self._get_metadata_path(kwargs.get("rank")))
        name = f"{path.parent.name}/{path.name}"  # sharded/.metadata
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except RefusedPickle as e:
            raise RefusedPickle(f"{name} {e}: refused, nothing of it was run") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise RefusedPickle(f"{name} is not checkpoint metadata ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(metadata, Metadata):
            raise RefusedPickle(f"{name} holds a {type(metadata).__name__}, not checkpoint metadata")
        for info in (metadata.storage_data or {}).values():  # the data files: plain names in this directory
            file = getattr(info, "relative_path", None)
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise RefusedPickle(f"{name} points at {file!r}, outside its checkpoint directory: refused")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are loaded with weights_only=True (torch's: weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        loaded = load_weights_only(value, f"the checkpoint's non-tensor entry {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load(state, reader: SafeReader) -> None:
    """dcp.load into `state` through `reader` and SafePlanner (without a process group: in this one process, from every
    rank's file). A failure is raised as itself: torch wraps it in a CheckpointException, a BaseException (no
    `except Exception` sees it) whose message is every rank's traceback."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # without a process group: "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=reader, planner=SafePlanner())
    except CheckpointException as e:
        error = next((exc for exc, _ in e.failures.values() if isinstance(exc, Exception)), None)
        if error is None:
            raise
        raise error from None
