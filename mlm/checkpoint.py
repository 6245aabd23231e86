"""Atomic checkpoints of a run's named pieces of state, verified before anything of them is read, and finding the newest
good one.

A run registers its state as named pieces (`Checkpoints.pieces`): anything with state_dict() and load_state_dict(saved),
wrapped in a `Piece` that says where it goes (its scope):
  "layout"  the layout writes it (mlm/parallel.py): replicated, the main process writes <name>.safetensors (a flat
            dict of tensors; tied ones once) or <name>.pt; sharded (runtime.sharding=fsdp), every rank its shards
            under sharded/ (torch.distributed.checkpoint; loadable onto another number of processes)
  "rank"    every process its own <name>-<rank>.json (the RNG)
  "state"   inside state.json under its name (the trainer's state); its keys are checked before anything is restored
  "main"    the main process's <name>.pt (the schedule, the fp16 loss scaler), read back weights-only
Adding a piece of state is one entry in the run's registration (mlm.train.checkpointed). A piece a checkpoint may lack
(the weight average, the scaler: a run without them wrote it) says how it starts fresh; any other missing piece is a
corrupt checkpoint.

A checkpoint is a directory `<run>/checkpoints/ckpt-<step>` holding the pieces' files and
  config.json         next to model.safetensors: the model's config, so `AutoModelForMaskedLM.from_pretrained(<ckpt>)`
                      and `pipeline("fill-mask", model=<ckpt>)` load the weights of that step (with the tokenizer's files)
    or HOW_TO_LOAD.txt  next to sharded/: one line naming mlm.export, which makes a model directory of them
  tokenizer.json ...  the tokenizer's files, as save_pretrained writes them (under 1 MB for the default)
  state.json          the checkpoint format (FORMAT), step, number of processes, model identity, the "state" pieces and
                      what a resume compares (global batch, config, data identity: mlm/data/identity.py)
  manifest.json       written last: every file's size and SHA-256; a checkpoint without it is incomplete
It is written under a temporary name and renamed into place when complete, so a kill at any
moment leaves either the old set of checkpoints or the old set plus one complete new one.
A checkpoint of another format (an earlier version's) is refused in one line (CHANGELOG.md lists the formats).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from mlm import faults
from mlm.config import UserError
from mlm.files import fsync_dir, os_error_of, replace, torch_save, write_error, write_json
from mlm.parallel import Piece, Replicated, stored_layout
from mlm.untrusted import load_weights_only

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# what a checkpoint directory is called (corrupt ones are renamed away from it)
CHECKPOINT_NAME = re.compile(r"ckpt-\d+")
FORMAT = 1  # state.json's "format": the layout of files and keys this code writes and reads (CHANGELOG.md)


class RNG:
    """This process's python, numpy, torch and (with CUDA) its device's random states, as JSON: a "rank" piece."""

    def state_dict(self) -> Dict[str, Any]:
        py = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
        }
        if torch.cuda.is_available():  # this process's device only: the others are other processes' (or none on resume)
            state["cuda"] = torch.cuda.get_rng_state().tolist()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


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


@dataclass
class Checkpoints:
    """A run's named pieces of state (each a `Piece`, or anything with state_dict/load_state_dict: a "main" piece),
    saved into and loaded from its checkpoints; `model` is the raw model, whose identity a load checks first."""

    run_dir: Path
    pieces: Dict[str, Any]
    accelerator: Any
    model: Any = None
    layout: Any = field(default_factory=Replicated)
    keep: int = 1
    writer: "Writer" = field(default_factory=lambda: Writer())
    loadable: Optional[Callable[[Path], None]] = None  # writes what from_pretrained needs (write_loadable)

    def scoped(self, scope: str) -> Dict[str, Piece]:
        """The pieces of one scope, in the order they were registered."""
        pieces = {name: p if isinstance(p, Piece) else Piece(p) for name, p in self.pieces.items()}
        return {name: p for name, p in pieces.items() if p.scope == scope}

    def save(self, step: int, facts: Optional[Dict[str, Any]] = None, wait: bool = True) -> Path:
        """Every process calls this (each saves its "rank" pieces and, when sharded, its shards); the main process
        writes the rest, with `facts` in state.json, and renames. With a background writer and wait=False the main
        process's files are written while the next steps run: the state of this step is copied to host memory first;
        the collectives stay on this thread."""
        acc = self.accelerator
        self.writer.wait()  # at most one write in flight (and an error of the last one surfaces here)
        final = checkpoint_dir(self.run_dir, step)
        tmp = final.with_name(f".tmp-{final.name}")
        with _removed_on_error(tmp, final):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-write
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            files = {f"{name}-{acc.process_index}.json": p.state_dict() for name, p in self.scoped("rank").items()}
            laid_out = self.layout.save(tmp, self.scoped("layout"), acc.is_main_process)  # shards: a collective
            if not acc.is_main_process:
                write_files(tmp, files)  # a few kB; the main process's manifest lists them
            elif self.loadable is not None:
                self.loadable(tmp)  # small files (config, tokenizer), written now
            acc.wait_for_everyone()
        if acc.is_main_process:
            files.update(laid_out)
            files.update({f"{name}.pt": p.state_dict() for name, p in self.scoped("main").items()})
            state = {"format": FORMAT, **(facts or {}), **{n: p.state_dict() for n, p in self.scoped("state").items()}}
            state.update(step=step, world_size=acc.num_processes, model=model_identity(self.model))
            write = lambda files, state: _write(files, state, tmp, final, self.keep)  # noqa: E731
            self.writer.submit(write, files, state, background=not wait)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> Dict[str, Any]:
        """Restore every piece from checkpoint `path` on this process; returns its state.json (checked by read_state
        against the "state" pieces before anything is restored)."""
        state = read_state(path, self.scoped("state"))
        if state["model"] != model_identity(self.model):
            raise UserError(
                f"checkpoint {path} belongs to a different model ({state['model']}) than this run builds "
                f"({model_identity(self.model)}); resume it with the model it was trained with, or train this one in a "
                "run directory of its own (hydra.run.dir=<new dir>)"
            )
        acc = self.accelerator
        for name, piece in self.scoped("rank").items():
            file = path / f"{name}-{acc.process_index}.json"
            if state["world_size"] != acc.num_processes and not file.exists():
                log.warning(
                    "checkpoint was written by %d processes, resuming with %d: %s starts fresh",
                    *(state["world_size"], acc.num_processes, name),
                )
            else:
                piece.load_state_dict(json.loads(file.read_text()))
        absent = {
            name: self.scoped("layout")[name] for name in self.layout.load(path, self.scoped("layout"), acc.device)
        }
        for name, piece in self.scoped("main").items():
            if (path / f"{name}.pt").exists():
                piece.load_state_dict(load_weights_only(path / f"{name}.pt", f"{name}.pt"))
            else:
                absent[name] = piece
        for name, piece in self.scoped("state").items():
            piece.load_state_dict(state[name])
        for name, piece in absent.items():
            start_fresh(path, name, piece)
        return state


def start_fresh(path: Path, name: str, piece: Piece) -> None:
    """A piece the checkpoint lacks: it starts fresh if it may (a run without it wrote the checkpoint), else the
    checkpoint is corrupt."""
    if piece.fresh is None:
        raise CorruptCheckpoint(f"it holds no {name}, which this version always writes")
    piece.fresh(path)


def read(path: Path, pieces: Dict[str, Piece]) -> List[str]:
    """Restore layout pieces ("model", "ema") from checkpoint `path` in this one process, whatever layout wrote it (no
    process group: FSDP shards are assembled from every rank's file); returns the names of those it does not hold."""
    return stored_layout(path).read(path, pieces, "cpu")


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
            if (path / name).stat().st_size != record["size"]:
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
    """resume=auto -> the run dir's checkpoints, newest first; never -> none; else that one path. A checkpoint of
    another format is refused here, before anything compares its settings (check_format)."""
    if resume == "never":
        return []
    if resume == "auto":
        candidates = list_checkpoints(run_dir)
    else:
        candidates = [Path(resume)]
        if not candidates[0].is_dir():
            raise UserError(f"resume={resume!r}: no such checkpoint directory (use auto, never, or a ckpt-* path)")
    for path in candidates:
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue  # unreadable: verification sets it aside
        if isinstance(state, dict):
            check_format(path, state)
    return candidates


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


# state.json's keys that loading reads, and their types (Checkpoints.save writes them, the run's facts among them)
STATE_KEYS = {"step": int, "world_size": int, "model": dict, "global_batch": int, "config": dict}


def check_format(path: Path, state: Dict[str, Any]) -> None:
    """Refuse, in one line with the way out, a checkpoint whose state.json is of another format than this code's."""
    found = state.get("format")
    if found != FORMAT:
        raise UserError(
            f"checkpoint {path} is of checkpoint format {found if found is not None else 'none (an earlier version)'}; "
            f"this version reads format {FORMAT} only (CHANGELOG.md): train from its run's final/ "
            "(model.source=pretrained model.name_or_path=<run>/final), or start over (resume=never)"
        )


def read_state(path: Path, pieces: Optional[Dict[str, Piece]] = None) -> Dict[str, Any]:
    """A checkpoint's state.json, checked before anything of it is used: another format is refused (UserError); a key
    missing or of another type, or a "state" piece (of `pieces`) holding a key this code does not write or lacking one
    it does, is a CorruptCheckpoint."""
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"state.json is not JSON ({e})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"state.json holds a JSON {type(state).__name__}, not an object")
    check_format(path, state)
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool):
            raise CorruptCheckpoint(f"state.json has no {key} of type {kind.__name__}")
    for name, piece in (pieces or {}).items():
        problem = piece_problem(state, name, piece.state_dict())
        if problem:
            raise CorruptCheckpoint(problem)
    problem = shape_problem(state)
    if problem:
        raise CorruptCheckpoint(f"state.json's {problem}")
    return state


def piece_problem(state: Dict[str, Any], name: str, live: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a "state" piece as saved, given what it holds now (the keys this code writes), or None."""
    saved = state.get(name)
    if not isinstance(saved, dict):
        return f"state.json has no {name} object"
    unknown, missing = sorted(saved.keys() - live.keys()), sorted(live.keys() - saved.keys())
    if unknown:
        return f"state.json's {name} holds {', '.join(unknown[:3])}, which this version never writes"
    if missing:
        return f"state.json's {name} has no {', '.join(missing[:3])}, which this version always writes"
    if "step" in live and saved["step"] != state["step"]:
        return f"state.json says step {state['step']} but its {name} step {saved['step']}"
    return None


def shape_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the keys a resume compares, or None."""
    from mlm.records import malformed_data

    shards = state.get("stream_shards")
    if shards is not None and (not isinstance(shards, int) or isinstance(shards, bool) or shards < 1):
        return f'"stream_shards" is {json.dumps(shards)[:40]}, not a number of shards'
    return malformed_data(state.get("data"))
