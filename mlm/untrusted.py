"""Reading what someone else wrote (checkpoints, run dirs, model folders) as data, never as code.

- torch.distributed.checkpoint's `.metadata` is a pickle that torch reads with plain `pickle.load`:
  `MetadataUnpickler` builds only the classes DCP metadata is made of (and torch dtypes, sizes,
  paths); anything else is refused before it is called (mlm/dcp_reader.py uses it).
- `load_weights_only` is torch.load(weights_only=True) whose refusal is our own line: torch's
  message advises weights_only=False, the one thing that would run the payload.
- `remote_code_of` finds a model folder's own Python (auto_map) before transformers is asked.
- `check_no_interpolation` refuses `${...}` in values read from a file: resolving one reads
  environment variables (secrets) or calls resolvers.
"""

from __future__ import annotations

import enum
import json
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from mlm.config import UserError


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names something other than plain data: refused before any of it was called."""


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# What DCP metadata is built from (torch 2.13: Metadata.state_dict_metadata, storage_data, storage_meta).
METADATA_CLASSES = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id: a path when dcp.save was given one (pathlib._local from Python 3.13)
    *(
        (module, cls)
        for module in ("pathlib", "pathlib._local")
        for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    ),
}


def enum_member(cls: Any, name: Any):
    """What a pickle's getattr(cls, name) may give here: a member of an enum it was allowed to name. Python 3.11.2
    (Debian 12's) pickles an enum member as getattr(EnumClass, "NAME") (3.11.7 by value): DCP's memory format."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise RefusedPickle(f"calls getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r}), not an enum member")


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only METADATA_CLASSES, torch dtypes and enum members by name (`enum_member`);
    anything else is a RefusedPickle."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name == "getattr":  # __builtin__: a protocol 2 pickle
            return enum_member
        if (module, name) in METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise RefusedPickle(f"names {module}.{name}, which checkpoint metadata never holds")

    def persistent_load(self, pid):
        raise RefusedPickle("holds a persistent reference, which checkpoint metadata never holds")


def refusal(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only refusal names (its first unsupported global, or what it could not read), without its
    advice to switch weights-only loading off."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"names {found.group(1)}"
    # a damaged or foreign file: "Unsupported operand 110"
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = detail.group(1).strip()[:100] if detail and "weights_only" not in detail.group(1) else "unreadable"
    return f"is not plain tensors and values ({detail})"


def load_weights_only(source, what: str, map_location: Any = "cpu"):
    """torch.load(weights_only=True); a refusal is a RefusedPickle naming `what` and what it holds."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except RefusedPickle:
        raise
    except pickle.UnpicklingError as e:
        raise RefusedPickle(f"{what} {refusal(e)}: refused, nothing of it was run") from None


def remote_code_of(folder: str) -> Optional[str]:
    """The file of a local model folder that asks for its own Python code (an `auto_map`), or None."""
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        try:
            settings = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable: transformers' own error says so
        if isinstance(settings, dict) and settings.get("auto_map"):
            return str(path)
    return None


def check_no_interpolation(values: Dict[str, Any], where: str) -> None:
    """Refuse a value holding `${...}`: resolving it would read an env var (a secret) or call a resolver. The value is not shown."""
    for key, value in values.items():
        for text in _strings(value):
            if "${" in text:
                raise UserError(
                    f"{where}: {key} holds an interpolation (${{...}}), which is never resolved from a file; refused"
                )


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
