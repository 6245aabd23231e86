"""The training loop: build everything from the config, train, evaluate, checkpoint, save.

`train()` reads top to bottom; `train_step()` is one optimizer step. Helpers for eval,
checkpoints, tracking and reports live in their own modules.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tqdm.auto import tqdm

from mlm import checkpoint, distributed, faults
from mlm.allocator import reuse_host_memory
from mlm.batching import TrainOrder, TrainSampler, make_loader
from mlm.config import Config, UserError
from mlm.data import build_blocks, flat_token_ids
from mlm.data.streaming import BlockStream, stream_eval_blocks, stream_loader
from mlm.dropout import use_fast_dropout
from mlm.evaluate import evaluate
from mlm.files import atomic_path, atomic_write_json, os_error_of, write_error
from mlm.masking import MLMCollator, scheduled_probability
from mlm.models import MLM_HEADS, MLMObjective, build_model, init_unigram_bias
from mlm.optim import build_optimizer, build_scheduler
from mlm.parallel import Replicated, build_layout
from mlm.preemption import Interrupted, StopSignals
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
    overflow_steps: int = 0  # fp16: updates the loss scaler skipped for overflowing gradients
    perplexity_before: Optional[float] = None
    best_perplexity: float = float("inf")
    last_eval: Dict[str, float] = field(default_factory=dict)
    tracker_run_id: Optional[str] = None
    log_window: List[float] = field(default_factory=lambda: [0.0, 0])  # loss sum and masked tokens since the last log
    final_eval_step: Optional[int] = None  # the step whose final eval is logged: a resume there must not log it twice
    unrecorded: List[Dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records a failed write left: the resume writes them


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


def skip_step(state: TrainState, scheduler, tcfg, error: Exception, run_dir: Path, main: bool) -> None:
    """A non-finite step: stop (default), or with on_nonfinite=skip drop it and keep the schedule in step."""
    state.skipped_steps += 1
    if tcfg.on_nonfinite == "stop" or state.skipped_steps > tcfg.max_skipped_steps:
        if not main:  # every rank stops here; the main process's message (it hashes the checkpoints) is the one shown
            raise NonFiniteLoss(f"non-finite training loss at step {state.step + 1} ({error})") from None
        good = checkpoint.newest_verified(run_dir)
        raise NonFiniteLoss(
            f"non-finite training loss at step {state.step + 1} ({error}); "
            + (f"the newest verified checkpoint is {good}" if good else "no verified checkpoint was written before it")
        ) from None
    log.warning("step %d: %s; skipped (%d so far)", state.step + 1, error, state.skipped_steps)
    scheduler.step()
    state.step += 1


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run in hardware here. On a CPU that means AVX512-BF16 or AMX (oneDNN's
    check); without them torch emulates bf16, ~45x slower than fp32 (measured on an AVX2 EPYC)."""
    if device_type == "cuda":  # compute capability 8.0 (Ampere) on; V100/T4 only emulate it, which torch counts by default
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return True  # other accelerators (MPS, XPU): Accelerate's own bf16 autocast
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check: assume emulated
        return False


def resolve_mixed_precision(requested: str) -> str:
    """trainer.mixed_precision=auto -> bf16 where the device runs it natively, else no (fp32)."""
    device_type = "cuda" if torch.cuda.is_available() else ("cpu" if not accelerator_available() else "other")
    if requested == "auto":
        resolved = "bf16" if native_bf16(device_type) else "no"
        log.info("trainer.mixed_precision=auto -> %s (%s bf16 on this %s)", resolved,
                 "native" if resolved == "bf16" else "no native", device_type.upper())
        return resolved
    if requested == "bf16" and not native_bf16(device_type):
        log.warning("trainer.mixed_precision=bf16: this %s has no native bf16 (on a CPU: no AVX512-BF16 or AMX), so "
                    "bf16 runs emulated, far slower than fp32; trainer.mixed_precision=auto picks fp32 here", device_type.upper())
    return requested


def make_accelerator(cfg: Config) -> Accelerator:
    # Gradient accumulation is done by hand in train_step (normalised by the global count of
    # masked tokens), so Accelerate's own accumulation stays at 1.
    # Without an accelerator, Accelerate only sets up multi-process CPU training (gloo) when told
    # cpu=True; otherwise torchrun's ranks would each train alone.
    # Accelerate keeps one state per process and refuses a second configuration (another
    # mixed_precision, device or distributed type); each job of a multirun starts from a fresh one.
    # The process group is not part of that state: mlm.distributed.job() owns it.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision, cpu=not accelerator_available())
    if cfg.trainer.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate ignores fp16 on CPU (the run would train in fp32 without a word). Attach CPU
        # autocast and a loss scaler the way it attaches them on CUDA, so fp16 means fp16 everywhere.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this process's masked-token loss sum (on the device)
    masked: int  # this process's masked tokens
    grad_norm: torch.Tensor  # global gradient norm before clipping (on the device)
    overflow: bool = False  # fp16: the loss scaler found inf/NaN gradients and skipped the update
    stop: Optional[str] = None  # why some process asked to stop after this step: "metrics" (unwritable) or "signal"


def train_step(objective, optimizer, scheduler, micro_batches: List[Dict[str, torch.Tensor]], accelerator, max_grad_norm: float,
               layout=Replicated(), stops: Tuple[bool, bool] = (False, False)) -> StepResult:
    """One optimizer step over micro-batches.

    The loss is normalised by the number of masked tokens in the whole global batch (all
    micro-batches, all processes), so a step gives the same gradient however the batch is split.
    Counting needs the labels only, which are on the host before the batches move to the device.

    Host syncs: one per step (the finite check below). Under an fp16 loss scaler an overflow is not a
    failure but the scaler's normal signal: the update is skipped and the scale backs off.
    `stops` (this process wants to stop after this step: for an unwritable metrics file, for a signal)
    ride on the same all-reduce, so every process learns them, and the reason, at that one host read.
    """
    n_local = sum(int(b["masked_positions"].numel()) for b in micro_batches)
    wanted = torch.tensor([float(s) for s in stops])
    if accelerator.num_processes > 1:  # one tiny all-reduce per step: the price of exact normalisation
        totals = accelerator.reduce(torch.tensor([float(n_local), *wanted.tolist()], dtype=torch.float64, device=accelerator.device), reduction="sum")
        # DDP and FSDP average gradients over processes; undo that. Stays on the device: no host wait.
        scale = (accelerator.num_processes / totals[:1].clamp(min=1)).float()
        wanted = totals[1:]
    else:
        scale = 1.0 / max(n_local, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with layout.no_sync(accelerator, objective, last=i == len(micro_batches) - 1):  # reduce gradients once per step
            micro_loss, _, _ = objective(**batch)
            accelerator.backward(micro_loss * scale)
        loss_sum += micro_loss.detach()
    # unscales first under a loss scaler, so the norm is that of the true gradients
    grad_norm = layout.grad_norm(accelerator.clip_grad_norm_(objective.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf")))
    # the one host read of a step (four scalars at once): it keeps a NaN out of the weights
    loss_value, norm_value, metrics_stop, signal_stop = torch.cat(
        [torch.stack([loss_sum.float(), grad_norm.float()]), wanted.to(loss_sum.device).float()]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    # Under a scaler, non-finite unscaled gradients are exactly what its found-inf check sees: it
    # skips the update (also inside fused kernels, where Accelerate's step_was_skipped stays False).
    overflow = accelerator.scaler is not None and not math.isfinite(norm_value)
    if not finite and not overflow:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss {loss_value:.4g}, grad norm {norm_value:.4g}")
    optimizer.step()  # under a scaler: skipped when the gradients overflowed, and the scale backs off
    if not overflow:  # the schedule follows the updates, as Accelerate's scheduler wrapper does
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, n_local, grad_norm, overflow, "metrics" if metrics_stop else "signal" if signal_stop else None)


def check_loss_scale(scaler) -> None:
    """fp16: a scale that keeps halving below 1 means the gradients are non-finite at any scale (a real NaN)."""
    if scaler is not None and scaler.get_scale() < 1.0:
        raise NonFiniteLoss(f"the fp16 loss scale fell to {scaler.get_scale():.3g}: the gradients are non-finite at any scale")


def total_steps(cfg: Config, order: TrainOrder) -> int:
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return max(1, math.ceil(cfg.trainer.epochs * order.steps_per_epoch))


def train(cfg: Config, run_dir: Path, job: Optional[Dict[str, Any]] = None, config_tree: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train and evaluate as configured; writes into `run_dir` and returns the results dict."""
    wall_start = time.perf_counter()
    cfg.validate()
    cfg.trainer.mixed_precision = resolve_mixed_precision(cfg.trainer.mixed_precision)  # what ran is what results.json records
    job = job or {}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # run.py's run dirs exist already; a direct call may name a new one
    accelerator = make_accelerator(cfg)
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.reuse_host_memory:
        reuse_host_memory()
    main = distributed.is_main_process()  # the launcher's rank 0 (the same one Accelerate sees)
    tcfg = cfg.trainer
    settings = flat_config(config_tree or asdict(cfg))  # kept in checkpoints and results: a rerun compares them (mlm.cli)

    # 1. model, tokenizer and token blocks (the main process fills the block cache, the others reuse it)
    with distributed.cache_builders_first(accelerator):
        model, tokenizer = build_model(cfg.model, cfg.block_size, cfg.seed)
        if cfg.dataset.streaming:  # training blocks come from the stream in train_loader below
            train_blocks, eval_blocks = None, stream_eval_blocks(cfg.dataset, tokenizer, cfg.block_size)
        else:
            blocks = build_blocks(cfg.dataset, tokenizer, cfg.block_size)
            train_blocks, eval_blocks = blocks["train"], blocks["test"]
    if cfg.model.head_bias_init == "unigram":
        if train_blocks is None:
            raise UserError("model.head_bias_init=unigram counts the training split's tokens; it needs dataset.streaming=false")
        init_unigram_bias(model, torch.from_numpy(np.bincount(flat_token_ids(train_blocks))), tokenizer.all_special_ids)
    if tcfg.max_eval_blocks:
        eval_blocks = eval_blocks.select(range(min(tcfg.max_eval_blocks, len(eval_blocks))))
    if len(eval_blocks) == 0:
        raise UserError(f"the held-out split of {cfg.dataset.path or cfg.dataset.kind} has no block of {cfg.block_size} tokens; "
                        "raise dataset.test_size, lower block_size, or use more data")
    order = TrainOrder(0, tcfg.per_device_batch_size, tcfg.gradient_accumulation_steps, accelerator.num_processes, cfg.seed)
    # a stream has no length: the whole run counts as one epoch of max_steps global batches
    order.num_blocks = len(train_blocks) if train_blocks is not None else tcfg.max_steps * order.global_batch
    stream_shards = accelerator.num_processes * max(1, tcfg.num_workers) if cfg.dataset.streaming else None
    if order.steps_per_epoch == 0:
        raise UserError(
            f"the training split has {len(train_blocks)} blocks, fewer than one global batch of {order.global_batch}; "
            "lower trainer.per_device_batch_size or block_size, or use more data"
        )
    steps = total_steps(cfg, order)
    budget_s = tcfg.budget_minutes * 60 if tcfg.budget_minutes else None  # of training time (state.train_seconds)

    def budget_spent() -> bool:
        return budget_s is not None and state.train_seconds >= budget_s

    def done_fraction() -> float:
        """How far training is (0 -> 1): by steps, or by the time budget when that is further along."""
        return max(state.step / steps, state.train_seconds / budget_s if budget_s else 0.0)

    # 2. objective, optimizer, schedule (the schedule is stepped by hand once per optimizer step);
    #    the layout replicates (DDP) or shards (FSDP2) the model from outside
    layout = build_layout(tcfg)
    if layout.sharded and accelerator.num_processes == 1:
        raise UserError("trainer.sharding=fsdp needs several processes (e.g. torchrun --nproc_per_node 2 run.py ...); use trainer.sharding=none")
    objective = MLMObjective(model, sparse=tcfg.sparse_prediction)
    if tcfg.head_only_steps and (accelerator.num_processes > 1 or objective.head_fn is None):
        raise UserError("trainer.head_only_steps needs one process and a model type with a known MLM head "
                        f"({', '.join(sorted(MLM_HEADS))}); set trainer.head_only_steps=0")
    if tcfg.fast_dropout:
        use_fast_dropout(model)
    if tcfg.activation_checkpointing:  # before sharding, so FSDP wraps the checkpointed layers
        enable_activation_checkpointing(model)
    if tcfg.compile:
        model.base_model.compile()  # in place: parameter names and checkpoints stay the same
    objective, optimizer = layout.prepare(objective, lambda module: build_optimizer(module, cfg.optimizer), accelerator, tcfg.mixed_precision)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, (lambda: state.train_seconds / budget_s) if budget_s else None)
    raw_objective = accelerator.unwrap_model(objective)
    raw_model = raw_objective.model

    # 3. resume, trackers
    state = TrainState()
    ckpt, saved = checkpoint.load_newest(
        cfg.resume, run_dir, lambda path: checkpoint.load_checkpoint(path, raw_model, optimizer, scheduler, accelerator.scaler, accelerator, layout),
        accelerator)
    if ckpt is not None:
        if saved["global_batch"] != order.global_batch:
            raise UserError(f"{ckpt} was trained with a global batch of {saved['global_batch']}, this run has {order.global_batch}; keep the batch settings to resume")
        if saved.get("stream_shards") != stream_shards:
            raise UserError(f"{ckpt} read its data stream in {saved.get('stream_shards')} shards, this run uses {stream_shards}; "
                            "keep dataset.streaming, the number of processes and trainer.num_workers to resume")
        state = TrainState(**saved["train_state"])
        log.info("resumed from %s at step %d", ckpt, state.step)
    if main:  # records past the checkpoint (or all, on a fresh start) are logged again
        truncate_metrics(run_dir, state.step if ckpt is not None else -1, state.unrecorded)
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
        if metrics["eval/masked_tokens"] == 0:  # a perplexity of nothing is NaN: a setting to fix, not a result
            raise UserError(f"the eval masked no token in {len(eval_blocks)} blocks at masking.mlm_probability={cfg.masking.mlm_probability}; "
                            "raise masking.mlm_probability or trainer.max_eval_blocks")
        faults.reached("eval")
        log.info("eval at step %d: perplexity %.2f, masked accuracy %.3f (%d blocks, %.0f s)", state.step,
                 metrics["eval/perplexity"], metrics["eval/masked_accuracy"], len(eval_blocks), time.perf_counter() - start)
        state.last_eval = metrics
        state.best_perplexity = min(state.best_perplexity, metrics["eval/perplexity"])
        tracker.log({**metrics, "eval/best_perplexity": state.best_perplexity}, state.step)
        return metrics

    def save(step: int) -> None:
        state.log_window = window.saved()  # so a resumed run logs the same averages as an uninterrupted one
        state.unrecorded = tracker.unwritten
        checkpoint.save_checkpoint(
            run_dir, step, raw_model, optimizer, scheduler, accelerator.scaler,
            {"train_state": asdict(state), "global_batch": order.global_batch, "stream_shards": stream_shards, "config": settings},
            accelerator, tcfg.keep_checkpoints, layout,
        )

    if state.step == 0:
        state.perplexity_before = run_eval()["eval/perplexity"]
    eval_every = tcfg.eval_every or order.steps_per_epoch

    # 4. the loop
    collator = MLMCollator(tokenizer, cfg.masking, seed=cfg.seed)
    collator.probability = scheduled_probability(cfg.masking, done_fraction())  # worker processes copy this rate

    def train_loader(epoch: int, first_step: int):
        if cfg.dataset.streaming:  # a resumed stream skips the micro-batches already trained on
            stream = BlockStream(cfg.dataset, tokenizer, cfg.block_size, order.micro_batch, accelerator.process_index,
                                 accelerator.num_processes, start_batches=first_step * order.accumulation)
            return stream_loader(stream, collator, tcfg.num_workers)
        sampler = TrainSampler(order, epoch, accelerator.process_index, start_step=first_step)
        return make_loader(train_blocks, sampler, collator, tcfg.num_workers, pin_memory=torch.cuda.is_available())

    tokens_per_step = order.global_batch * cfg.block_size
    window = LogWindow.restore(state.log_window, accelerator.device)
    bar = tqdm(total=steps, initial=state.step, disable=not (main and tcfg.progress_bar), desc="train", dynamic_ncols=True)
    stop = StopSignals().install()
    try:
        while state.step < steps and not budget_spent():
            epoch, first = divmod(state.step, order.steps_per_epoch)
            collator.stream = epoch  # new masks every epoch, the same for every process
            batches = iter(train_loader(epoch, first))
            for _ in range(first, min(order.steps_per_epoch, first + steps - state.step)):
                t0 = time.perf_counter()
                collator.probability = scheduled_probability(cfg.masking, done_fraction())  # a function of the step (or budget)
                raw_objective.set_head_only(state.step < tcfg.head_only_steps)
                micro = [next(batches) for _ in range(order.accumulation)]
                try:
                    result = train_step(objective, optimizer, scheduler, micro, accelerator, tcfg.max_grad_norm, layout,
                                        stops=(tracker.failure is not None, stop.signum is not None))
                except NonFiniteLoss as e:
                    skip_step(state, scheduler, tcfg, e, run_dir, main)
                    continue
                state.step += 1
                faults.reached("step")
                faults.fail_after_step(job.get("num") or 0, distributed.rank(), state.step)
                state.tokens += tokens_per_step
                seconds = time.perf_counter() - t0
                if budget_s and accelerator.num_processes > 1:  # one clock for all ranks: same LR, same last step
                    seconds = float(accelerator.reduce(torch.tensor([seconds], device=accelerator.device), reduction="max")[0])
                state.train_seconds += seconds
                if result.overflow:  # the data was consumed; the update and the schedule step were not
                    state.overflow_steps += 1
                    log.info("step %d: fp16 gradients overflowed, update skipped; loss scale now %g", state.step, accelerator.scaler.get_scale())
                    check_loss_scale(accelerator.scaler)
                else:
                    window.add(result.loss_sum, result.masked, seconds)
                bar.update(1)
                last = state.step == steps or budget_spent()
                if state.step % tcfg.log_every == 0 or last:
                    metrics = {**window.flush(accelerator, tokens_per_step), "train/lr": scheduler.get_last_lr()[0],
                               "train/grad_norm": float(result.grad_norm), "train/epoch": state.step / order.steps_per_epoch,
                               "train/mlm_probability": collator.probability}
                    if accelerator.scaler is not None:
                        metrics.update({"train/loss_scale": accelerator.scaler.get_scale(), "train/overflow_steps": state.overflow_steps})
                    tracker.log(metrics, state.step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
                if last:
                    break
                if state.step % eval_every == 0:
                    run_eval()
                if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                    save(state.step)
                elif result.stop:
                    save(state.step)
                if result.stop:
                    stop_with_checkpoint(result.stop, stop, tracker, run_dir, state.step)
        bar.close()

        # 5. final eval, checkpoint, model, results. A rerun after a kill in this phase resumes from
        # the final checkpoint, finds its eval logged (final_eval_step), and redoes only the files.
        if state.final_eval_step == state.step:
            final = state.last_eval
        else:
            final = run_eval()
            state.final_eval_step = state.step
            save(state.step)
        if checkpoint.any_process(accelerator, tracker.failure is not None):  # the final checkpoint carries the unwritten records
            stop_with_checkpoint("metrics", stop, tracker, run_dir, state.step)
        results = {
            "eval_loss": final["eval/loss"],
            "perplexity": final["eval/perplexity"],
            "perplexity_before": state.perplexity_before,
            "best_perplexity": state.best_perplexity,
            "masked_accuracy": final["eval/masked_accuracy"],
            "steps": state.step,
            "stopped": "budget" if budget_spent() else "steps",  # what ended training
            "skipped_steps": state.skipped_steps,
            "overflow_steps": state.overflow_steps,
            "train_tokens": state.tokens,
            "train_seconds": round(state.train_seconds, 3),
            "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
            "processes": accelerator.num_processes,
            "device": "cpu" if accelerator.device.type == "cpu" else str(accelerator.device),  # this process's; rank r has cuda:<local rank>
            "device_slot": job.get("device_slot"),
            "sharding": tcfg.sharding,
            "mixed_precision": tcfg.mixed_precision,  # auto resolved
            "peak_rss_mb": peak_rss_mb(accelerator),
            "wall_seconds": round(time.perf_counter() - wall_start, 3),
            "config": settings,  # what a rerun compares before calling this run finished
        }
        tracker.summary({"final/perplexity": results["perplexity"], "best/perplexity": results["best_perplexity"], "final/eval_loss": results["eval_loss"]})
        full_weights = layout.full_state_dict(raw_model) if tcfg.save_model else None  # a collective when sharded
        if main:
            if tcfg.save_model:
                save_final(raw_model, tokenizer, run_dir / "final", full_weights)
            faults.reached("results")
            try:
                atomic_write_json(run_dir / "results.json", results)  # written last: its presence means the run is finished
            except OSError as e:
                raise write_error("results", run_dir / "results.json", e) from e
        return results
    finally:
        stop.restore()
        bar.close()
        tracker.finish()


def stop_with_checkpoint(reason: str, stop: StopSignals, tracker, run_dir: Path, step: int) -> None:
    """After the checkpoint of `step`, on every process: end the run for an unwritable metrics file (a UserError)
    or a stop signal (Interrupted)."""
    written = Path(run_dir) / "checkpoints" / f"ckpt-{step:08d}"
    if reason == "metrics":
        path = Path(run_dir) / "metrics.jsonl"
        cause = write_error("metrics", path, tracker.failure) if tracker.failure else f"the main process cannot write {path}"
        raise UserError(f"{cause}; stopped after step {step} with checkpoint {written}, which keeps the unwritten records")
    stop.hand_on()  # submitit's handler requeues the job and exits here
    raise Interrupted(stop.signum, f"stopped by {stop.name} after step {step}; checkpoint {written} written; "
                                   "run the same command again to resume")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every layer (the name changed within transformers 5)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def peak_rss_mb(accelerator) -> float:
    """The largest peak resident memory of any process of the run, in MB (Linux reports KB)."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=accelerator.device)
    return round(float(accelerator.reduce(peak, reduction="max") if accelerator.num_processes > 1 else peak), 1)


def save_final(model, tokenizer, path: Path, state_dict=None) -> None:
    """save_pretrained (safetensors) of model and tokenizer: `pipeline('fill-mask', model=path)` loads it.

    Saved into a temporary directory renamed into place, so `path` never holds half a model. A
    sharded model passes its gathered `state_dict`."""
    try:
        with atomic_path(path) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            faults.reached("final")
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # safetensors reports a full disk as a SafetensorError
        if os_error_of(e) is None:
            raise
        raise write_error("the final model to", path, e) from e
