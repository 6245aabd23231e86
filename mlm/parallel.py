"""How the model is spread over processes, from outside the model: replicas or FSDP2 shards.

`runtime.sharding=none` is the plain path: Accelerate wraps the objective in DDP when there is
more than one process (every rank holds the whole model and optimizer). `runtime.sharding=fsdp`
applies PyTorch's FSDP2 (`fully_shard`) ourselves, as torchtitan does: every transformer layer is
its own unit and the root, the objective the loop calls, holds the rest (embeddings, the tied
decoder, the head), so one layer's parameters are gathered at a time. This works with gloo on CPU as with NCCL on GPUs; Accelerate's
own FSDP mode only switches on for GPU-like devices, so it is not used.

The training loop asks a `Layout` for these things and never branches on the mode:
  - `no_sync(objective, last)`: skip the gradient reduction of all but the last micro-batch;
  - `pieces(model, optimizer)`: the model and optimizer as pieces of checkpoint state (mlm/checkpoint.py), each
    with the state dict of this layout (sharded: DTensors under the model's own parameter names);
  - `save(dir, pieces, main)` / `load(dir, pieces, device)`: how the checkpoint's "layout" pieces (model,
    optimizer, weight average) are written and read: replicated, one file per piece by the main process;
    sharded, every rank writes its shards with torch.distributed.checkpoint, and the layout on disk does not
    depend on the number of processes, so a run can resume on another one;
  - `full_state_dict(model)`: the whole model for `final/` (a collective: every rank calls it);
  - `reshard()`: drop gathered copies of the weights, so that weights changed in place (the weight
    average swapped in) are the ones the next forward gathers.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import _remove_duplicate_names, load_file  # the rule save_model drops tied names by
from torch import nn

from mlm.config import UserError
from mlm.untrusted import load_weights_only

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files: one per rank plus .metadata


def _plain_tensor(x):
    """A DTensor (a sharded run's grad norm) as the full local value; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def is_sharded(param: torch.Tensor) -> bool:
    """Whether a parameter is a DTensor (FSDP2's shard of it)."""
    return hasattr(param, "to_local")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard (the same storage), a plain tensor itself.
    Call it under no_grad, where to_local() returns the shard itself rather than an autograd view."""
    return param.to_local() if is_sharded(param) else param


class Piece:
    """A piece of run state for a checkpoint (mlm/checkpoint.py): `state` (anything with state_dict() and
    load_state_dict(saved)), where it goes (`scope`: "main", "rank", "state" or "layout"), and, for one a checkpoint may
    lack (a run without it wrote the checkpoint), `fresh(path)`: how it starts fresh then."""

    def __init__(self, state, scope: str = "main", fresh: Optional[Callable[[Path], None]] = None):
        self.state, self.scope, self.fresh = state, scope, fresh

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, saved) -> None:
        self.state.load_state_dict(saved)


def tensor_file(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """(tensors, metadata) for a .safetensors file, as safetensors' save_model writes them: a tied weight once, its other
    names in the metadata (computed here, on the live tensors, because a copy no longer shares their storage)."""
    metadata = {name: kept for kept, dropped in _remove_duplicate_names(tensors).items() for name in dropped}
    return {k: v.contiguous() for k, v in tensors.items() if k not in metadata}, metadata or None


def read_tensor_file(path: Path) -> Dict[str, torch.Tensor]:
    """A tensor_file's tensors, a tied one under each of its names again (metadata naming no tensor is not a name)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        tied = f.metadata() or {}
    return {**tensors, **{name: tensors[kept] for name, kept in tied.items() if kept in tensors}}


def flat(state: Dict[str, Any]) -> bool:
    """Whether a state dict maps names to tensors only (a model's, a weight average's): its names are checked on load."""
    return all(isinstance(v, torch.Tensor) for v in state.values())


def check_names(directory: Path, name: str, wanted, saved) -> None:
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {directory}: its {name} does not fit the one built here (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


class Layout(Protocol):
    """How the model is spread over processes (the module's docstring says what each method is for)."""

    sharded: bool

    def prepare(self, objective: nn.Module, make_optimizer: Callable, accelerator, mixed_precision: str): ...
    def no_sync(self, accelerator, objective, last: bool): ...
    def grad_norm(self, norm): ...
    def reshard(self) -> None: ...
    def pieces(self, model, optimizer) -> Dict[str, Piece]: ...
    def save(self, directory: Path, pieces: Dict[str, Piece], main: bool) -> Dict[str, Any]: ...
    def load(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]: ...
    def read(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]: ...
    def full_state_dict(self, model) -> Optional[Dict[str, torch.Tensor]]: ...


class Replicated:
    """One process, or DDP replicas through Accelerate: every rank holds everything, rank 0 writes."""

    sharded = False

    def prepare(self, objective: nn.Module, make_optimizer: Callable, accelerator, mixed_precision: str):
        return accelerator.prepare(objective, make_optimizer(objective))

    def no_sync(self, accelerator, objective, last: bool):
        return contextlib.nullcontext() if last else accelerator.no_sync(objective)

    def grad_norm(self, norm):
        return norm

    def reshard(self) -> None:
        pass  # the model's parameters are the only copy

    def pieces(self, model, optimizer) -> Dict[str, Piece]:
        return {"model": Piece(model, "layout"), "optimizer": Piece(optimizer, "layout")}

    def save(self, directory: Path, pieces: Dict[str, Piece], main: bool) -> Dict[str, Any]:
        """The main process's files of `pieces`, file name -> contents (the live tensors, not copies, written with the
        checkpoint's other files: mlm.checkpoint.write_files): <name>.safetensors for a flat state, else <name>.pt."""
        if not main:
            return {}
        states = {name: piece.state_dict() for name, piece in pieces.items()}
        return {
            f"{name}.safetensors" if flat(state) else f"{name}.pt": tensor_file(state) if flat(state) else state
            for name, state in states.items()
        }

    def load(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]:
        """Restore `pieces` from a checkpoint this layout wrote; returns the names of those it does not hold."""
        if (directory / SHARDED_DIR).exists():  # one line that does not send the user to runtime.sharding=fsdp
            raise UserError(
                f"checkpoint {directory} holds FSDP shards, which resume with several processes only (torchrun "
                "--nproc_per_node 2 run.py ... runtime.sharding=fsdp); in one process, export its weights "
                f"(python -m mlm.export {directory} <dir>) and train from them (model.source=pretrained "
                "model.name_or_path=<dir>)"
            )
        return self.read(directory, pieces, device)

    def read(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]:
        # Under gloo Accelerate's device is "cpu:0", a location torch.load cannot restore to: plain "cpu" then
        location = torch.device("cpu") if torch.device(device).type == "cpu" else device
        absent = []
        for name, piece in pieces.items():
            if (directory / f"{name}.safetensors").exists():
                saved = read_tensor_file(directory / f"{name}.safetensors")
                check_names(directory, name, piece.state_dict(), saved)
            elif (directory / f"{name}.pt").exists():
                saved = load_weights_only(directory / f"{name}.pt", f"{name}.pt", map_location=location)
            else:
                absent.append(name)
                continue
            piece.load_state_dict(saved)
        return absent

    def full_state_dict(self, model) -> Optional[Dict[str, torch.Tensor]]:
        return None  # save_pretrained reads the model itself


class ShardedModel:
    """The FSDP root's weights as DTensors, under the model's own names: the objective's "model." dropped."""

    def __init__(self, root: nn.Module):
        self.root = root

    def state_dict(self) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {name.removeprefix("model."): t for name, t in get_model_state_dict(self.root).items()}

    def load_state_dict(self, saved: Dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        names = {name.removeprefix("model."): name for name in get_model_state_dict(self.root)}  # no communication
        set_model_state_dict(self.root, {names[name]: t for name, t in saved.items()})


class ShardedOptimizer:
    """An optimizer over FSDP shards: its state keyed by parameter names, each rank's shards as DTensors."""

    def __init__(self, root: nn.Module, optimizer):
        self.root, self.optimizer = root, optimizer

    def state_dict(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.root, self.optimizer)

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.root, self.optimizer, saved)


class FullyShard:
    """FSDP2: parameters, gradients and optimizer state sharded over all processes."""

    sharded = True

    def prepare(self, objective: nn.Module, make_optimizer: Callable, accelerator, mixed_precision: str):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: parameters gathered and computed in bf16; gradients reduced and master weights kept in fp32
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for layer in transformer_layers(objective.model):
            fully_shard(layer, mp_policy=policy)
        # The root is the objective, whose forward the loop calls (the sparse head calls the encoder
        # and the head separately): the embeddings, the tied decoder and the head are gathered together.
        fully_shard(objective, mp_policy=policy)
        self.root = objective
        # The optimizer must see the sharded parameters, so it is built after fully_shard. The
        # objective is not given to Accelerate: it would wrap it in DDP on top of the shards.
        return objective, accelerator.prepare(make_optimizer(objective))

    def no_sync(self, accelerator, objective, last: bool):
        return _gradient_sync(objective, last)

    def grad_norm(self, norm):
        return _plain_tensor(norm)

    def reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self.root.modules():  # local: frees the gathered copies, no communication
            if isinstance(module, FSDPModule):
                module.reshard()

    def pieces(self, model, optimizer) -> Dict[str, Piece]:
        return {
            "model": Piece(ShardedModel(self.root), "layout"),
            "optimizer": Piece(ShardedOptimizer(self.root, optimizer), "layout"),
        }

    def save(self, directory: Path, pieces: Dict[str, Piece], main: bool) -> Dict[str, Any]:
        """Every rank writes its shards of every piece now (a collective); nothing is left for the main process."""
        import torch.distributed.checkpoint as dcp

        dcp.save(
            {name: piece.state_dict() for name, piece in pieces.items()}, checkpoint_id=str(directory / SHARDED_DIR)
        )
        return {}

    def load(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]:
        if not (directory / SHARDED_DIR).exists():
            raise UserError(
                f"checkpoint {directory} holds a whole model, not FSDP shards; resume it with runtime.sharding=none"
            )
        return self.read(directory, pieces, device)

    def read(self, directory: Path, pieces: Dict[str, Piece], device) -> List[str]:
        """Each rank reads the pieces of its shards (in one process without a process group: every rank's file, whole
        tensors); returns the names of the pieces the checkpoint does not hold."""
        from mlm.dcp_reader import SafeReader
        from mlm.dcp_reader import load as load_shards

        # the metadata (a pickle) and non-tensor entries are read as data only (mlm/dcp_reader.py); the metadata first,
        # so that a refusal is its own one-line error, not one inside dcp.load's collective error report
        reader = SafeReader(str(directory / SHARDED_DIR))
        saved = {}  # piece name -> the names of its saved entries
        for key in reader.read_metadata().state_dict_metadata:
            name, _, entry = key.partition(".")
            saved.setdefault(name, set()).add(entry)
        states = {name: piece.state_dict() for name, piece in pieces.items() if name in saved}
        for name, state in states.items():
            if flat(state):
                check_names(directory, name, state, saved[name])
        load_shards(states, reader)  # in place, into the pieces' own tensors
        for name, state in states.items():
            pieces[name].load_state_dict(state)
        return [name for name in pieces if name not in saved]

    def full_state_dict(self, model) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank takes part in the all-gathers; the tensors land on the CPU of rank 0 only
        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # the objective's keys -> the model's
        full = {name.removeprefix("model."): tensor for name, tensor in full.items()}
        # Gathering copies each name apart; point tied names (decoder = word embeddings) at one tensor
        # again, so save_pretrained stores them once, as it does for an unsharded model.
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and name in full:
                full[name] = full[first]
        return full


def stored_layout(directory: Path) -> Layout:
    """The layout that wrote checkpoint `directory`, for reading it in one process (mlm.export)."""
    return FullyShard() if (directory / SHARDED_DIR).is_dir() else Replicated()


@contextlib.contextmanager
def _gradient_sync(model, enabled: bool):
    """FSDP2 reduce-scatters gradients after every backward unless told not to (micro-batches but the last)."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def transformer_layers(model: nn.Module):
    """The repeated blocks to shard one by one: the model's own `_no_split_modules` classes, except any
    that holds the input embeddings (their weight is tied to the decoder, which must stay in one unit)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    embedding = model.get_input_embeddings().weight
    layers = [
        m for m in model.modules() if type(m).__name__ in names and not any(p is embedding for p in m.parameters())
    ]
    if not layers:
        raise UserError(
            f"runtime.sharding=fsdp found no transformer layers in {type(model).__name__} (no _no_split_modules)"
        )
    return layers


LAYOUTS = {"none": Replicated, "fsdp": FullyShard}


def build_layout(sharding: str) -> Layout:
    """runtime.sharding -> its layout."""
    return LAYOUTS[sharding]()
