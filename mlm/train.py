"""The training loop: build everything from the config, train, evaluate, checkpoint, save.

`train()` reads top to bottom; `train_step()` is one optimizer step. Helpers for eval,
checkpoints, tracking and reports live in their own modules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import transformers
from accelerate import Accelerator
from tqdm.auto import tqdm

from mlm import checkpoint, faults
from mlm.batching import TrainOrder, TrainSampler, make_loader
from mlm.config import Config, UserError
from mlm.data import build_blocks
from mlm.evaluate import evaluate
from mlm.files import atomic_path, atomic_write_json, os_error_advice
from mlm.masking import MLMCollator
from mlm.models import MLMObjective, build_model
from mlm.optim import build_optimizer, build_scheduler
from mlm.tracking import flat_config, open_trackers, truncate_metrics

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainState:
    """What the loop carries between steps, and what a checkpoint stores besides tensors."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all positions, masked or not)
    train_seconds: float = 0.0  # wall time inside training steps, excluding eval and checkpoints
    skipped_steps: int = 0  # steps dropped for a non-finite loss (trainer.on_nonfinite=skip)
    perplexity_before: Optional[float] = None
    best_perplexity: float = float("inf")
    last_eval: Dict[str, float] = field(default_factory=dict)
    tracker_run_id: Optional[str] = None
    log_window: List[float] = field(default_factory=lambda: [0.0, 0])  # loss sum and masked tokens since the last log
    final_eval_step: Optional[int] = None  # the step whose final eval is logged: a resume there must not log it twice


class LogWindow:
    """Training loss and time accumulated between two log steps; the loss stays on the device until then."""

    def __init__(self, device, loss_sum: float = 0.0, masked: int = 0):
        self.device = device
        self.loss_sum = torch.tensor(loss_sum, device=device)
        self.masked, self.seconds, self.steps = masked, 0.0, 0

    @classmethod
    def restore(cls, saved: List[float], device) -> "LogWindow":
        return cls(device, float(saved[0]), int(saved[1]))

    def saved(self) -> List[float]:
        """What a checkpoint keeps: the loss average must span the kill; timing restarts anyway."""
        return [float(self.loss_sum), self.masked]

    def add(self, loss_sum: torch.Tensor, masked: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.masked += masked
        self.seconds += seconds
        self.steps += 1

    def flush(self, accelerator, tokens_per_step: int) -> Dict[str, float]:
        """Mean masked-token loss over the window and all processes (one all-reduce), then reset."""
        totals = torch.stack([self.loss_sum.double(), torch.tensor(float(self.masked), dtype=torch.float64, device=self.device)])
        totals = accelerator.reduce(totals, reduction="sum")
        seconds = max(self.seconds, 1e-9)
        metrics = {
            "train/loss": float(totals[0] / totals[1].clamp(min=1)),
            "perf/tokens_per_s": self.steps * tokens_per_step / seconds,
            "perf/step_s": seconds / max(self.steps, 1),
        }
        self.__init__(self.device)
        return metrics


def skip_step(state: TrainState, scheduler, tcfg, error: Exception, run_dir: Path) -> None:
    """A non-finite step: stop (default), or with on_nonfinite=skip drop it and keep the schedule in step."""
    state.skipped_steps += 1
    if tcfg.on_nonfinite == "stop" or state.skipped_steps > tcfg.max_skipped_steps:
        kept = checkpoint.list_checkpoints(run_dir)
        raise NonFiniteLoss(
            f"non-finite training loss at step {state.step + 1} ({error}); "
            + (f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint was written before it")
        ) from None
    log.warning("step %d: %s; skipped (%d so far)", state.step + 1, error, state.skipped_steps)
    scheduler.step()
    state.step += 1


def make_accelerator(cfg: Config) -> Accelerator:
    # Gradient accumulation is done by hand in train_step (normalised by the global count of
    # masked tokens), so Accelerate's own accumulation stays at 1.
    # Without an accelerator, Accelerate only sets up multi-process CPU training (gloo) when told
    # cpu=True; otherwise torchrun's ranks would each train alone.
    return Accelerator(mixed_precision=cfg.trainer.mixed_precision, cpu=not accelerator_available())


def accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def train_step(objective, optimizer, scheduler, micro_batches: List[Dict[str, torch.Tensor]], accelerator, max_grad_norm: float):
    """One optimizer step over micro-batches; returns (loss sum, masked tokens, grad norm) of this process.

    The loss is normalised by the number of masked tokens in the whole global batch (all
    micro-batches, all processes), so a step gives the same gradient however the batch is split.
    Counting needs the labels only, which are on the host before the batches move to the device.
    """
    n_local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    n_global = n_local
    if accelerator.num_processes > 1:  # one tiny all-reduce per step: the price of exact normalisation
        n_global = int(accelerator.reduce(torch.tensor([n_local], device=accelerator.device), reduction="sum").item())
    scale = accelerator.num_processes / max(n_global, 1)  # DDP averages gradients over processes; undo that
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(objective):  # sync gradients once per step
            micro_loss, _, _ = objective(**batch)
            accelerator.backward(micro_loss * scale)
        loss_sum += micro_loss.detach()
    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    # a host read of two scalars per step: free on CPU, and it keeps a NaN out of the weights
    if not (math.isfinite(float(loss_sum)) and math.isfinite(float(grad_norm))):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss {float(loss_sum):.4g}, grad norm {float(grad_norm):.4g}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_local, grad_norm


def total_steps(cfg: Config, order: TrainOrder) -> int:
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return max(1, math.ceil(cfg.trainer.epochs * order.steps_per_epoch))


def train(cfg: Config, run_dir: Path, job: Optional[Dict[str, Any]] = None, config_tree: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train and evaluate as configured; writes into `run_dir` and returns the results dict."""
    wall_start = time.perf_counter()
    cfg.validate()
    job = job or {}
    run_dir = Path(run_dir)
    accelerator = make_accelerator(cfg)
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    main = accelerator.is_main_process
    tcfg = cfg.trainer

    # 1. model, tokenizer and token blocks (the main process fills the block cache, the others reuse it)
    with accelerator.main_process_first():
        model, tokenizer = build_model(cfg.model, cfg.block_size, cfg.seed)
        blocks = build_blocks(cfg.dataset, tokenizer, cfg.block_size)
    train_blocks, eval_blocks = blocks["train"], blocks["test"]
    if tcfg.max_eval_blocks:
        eval_blocks = eval_blocks.select(range(min(tcfg.max_eval_blocks, len(eval_blocks))))
    order = TrainOrder(len(train_blocks), tcfg.per_device_batch_size, tcfg.gradient_accumulation_steps, accelerator.num_processes, cfg.seed)
    if order.steps_per_epoch == 0:
        raise UserError(
            f"the training split has {len(train_blocks)} blocks, fewer than one global batch of {order.global_batch}; "
            "lower trainer.per_device_batch_size or block_size, or use more data"
        )
    steps = total_steps(cfg, order)

    # 2. objective, optimizer, schedule (the schedule is stepped by hand once per optimizer step)
    objective = MLMObjective(model, sparse=tcfg.sparse_prediction)
    if tcfg.compile:
        model.base_model.compile()  # in place: parameter names and checkpoints stay the same
    optimizer = build_optimizer(objective, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    raw_model = accelerator.unwrap_model(objective).model

    # 3. resume, trackers
    state = TrainState()
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:
        saved = checkpoint.load_checkpoint(ckpt, raw_model, optimizer, scheduler, accelerator.scaler, accelerator)
        if saved["global_batch"] != order.global_batch:
            raise UserError(f"{ckpt} was trained with a global batch of {saved['global_batch']}, this run has {order.global_batch}; keep the batch settings to resume")
        state = TrainState(**saved["train_state"])
        log.info("resumed from %s at step %d", ckpt, state.step)
    if main:  # records past the checkpoint (or all, on a fresh start) are logged again
        truncate_metrics(run_dir, state.step if ckpt is not None else -1)
        (run_dir / "error.txt").unlink(missing_ok=True)  # a failure this run recovers from
        if ckpt is None:  # starting over: a previous run's results and checkpoints would pass for this one's
            (run_dir / "results.json").unlink(missing_ok=True)
            checkpoint.discard_checkpoints(run_dir)
    tracker = open_trackers(cfg.tracker, run_dir, config_tree or asdict(cfg), job, main, resume_id=state.tracker_run_id)
    state.tracker_run_id = tracker.run_id or state.tracker_run_id
    faults.reached("startup")

    def run_eval() -> Dict[str, float]:
        start = time.perf_counter()
        metrics = evaluate(objective, eval_blocks, tokenizer, cfg.masking, cfg.seed, accelerator, tcfg.eval_batch_size)
        faults.reached("eval")
        log.info("eval at step %d: perplexity %.2f, masked accuracy %.3f (%d blocks, %.0f s)", state.step,
                 metrics["eval/perplexity"], metrics["eval/masked_accuracy"], len(eval_blocks), time.perf_counter() - start)
        state.last_eval = metrics
        state.best_perplexity = min(state.best_perplexity, metrics["eval/perplexity"])
        tracker.log({**metrics, "eval/best_perplexity": state.best_perplexity}, state.step)
        return metrics

    def save(step: int) -> None:
        state.log_window = window.saved()  # so a resumed run logs the same averages as an uninterrupted one
        checkpoint.save_checkpoint(
            run_dir, step, raw_model, optimizer, scheduler, accelerator.scaler,
            {"train_state": asdict(state), "global_batch": order.global_batch}, accelerator, tcfg.keep_checkpoints,
        )

    if state.step == 0:
        state.perplexity_before = run_eval()["eval/perplexity"]
    eval_every = tcfg.eval_every or order.steps_per_epoch

    # 4. the loop
    collator = MLMCollator(tokenizer, cfg.masking, seed=cfg.seed)
    tokens_per_step = order.global_batch * cfg.block_size
    window = LogWindow.restore(state.log_window, accelerator.device)
    bar = tqdm(total=steps, initial=state.step, disable=not (main and tcfg.progress_bar), desc="train", dynamic_ncols=True)
    try:
        while state.step < steps:
            epoch, first = divmod(state.step, order.steps_per_epoch)
            collator.stream = epoch  # new masks every epoch, the same for every process
            sampler = TrainSampler(order, epoch, accelerator.process_index, start_step=first)
            batches = iter(make_loader(train_blocks, sampler, collator, tcfg.num_workers, pin_memory=torch.cuda.is_available()))
            for _ in range(first, min(order.steps_per_epoch, first + steps - state.step)):
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(order.accumulation)]
                try:
                    loss_sum, n_masked, grad_norm = train_step(objective, optimizer, scheduler, micro, accelerator, tcfg.max_grad_norm)
                except NonFiniteLoss as e:
                    skip_step(state, scheduler, tcfg, e, run_dir)
                    continue
                state.step += 1
                faults.reached("step")
                state.tokens += tokens_per_step
                seconds = time.perf_counter() - t0
                state.train_seconds += seconds
                window.add(loss_sum, n_masked, seconds)
                bar.update(1)
                if state.step % tcfg.log_every == 0 or state.step == steps:
                    metrics = {**window.flush(accelerator, tokens_per_step), "train/lr": scheduler.get_last_lr()[0],
                               "train/grad_norm": float(grad_norm), "train/epoch": state.step / order.steps_per_epoch}
                    tracker.log(metrics, state.step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
                if state.step % eval_every == 0 and state.step < steps:
                    run_eval()
                if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0 and state.step < steps:
                    save(state.step)
        bar.close()

        # 5. final eval, checkpoint, model, results. A rerun after a kill in this phase resumes from
        # the final checkpoint, finds its eval logged (final_eval_step), and redoes only the files.
        if state.final_eval_step == state.step:
            final = state.last_eval
        else:
            final = run_eval()
            state.final_eval_step = state.step
            save(state.step)
        results = {
            "eval_loss": final["eval/loss"],
            "perplexity": final["eval/perplexity"],
            "perplexity_before": state.perplexity_before,
            "best_perplexity": state.best_perplexity,
            "masked_accuracy": final["eval/masked_accuracy"],
            "steps": state.step,
            "skipped_steps": state.skipped_steps,
            "train_tokens": state.tokens,
            "train_seconds": round(state.train_seconds, 3),
            "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
            "processes": accelerator.num_processes,
            "wall_seconds": round(time.perf_counter() - wall_start, 3),
            "config": flat_config(config_tree or asdict(cfg)),  # what a rerun compares before calling this run finished
        }
        tracker.summary({"final/perplexity": results["perplexity"], "best/perplexity": results["best_perplexity"], "final/eval_loss": results["eval_loss"]})
        if main:
            if tcfg.save_model:
                save_final(raw_model, tokenizer, run_dir / "final")
            faults.reached("results")
            atomic_write_json(run_dir / "results.json", results)  # written last: its presence means the run is finished
        return results
    finally:
        bar.close()
        tracker.finish()


def save_final(model, tokenizer, path: Path) -> None:
    """save_pretrained (safetensors) of model and tokenizer: `pipeline('fill-mask', model=path)` loads it.

    Saved into a temporary directory renamed into place, so `path` never holds half a model."""
    try:
        with atomic_path(path) as tmp:
            model.save_pretrained(tmp)
            faults.reached("final")
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"cannot write the final model to {path}: {e.strerror or e} ({os_error_advice(e)})") from e
