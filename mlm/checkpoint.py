"""Atomic checkpoints with everything an exact resume needs, and finding the newest good one.

A checkpoint is a directory `<run>/checkpoints/ckpt-<step>` holding
  model.safetensors   the model's weights (tied weights stored once)
  optimizer.pt        optimizer state (read back with torch.load(weights_only=True))
    or sharded/       with trainer.sharding=fsdp: model and optimizer shards of every rank
                      (torch.distributed.checkpoint; loadable onto another number of processes)
  scheduler.pt, scaler.pt
  rng-<rank>.json     python, numpy and torch RNG states of each process
  state.json          step, data position, tracker run id, best eval, model identity
  manifest.json       written last: every file's size; a checkpoint without it is incomplete
It is written under a temporary name and renamed into place when complete, so a kill at any
moment leaves either the old set of checkpoints or the old set plus one complete new one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mlm import faults
from mlm.config import UserError
from mlm.files import fsync_dir, os_error_advice, replace, write_json
from mlm.parallel import Replicated

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def rng_state() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():  # this process's device only: the others are other processes' (or none on resume)
        state["cuda"] = [torch.cuda.get_rng_state().tolist()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng(state["cuda"])


def _set_cuda_rng(states: List[list]) -> None:
    """One state (this process's device), or one per device from checkpoints that kept every visible GPU's."""
    if len(states) == 1:
        torch.cuda.set_rng_state(torch.tensor(states[0], dtype=torch.uint8))
        return
    n = torch.cuda.device_count()
    if len(states) > n:
        log.warning("checkpoint holds the CUDA RNG of %d devices, this process sees %d: restoring the first %d", len(states), n, n)
    for i, s in enumerate(states[:n]):
        torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


def model_identity(model) -> Dict[str, Any]:
    """What must match for a checkpoint's weights to belong to this model."""
    c = model.config
    return {k: getattr(c, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, scaler, state: Dict[str, Any], accelerator, keep: int,
    layout=Replicated(),
) -> Optional[Path]:
    """Every process calls this (each saves its RNG and, when sharded, its shards); the main process
    writes the rest and renames."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"ckpt-{step:08d}"
    tmp = root / f".tmp-ckpt-{step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-write
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_json(tmp / f"rng-{accelerator.process_index}.json", rng_state())
        layout.save(tmp, model, optimizer, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            faults.reached("checkpoint")
            write_json(tmp / "state.json", {**state, "step": step, "world_size": accelerator.num_processes, "model": model_identity(model)})
            sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / MANIFEST, {"step": step, "files": sizes})
            fsync_dir(tmp)
            replace(tmp, final)  # over the same step saved before, if any (e.g. by a run started with resume=never)
            _prune(root, keep)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {e.strerror or e} ({os_error_advice(e)})") from e
    accelerator.wait_for_everyone()
    return final


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """The manifest if every listed file is there with its recorded size, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, size in manifest["files"].items():
            if (path / name).stat().st_size != size:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoint directories, newest step first (by the step recorded inside, not the name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        manifest = _read_manifest(path)
        if manifest is None:
            log.warning("skipping incomplete or corrupt checkpoint %s", path)
            continue
        found.append((manifest["step"], path))
    return [p for _, p in sorted(found, reverse=True)]


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def discard_checkpoints(run_dir: Path) -> None:
    """A run starting over (resume=never) in a used directory: a later resume=auto must not pick up the old run's."""
    old = list_checkpoints(run_dir)
    if old:
        log.warning("starting over in %s: deleting %d checkpoint(s) of the previous run there (newest %s)", run_dir, len(old), old[0].name)
        for path in old:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """resume=auto -> newest complete checkpoint in the run dir (or none); never -> none; else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[0] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume!r}: no such checkpoint directory (use auto, never, or a ckpt-* path)")
    if _read_manifest(path) is None:
        raise UserError(f"resume={resume!r} is incomplete or corrupt (no valid {MANIFEST}); pick an older checkpoint")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, accelerator, layout=Replicated()) -> Dict[str, Any]:
    """Restore weights, optimizer, schedule and this process's RNG; returns the saved trainer state."""
    state = json.loads((path / "state.json").read_text())
    if state["model"] != model_identity(model):
        raise UserError(
            f"checkpoint {path} belongs to a different model ({state['model']}) than this run builds "
            f"({model_identity(model)}); use resume=never or a matching run directory"
        )
    if state["world_size"] != accelerator.num_processes and not (path / f"rng-{accelerator.process_index}.json").exists():
        log.warning("checkpoint was written by %d processes, resuming with %d: RNG streams start fresh", state["world_size"], accelerator.num_processes)
    else:
        set_rng_state(json.loads((path / f"rng-{accelerator.process_index}.json").read_text()))
    layout.load(path, model, optimizer, accelerator.device)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    return state
