"""A training checkpoint as a Hugging Face model directory: `python -m mlm.export <checkpoint or run dir> <out dir>`.

    python -m mlm.export outputs/runs/<run>/checkpoints/ckpt-00000500 exported/step-500
    python -m mlm.export outputs/runs/<run> exported/newest --push-to-hub me/my-mlm   # branch step-<N>
    python -m mlm.export outputs/runs/<run> exported/newest-ema --ema                  # its weight average instead

A run directory stands for its newest checkpoint that verifies. The checkpoint is hashed against
its manifest before anything of it is read; the model is rebuilt from the run's own config (kept
in state.json), its weights read through the checkpoint's own reader (mlm.checkpoint.read: its
"model" piece, strictly: a name missing or left over is an error), whole or from the FSDP shards of
any number of processes (read here in one process, without a process group), then written as `final/` is: save_pretrained of model and tokenizer,
renamed into place when complete (into an existing empty directory, `.` too, its files are moved,
config.json last). `pipeline("fill-mask", model=<out dir>)` loads it. With --ema the
checkpoint's "ema" piece, the weight average (trainer.ema_decay, mlm/ema.py), is laid over the
loaded weights: it holds the trainable parameters, the frozen ones equal their weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mlm import checkpoint
from mlm.config import ModelConfig, UserError
from mlm.hub import hub_reachable, offline_mode
from mlm.untrusted import RefusedPickle, check_no_interpolation

log = logging.getLogger(__name__)


def is_checkpoint(path: Path) -> bool:
    return (path / checkpoint.MANIFEST).exists() or (path / "state.json").exists()


def pick_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint (it must verify), else the newest checkpoint of the run dir `path` that verifies."""
    if is_checkpoint(path):
        problem = checkpoint.verify(path)
        if problem:
            raise UserError(
                f"checkpoint {path}: the checkpoint {problem}; export another one (or the run directory: its newest good one)"
            )
        return path
    if not (path / "checkpoints").is_dir():
        raise UserError(
            f"{path} is neither a checkpoint (no {checkpoint.MANIFEST}) nor a run directory (no checkpoints/); "
            "give <run>/checkpoints/ckpt-<step> or <run>"
        )
    for candidate in checkpoint.list_checkpoints(path):
        problem = checkpoint.verify(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s %s; skipped, trying the next older one", candidate, problem)
    raise UserError(f"no checkpoint of {path} verifies (see {path / 'checkpoints'}); nothing to export")


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: the inverse of mlm.tracking.flatten."""
    tree: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def model_config(settings: Dict[str, Any]) -> ModelConfig:
    """The typed ModelConfig from a run's flat config ("model.arch.hidden_size": 32 -> arch={"hidden_size": 32})."""
    from omegaconf import OmegaConf

    tree = unflatten({k: v for k, v in settings.items() if k.startswith("model.")}).get("model", {})
    # Choice strings -> members, types checked; a key this version does not have is an error
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), tree))


def model_settings(ckpt: Path, state: Dict[str, Any], trust_remote_code: bool) -> ModelConfig:
    """The run's model config, from the checkpoint (data only): no `${...}` resolved, trust_remote_code only if this
    command was given --trust-remote-code, no attention backend that could be fetched (local_attention), and the model
    it names loaded from this machine only (never fetched)."""
    check_no_interpolation(
        {k: v for k, v in state["config"].items() if k.startswith("model.")}, f"checkpoint {ckpt}'s state.json"
    )
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = model_config(state["config"])
    except OmegaConfBaseException as e:  # a value of the wrong type: "model.dropout": "abc"
        raise UserError(
            f"checkpoint {ckpt}'s state.json: its model config does not fit this version's ({str(e).splitlines()[0][:200]})"
        ) from None
    if cfg.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"checkpoint {ckpt}'s run had model.trust_remote_code=true: its model {cfg.name_or_path} runs Python code of "
            "its own, and export takes that setting from its own command line only (--trust-remote-code, "
            "for code you have read): refused, nothing loaded"
        )
    cfg.trust_remote_code = trust_remote_code
    cfg.attn_implementation = local_attention(cfg.attn_implementation)
    return cfg


LOCAL_ATTENTION = ("eager", "sdpa")  # attention in torch itself: nothing to import or fetch


def local_attention(saved: str) -> str:
    """The attention backend to rebuild with: the run's if it is eager or sdpa, else the schema default. Any other
    backend may be a hub kernel (org/repo, or flash attention's fallback to one), code fetched and run; a checkpoint
    never chooses that, and the backend does not change the weights."""
    return saved if saved in LOCAL_ATTENTION else ModelConfig.attn_implementation


def rebuild(ckpt: Path, ema: bool = False, trust_remote_code: bool = False):
    """(model with the checkpoint's weights, or its weight average with `ema`, tokenizer, step): the run's own model builder, then a strict load."""
    from mlm.ema import WeightAverage
    from mlm.models import build_model, resolve_path
    from mlm.parallel import Piece

    try:
        state = checkpoint.read_state(ckpt)
    except checkpoint.CorruptCheckpoint as e:
        raise UserError(f"checkpoint {ckpt}: {e}; export another one") from None
    cfg = model_settings(ckpt, state, trust_remote_code)
    settings = state["config"]
    if not isinstance(settings.get("block_size"), int) or not isinstance(settings.get("seed"), int):
        raise UserError(f"checkpoint {ckpt}: state.json's config has no block_size or seed; export another one")
    if settings.get("tokenizer.kind", "pretrained") != "pretrained":  # trained by the run: saved in each checkpoint
        cfg.tokenizer = str(ckpt)
    named = {cfg.tokenizer or cfg.name_or_path, *([cfg.name_or_path] if cfg.source == "pretrained" else [])}
    print(
        f"model: {', '.join(sorted(resolve_path(n) for n in named))} (named by the checkpoint; files on this machine only, "
        f"{'its code run: --trust-remote-code' if trust_remote_code else 'no code run'})"
    )
    model, tokenizer = build_model(cfg, settings["block_size"], settings["seed"], fetch=False)
    if checkpoint.model_identity(model) != state["model"]:
        raise UserError(
            f"checkpoint {ckpt} holds a model {state['model']}, but its config builds {checkpoint.model_identity(model)} "
            "here; export with the version of the code that trained it"
        )
    average = WeightAverage(model, decay=0.0) if ema else None  # the weights the run averaged, named as it did
    try:
        absent = checkpoint.read(ckpt, {"model": Piece(model), **({"ema": Piece(average)} if ema else {})})
    except RefusedPickle as e:
        raise UserError(f"checkpoint {ckpt}: {e}") from None
    if absent:
        raise UserError(
            f"checkpoint {ckpt} holds no weight average (its run had trainer.ema_decay=0, off); export it without --ema"
        )
    if average is not None:
        average.swap()  # the average into the trainable parameters; the frozen ones equal their weights
    return model, tokenizer, int(state["step"])


def check_out_dir(out: Path, source: Path) -> None:
    # "." or "x/.." name a directory too: compared and renamed into as such
    out, source = out.resolve(), source.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; export into a new or empty directory (nothing is overwritten)")
    protected = source if is_checkpoint(source) else source / "checkpoints"
    if out.is_relative_to(protected):  # a file planted in a checkpoint makes it fail verification
        raise UserError(f"{out} is inside {protected}; export outside the run's checkpoints")


STAGING = ".export"  # inside an existing out dir: where the model is written before its files are moved in


def write_model(model, tokenizer, out: Path) -> None:
    """mlm.train.save_final's model directory at `out`. A new one is renamed into place whole. An existing (empty)
    directory stays the same directory, for it may be the shell's own (`.`), which a rename over it would leave
    deleted: the model is written into a folder inside it, then its files are moved up, config.json last (loaders
    take a folder without one for no model, so a kill halfway leaves no half a model that loads)."""
    from mlm.files import fsync_dir
    from mlm.train import save_final  # the same writer as a run's final/ (atomic)

    if not out.is_dir():
        save_final(model, tokenizer, out)
        return
    staging = out / STAGING
    save_final(model, tokenizer, staging)
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    staging.rmdir()
    fsync_dir(out)


def default_revision(step, ema: bool) -> str:
    """The branch an export is pushed to without --revision: step-<N>, or step-<N>-ema for the weight average."""
    return f"step-{step}-ema" if ema else f"step-{step}"


def check_push(repo: str, out: Path, revision: Optional[str], ema: bool = False) -> None:
    """Before any work: a valid repo id and a hub that answers (huggingface_hub would retry an unreachable one for a minute)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo!r}: {str(e).splitlines()[0]}") from None
    if offline_mode() or not hub_reachable():
        raise UserError(
            f"--push-to-hub {repo}: the Hugging Face hub is unreachable (offline?); export without --push-to-hub "
            f"and upload it later: hf upload {repo} {out} --revision {revision or default_revision('<step>', ema)}"
        )


def push(out: Path, repo: str, revision: str, step: int) -> str:
    """Upload `out` to branch `revision` of the model repo `repo` (both created if absent); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo, folder_path=str(out), revision=revision, commit_message=f"mlm.export: step {step}"
        )
    except (OSError, ValueError) as e:  # HfHubHTTPError (401 without a token, 403, 404) is an OSError
        raise UserError(f"--push-to-hub {repo}: {str(e).strip().splitlines()[0][:300]} (the export is in {out})") from e
    return info.commit_url


def export(
    source: Path,
    out: Path,
    repo: Optional[str] = None,
    revision: Optional[str] = None,
    ema: bool = False,
    trust_remote_code: bool = False,
) -> Tuple[Path, int]:
    """Write the model (or with `ema` its weight average) of checkpoint (or run dir) `source` into `out`, optionally pushed;
    returns (the checkpoint, its step). Code shipped with the model runs only with `trust_remote_code` (--trust-remote-code)."""
    check_out_dir(out, source)
    if repo:
        check_push(repo, out, revision, ema)
    ckpt = pick_checkpoint(source)
    print(
        f"exporting {'the weight average of ' if ema else ''}{ckpt}"
        + ("" if ckpt == source else f" (the newest verified checkpoint of {source})")
    )
    model, tokenizer, step = rebuild(ckpt, ema, trust_remote_code)
    write_model(model, tokenizer, out.resolve())
    print(f'wrote {out} (step {step}): python -m mlm.predict {out} "... <mask> ..."')
    if repo:
        revision = revision or default_revision(step, ema)
        print(f"pushed to {repo} (branch {revision}): {push(out, repo, revision, step)}")
    return ckpt, step


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlm.export", description="Turn a training checkpoint into a Hugging Face model directory."
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint (<run>/checkpoints/ckpt-<step>) or a run directory (its newest verified checkpoint)",
    )
    parser.add_argument("out", type=Path, help="the model directory to write (new or empty)")
    parser.add_argument(
        "--push-to-hub", metavar="REPO", help="also upload it to this Hugging Face model repo (created if absent)"
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export the checkpoint's weight average (trainer.ema_decay > 0) instead of its weights",
    )
    parser.add_argument(
        "--revision",
        metavar="BRANCH",
        help="--push-to-hub: the branch to upload to (default: step-<step>, with --ema step-<step>-ema)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with the checkpoint's model (an auto_map), for code you have read; "
        "never taken from the checkpoint's own config",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.revision and not args.push_to_hub:
        parser.error("--revision needs --push-to-hub")
    if not args.checkpoint.exists():
        parser.error(f"no such checkpoint or run directory: {args.checkpoint}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar for a one-file model
    from mlm.errors import exit_code

    return exit_code(
        lambda: export(args.checkpoint, args.out, args.push_to_hub, args.revision, args.ema, args.trust_remote_code),
        args.debug,
    )


if __name__ == "__main__":
    sys.exit(main())
