"""The training loop over a run that `build_run()` assembles from the config.

`build_run()` makes everything a run is made of (accelerator, model, data, objective, optimizer,
schedule, layout) and writes nothing; the throughput benchmark calls it too. `open_run()` puts it in
a run dir: resume from the newest good checkpoint (or start fresh), open the trackers. `train()` reads
top to bottom: build, open, first eval, the steps with their cadence, final eval, results.
`train_step()` is one optimizer step.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import transformers
from accelerate import Accelerator

from mlm import checkpoint, downstream, faults, flops, progress, rundir
from mlm.allocator import reuse_host_memory
from mlm.batching import TrainOrder, TrainSampler, make_loader
from mlm.config import Config, Resumable, UserError
from mlm.data import build_blocks, flat_token_ids
from mlm.data.identity import changed_data, data_identity
from mlm.data.streaming import BlockStream, stream_eval_blocks, stream_loader
from mlm.ema import WeightAverage, weight_average
from mlm.evaluate import evaluate
from mlm.files import atomic_path, default_cache_root, os_error_of, write_error
from mlm.job import Job, cache_builders_first, on_main_alone
from mlm.masking import MLMCollator, scheduled_probability
from mlm.models import MLMObjective, build_model, check_document_attention, init_unigram_bias
from mlm.optim import build_optimizer, build_scheduler
from mlm.parallel import Replicated, build_layout
from mlm.placement import is_main_process, rank
from mlm.precision import make_accelerator, precision_reason, resolve_mixed_precision
from mlm.preemption import Abandoned, Interrupted, StopSignals, plan
from mlm.tokenizer_training import run_tokenizer, tokenizer_from_text
from mlm.tracking import flat_config, open_trackers

log = logging.getLogger(__name__)

# a log window whose steps waited longer than this share for their batches gets one warning per run
DATA_WAIT_WARN = 0.2


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainState:
    """What the loop carries between steps, and what a checkpoint stores besides tensors."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all positions, masked or not)
    predictions: int = 0  # masked positions trained on, all processes (the sparse head's FLOPs follow them)
    train_seconds: float = 0.0  # wall time inside training steps, excluding eval and checkpoints
    skipped_steps: int = 0  # steps dropped for a non-finite loss (trainer.on_nonfinite=skip)
    overflow_steps: int = 0  # fp16: updates the loss scaler skipped for overflowing gradients
    perplexity_before: Optional[float] = None
    bits_per_char_before: Optional[float] = None  # the same eval per character (mlm/characters.py)
    best_perplexity: float = float("inf")
    last_eval: Dict[str, float] = field(default_factory=dict)
    tracker_run_id: Optional[str] = None
    log_window: List[float] = field(default_factory=lambda: [0.0, 0])  # loss sum and masked tokens since the last log
    final_eval_step: Optional[int] = None  # the step whose final eval is logged: a resume there must not log it twice
    # metrics.jsonl records a failed write left: the resume writes them
    unrecorded: List[Dict[str, Any]] = field(default_factory=list)
    branched_from: Optional[Dict[str, Any]] = (
        None  # {"checkpoint": path, "step": n}: the other run's checkpoint this one started from
    )

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        """Take a checkpoint's state in place (the schedule's time-budget clock reads this object)."""
        self.__dict__.update(TrainState(**saved).__dict__)


class LogWindow:
    """Training loss and time accumulated between two log steps; the loss stays on the device until then."""

    def __init__(self, device, loss_sum: float = 0.0, masked: int = 0):
        self.device = device
        self.loss_sum = torch.tensor(loss_sum, device=device)
        self.masked, self.seconds, self.steps = masked, 0.0, 0
        self.wait = 0.0  # of self.seconds, spent waiting for the next batch

    @classmethod
    def restore(cls, saved: List[float], device) -> "LogWindow":
        return cls(device, float(saved[0]), int(saved[1]))

    def saved(self) -> List[float]:
        """What a checkpoint keeps: the loss average must span the kill; timing restarts anyway."""
        return [float(self.loss_sum), self.masked]

    def add(self, loss_sum: torch.Tensor, masked: int, seconds: float, wait: float = 0.0) -> None:
        self.loss_sum += loss_sum
        self.masked += masked
        self.seconds += seconds
        self.wait += wait
        self.steps += 1

    def flush(
        self, accelerator, tokens_per_step: int, utilisation: Optional[flops.Utilisation] = None
    ) -> Dict[str, float]:
        """Mean masked-token loss over the window and all processes (one all-reduce), then reset; with
        `utilisation`, also the window's model TFLOP/s per device and MFU."""
        totals = torch.stack(
            [self.loss_sum.double(), torch.tensor(float(self.masked), dtype=torch.float64, device=self.device)]
        )
        totals = accelerator.reduce(totals, reduction="sum")
        seconds = max(self.seconds, 1e-9)
        metrics = {
            "train/loss": float(totals[0] / totals[1].clamp(min=1)),
            "train/masked_tokens": int(totals[1]),  # of all processes
            "perf/tokens_per_s": self.steps * tokens_per_step / seconds,
            "perf/step_s": seconds / max(self.steps, 1),
            "perf/data_wait": min(self.wait / seconds, 1.0),  # share of the steps' time spent in next(batches)
        }
        if utilisation is not None:
            metrics.update(utilisation.rates(self.steps * tokens_per_step, metrics["train/masked_tokens"], seconds))
        self.__init__(self.device)
        return metrics


@dataclass
class Data:
    tokenizer: Any
    train_blocks: Any  # None when training from a stream
    eval_blocks: Any
    order: TrainOrder
    steps: int  # optimizer steps the run trains for
    stream_shards: Optional[int]  # streaming: how many shards the stream is read in (a resume must keep it)
    # what it trains on: source files' and tokenizer's hashes (mlm/data/identity.py), a resume compares them
    identity: Dict[str, Any]


@dataclass
class Run:
    """Everything one training run is made of, built from the config by build_run()."""

    cfg: Config
    job: Dict[str, Any]
    accelerator: Accelerator
    data: Data
    layout: Any
    objective: Any  # the prepared MLMObjective (DDP- or FSDP-wrapped where there are several processes)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collator: MLMCollator
    state: TrainState
    settings: Dict[str, Any]  # the flat config, kept in checkpoints and results: a rerun compares them
    budget_s: Optional[float]  # of training time (state.train_seconds)
    main: bool  # the launcher's rank 0 (the same one Accelerate sees)
    run_dir: Optional[Path] = None  # set by open_run
    tracker: Any = None  # opened by open_run
    ema: Optional[WeightAverage] = None  # the weight average (trainer.ema_decay > 0)
    utilisation: Optional[flops.Utilisation] = None  # FLOP counts and device peak (perf/mfu); None: not countable
    precision: str = ""  # the precision it trains in, and why (the start banner)
    batch_wait: float = 0.0  # seconds the current step waited for its batches (train_batches)
    waited: List[float] = field(default_factory=lambda: [0.0, 0.0])  # batch wait and step seconds since this process
    data_wait_warned: bool = False
    writer: checkpoint.Writer = field(default_factory=checkpoint.Writer)  # inline, or in the background
    group: Optional[Job] = None  # the job's processes acting as one (mlm.job); None: outside a Job

    def step(self, micro_batches: List[Dict[str, torch.Tensor]], stops: Tuple[bool, bool] = (False, False)):
        """train_step over this run's parts."""
        tcfg, acc = self.cfg.trainer, self.accelerator
        args = (self.objective, self.optimizer, self.scheduler, micro_batches, acc, tcfg.max_grad_norm, self.layout)
        return train_step(*args, stops=stops)

    @property
    def raw_model(self):
        return self.accelerator.unwrap_model(self.objective).model

    @property
    def tokens_per_step(self) -> int:
        return self.data.order.global_batch * self.cfg.block_size

    def budget_spent(self) -> bool:
        return self.budget_s is not None and self.state.train_seconds >= self.budget_s

    def done_fraction(self) -> float:
        """How far training is (0 -> 1): by steps, or by the time budget when that is further along."""
        return max(
            self.state.step / self.data.steps, self.state.train_seconds / self.budget_s if self.budget_s else 0.0
        )

    def last_step(self) -> bool:
        return self.state.step == self.data.steps or self.budget_spent()


def build_run(
    cfg: Config,
    job: Optional[Dict[str, Any]] = None,
    config_tree: Optional[Dict[str, Any]] = None,
    built: Optional[Tuple[Any, Any]] = None,
    group: Optional[Job] = None,
    run_dir: Optional[Path] = None,
) -> Run:
    """Validate the config and build the run's parts; nothing is written (but the token-block cache) and no run dir is
    read: open_run() does that (`run_dir`: where a trained tokenizer lost from the cache is found, in the checkpoint
    to resume). `built`: a (model, tokenizer) made elsewhere instead of cfg.model's (the benchmark's)."""
    cfg.validate()
    if cfg.downstream.kind != "none" and is_main_process():
        downstream.task_splits(cfg.downstream)  # its data loads (or fails) now, not after training
    requested_precision = cfg.runtime.mixed_precision
    cfg.runtime.mixed_precision = resolve_mixed_precision(requested_precision)  # what ran is what results.json records
    accelerator = make_accelerator(cfg.runtime.mixed_precision)
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    if cfg.runtime.reuse_host_memory:
        reuse_host_memory()
    model, data = build_data(cfg, accelerator, built, group, run_dir)
    state = TrainState()
    budget_s = cfg.trainer.budget_minutes * 60 if cfg.trainer.budget_minutes else None
    layout, objective, optimizer, scheduler = build_optimization(
        cfg, model, data.steps, accelerator, (lambda: state.train_seconds / budget_s) if budget_s else None
    )
    collator = MLMCollator(data.tokenizer, cfg.masking, seed=cfg.seed)
    parts = (accelerator, data, layout, objective, optimizer, scheduler, collator, state)
    run = Run(cfg, job or {}, *parts, flat_config(config_tree or asdict(cfg)), budget_s, is_main_process(), group=group)
    run.ema = weight_average(run.raw_model, cfg.trainer.ema_decay, data.steps)  # before resume(), which loads it
    run.precision = precision_reason(str(requested_precision), str(cfg.runtime.mixed_precision))
    run.writer = checkpoint_writer(cfg, layout)
    sparse = accelerator.unwrap_model(objective).sparse
    run.utilisation = flops.measure_utilisation(
        run.raw_model, cfg.block_size, sparse, accelerator, cfg.runtime.mixed_precision
    )
    return run


def open_run(run: Run, run_dir: Path, config_tree: Optional[Dict[str, Any]] = None) -> Run:
    """Put a built run in `run_dir`: resumed from its newest good checkpoint, if any (the run dir's records then
    keep only the steps up to it), with its trackers open."""
    run.run_dir = Path(run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)  # run.py's run dirs exist already; a direct call may name a new one
    resume(run)
    state = run.state
    tree = config_tree or asdict(run.cfg)
    run.tracker = open_trackers(
        run.cfg.tracker, run.run_dir, tree, run.job, run.main, resume_id=state.tracker_run_id, start_step=state.step
    )
    state.tracker_run_id = run.tracker.run_id or state.tracker_run_id
    faults.reached("startup")
    return run


def checkpoint_writer(cfg: Config, layout) -> checkpoint.Writer:
    """trainer.async_checkpoint's writer. Sharded runs write synchronously: each rank's shards are written by a
    collective (torch.distributed.checkpoint), whose async_save would run collectives off this thread on a second
    process group, and the manifest would have to wait for every rank's background write."""
    if cfg.trainer.async_checkpoint and layout.sharded:
        log.warning(
            "trainer.async_checkpoint: sharded runs (runtime.sharding=fsdp) write their checkpoints synchronously"
        )
    return checkpoint.Writer(background=cfg.trainer.async_checkpoint and not layout.sharded)


def shared_tokenizer(cfg: Config, accelerator: Accelerator, group: Optional[Job], run_dir: Optional[Path] = None):
    """The run's trained tokenizer (None for tokenizer=pretrained), the same on every process: the main process reads
    or trains it (the others wait on the job's store, with no time limit) and sends its JSON to the others. Not each
    its own: WordPiece and Unigram training is not deterministic, and a node-local or unwritable cache is not shared."""
    if cfg.tokenizer.kind == "pretrained":
        return None

    def read_or_train():  # a lost cache entry is taken from the checkpoint a resume would load first
        resumed = next(iter(checkpoint.resume_candidates(cfg.resume, run_dir)), None) if run_dir else None
        return run_tokenizer(cfg, resumed=resumed)

    mine = on_main_alone("tokenizer", read_or_train, group)
    text = checkpoint.agreed(accelerator, mine.backend_tokenizer.to_str() if mine is not None else None)
    return mine if mine is not None else tokenizer_from_text(cfg, text)


def build_data(
    cfg: Config,
    accelerator: Accelerator,
    built: Optional[Tuple[Any, Any]] = None,
    group: Optional[Job] = None,
    run_dir: Optional[Path] = None,
) -> Tuple[Any, Data]:
    """Model and tokenizer (`built`, or cfg.model's), token blocks (the main process fills the block cache, the
    others reuse it), and the data order."""
    trained = None if built else shared_tokenizer(cfg, accelerator, group, run_dir)
    with cache_builders_first(accelerator, group):
        model, tokenizer = built or build_model(cfg.model, cfg.block_size, cfg.seed, tokenizer=trained)
        if cfg.dataset.document_attention:
            check_document_attention(model)  # before any block is built
        if cfg.dataset.streaming:  # training blocks come from the stream (train_batches)
            train_blocks, eval_blocks = None, stream_eval_blocks(cfg.dataset, tokenizer, cfg.block_size)
        else:
            blocks = build_blocks(cfg.dataset, tokenizer, cfg.block_size)
            train_blocks, eval_blocks = blocks["train"], blocks["test"]
        # the hashes build_blocks just took: a stat per file
        identity = data_identity(cfg.dataset, tokenizer, default_cache_root())
    if cfg.model.head_bias_init == "unigram":
        if train_blocks is None:
            log.warning(
                "model.head_bias_init=unigram counts the training split's tokens, which a stream does not have; "
                "the head's output bias is left as it was built"
            )
        else:
            init_unigram_bias(
                model, torch.from_numpy(np.bincount(flat_token_ids(train_blocks))), tokenizer.all_special_ids
            )
    tcfg = cfg.trainer
    if tcfg.max_eval_blocks:
        eval_blocks = eval_blocks.select(range(min(tcfg.max_eval_blocks, len(eval_blocks))))
    if len(eval_blocks) == 0:
        raise UserError(
            f"the held-out split of {cfg.dataset.path or cfg.dataset.kind} has no block of {cfg.block_size} tokens; "
            "raise dataset.test_size, lower block_size, or use more data"
        )
    order = TrainOrder(
        0, tcfg.per_device_batch_size, tcfg.gradient_accumulation_steps, accelerator.num_processes, cfg.seed
    )
    # a stream has no length: the whole run counts as one epoch of max_steps global batches
    order.num_blocks = len(train_blocks) if train_blocks is not None else tcfg.max_steps * order.global_batch
    if order.steps_per_epoch == 0:
        raise UserError(
            f"the training split has {len(train_blocks)} blocks, fewer than one global batch of {order.global_batch}; "
            "lower trainer.per_device_batch_size or block_size, or use more data"
        )
    steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * order.steps_per_epoch))
    stream_shards = accelerator.num_processes * max(1, cfg.runtime.num_workers) if cfg.dataset.streaming else None
    return model, Data(tokenizer, train_blocks, eval_blocks, order, steps, stream_shards, identity)


def build_optimization(cfg: Config, model, steps: int, accelerator: Accelerator, budget_progress=None):
    """The layout (DDP replicas or FSDP2 shards, applied from outside), the prepared objective, optimizer
    and schedule (stepped by hand once per optimizer step; `budget_progress` makes it follow a time budget)."""
    layout = build_layout(cfg.runtime.sharding)
    if layout.sharded and accelerator.num_processes == 1:
        raise UserError(
            "runtime.sharding=fsdp needs several processes (e.g. torchrun --nproc_per_node 2 run.py ...); use runtime.sharding=none"
        )
    objective = MLMObjective(model, sparse=cfg.runtime.sparse_prediction)
    if cfg.runtime.activation_checkpointing:  # before sharding, so FSDP wraps the checkpointed layers
        enable_activation_checkpointing(model)
    if cfg.runtime.compile:
        model.base_model.compile()  # in place: parameter names and checkpoints stay the same
    objective, optimizer = layout.prepare(
        objective, lambda module: build_optimizer(module, cfg.optimizer), accelerator, cfg.runtime.mixed_precision
    )
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, budget_progress)
    return layout, objective, optimizer, scheduler


def resume(run: Run) -> None:
    """Load the newest checkpoint that verifies (or start fresh), then make the run dir agree with that."""
    config_rates = list(run.scheduler.base_lrs)  # loading puts back the checkpoint's peak rates
    ckpt, saved = checkpoint.load_newest(run.cfg.resume, run.run_dir, checkpoints(run).load, run.accelerator)
    if ckpt is not None:
        order = run.data.order
        if saved["global_batch"] != order.global_batch:
            raise UserError(
                f"{ckpt} was trained with a global batch of {saved['global_batch']}, this run has {order.global_batch}; keep the batch settings to resume"
            )
        if saved.get("stream_shards") != run.data.stream_shards:
            raise UserError(
                f"{ckpt} read its data stream in {saved.get('stream_shards')} shards, this run uses {run.data.stream_shards}; "
                "keep dataset.streaming, the number of processes and runtime.num_workers to resume"
            )
        other_data = check_data(saved, run.data.identity, ckpt, run.cfg.resume)
        keep_config_rates(run.optimizer, run.scheduler, config_rates)
        if run.run_dir.resolve() not in ckpt.resolve().parents:  # another run's checkpoint: a branch, own tracker run
            run.state.branched_from, run.state.tracker_run_id = (
                {"checkpoint": str(ckpt.resolve()), "step": run.state.step},
                None,
            )
        if other_data:
            forget_other_data(run.state, ckpt, other_data)
        log.info("resumed from %s at step %d", ckpt, run.state.step)
    if run.main:
        rundir.start_from(run.run_dir, run.state.step if ckpt is not None else None, run.state.unrecorded)


def check_data(saved: Dict[str, Any], identity: Dict[str, Any], ckpt: Path, resume_setting: str) -> List[str]:
    """Resuming `ckpt` on other data than it recorded (files or tokenizer): refused under resume=auto, a warning for a
    checkpoint named by hand (a branch the user asked for), and what differs is returned. The run dir's guard already
    refused changed files."""
    differ = changed_data(saved.get("data"), identity)
    if differ and resume_setting == "auto":
        raise rundir.data_changed(ckpt, differ)
    if differ:
        log.warning("resuming %s on other data than it trained on: %s", ckpt, "; ".join(differ))
    return differ


def forget_other_data(state: TrainState, ckpt: Path, differ: List[str]) -> None:
    """A resume onto other data keeps no number measured on the checkpoint's data, so results.json and the summary never
    set one corpus's perplexity against another's. The "before" stays unknown rather than measured now: an eval at this
    step would score the checkpoint's trained weights, not the model the run started from."""
    log.warning(
        "%s's evals (perplexity before %s, best %s) and loss window were measured on its own data: not carried over",
        ckpt.name,
        state.perplexity_before,
        state.best_perplexity,
    )
    state.perplexity_before, state.bits_per_char_before, state.best_perplexity, state.last_eval = (
        None,
        None,
        float("inf"),
        {},
    )
    state.final_eval_step = None
    state.log_window = [0.0, 0]
    if state.branched_from is not None:  # results.json says why it has no "before"
        state.branched_from["other_data"] = differ


def keep_config_rates(optimizer, scheduler, rates: List[float]) -> None:
    """A resume with another optimizer.lr (or new_head_lr_scale) trains at this config's peak rates from the
    checkpoint's step on, as it says. Unchanged rates are left exactly as loaded (an exact resume)."""
    if list(scheduler.base_lrs) == rates:
        return
    scheduler.base_lrs = rates
    for group, rate, curve in zip(optimizer.param_groups, rates, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = rate, rate * curve(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def train(
    cfg: Config,
    run_dir: Path,
    job: Optional[Dict[str, Any]] = None,
    config_tree: Optional[Dict[str, Any]] = None,
    group: Optional[Job] = None,
) -> Dict[str, Any]:
    """Train and evaluate as configured (in `group`, its Job); writes into `run_dir` and returns the results dict."""
    wall_start = time.perf_counter()
    # until its plan is set, a stop signal ends the process at once in one line: there is nothing to save yet
    stop = StopSignals(
        is_main_process(), lambda: next(iter(checkpoint.list_checkpoints(run_dir)), None), plan=None
    ).install()
    try:
        run = open_run(build_run(cfg, job, config_tree, group=group, run_dir=run_dir), run_dir, config_tree)
    except BaseException:
        stop.restore()
        raise
    state, tcfg = run.state, cfg.trainer
    start_step = state.step  # that of the checkpoint it resumed from (0: none)
    bar = None
    try:
        window = LogWindow.restore(state.log_window, run.accelerator.device)
        if run.main:
            progress.log_lines(banner(run))
        bar = progress.TrainBar(
            run.data.steps, state.step, run.budget_s, state.train_seconds, run.main and tcfg.progress_bar
        )
        stop.plan = "stopping after this step with a checkpoint"
        if state.step == 0:
            before = run_eval(run, bar)
            state.perplexity_before, state.bits_per_char_before = (
                before["eval/perplexity"],
                before["eval/bits_per_char"],
            )
        train_steps(run, window, bar, stop)
        bar.close()
        final = final_eval(run, window, bar, stop)
        results = results_record(run, final, time.perf_counter() - wall_start)
        stop.plan = "finishing final/ and results.json (seconds)"
        save_outputs(run, results, stop)
        return results
    except Abandoned as e:  # a stop signal during an eval, seen by every process at the same batch
        stop_abandoned_eval(run, window, stop, e, start_step)
    finally:
        run.writer.close()  # an error or a stop: the checkpoint in flight is completed, never abandoned half-written
        stop.restore()
        if bar is not None:
            bar.close()
        run.tracker.finish()


def train_steps(run: Run, window: "LogWindow", bar: progress.TrainBar, stop: StopSignals) -> None:
    """The steps from where the run stands to its last, with their logs, evals, checkpoints and stops."""
    state, tcfg = run.state, run.cfg.trainer
    eval_every = tcfg.eval_every or run.data.order.steps_per_epoch
    for t0, micro in train_batches(run):
        try:
            result = run.step(micro, stops=(run.tracker.failure is not None, stop.signum is not None))
        except NonFiniteLoss as e:
            run.writer.wait()  # the checkpoint in flight is complete before the newest verified one is named
            skip_step(state, run.scheduler, tcfg, e, run.run_dir, run.main)
            continue
        run.writer.check()  # a checkpoint that failed in the background stops the run here
        count_step(run, result, t0, window)
        if run.ema is not None and not result.overflow:  # only a step that changed the weights
            run.ema.update()
        bar.update(state.train_seconds)
        if state.step % tcfg.log_every == 0 or run.last_step():
            log_train(run, result, window, bar)
        if bar.projection_due(state.step, tcfg.log_every) and not run.last_step():
            log.info(projection(run, bar))
        if run.last_step():
            return
        if state.step % eval_every == 0:
            run_eval(run, bar)
        if (tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0) or result.stop:
            save(run, window, wait=result.stop is not None)  # a stop's checkpoint is complete before any rank leaves
        if result.stop:
            stop_with_checkpoint(result.stop, stop, run.tracker, run.run_dir, state.step)


def final_eval(run: Run, window: "LogWindow", bar: progress.TrainBar, stop: StopSignals) -> Dict[str, float]:
    """The final eval and its checkpoint, then the stops that end a trained run before its files are written."""
    state, tcfg = run.state, run.cfg.trainer
    log.info(
        progress.end_line(state.step, run.data.steps, tcfg.max_steps, tcfg.epochs, run.budget_s, state.train_seconds)
    )
    stop.plan = "stopping once the final checkpoint is written; nothing is left to train"
    # A rerun after a kill from here on resumes from the final checkpoint, finds its eval logged
    # (final_eval_step), and redoes only the files.
    if state.final_eval_step == state.step:
        final = state.last_eval
    else:
        final = run_eval(run, bar)
        state.final_eval_step = state.step
        save(run, window)
    if checkpoint.any_process(run.accelerator, run.tracker.failure is not None):  # the checkpoint carries them
        stop_with_checkpoint("metrics", stop, run.tracker, run.run_dir, state.step)
    if checkpoint.any_process(run.accelerator, stop.signum is not None):  # trained, checkpointed: files are the rerun's
        stop_after_training(
            stop,
            f"checkpoint {checkpoint.checkpoint_dir(run.run_dir, state.step)} holds the final eval; "
            f"write final/ and results.json (nothing left to train) with: {rundir.resume_command(run.run_dir)}",
        )
    return final


def train_batches(run: Run) -> Iterator[Tuple[float, List[Dict[str, torch.Tensor]]]]:
    """(start time, micro-batches) of each optimizer step from where the run stands, epoch after epoch.

    The masking rate is set before each step's batches are drawn: it is a function of the step (or
    the spent budget). New masks every epoch, the same for every process."""
    state, order, collator = run.state, run.data.order, run.collator
    # worker processes copy this rate
    collator.probability = scheduled_probability(run.cfg.masking, run.done_fraction())
    while state.step < run.data.steps and not run.budget_spent():
        epoch, first = divmod(state.step, order.steps_per_epoch)
        collator.stream = epoch
        batches = iter(epoch_loader(run, epoch, first))
        for _ in range(first, min(order.steps_per_epoch, first + run.data.steps - state.step)):
            t0 = time.perf_counter()
            collator.probability = scheduled_probability(run.cfg.masking, run.done_fraction())
            micro = [next(batches) for _ in range(order.accumulation)]
            run.batch_wait = time.perf_counter() - t0  # perf/data_wait: the step's time waiting for data
            yield t0, micro


def epoch_loader(run: Run, epoch: int, first_step: int):
    cfg, data, acc = run.cfg, run.data, run.accelerator
    if cfg.dataset.streaming:  # a resumed stream skips the micro-batches already trained on
        stream = BlockStream(
            cfg.dataset,
            data.tokenizer,
            cfg.block_size,
            data.order.micro_batch,
            acc.process_index,
            acc.num_processes,
            start_batches=first_step * data.order.accumulation,
        )
        return stream_loader(stream, run.collator, cfg.runtime.num_workers)
    sampler = TrainSampler(data.order, epoch, acc.process_index, start_step=first_step)
    return make_loader(
        data.train_blocks, sampler, run.collator, cfg.runtime.num_workers, pin_memory=torch.cuda.is_available()
    )


def count_step(run: Run, result: "StepResult", t0: float, window: "LogWindow") -> None:
    """Book a finished step: its count, tokens and time (one clock for all ranks under a budget), and its loss."""
    state, acc = run.state, run.accelerator
    state.step += 1
    faults.reached("step")
    faults.fail_after_step(run.job.get("num") or 0, rank(), state.step)
    state.tokens += run.tokens_per_step
    seconds = time.perf_counter() - t0
    if run.budget_s and acc.num_processes > 1:  # the same LR and the same last step on every rank
        seconds = float(acc.reduce(torch.tensor([seconds], device=acc.device), reduction="max")[0])
    state.train_seconds += seconds
    if result.overflow:  # the data was consumed; the update and the schedule step were not
        state.overflow_steps += 1
        log.info(
            "step %d: fp16 gradients overflowed, update skipped; loss scale now %g", state.step, acc.scaler.get_scale()
        )
        check_loss_scale(acc.scaler)
    else:
        window.add(result.loss_sum, result.masked, seconds, run.batch_wait)
    run.waited[0] += run.batch_wait
    run.waited[1] += seconds


def log_train(run: Run, result: "StepResult", window: "LogWindow", bar) -> None:
    window_steps = window.steps
    metrics = {
        **window.flush(run.accelerator, run.tokens_per_step, run.utilisation),
        "train/lr": run.scheduler.get_last_lr()[0],
        "train/grad_norm": float(result.grad_norm),
        "train/epoch": run.state.step / run.data.order.steps_per_epoch,
        "train/mlm_probability": run.collator.probability,
    }
    scaler = run.accelerator.scaler
    if scaler is not None:
        metrics.update({"train/loss_scale": scaler.get_scale(), "train/overflow_steps": run.state.overflow_steps})
    run.state.predictions += metrics["train/masked_tokens"]
    run.tracker.log(metrics, run.state.step)
    if metrics["perf/data_wait"] > DATA_WAIT_WARN and not run.data_wait_warned:
        run.data_wait_warned = True
        first = run.state.step - window_steps + 1
        steps = f"steps {first}-{run.state.step}" if window_steps > 1 else f"step {run.state.step}"
        log.warning(
            "%s waited %.0f%% of the time for the next batch: the device is starved of data "
            "(raise runtime.num_workers; docs/performance.md, 'Data wait')",
            steps,
            100 * metrics["perf/data_wait"],
        )
    log.info(
        progress.train_line(
            run.state.step, run.data.steps, metrics, (run.state.train_seconds, run.budget_s) if run.budget_s else None
        )
    )
    bar.set_postfix(
        step=run.state.step,
        loss=f"{metrics['train/loss']:.3f}",
        lr=f"{metrics['train/lr']:.2e}",
        tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
    )


def banner(run: Run) -> List[str]:
    """The start banner's lines (mlm.progress.banner_lines)."""
    cfg, acc, order = run.cfg, run.accelerator, run.data.order
    trainable, total = progress.count_parameters(run.raw_model)
    device = (
        f"{acc.device} ({torch.cuda.get_device_name(acc.device)})"
        if acc.device.type == "cuda"
        else f"{acc.device.type} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    )
    model = cfg.model.name_or_path
    if cfg.tokenizer.kind != "pretrained":  # a scratch model (checked) with a tokenizer of its own: no name is involved
        model = f"{cfg.model.arch.get('model_type')} from scratch, tokenizer={cfg.tokenizer.kind} of {len(run.data.tokenizer)} tokens"
    return progress.banner_lines(
        model=model,
        trainable=trainable,
        total=total,
        global_batch=order.global_batch,
        block_size=cfg.block_size,
        batch_parts=progress.batch_parts(order.micro_batch, acc.num_processes, order.accumulation),
        steps=run.data.steps,
        start_step=run.state.step,
        budget_minutes=cfg.trainer.budget_minutes,
        precision=run.precision,
        device=device,
        processes=acc.num_processes,
        run_dir=run.run_dir,
        resume=rundir.resume_command(run.run_dir),
    )


def projection(run: Run, bar: progress.TrainBar) -> str:
    state = run.state
    return progress.projection_line(
        state.step,
        run.data.steps,
        bar.step_seconds(state.step, state.train_seconds),
        bar.eval_seconds,
        run.cfg.trainer.eval_every or run.data.order.steps_per_epoch,
        run.budget_s,
        state.train_seconds,
        run.accelerator.device.type == "cpu",
    )


def run_eval(run: Run, bar: Optional[progress.TrainBar] = None) -> Dict[str, float]:
    """The eval at this step (with a bar over its batches where the training bar shows); its time is kept out of the
    training bar's rate."""
    cfg, state, blocks = run.cfg, run.state, run.data.eval_blocks
    start = time.perf_counter()
    title = f"eval at step {state.step}" if bar is not None and bar.shown else None
    log.info("eval at step %d: scoring %d held-out blocks", state.step, len(blocks))
    with plan(abandon_plan(state.step)):
        metrics = evaluate(
            run.objective,
            blocks,
            run.data.tokenizer,
            cfg.masking,
            cfg.seed,
            run.accelerator,
            cfg.trainer.eval_batch_size,
            title,
        )
        if metrics["eval/masked_tokens"] == 0:  # a perplexity of nothing is NaN: a setting to fix, not a result
            raise UserError(
                f"the eval masked no token in {len(blocks)} blocks at masking.mlm_probability={cfg.masking.mlm_probability}; "
                "raise masking.mlm_probability or trainer.max_eval_blocks"
            )
        if run.ema is not None:
            metrics.update(eval_average(run, title))
    faults.reached("eval")
    seconds = time.perf_counter() - start
    log.info(
        "eval at step %d: perplexity %.2f, %.3f bits per character, masked accuracy %.3f (%d blocks, %.0f s)",
        state.step,
        metrics["eval/perplexity"],
        metrics["eval/bits_per_char"],
        metrics["eval/masked_accuracy"],
        len(blocks),
        seconds,
    )
    if bar is not None:
        bar.eval_took(seconds)
    state.last_eval = metrics
    state.best_perplexity = min(state.best_perplexity, metrics["eval/perplexity"])
    run.tracker.log({**metrics, "eval/best_perplexity": state.best_perplexity}, state.step)
    return metrics


def abandon_plan(step: int) -> str:
    """What a stop signal during the eval at `step` does (said at once, in one line)."""
    if step == 0:
        return (
            "abandoning the eval at step 0; nothing is trained yet, so there is no checkpoint and the rerun starts over"
        )
    return f"abandoning the eval at step {step}; stopping with the checkpoint of step {step}"


def stop_abandoned_eval(
    run: Run, window: "LogWindow", stop: StopSignals, abandoned: Abandoned, start_step: int
) -> None:
    """End the run after an eval a stop signal gave up (nothing of it logged), on every process: with the checkpoint of
    the last step, written now unless the run resumed from it. The rerun does not redo that eval (the next is at
    its usual step; a final eval is done by the rerun). Before the first step there is nothing to save."""
    state = run.state
    log.warning(
        "abandoned the eval at step %d after %s for %s: nothing of it is logged%s",
        state.step,
        abandoned,
        stop.name,
        "" if state.step == 0 else ", and a rerun goes on without it",
    )
    if state.step == 0:
        stop.hand_on()  # submitit's handler requeues the job and exits here
        raise Interrupted(
            stop.signum,
            f"stopped by {stop.name} during the eval at step 0; nothing trained yet and no checkpoint; "
            f"start over with: {rundir.resume_command(run.run_dir)}",
        )
    if state.step != start_step:
        save(run, window)
    if run.last_step():
        stop_after_training(
            stop,
            f"checkpoint {checkpoint.checkpoint_dir(run.run_dir, state.step)} is the last step's; run the final "
            f"eval and write final/ and results.json (nothing left to train) with: {rundir.resume_command(run.run_dir)}",
        )
    stop_with_checkpoint("signal", stop, run.tracker, run.run_dir, state.step)


def eval_average(run: Run, title: Optional[str] = None) -> Dict[str, float]:
    """The same eval of the weight average, swapped into the model and back (doubles the eval time)."""
    cfg = run.cfg
    with run.ema.swapped_in(run.layout):
        metrics = evaluate(
            run.objective,
            run.data.eval_blocks,
            run.data.tokenizer,
            cfg.masking,
            cfg.seed,
            run.accelerator,
            cfg.trainer.eval_batch_size,
            title and f"{title} (weight average)",
        )
    log.info("eval at step %d: weight average's perplexity %.2f", run.state.step, metrics["eval/perplexity"])
    return {
        "eval/ema_loss": metrics["eval/loss"],
        "eval/ema_perplexity": metrics["eval/perplexity"],
        "eval/ema_bits_per_char": metrics["eval/bits_per_char"],
    }


def checkpoints(run: Run) -> checkpoint.Checkpoints:
    """The run's state as named pieces, what its checkpoints save and a resume restores: one entry per piece."""
    acc = run.accelerator
    pieces = {
        **run.layout.pieces(run.raw_model, run.optimizer),
        "scheduler": run.scheduler,
        "rng": checkpoint.Piece(checkpoint.RNG(), "rank"),
        "train_state": checkpoint.Piece(run.state, "state"),  # with the data position: its step
    }
    if acc.scaler is not None:  # fp16; a checkpoint of another precision has none: it starts fresh
        pieces["scaler"] = checkpoint.Piece(acc.scaler, fresh=lambda path: None)
    if run.ema is not None:
        pieces["ema"] = checkpoint.Piece(run.ema, "layout", fresh=run.ema.restart_from)
    loadable = lambda directory: checkpoint.write_loadable(  # noqa: E731
        directory, run.raw_model, run.data.tokenizer, run.layout.sharded
    )
    return checkpoint.Checkpoints(
        run.run_dir, pieces, acc, run.raw_model, run.layout, run.cfg.trainer.keep_checkpoints, run.writer, loadable
    )


def save(run: Run, window: "LogWindow", wait: bool = True) -> None:
    """Checkpoint this step; wait=False returns once the state is copied when trainer.async_checkpoint is on."""
    state = run.state
    state.log_window = window.saved()  # so a resumed run logs the same averages as an uninterrupted one
    state.unrecorded = run.tracker.unwritten
    facts = {  # what a resume compares
        "global_batch": run.data.order.global_batch,
        "stream_shards": run.data.stream_shards,
        "config": run.settings,
        "data": run.data.identity,
    }
    checkpoints(run).save(state.step, facts, wait)


def results_record(run: Run, final: Dict[str, float], wall_seconds: float) -> Dict[str, Any]:
    """What results.json says of a finished run."""
    state, acc = run.state, run.accelerator
    return {
        "eval_loss": final["eval/loss"],
        "perplexity": final["eval/perplexity"],
        "perplexity_before": state.perplexity_before,
        "best_perplexity": state.best_perplexity,
        "ema_perplexity": final.get("eval/ema_perplexity"),  # the weight average's (trainer.ema_decay); null when off
        # per character of the masked tokens (mlm/characters.py): comparable across tokenizers, as perplexity is not
        "bits_per_char": final.get("eval/bits_per_char"),  # none from a final eval an older version logged
        "bits_per_char_before": state.bits_per_char_before,
        "ema_bits_per_char": final.get("eval/ema_bits_per_char"),
        "masked_accuracy": final["eval/masked_accuracy"],
        "steps": state.step,
        "stopped": "budget" if run.budget_spent() else "steps",  # what ended training
        "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps,
        "train_tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
        # this process's steps (since a resume)
        "data_wait": round(run.waited[0] / run.waited[1], 4) if run.waited[1] else None,
        **flops.run_totals(run.utilisation, state.tokens, state.predictions, state.train_seconds),  # train_flops, mfu
        "processes": acc.num_processes,
        "device": "cpu" if acc.device.type == "cpu" else str(acc.device),  # this process's; rank r: cuda:<local rank>
        "device_slot": run.job.get("device_slot"),
        "sharding": str(run.cfg.runtime.sharding),
        "mixed_precision": run.cfg.runtime.mixed_precision,  # auto resolved
        "peak_rss_mb": peak_rss_mb(acc),
        "wall_seconds": round(wall_seconds, 3),
        "branched_from": state.branched_from,  # resume=<another run's checkpoint>: which, and its step
        "config": run.settings,  # what a rerun compares before calling this run finished
        "data": run.data.identity,  # and what it trained on (mlm/data/identity.py); data.tokenizer: its fingerprint
    }


def save_outputs(run: Run, results: Dict[str, Any], stop: StopSignals) -> None:
    """The final model (gathered on every process when sharded) and results.json, written after it: its presence means
    finished. A downstream task then fine-tunes final/ (minutes) and results.json is written again with its numbers;
    a stop signal before or during that fine-tune ends the run with the training results kept, and the rerun adds them
    (mlm.downstream.add_to_finished_run)."""
    run.tracker.summary(
        {
            "final/perplexity": results["perplexity"],
            "best/perplexity": results["best_perplexity"],
            "final/eval_loss": results["eval_loss"],
        }
    )
    if results["bits_per_char"] is not None:
        run.tracker.summary({"final/bits_per_char": results["bits_per_char"]})
    save_model = run.cfg.trainer.save_model
    if run.ema is not None:
        save_average_outputs(run, results)
    full_weights = run.layout.full_state_dict(run.raw_model) if save_model else None  # a collective when sharded
    if run.main and save_model:
        log.info("saving the final model to %s", run.run_dir / "final")
        save_final(run.raw_model, run.data.tokenizer, run.run_dir / "final", full_weights)
    if run.main:
        faults.reached("results")
        rundir.write_results(run.run_dir, results)
    if run.cfg.downstream.kind != "none":  # the main process fine-tunes final/ (minutes); the other ranks wait for it
        stop.plan = f"stopping the downstream fine-tune at its next step; {run.run_dir / 'results.json'} holds the training results"
        stopped = checkpoint.any_process(run.accelerator, stop.signum is not None)
        scores = None if stopped else on_main_alone("downstream", lambda: fine_tune_final(run), run.group)
        if checkpoint.any_process(run.accelerator, run.main and scores is None):
            stop_after_training(
                stop,
                f"the training results are in {run.run_dir / 'results.json'}; "
                f"add the downstream numbers with: {rundir.resume_command(run.run_dir)}",
            )
        if run.main:
            results["downstream"] = scores
            run.tracker.summary({"downstream/accuracy": scores["accuracy"], "downstream/macro_f1": scores["macro_f1"]})
            rundir.write_results(run.run_dir, results)


def fine_tune_final(run: Run) -> Optional[Dict[str, Any]]:
    """The downstream scores of final/, or None where a stop signal ended the fine-tune (so the other ranks, waiting
    for this one, learn of it in the next all-reduce instead of waiting for ever)."""
    log.info("downstream: fine-tuning %s on %s", run.run_dir / "final", downstream.task_name(run.cfg.downstream))
    try:
        # this run's own model: its code (if any) was trusted on this command line
        return downstream.evaluate(
            run.run_dir / "final", run.cfg.downstream, run.accelerator.device, run.cfg.model.trust_remote_code
        )
    except Interrupted:
        return None


def save_average_outputs(run: Run, results: Dict[str, Any]) -> None:
    """The weight average's summary, and <run>/final_ema: a model like final/ (gathered on every process when sharded)."""
    run.tracker.summary({"final/ema_perplexity": results["ema_perplexity"]})
    if not run.cfg.trainer.save_model:
        return
    with run.ema.swapped_in(run.layout):
        weights = run.layout.full_state_dict(run.raw_model)  # a collective when sharded
        if run.main:
            save_final(run.raw_model, run.data.tokenizer, run.run_dir / "final_ema", weights)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this process's masked-token loss sum (on the device)
    masked: int  # this process's masked tokens
    grad_norm: torch.Tensor  # global gradient norm before clipping (on the device)
    overflow: bool = False  # fp16: the loss scaler found inf/NaN gradients and skipped the update
    stop: Optional[str] = None  # why some process asked to stop after this step: "metrics" (unwritable) or "signal"


def train_step(
    objective,
    optimizer,
    scheduler,
    micro_batches: List[Dict[str, torch.Tensor]],
    accelerator,
    max_grad_norm: float,
    layout=Replicated(),
    stops: Tuple[bool, bool] = (False, False),
) -> StepResult:
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
        totals = accelerator.reduce(
            torch.tensor([float(n_local), *wanted.tolist()], dtype=torch.float64, device=accelerator.device),
            reduction="sum",
        )
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
    grad_norm = layout.grad_norm(
        accelerator.clip_grad_norm_(objective.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    )
    # the one host read of a step (four scalars at once): it keeps a NaN out of the weights
    loss_value, norm_value, metrics_stop, signal_stop = torch.cat(
        [torch.stack([loss_sum.float(), grad_norm.float()]), wanted.to(loss_sum.device).float()]
    ).tolist()
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
    return StepResult(
        loss_sum, n_local, grad_norm, overflow, "metrics" if metrics_stop else "signal" if signal_stop else None
    )


def check_loss_scale(scaler) -> None:
    """fp16: a scale that keeps halving below 1 means the gradients are non-finite at any scale (a real NaN)."""
    if scaler is not None and scaler.get_scale() < 1.0:
        raise NonFiniteLoss(
            f"the fp16 loss scale fell to {scaler.get_scale():.3g}: the gradients are non-finite at any scale"
        )


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


def stop_with_checkpoint(reason: str, stop: StopSignals, tracker, run_dir: Path, step: int) -> None:
    """After the checkpoint of `step`, on every process: end the run for an unwritable metrics file (a UserError)
    or a stop signal (Interrupted)."""
    written = checkpoint.checkpoint_dir(run_dir, step)
    if reason == "metrics":
        path = Path(run_dir) / "metrics.jsonl"
        cause = (
            write_error("metrics", path, tracker.failure)
            if tracker.failure
            else f"the main process cannot write {path}"
        )
        raise Resumable(
            f"{cause}; stopped after step {step} with checkpoint {written}, which keeps the unwritten records"
        )
    stop.hand_on()  # submitit's handler requeues the job and exits here
    raise Interrupted(
        stop.signum,
        f"stopped by {stop.name} after step {step}; checkpoint {written} written; "
        f"resume with: {rundir.resume_command(run_dir)}",
    )


def stop_after_training(stop: StopSignals, what: str) -> None:
    """A stop signal after the last step (every process): the run ends now, trained, with `what` left for the rerun."""
    stop.hand_on()  # submitit's handler requeues the job and exits here
    raise Interrupted(stop.signum, f"stopped by {stop.name} after the last step; {what}")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every layer (the name changed within transformers 5)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def own_peak_rss_mb() -> float:
    """This process's peak resident memory, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(accelerator) -> float:
    """The largest peak resident memory of any process of the run, in MB."""
    peak = torch.tensor([own_peak_rss_mb()], dtype=torch.float64, device=accelerator.device)
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
