"""How the model is spread over processes, from outside the model: replicas or FSDP2 shards.

`runtime.sharding=none` is the plain path: Accelerate wraps the objective in DDP when there is
more than one process (every rank holds the whole model and optimizer). `runtime.sharding=fsdp`
applies PyTorch's FSDP2 (`fully_shard`) ourselves, as torchtitan does: every transformer layer is
its own unit and the root, the objective the loop calls, holds the rest (embeddings, the tied
decoder, the head), so one layer's parameters are gathered at a time. This works with gloo on CPU as with NCCL on GPUs; Accelerate's
own FSDP mode only switches on for GPU-like devices, so it is not used.

The training loop asks a `Layout` for these things and never branches on the mode:
  - `no_sync(objective, last)`: skip the gradient reduction of all but the last micro-batch;
  - `save(dir, ...)` / `load(dir, ...)`: checkpoint weights, optimizer state and the weight average
    (mlm/ema.py) if there is one (sharded: every rank writes its shards with
    torch.distributed.checkpoint, and the layout on disk does not depend on the number of
    processes, so a run can resume on another one);
  - `full_state_dict(model)`: the whole model for `final/` (a collective: every rank calls it);
  - `reshard()`: drop gathered copies of the weights, so that weights changed in place (the weight
    average swapped in) are the ones the next forward gathers.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import _remove_duplicate_names, load_file, load_model  # the rule save_model drops tied names by
from torch import nn

from mlm.config import UserError
from mlm.untrusted import load_weights_only

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # replicated: the weight average, keyed by the model's parameter names
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files: one per rank plus .metadata


def _plain_tensor(x):
    """A DTensor (a sharded run's grad norm) as the full local value; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard (the same storage), a plain tensor itself.
    Call it under no_grad, where to_local() returns the shard itself rather than an autograd view."""
    return param.to_local() if hasattr(param, "to_local") else param


def restart_average(ema, directory: Path) -> None:
    """A checkpoint without a weight average resumed with trainer.ema_decay > 0 (resume=<path>, or one
    saved before the setting was compared): the average starts from the resumed weights."""
    log.warning(
        "checkpoint %s holds no weight average; the average (trainer.ema_decay=%g) starts from its weights",
        directory,
        ema.decay,
    )
    ema.restart()


def weights(model) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """(tensors, metadata) for model.safetensors, as safetensors' save_model writes them: a tied weight once, its other
    names in the metadata (computed here, on the live tensors, because a copy no longer shares their storage)."""
    tensors = model.state_dict()
    metadata = {name: kept for kept, dropped in _remove_duplicate_names(tensors).items() for name in dropped}
    return {k: v.contiguous() for k, v in tensors.items() if k not in metadata}, metadata or None


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

    def save(self, directory: Path, model, optimizer, accelerator, ema=None) -> None:
        """What must be written now, on every process (nothing: the main process writes `files` with the checkpoint's others)."""

    def files(self, model, optimizer, ema=None) -> Dict[str, Any]:
        """The main process's model files of a checkpoint, file name -> contents (the live tensors, not copies): mlm.checkpoint.write_files."""
        files = {MODEL_FILE: weights(model), OPTIMIZER_FILE: optimizer.state_dict()}
        if ema is not None:
            files[EMA_FILE] = (ema.state(), None)
        return files

    def load(self, directory: Path, model, optimizer, device, ema=None) -> None:
        if (
            directory / SHARDED_DIR
        ).exists():  # one line that does not send the user to runtime.sharding=fsdp, which one process refuses
            raise UserError(
                f"checkpoint {directory} holds FSDP shards, which resume with several processes only (torchrun "
                "--nproc_per_node 2 run.py ... runtime.sharding=fsdp); in one process, export its weights "
                f"(python -m mlm.export {directory} <dir>) and train from them (model.source=pretrained model.name_or_path=<dir>)"
            )
        missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
        if missing or unexpected:
            raise UserError(
                f"checkpoint {directory} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        # Under gloo Accelerate's device is "cpu:0", a location torch.load cannot restore to: plain "cpu" then
        location = torch.device("cpu") if torch.device(device).type == "cpu" else device
        optimizer.load_state_dict(load_weights_only(directory / OPTIMIZER_FILE, OPTIMIZER_FILE, map_location=location))
        if ema is not None and (directory / EMA_FILE).exists():
            ema.load_state(load_file(str(directory / EMA_FILE)), f"checkpoint {directory}")
        elif ema is not None:
            restart_average(ema, directory)

    def full_state_dict(self, model) -> Optional[Dict[str, torch.Tensor]]:
        return None  # save_pretrained reads the model itself


class FullyShard(Replicated):
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

    def files(self, model, optimizer, ema=None) -> Dict[str, Any]:
        return {}  # every rank's shards are written by `save`, a collective

    def save(self, directory: Path, model, optimizer, accelerator, ema=None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.root, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if ema is not None:
            state["ema"] = _sharded_average(ema)
        dcp.save(state, checkpoint_id=str(directory / SHARDED_DIR))

    def load(self, directory: Path, model, optimizer, device, ema=None) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from mlm.dcp_reader import SafeReader
        from mlm.dcp_reader import load as load_shards

        if not (directory / SHARDED_DIR).exists():
            raise UserError(
                f"checkpoint {directory} holds a whole model, not FSDP shards; resume it with runtime.sharding=none"
            )
        # the metadata (a pickle) and non-tensor entries are read as data only (mlm/dcp_reader.py); the metadata first,
        # so that a refusal is its own one-line error, not one inside dcp.load's collective error report
        reader = SafeReader(str(directory / SHARDED_DIR))
        saved_keys = reader.read_metadata().state_dict_metadata
        model_sd, optim_sd = get_state_dict(self.root, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        saved_average = ema is not None and _average_in(saved_keys)
        if saved_average:
            state["ema"] = _sharded_average(ema)  # views of the average's shards: loaded in place
        load_shards(state, reader)  # each rank reads the pieces of its shards
        set_state_dict(self.root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if ema is not None and not saved_average:
            restart_average(ema, directory)

    def full_state_dict(self, model) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank takes part in the all-gathers; the tensors land on the CPU of rank 0 only
        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {
            name.removeprefix("model."): tensor for name, tensor in full.items()
        }  # the objective's keys -> the model's
        # Gathering copies each name apart; point tied names (decoder = word embeddings) at one tensor
        # again, so save_pretrained stores them once, as it does for an unsharded model.
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and name in full:
                full[name] = full[first]
        return full


@torch.no_grad()
def _sharded_average(ema) -> Dict[str, torch.Tensor]:
    """The weight average's local shards as DTensors laid out like their parameters (sharing their
    memory), so torch.distributed.checkpoint saves and reshards them as it does the model."""
    from torch.distributed.tensor import DTensor

    return {
        name: DTensor.from_local(average, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
        for name, param, average in ema.entries()
    }


def _average_in(saved_keys) -> bool:
    """Whether a torch.distributed.checkpoint's keys (its metadata lists every one) hold an "ema" entry."""
    return any(key.startswith("ema.") for key in saved_keys)


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


def build_layout(sharding: str):
    """runtime.sharding -> its layout."""
    return LAYOUTS[sharding]()
