"""Atomic checkpoints with everything an exact resume needs, and finding the newest good one.

A checkpoint is a directory `<run>/checkpoints/ckpt-<step>` holding
  model.safetensors   the model's weights (tied weights stored once)
  config.json         with model.safetensors: the model's config, so `AutoModelForMaskedLM.from_pretrained(<ckpt>)` and
                      `pipeline("fill-mask", model=<ckpt>)` load the weights of that step (with the tokenizer's files)
  tokenizer.json ...  the tokenizer's files, as save_pretrained writes them (under 1 MB for the default)
  optimizer.pt        optimizer state (read back with torch.load(weights_only=True))
  ema.safetensors     with trainer.ema_decay > 0: the weight average (mlm/ema.py)
    or sharded/       with runtime.sharding=fsdp: model, optimizer and weight-average shards of every rank
                      (torch.distributed.checkpoint; loadable onto another number of processes), and
                      HOW_TO_LOAD.txt instead of config.json: one line naming mlm.export, which makes a model directory of them
  scheduler.pt, scaler.pt
  rng-<rank>.json     python, numpy and torch RNG states of each process
  state.json          step, data position, tracker run id, best eval, model identity, data identity ("data":
                      the source files' and tokenizer's SHA-256, mlm/data/identity.py; a resume compares them)
  manifest.json       written last: every file's size and SHA-256; a checkpoint without it is incomplete
It is written under a temporary name and renamed into place when complete, so a kill at any
moment leaves either the old set of checkpoints or the old set plus one complete new one.

Before anything of a checkpoint is read (nothing is unpickled, not even torch.distributed.checkpoint's
.metadata), every file is hashed and compared with the manifest. A checkpoint that fails that
check, or fails to load, is moved aside to `checkpoints/corrupt-ckpt-<step>` with one warning,
and the next older one is used. A hash that matches says only that the files are as written, not
who wrote them, so loading trusts none of it either: *.pt files are read weights_only, the shards'
.metadata through an allow-list (mlm/untrusted.py), and state.json must hold the keys this code
writes (read_state); a refusal is such a load failure.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from mlm import faults
from mlm.config import UserError
from mlm.files import fsync_dir, os_error_of, replace, torch_save, write_error, write_json
from mlm.parallel import Replicated
from mlm.untrusted import load_weights_only

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(
    r"ckpt-\d+"
)  # what a checkpoint directory is called (corrupt ones are renamed away from it)


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
        log.warning(
            "checkpoint holds the CUDA RNG of %d devices, this process sees %d: restoring the first %d",
            len(states),
            n,
            n,
        )
    for i, s in enumerate(states[:n]):
        torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


def model_identity(model) -> Dict[str, Any]:
    """What must match for a checkpoint's weights to belong to this model."""
    c = model.config
    return {
        k: getattr(c, k, None)
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    }


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is (once complete)."""
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    scaler,
    state: Dict[str, Any],
    accelerator,
    keep: int,
    layout=Replicated(),
    ema=None,
    tokenizer=None,
    writer: Optional["Writer"] = None,
    wait: bool = True,
) -> Optional[Path]:
    """Every process calls this (each saves its RNG and, when sharded, its shards); the main process writes the rest
    (with `tokenizer`: what from_pretrained needs, write_loadable) and renames. With a background `writer` and
    wait=False the main process's files are written while the next steps run: the state of this step is copied to
    host memory first; the collectives stay on this thread."""
    writer = writer or Writer()
    writer.wait()  # at most one write in flight (and an error of the last one surfaces here)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    with _removed_on_error(tmp, final):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-write
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        files = {f"rng-{accelerator.process_index}.json": rng_state()}
        layout.save(tmp, model, optimizer, accelerator, ema)  # the shards when sharded (a collective), else nothing
        if not accelerator.is_main_process:
            write_files(tmp, files)  # a few kB; the main process's manifest lists them
        elif tokenizer is not None:
            write_loadable(tmp, model, tokenizer, layout.sharded)  # small files (config, tokenizer), written now
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files.update(layout.files(model, optimizer, ema))
        files["scheduler.pt"] = scheduler.state_dict()
        if scaler is not None:
            files["scaler.pt"] = scaler.state_dict()
        state = {**state, "step": step, "world_size": accelerator.num_processes, "model": model_identity(model)}
        writer.submit(lambda files, state: _write(files, state, tmp, final, keep), files, state, background=not wait)
    accelerator.wait_for_everyone()
    return final


def _write(files: Dict[str, Any], state: Dict[str, Any], tmp: Path, final: Path, keep: int) -> None:
    """The main process's part: its files, state.json, the manifest (last), the rename, then the pruning."""
    with _removed_on_error(tmp, final):
        write_files(tmp, files)
        faults.reached("checkpoint")
        write_json(tmp / "state.json", state)
        files = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST, {"step": state["step"], "files": files})
        fsync_dir(tmp)
        replace(tmp, final)  # over the same step saved before, if any (e.g. by a run started with resume=never)
        _prune(final.parent, keep, final)


@contextlib.contextmanager
def _removed_on_error(tmp: Path, final: Path):
    try:
        yield
    except Exception as e:  # a full disk raises RuntimeError in torch.save, SafetensorError in safetensors
        shutil.rmtree(tmp, ignore_errors=True)
        if os_error_of(e) is None:
            raise
        raise write_error("checkpoint", final, e) from e


def write_files(directory: Path, files: Dict[str, Any]) -> None:
    """Write file name -> contents: *.json as JSON, *.safetensors from (tensors, metadata), anything else with torch.save."""
    for name, contents in files.items():
        if name.endswith(".json"):
            write_json(directory / name, contents)
        elif name.endswith(".safetensors"):
            tensors, metadata = contents
            save_file(tensors, str(directory / name), metadata=metadata)
        else:
            torch_save(contents, directory / name)


def host_copy(obj):
    """A copy of a state (nested dicts, lists and tuples of tensors and plain values) with every tensor in host memory:
    what a background write reads while the next steps change the live tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Writer:
    """Writes a checkpoint's main-process files inline, or (background=True, trainer.async_checkpoint) on a thread of its
    own from a host copy of the state, one write at a time. The thread is not a daemon: an exiting interpreter waits
    for it, so a stop never leaves the newest checkpoint half-written; a kill leaves its temporary directory, which
    no resume takes. A write's error is raised in the training thread by `check` (every step) or `wait`."""

    def __init__(self, background: bool = False):
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, write: Callable[..., None], *state, background: bool = True) -> None:
        """write(*state) once the write in flight is complete: inline, or (background and self.background) on the
        writer's thread from a host copy of `state` (a write waited for at once gains nothing from a copy)."""
        self.wait()
        if not (background and self.background):
            write(*state)
            return
        state = host_copy(state)  # on this thread, before the next step changes anything

        def run():
            try:
                write(*state)
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a write that failed in the background (a finished write's only)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Until the write in flight, if any, is complete (renamed into place), then `check`."""
        if self._thread is not None:
            faults.waiting_for(self._thread)
            self._thread.join()
            self._thread = None
        self.check()

    def close(self) -> None:
        """On the way out of a run that raised: wait for the write in flight; its error is logged, not raised over the run's."""
        try:
            self.wait()
        except Exception as e:
            log.error("the checkpoint written in the background failed too: %s", e)


LOAD_NOTE = "HOW_TO_LOAD.txt"  # in a sharded checkpoint, where config.json would be


def write_loadable(directory: Path, model, tokenizer, sharded: bool) -> None:
    """The tokenizer's files and, next to a whole model.safetensors, the model's config.json (as save_pretrained writes
    it): Hugging Face's loaders then read the checkpoint as a model directory. FSDP shards they cannot read: a one-line
    note names mlm.export instead, and without config.json from_pretrained finds no model there rather than a wrong one."""
    tokenizer.save_pretrained(directory)
    if sharded:
        (directory / LOAD_NOTE).write_text(
            "This checkpoint holds FSDP shards (sharded/), which from_pretrained cannot read; "
            f"python -m mlm.export {directory.with_name(directory.name.removeprefix('.tmp-'))} <out dir> writes a model directory it loads.\n"
        )
        return
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.save_pretrained(directory)


def file_record(path: Path) -> Dict[str, Any]:
    """What the manifest keeps of a file: its size and SHA-256 (read back from the page cache at ~1.5 GB/s: benchmarks/checkpoint_hash.py)."""
    with open(path, "rb") as f:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """The manifest if every listed file is there with its recorded size (a cheap check, no hashing), else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, record in manifest["files"].items():
            size = record["size"] if isinstance(record, dict) else record  # older manifests kept sizes only
            if (path / name).stat().st_size != size:
                return None
        int(manifest["step"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(path: Path) -> Optional[str]:
    """None if every file of the checkpoint hashes as its manifest says, else what is wrong."""
    manifest = _read_manifest(path)
    if manifest is None:
        return f"incomplete: a file is missing, has another size than {MANIFEST} records, or {MANIFEST} is unreadable"
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in listed
    )
    if extra:
        return f"holds files this run did not write: {', '.join(extra[:3])}"
    for name, record in manifest["files"].items():
        if not isinstance(record, dict):
            log.warning("%s was written before checkpoints kept content hashes: checked by file sizes only", path)
            return None
        try:
            digest = file_record(path / name)["sha256"]
        except OSError as e:  # EIO, a stale NFS handle: as unusable as a changed file
            return f"{name} cannot be read ({e.strerror or e})"
        if digest != record["sha256"]:
            return f"{name} changed after it was written (its SHA-256 differs from {MANIFEST})"
    return None


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoint directories, newest step first (by the step recorded inside, not the name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not path.is_dir() or not CHECKPOINT_NAME.fullmatch(path.name):
            continue
        manifest = _read_manifest(path)
        if manifest is None:
            log.warning("skipping incomplete or corrupt checkpoint %s", path)
            continue
        found.append((manifest["step"], path))
    return [p for _, p in sorted(found, reverse=True)]


def _prune(root: Path, keep: int, written: Path) -> None:
    """Keep the checkpoint just written and the newest keep-1 others."""
    others = [p for p in list_checkpoints(root.parent) if p != written]
    for old in others[keep - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def newest_verified(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint whose every file hashes as written (what an error message may call "good")."""
    return next((p for p in list_checkpoints(run_dir) if verify(p) is None), None)


def set_aside(path: Path, reason: str) -> Path:
    """Move a checkpoint that failed verification or loading out of the way: never resumed, never rotated."""
    target = path.with_name(f"corrupt-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    log.warning("checkpoint %s %s; moved to %s, resuming from the next older one", path, reason, target)
    return target


def discard_checkpoints(run_dir: Path) -> None:
    """A run starting over (resume=never) in a used directory: a later resume=auto must not pick up the old run's."""
    old = list_checkpoints(run_dir)
    if old:
        log.warning(
            "starting over in %s: deleting %d checkpoint(s) of the previous run there (newest %s)",
            run_dir,
            len(old),
            old[0].name,
        )
        for path in old:
            shutil.rmtree(path, ignore_errors=True)


def resume_candidates(resume: str, run_dir: Path) -> List[Path]:
    """resume=auto -> the run dir's checkpoints, newest first; never -> none; else that one path."""
    if resume == "never":
        return []
    if resume == "auto":
        return list_checkpoints(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume!r}: no such checkpoint directory (use auto, never, or a ckpt-* path)")
    return [path]


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: the newest that verifies (a bad one is set aside); an explicit path must verify."""
    for path in resume_candidates(resume, run_dir):
        problem = verify(path)
        if problem is None:
            return path
        if resume != "auto":
            raise UserError(f"resume={resume!r}: the checkpoint {problem}; pick another checkpoint")
        set_aside(path, problem)
    return None


def load_newest(
    resume: str, run_dir: Path, load: Callable[[Path], Dict[str, Any]], accelerator
) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """Resume from the newest checkpoint that verifies and loads on every process: (its path, what `load` returned),
    or (None, None) to start fresh. The main process alone verifies and sets bad ones aside; the others take its choice.

    One that verifies but fails to load is set aside too and the next older one tried; when none is
    left after such a failure the run stops (UserError) rather than start fresh over half-loaded state."""
    failed = None
    while True:
        path = agreed(accelerator, resolve_resume(resume, run_dir) if accelerator.is_main_process else None)
        if path is None:
            if failed:
                raise UserError(
                    f"no checkpoint in {run_dir} loads ({failed}); they are in {Path(run_dir) / 'checkpoints'}/corrupt-ckpt-*, "
                    "or start in a run directory of its own (hydra.run.dir=<new dir>)"
                )
            return None, None
        error, saved = None, None
        try:
            saved = load(path)
        except UserError:  # the checkpoint is fine but does not fit this run's settings: the user's to decide
            raise
        except Exception as e:
            error = e
        if not any_process(accelerator, error is not None):
            return path, saved
        failed = (
            f"{path.name}: {type(error).__name__}: {str(error)[:200]}"
            if error
            else f"{path.name} failed to load on another process"
        )
        if resume != "auto":
            raise UserError(f"resume={resume!r}: the checkpoint failed to load ({failed}); pick another checkpoint")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            set_aside(path, f"failed to load ({failed})")
        accelerator.wait_for_everyone()


def agreed(accelerator, value):
    """The main process's `value` on every process (a broadcast when there are several)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process of the run (one tiny all-reduce when there are several)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")[0] > 0)


class CorruptCheckpoint(Exception):
    """A checkpoint that verifies but holds what this code never writes: set aside like one whose bytes changed."""


# state.json's keys that loading reads, and their types (save_checkpoint writes them, the trainer's under "train_state")
STATE_KEYS = {"step": int, "world_size": int, "model": dict, "train_state": dict, "global_batch": int}


def read_state(path: Path, train_state_fields: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """A checkpoint's state.json, checked before anything of it is used: a key missing or of another type, or (given the
    trainer's `train_state_fields`) a trainer key this code does not have or one it has missing, is a CorruptCheckpoint."""
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"state.json is not JSON ({e})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"state.json holds a JSON {type(state).__name__}, not an object")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool):
            raise CorruptCheckpoint(f"state.json has no {key} of type {kind.__name__}")
    if train_state_fields is not None:
        unknown = sorted(state["train_state"].keys() - set(train_state_fields))
        if unknown:
            raise CorruptCheckpoint(
                f"state.json's train_state holds {', '.join(unknown[:3])}, which this version never writes"
            )
        missing = sorted(set(train_state_fields) - state["train_state"].keys())
        if missing:
            raise CorruptCheckpoint(
                f"state.json's train_state has no {', '.join(missing[:3])}, which this version always writes"
            )
    if state["train_state"].get("step") != state["step"]:
        raise CorruptCheckpoint(
            f"state.json says step {state['step']} but its train_state step {state['train_state'].get('step')}"
        )
    problem = shape_problem(state)
    if problem:
        raise CorruptCheckpoint(f"state.json's {problem}")
    return state


def shape_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the keys a resume compares (absent in an older version's checkpoint), or None."""
    from mlm.records import malformed_data

    if "config" in state and not isinstance(state["config"], dict):
        return '"config" is not an object of settings'
    shards = state.get("stream_shards")
    if shards is not None and (not isinstance(shards, int) or isinstance(shards, bool) or shards < 1):
        return f'"stream_shards" is {json.dumps(shards)[:40]}, not a number of shards'
    return malformed_data(state.get("data"))


def load_checkpoint(
    path: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    accelerator,
    layout=Replicated(),
    ema=None,
    train_state_fields: Optional[Collection[str]] = None,
) -> Dict[str, Any]:
    """Restore weights, optimizer, weight average, schedule and this process's RNG; returns the saved trainer state
    (checked by read_state against `train_state_fields`, the trainer's, before anything is restored)."""
    state = read_state(path, train_state_fields)
    if state["model"] != model_identity(model):
        raise UserError(
            f"checkpoint {path} belongs to a different model ({state['model']}) than this run builds "
            f"({model_identity(model)}); resume it with the model it was trained with, or train this one in a run directory of its own (hydra.run.dir=<new dir>)"
        )
    if (
        state["world_size"] != accelerator.num_processes
        and not (path / f"rng-{accelerator.process_index}.json").exists()
    ):
        log.warning(
            "checkpoint was written by %d processes, resuming with %d: RNG streams start fresh",
            state["world_size"],
            accelerator.num_processes,
        )
    else:
        set_rng_state(json.loads((path / f"rng-{accelerator.process_index}.json").read_text()))
    layout.load(path, model, optimizer, accelerator.device, ema)
    scheduler.load_state_dict(load_weights_only(path / "scheduler.pt", "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(load_weights_only(path / "scaler.pt", "scaler.pt"))
    return state
