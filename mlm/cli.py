"""What run.py does around training: resolvers, the typed config, errors as one line, the summary."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mlm.config import Config, UserError, register_configs
from mlm.distributed import is_main_process, launch_name

log = logging.getLogger("mlm")


def launch_stamp() -> str:
    """A timestamp shared by all processes of one launch on one node (for the run directory name).

    torchrun and `accelerate launch` start every rank from one launcher process, so its start time
    is common to all of them; a plain `python run.py` uses its own start time. The tasks of one
    SLURM job (on several nodes) use its job id instead: their start times differ.
    """
    name = launch_name()
    if name:
        return name
    start = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        start = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(start).strftime("%Y-%m-%d_%H-%M-%S")


def register() -> None:
    register_configs()
    OmegaConf.register_new_resolver("mlm_launch_stamp", launch_stamp, use_cache=True, replace=True)
    # value on the main process; on the others the second argument (default: null)
    OmegaConf.register_new_resolver("mlm_main_process_only", lambda value, other=None: value if is_main_process() else other, replace=True)


def job_info(cfg_hydra) -> dict:
    from hydra.types import RunMode

    multirun = cfg_hydra.mode == RunMode.MULTIRUN
    return {
        "name": cfg_hydra.job.name,
        "overrides": list(cfg_hydra.overrides.task),
        "sweep_name": Path(cfg_hydra.sweep.dir).name if multirun else None,
        "multirun": multirun,
        "num": cfg_hydra.job.num if multirun else None,
    }


def run_job(cfg: DictConfig) -> float:
    """Train one job; a user error is one line and exit code 2 (in a sweep: a failed job, the sweep goes on)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    job = job_info(hc)
    debug = bool(cfg.get("debug", False))
    try:
        from mlm import distributed
        from mlm.train import NonFiniteLoss, train

        typed: Config = OmegaConf.to_object(cfg)
        try:
            # one device and one process group for this job; a failure on any rank fails it on all
            with distributed.job(run_dir, typed.trainer.device_slots) as placed:
                results = train(typed, run_dir, {**job, "device_slot": placed["slot"]}, OmegaConf.to_container(cfg, resolve=True))
        except NonFiniteLoss as e:
            raise UserError(str(e)) from e
    except UserError as e:
        if debug:
            raise
        return _fail(run_dir, job, str(e))
    except Exception as e:
        if job["multirun"] and not debug:  # one broken job must not end the sweep; its log has the traceback
            log.exception("job failed")
            return _fail(run_dir, job, f"{type(e).__name__}: {e}")
        raise
    if is_main_process():
        from mlm.report import plot_run

        plot_run(run_dir)
        print(summary_text(typed, run_dir, results))
    return results["perplexity"]


def _fail(run_dir: Path, job: dict, message: str) -> float:
    from mlm.distributed import failure_report

    log.error(message)
    if is_main_process() and run_dir.exists():
        (run_dir / "error.txt").write_text(failure_report(run_dir, message) + "\n")
    if job["multirun"]:
        return float("nan")  # Optuna records a failed trial; the basic sweeper goes on
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def summary_text(cfg: Config, run_dir: Path, results: dict) -> str:
    lines = [
        "",
        f"perplexity: {results['perplexity_before']:.2f} before -> {results['perplexity']:.2f} after "
        f"({results['steps']} steps, {results['train_seconds']:.0f} s, {results['tokens_per_s']:.0f} tokens/s)",
        f"run directory: {run_dir}",
    ]
    final = run_dir / "final"
    if final.exists():
        from mlm.config import ModelConfig
        from mlm.models import build_pretrained, load_tokenizer
        from mlm.predict import format_predictions, fill_mask

        model_cfg = ModelConfig(name_or_path=str(final))
        tokenizer = load_tokenizer(model_cfg)
        model = build_pretrained(model_cfg, tokenizer)
        lines.append(f"model: {final}  (python -m mlm.predict {final} \"... <mask> ...\")")
        for text in cfg.trainer.probe_sentences:
            lines.append(format_predictions(text, fill_mask(model, tokenizer, text, cfg.trainer.top_k)))
    return "\n".join(lines)
