#!/usr/bin/env python
"""Training throughput: transformers.Trainer (the HF guide's recipe) against this harness's step.

    python benchmarks/train_throughput.py --json out.json [--steps N --warmup W --reps R --threads T --quick --compile]
                                          [--scale default|base --block 128|512 --batch B --device auto|cpu|cuda]

Device: CUDA when present (--device auto), else the CPU; harness and Trainer always on the same one.
The CPU run is the one described below. On CUDA the variants are trainer_bf16 (bf16=True,
optim=adamw_torch_fused, sdpa), trainer_bf16_compile (the same with torch_compile=True), harness and
harness_compile (runtime.compile=true), all under bf16 autocast, at a global batch of 64 x 128 or 32 x 512
tokens (--batch) with 4 dataloader workers each; a step's time ends at torch.cuda.synchronize(); peak
memory is torch.cuda.max_memory_allocated; MFU divides by NVIDIA's datasheet peak (mlm.flops.GPU_PEAKS).
--scale base swaps the model for a BERT-base-shaped encoder (12 x 768, 12 heads, FFN 3072, vocab
30522, random init from a local BertConfig: no hub), at --block 128 or 512; on CPU it is not run
unless asked (tens of seconds to minutes a step). benchmarks/gpu_check.py runs the three
CUDA configurations (default at 128, base at 128 and 512) in one call.

Every variant trains the same model (RoBERTa, 6 layers x 768, 12 heads, FFN 3072, vocab 50265, ~82M
parameters), built from the same seed (parameter checksum compared: "same_init"), on the same token
blocks (the default Wikipedia sample, the offline MiniLM tokenizer, block 128), batch 8, for the
same steps and threads, with the same AdamW (--lr, default 3e-4; betas 0.9/0.999, eps 1e-8, weight
decay 0.01 on matrices only), linear decay without warm-up and gradient clipping at 1.0:

  trainer_fp32     transformers.Trainer + DataCollatorForLanguageModeling(mlm_probability=0.15), fp32
  trainer_bf16     the same with bf16=True; only where the CPU runs bf16 natively, else under "skipped"
  harness          mlm.train.build_run() around the same model: a Config composed from conf/ (experiment=none:
                   15% masks, one learning rate), trained by mlm.train.train_batches and train_step, at the
                   precision runtime.mixed_precision=auto picks (bf16 where native, else fp32)
  harness_compile  (--compile) the harness with runtime.compile=true

Reading the output. Each variant runs in its own worker process, and the variants take turns window
by window (W warm-up steps, then R windows of N steps, interleaved), so background load hits all
alike. tokens/s is the median over windows of N * 8 * 128 / window time, end to end (data, masking,
step, loss read-back); speedup_vs_* are ratios of those medians, speedup_median_of_rounds the
median of per-round ratios. FLOPs count the model as executed ("flops_counted": 6 x body parameters
+ attention + the MLM head, on every position for the Trainer, on the masked ones for the harness);
MFU divides them by a torch.matmul peak at the variant's precision, probed in every round. eval_loss:
every variant scored in fp32 on the same eval masks after the same steps; the check is the harness
within 2% of the Trainer at the harness's precision. Details: the comment block below the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit  # benchmarks/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# How it measures, in detail.
#
# Variants. The model has 514 positions and sdpa attention. trainer_fp32 uses Trainer's own default
# optimizer (fused AdamW in transformers 5 with torch >= 2.8); trainer_bf16 autocasts through
# Accelerate. bf16 is native where the CPU has AVX512-BF16 or AMX (mlm.precision.native_bf16);
# elsewhere torch emulates it and one dense step of this model takes minutes, so the bf16 Trainer
# is skipped with the measured reason. The harness variant gets runtime.reuse_host_memory (on by
# default) and the sparse MLM head (runtime.sparse_prediction), as a default run does.
#
# Processes. Each variant runs in its own worker subprocess launched by this script, so that its
# peak RSS (resource.getrusage ru_maxrss of that process) is its own and no variant inherits
# another's allocator state. All workers stay alive for the whole run (about 2.5 GB each at peak),
# but only one computes at a time: the others block on a pipe, using no CPU.
#
# Timing, interleaved. Every variant trains W warm-up steps (not timed: allocation, first touch,
# torch.compile) and then R windows of N consecutive steps, W + R*N steps in all, as one training
# run. The driver runs the variants' windows in turns: round 0 is every variant's warm-up, round r
# is every variant's r-th window (the order rotates each round), and a worker pauses between its
# windows until the driver tells it to go on. So the windows of different variants are minutes apart
# at most, and a change in background load (other jobs starting or stopping on the machine) hits
# all variants alike instead of whichever happened to run last. A step is timed from the end of the
# previous step (or the end of a pause) to the end of this one, so data loading, masking and
# collation, the loss read-back and per-step logging are included for both loops; the pause itself
# is never timed. The Trainer's timestamps come from a TrainerCallback (on_step_begin/on_step_end),
# the harness's from the loop in this file around mlm.train.train_step. tokens/s of a window counts
# all positions, masked or not. The compute-only time (step begin -> step end, i.e. without fetching
# and collating the batch) is reported too.
#
# MFU. The matmul peak is measured in this run with mlm.flops.measure_matmul (perf/mfu's CPU probe:
# square torch.matmul from --matmul-size up until one takes 50 ms, best of several) before the run, at the start of every round (all workers paused) and after
# the run. "mfu" divides each window by the probe of its own round and takes the median, so
# background load that slows both alike cancels out; "mfu_vs_best_peak" divides by the best probe of
# the whole run. FLOPS_COUNTED below says what is counted and what is not.
#
# Learning check. After the same number of steps from the same initial weights, every variant's
# model is scored in fp32 (no autocast; the dtype is checked with a forward hook) on the first
# --eval-blocks test blocks with the harness's deterministic eval masks
# (MLMCollator(stream=mlm.masking.EVAL_STREAM)), so all variants see identical eval inputs. The
# training data order and masks differ between the Trainer (its RandomSampler and torch RNG masking)
# and the harness (its TrainOrder permutation and hash masking), so the losses match only
# statistically: the check is "harness within 2% of the Trainer at the harness's precision"
# (trainer_bf16 where bf16 is native, else trainer_fp32). The eval loss of the initial weights is
# reported to show how far training moved the loss: a check on a loss that did not move would be
# meaningless, so the default learning rate is 3e-4 rather than the guide's 2e-5 (a fine-tuning rate
# for a pretrained model, which from random init barely moves the loss in a few steps; --lr 2e-5
# gives the guide's value). The default run is short (2 warm-up + 3 x 3 timed = 11 steps per
# variant) so that all three variants fit in 10 minutes on 2 cores, where a dense fp32 step of this
# model takes ~5-13 s depending on load; more steps (--steps/--reps) make both the timing and the
# learning check tighter. harness_compile is not evaluated (same math as harness; eval would
# recompile the encoder).

BLOCK = 128  # the default --block
BATCH = 8  # the CPU's batch (blocks per step); on CUDA see CUDA_BATCH
ARCH = dict(
    num_hidden_layers=6,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
)
# --scale base: a BERT-base-shaped encoder from a local config (random init, no hub), the MiniLM tokenizer's vocabulary
BASE_ARCH = dict(
    num_hidden_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=30522,
    max_position_embeddings=512,
    type_vocab_size=2,
)
SCALES = {"default": ("roberta", ARCH), "base": ("bert", BASE_ARCH)}
# On CUDA one batch of 8 x 128 leaves an H100 mostly idle: the same global batch for every variant, larger
CUDA_BATCH = {128: 64, 512: 32}  # block -> blocks per step (8192 and 16384 tokens)
CUDA_WORKERS = (
    4  # dataloader workers of both the Trainer and the harness on CUDA (the collator runs beside the GPU step)
)
VARIANTS = ("trainer_fp32", "trainer_bf16", "harness")
CUDA_VARIANTS = ("trainer_bf16", "trainer_bf16_compile", "harness", "harness_compile")
TRAINER_PRECISION = {"trainer_fp32": "fp32", "trainer_bf16": "bf16", "trainer_bf16_compile": "bf16"}
TOKEN = "@@train_throughput@@"  # prefix of the workers' status lines on stdout
FLOPS_COUNTED = (
    "model FLOPs per optimizer step, counted by mlm.flops.count_flops (the harness's perf/mfu counter): 6 x the "
    "weights of every nn.Linear in the encoder per token (forward 2x + backward 4x; T = batch x block tokens) "
    "+ 12 * layers * hidden * seq * T  (attention scores QK^T and weighted values, forward + backward) "
    "+ 6 x the MLM head's nn.Linear weights (transform and vocabulary projection) per predicted position as executed: "
    "P = T for the Trainer's dense head, P = the measured number of masked positions (~15%) for the harness's "
    "sparse head. Not counted: biases, embedding lookups and their gradient, layer norms, activations, softmax, "
    "loss, optimizer update. MFU = achieved model FLOP/s / peak at the variant's precision: on CPU a torch.matmul "
    "peak measured in this run (bf16 variants vs bf16 peak, trainer_fp32 vs fp32 peak); on CUDA NVIDIA's datasheet "
    "figure (dense bf16 Tensor Core peak)."
)


# ---------------------------------------------------------------- shared by the workers


def _quiet() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _log(variant: str, msg: str) -> None:
    print(f"[{variant}] {msg}", file=sys.stderr, flush=True)


def build_model(tokenizer, seed: int, scale: str = "default"):
    import torch
    from transformers import AutoModelForMaskedLM, BertConfig, RobertaConfig

    torch.manual_seed(seed)
    model_type, arch = SCALES[scale]
    config = (RobertaConfig if model_type == "roberta" else BertConfig)(**arch, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def param_stats(model) -> dict:
    import torch

    emb = model.base_model.embeddings
    tables = {id(emb.word_embeddings.weight), id(emb.position_embeddings.weight), id(emb.token_type_embeddings.weight)}
    head = {id(p) for p in model.parameters()} - {
        id(p) for p in model.base_model.parameters()
    }  # lm_head (RoBERTa) or cls (BERT)
    params = list(model.parameters())  # tied decoder weight appears once
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in params)) + float(sum((p.double() ** 2).sum() for p in params))
    return {
        "n_params": sum(p.numel() for p in params),
        "n_body": sum(p.numel() for p in params if id(p) not in tables and id(p) not in head),
        "init_checksum": round(checksum, 6),
    }


class DtypeProbe:
    """Records the output dtype of one Linear on its first call (shows whether autocast is active)."""

    def __init__(self, module):
        self.dtype = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.dtype is None:
            self.dtype = str(output.dtype).replace("torch.", "")
        self.handle.remove()


class OneProcess:
    """What mlm.evaluate.evaluate asks of its accelerator, for one process on `device`: nothing to reduce."""

    process_index, num_processes = 0, 1

    def __init__(self, device):
        self.device = device

    def reduce(self, tensor, reduction="sum"):
        return tensor


def first_linear(model):
    return model.base_model.encoder.layer[0].intermediate.dense


def eval_loss(model, blocks, tokenizer, seed: int, batch_size: int = 16) -> dict:
    """Mean masked-token loss in fp32 with the harness's deterministic eval masks (identical for every variant):
    mlm.evaluate.evaluate, the harness's own eval, on the model's device."""
    import torch
    from mlm.config import MaskingConfig
    from mlm.evaluate import evaluate
    from mlm.models import MLMObjective

    # A fresh objective around the raw model: Accelerate patches the *prepared* module's forward with
    # autocast, and Trainer patches the model's own forward; base_model and lm_head are untouched.
    objective = MLMObjective(model, sparse=True)
    device = next(model.parameters()).device
    probe = DtypeProbe(first_linear(model))
    with torch.autocast(device.type, enabled=False):
        m = evaluate(objective, blocks, tokenizer, MaskingConfig(), seed, OneProcess(device), batch_size)
    return {"loss": m["eval/loss"], "masked_tokens": m["eval/masked_tokens"], "dtype": probe.dtype}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def memory_before(s: dict) -> dict:
    """Host RSS, and on CUDA the device memory allocated (weights, optimizer) with its peak counter reset."""
    out = {"rss_before_train_mb": rss_mb()}
    if s["device"] == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        out["cuda_allocated_before_train_mb"] = torch.cuda.memory_allocated() / 2**20
    return out


def memory_peak(s: dict) -> dict:
    from mlm.train import own_peak_rss_mb

    out = {"peak_rss_mb": own_peak_rss_mb()}
    if s["device"] == "cuda":
        import torch

        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------- the worker side of the driver protocol


def _signal(msg: str) -> None:
    print(f"{TOKEN} {msg}", flush=True)


def _wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":  # the driver is gone (EOF) or confused: stop
        raise SystemExit(3)


class Gate:
    """Times steps and pauses the worker at window boundaries until the driver says go.

    A step's time runs from the end of the previous step, or from the end of a pause, to the end of
    this step; the pause is never counted.
    """

    def __init__(self, boundaries, cuda: bool = False):
        self.boundaries = set(boundaries)  # step numbers (1-based) after which to pause
        self.cuda = cuda
        self.step_s, self.compute_s = [], []
        self.threads = None
        self._last = self._begin = None

    def open(self) -> None:
        _signal("ready")
        _wait_go()
        self._last = time.perf_counter()

    def step_begin(self) -> None:
        import torch

        self._begin = time.perf_counter()
        if self.threads is None:
            self.threads = torch.get_num_threads()

    def step_end(self, step: int) -> None:
        if self.cuda:  # a step ends when the device has done it (both loops read their loss back every step anyway)
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.step_s.append(now - self._last)
        self.compute_s.append(now - self._begin)
        self._last = now
        if step in self.boundaries:
            if (
                self.cuda
            ):  # a paused worker hands its cached activations back: only the running one holds the device's memory
                import torch

                torch.cuda.empty_cache()
            _signal("done")
            _wait_go()
            self._last = time.perf_counter()


def boundaries(s: dict):
    return [s["warmup"] + r * s["steps"] for r in range(s["reps"] + 1)]


# ---------------------------------------------------------------- one variant (runs in a worker subprocess)


class CountMasked:
    """The guide's collator, unchanged; only counts the masked positions it produces."""

    def __init__(self, inner):
        self.inner, self.masked = inner, []

    def __call__(self, features):
        out = self.inner(features)
        self.masked.append(int((out["labels"] != -100).sum()))
        return out


def trainer_args(variant: str, s: dict, out_dir: str):
    """The guide's TrainingArguments, set to this benchmark's shared settings."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=s["total_steps"],
        per_device_train_batch_size=s["batch_size"],
        learning_rate=s["lr"],
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        bf16=TRAINER_PRECISION[variant] == "bf16",
        use_cpu=s["device"] == "cpu",  # else the GPU, as the harness
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,  # the loss is read back every step, as the harness loop does
        dataloader_num_workers=s["num_workers"],
        seed=s["seed"],
        disable_tqdm=True,
        # on CUDA the Trainer's best settings: fused AdamW (its CPU default already), and a torch_compile row
        **(
            {"optim": "adamw_torch_fused", "torch_compile": variant.endswith("_compile")}
            if s["device"] == "cuda"
            else {}
        ),
    )


def gate_callback(gate: Gate):
    """A TrainerCallback that times the Trainer's steps and pauses it at window boundaries."""
    from transformers import TrainerCallback

    class GateCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            gate.open()

        def on_step_begin(self, args, state, control, **kwargs):
            gate.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            gate.step_end(state.global_step)

    return GateCallback()


def run_trainer(variant: str, s: dict, tokenizer, train_blocks, model) -> dict:
    from transformers import DataCollatorForLanguageModeling, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    gate = Gate(boundaries(s), s["device"] == "cuda")
    collator = CountMasked(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15))
    with tempfile.TemporaryDirectory() as out_dir:
        args = trainer_args(variant, s, out_dir)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_blocks,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[gate_callback(gate)],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        probe = (
            None if args.torch_compile else DtypeProbe(first_linear(model))
        )  # a hook is no probe under torch.compile
        before = memory_before(s)
        trainer.train()
        peak = memory_peak(s)
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {
        "step_s": gate.step_s,
        "compute_s": gate.compute_s,
        "masked_per_step": collator.masked[: len(gate.step_s)],
        "train_loss": losses,
        "autocast_dtype": probe.dtype if probe else f"{TRAINER_PRECISION[variant]} (not probed under torch.compile)",
        "threads_in_step": gate.threads,
        "optimizer": str(args.optim),
        "torch_compile": args.torch_compile,
        **before,
        **peak,
        "dense_head": True,
    }


def harness_config(variant: str, s: dict):
    """The typed config of the harness variant, composed from conf/ as `python run.py <overrides>` would."""
    from mlm.overrides import compose

    cfg = compose(
        [
            "experiment=none",  # no recipe: one learning rate for every weight and 15% training masks, as the Trainer
            f"seed={s['seed']}",
            f"block_size={s['block_size']}",
            f"optimizer.lr={s['lr']}",
            "optimizer.beta2=0.999",
            "optimizer.eps=1e-8",
            "optimizer.weight_decay=0.01",  # the Trainer's AdamW
            "scheduler=linear",
            "scheduler.warmup_ratio=0",
            "scheduler.warmup_steps=0",
            f"trainer.max_steps={s['total_steps']}",
            f"trainer.per_device_batch_size={s['batch_size']}",
            "trainer.max_grad_norm=1.0",
            f"runtime.mixed_precision={'bf16' if s['harness_precision'] == 'bf16' else 'no'}",
            "runtime.sparse_prediction=true",
            f"runtime.compile={str(variant == 'harness_compile').lower()}",
            f"runtime.num_workers={s['num_workers']}",
        ]
    )
    cfg.validate()
    return cfg


def run_harness(variant: str, s: dict, tokenizer, model) -> dict:
    from mlm.train import build_run, train_batches

    # The run mlm.train.build_run() assembles from the config, around this script's own model (the Trainer's initial
    # weights); its own data (the same blocks: a cache hit) and the loop's batches (mlm.train.train_batches)
    run = build_run(harness_config(variant, s), built=(model, tokenizer))
    assert run.data.steps == s["total_steps"], run.data.steps
    assert scheduled_rate(run) == s["mlm_probability"], scheduled_rate(run)
    probe = None if variant == "harness_compile" else DtypeProbe(first_linear(model))
    run.objective.train()
    gate = Gate(boundaries(s), s["device"] == "cuda")
    before = memory_before(s)
    gate.open()
    masked, losses = [], []
    for _, micro in train_batches(run):
        gate.step_begin()
        result = run.step(micro)
        run.state.step += 1
        losses.append(round(float(result.loss_sum) / max(result.masked, 1), 4))  # train_step already synced the loss
        masked.append(int(result.masked))
        if run.state.step == 1 and variant == "harness_compile":
            _log(variant, f"first step (compiles the encoder) took {time.perf_counter() - gate._begin:.1f}s")
        gate.step_end(run.state.step)
    peak = memory_peak(s)
    return {
        "step_s": gate.step_s,
        "compute_s": gate.compute_s,
        "masked_per_step": masked,
        "train_loss": losses,
        "autocast_dtype": probe.dtype if probe else f"{s['harness_precision']} (not probed under torch.compile)",
        "threads_in_step": gate.threads,
        "optimizer": f"mlm.train.build_run: torch.optim.AdamW fused={run.optimizer.optimizer.defaults.get('fused')}",
        **before,
        **peak,
        "dense_head": False,
        "first_step_s": gate.step_s[0],
    }


def scheduled_rate(run) -> float:
    """The training mask rate at the start (constant here: experiment=none), as mlm.train.train_batches sets it."""
    from mlm.masking import scheduled_probability

    return scheduled_probability(run.cfg.masking, run.done_fraction())


def worker(variant: str, s: dict) -> dict:
    import torch

    torch.set_num_threads(s["threads"])
    _quiet()
    from mlm.config import DatasetConfig, ModelConfig
    from mlm.data import build_blocks
    from mlm.models import load_tokenizer

    t_setup = time.perf_counter()
    tokenizer = load_tokenizer(ModelConfig())
    from mlm.flops import count_flops

    blocks = build_blocks(DatasetConfig(), tokenizer, s["block_size"])
    train_blocks = blocks["train"]
    eval_blocks = blocks["test"].select(range(min(s["eval_blocks"], len(blocks["test"]))))
    model = build_model(tokenizer, s["seed"], s["scale"])
    stats = param_stats(model)
    # the package's FLOP counter (perf/mfu's): the Trainer's head runs on every position, the harness's on the masked ones
    count = count_flops(model, s["block_size"], sparse=not variant.startswith("trainer"))
    result = {
        "variant": variant,
        **stats,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "flops_per_token": count.per_token,
        "flops_per_prediction": count.per_prediction,
    }
    if s["device"] == "cuda":
        model.to("cuda")  # the eval of the initial weights runs there too; Trainer and Accelerate keep it there
    if s.get("eval_init"):
        _log(variant, "eval of the initial weights ...")
        result["eval_init"] = eval_loss(model, eval_blocks, tokenizer, s["seed"])
    result["setup_s"] = time.perf_counter() - t_setup
    if variant.startswith("trainer"):
        result.update(run_trainer(variant, s, tokenizer, train_blocks, model))
    else:
        result.update(run_harness(variant, s, tokenizer, model))
    if not variant.endswith("_compile"):  # eval would recompile the compiled model (eval mode, other shapes)
        result["eval"] = eval_loss(model, eval_blocks, tokenizer, s["seed"])
    result["torch_threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------- the driver


class Worker:
    """One variant's subprocess, driven over its stdin (go) and stdout (ready / done / finished)."""

    def __init__(self, variant: str, settings: dict, out: Path):
        self.variant, self.out, self.error = variant, out, None
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_worker",
            variant,
            "--_settings",
            json.dumps(settings),
            "--_out",
            str(out),
        ]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env, cwd=str(ROOT)
        )

    @property
    def alive(self) -> bool:
        return self.error is None

    def expect(self, msg: str) -> bool:
        """Read the worker's stdout until status `msg` (other lines are passed on to stderr)."""
        for line in self.proc.stdout:
            if line.startswith(TOKEN):
                if line[len(TOKEN) :].strip() == msg:
                    return True
            else:
                sys.stderr.write(line)
        self.error = f"worker exited with code {self.proc.wait()} while the driver waited for {msg!r}"
        print(f"[{self.variant}] FAILED: {self.error}", file=sys.stderr, flush=True)
        return False

    def send_go(self) -> bool:
        if not self.alive:
            return False
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # expect() reports the exit
        return True

    def go(self, then: str) -> bool:
        return self.send_go() and self.expect(then)

    def result(self) -> dict:
        if self.alive and self.proc.wait() == 0 and self.out.exists():
            return json.loads(self.out.read_text())
        return {"variant": self.variant, "error": self.error or f"worker exited with code {self.proc.wait()}"}


def run_interleaved(variants, settings: dict, tmp: Path, probe):
    """Start the workers one by one (setup never overlaps), then run their windows in rotating turns.

    `probe()` measures the matmul peak at the start of every round, while all workers are paused.
    """
    workers, rounds = {}, []
    # CUDA (16 cores, 80 GB): after the first worker (it fills the block cache), the others' setup at once, and the
    # (compiling) warm-up of all variants at once
    together = settings["device"] == "cuda"
    for i, v in enumerate(variants):
        print(f"[{v}] setting up ...", file=sys.stderr, flush=True)
        workers[v] = Worker(v, {**settings, "eval_init": i == 0}, tmp / f"{v}.json")
        if not together or i == 0:
            workers[v].expect("ready")
    if together:
        for w in list(workers.values())[1:]:
            w.expect("ready")
    for r in range(1 + settings["reps"]):
        order = list(variants[r % len(variants) :]) + list(variants[: r % len(variants)])
        what = (
            f"{settings['warmup']} warm-up step(s)"
            if r == 0
            else f"window {r}/{settings['reps']} ({settings['steps']} step(s))"
        )
        entry = {
            "round": r,
            "order": order,
            "loadavg_1min": os.getloadavg()[0],
            "matmul_gflops": probe(),
            "seconds": {},
        }
        if r == 0 and together:  # untimed: only the windows after it are measured, one variant at a time
            t = time.perf_counter()
            started = [v for v in order if workers[v].send_go()]
            for v in started:
                if workers[v].expect("done"):
                    entry["seconds"][v] = time.perf_counter() - t
                    print(
                        f"[{v}] {what} (all variants at once): {entry['seconds'][v]:.1f}s", file=sys.stderr, flush=True
                    )
            rounds.append(entry)
            continue
        for v in order:
            t = time.perf_counter()
            if workers[v].go("done"):
                entry["seconds"][v] = time.perf_counter() - t
                print(f"[{v}] {what}: {entry['seconds'][v]:.1f}s", file=sys.stderr, flush=True)
        rounds.append(entry)
    results = {}
    for v, w in workers.items():  # evals, one at a time
        if w.go("finished"):
            print(f"[{v}] evaluated", file=sys.stderr, flush=True)
        results[v] = w.result()
    return results, rounds


def matmul_gflops(size: int, reps: int, threads: int, names=("fp32", "bf16")) -> dict:
    """GFLOP/s of square torch.matmul at each precision in `names`: mlm.flops.measure_matmul (perf/mfu's CPU probe),
    starting at `size`."""
    import torch

    from mlm.flops import measure_matmul

    torch.set_num_threads(threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {name: measure_matmul(dtypes[name], reps, size) / 1e9 for name in ("fp32", "bf16") if name in names}


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def gflops(probe: dict) -> str:
    return "/".join(f"{g:.0f}" for g in probe.values())


# ---------------------------------------------------------------- the driver's steps, in the order main() runs them


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", required=False, help="write the results here")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed windows; the median is reported (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the usable cores)")
    p.add_argument(
        "--lr", type=float, default=3e-4, help="peak learning rate of every variant (linear decay, no warm-up)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--eval-blocks", type=int, default=None, help="test blocks for the learning check (default 64; quick 16)"
    )
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="the peak probe's first square matmul size; it grows to 4096 until one takes 50 ms (default 2048; quick 1024)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 x 1 timed steps, 16 eval blocks")
    p.add_argument(
        "--compile", action="store_true", help="also time harness_compile (runtime.compile=true); always on CUDA"
    )
    p.add_argument(
        "--scale",
        choices=tuple(SCALES),
        default="default",
        help="default: RoBERTa 6x768 (vocab 50265); base: BERT-base 12x768 (vocab 30522), random init from a local config",
    )
    p.add_argument("--block", type=int, choices=(128, 512), default=BLOCK, help="tokens per block (default 128)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"blocks per step, every variant (default: {BATCH} on CPU; on CUDA {CUDA_BATCH})",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present, else CPU"
    )
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_settings", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if any(x is not None and x < 1 for x in (a.steps, a.reps, a.warmup, a.batch)):
        p.error("--steps, --reps, --warmup and --batch must be >= 1")
    if a.device == "cuda" and not __import__("torch").cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return a


def make_settings(a) -> dict:
    """Every setting the workers share (the JSON's "settings"), with --quick's smaller defaults."""
    import torch

    from mlm.flops import gpu_peak
    from mlm.precision import native_bf16, resolve_mixed_precision

    q = a.quick
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    # CUDA: more warm-up (torch.compile compiles in the first steps) and longer windows (a step takes milliseconds)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1 if q else 2)
    steps = a.steps if a.steps is not None else ((5 if q else 10) if cuda else 1 if q else 3)
    reps = a.reps if a.reps is not None else (2 if q else 3)
    model_type, arch = SCALES[a.scale]
    name = torch.cuda.get_device_name(0) if cuda else None
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": name or "CPU",
        "warmup": warmup,
        "steps": steps,
        "reps": reps,
        "total_steps": warmup + steps * reps,
        "threads": a.threads or len(os.sched_getaffinity(0)),
        "lr": a.lr,
        "seed": a.seed,
        "eval_blocks": a.eval_blocks or (16 if q else 64),
        "block_size": a.block,
        "scale": a.scale,
        "batch_size": a.batch or (CUDA_BATCH[a.block] if cuda else BATCH),
        "num_workers": CUDA_WORKERS if cuda else 0,
        "matmul_size": a.matmul_size or (1024 if q else 2048),
        "matmul_reps": 3 if q else 7,
        "quick": q,
        "compile": a.compile or cuda,
        "bf16_native": native_bf16("cuda" if cuda else "cpu"),  # on the Trainer's device, the harness's
        "harness_precision": "bf16"
        if resolve_mixed_precision("auto") == "bf16"
        else "fp32",  # what runtime.mixed_precision=auto picks
        # CUDA: MFU against NVIDIA's datasheet figure (mlm.flops.GPU_PEAKS, as perf/mfu); CPU: the matmul probe below
        "datasheet_peak_gflops": {p: (gpu_peak(name, p) or 0) / 1e9 or None for p in ("bf16", "fp32")}
        if cuda
        else None,
        "model": {"model_type": model_type, **arch, "attn_implementation": "sdpa"},
        "data": f"mlm.data.build_blocks(DatasetConfig(), load_tokenizer(ModelConfig()), {a.block}): train split",
        "optimizer": "AdamW betas (0.9, 0.999) eps 1e-8 weight_decay 0.01 (not on biases/norms), grad clip 1.0, linear decay to 0, no warm-up",
        "mlm_probability": 0.15,
    }


def choose_variants(s: dict):
    """The variants to run, and the skipped ones with the measured reason."""
    if s["device"] == "cuda":
        return list(CUDA_VARIANTS), {
            "trainer_fp32": "on CUDA the Trainer runs with its best settings (bf16, fused AdamW, sdpa; "
            "trainer_bf16_compile adds torch_compile): an fp32 row would only be slower"
        }
    variants = list(VARIANTS) + (["harness_compile"] if s["compile"] else [])
    skipped = {}
    if s["scale"] == "default":
        skipped["base scale"] = (
            "BERT-base 12x768 at block 128 and 512 is not run on CPU by default (a dense step takes "
            "tens of seconds to minutes on 2 cores); --scale base [--block 512] runs it"
        )
    if not s["bf16_native"]:
        emulated = matmul_gflops(512, 3, s["threads"], ("fp32", "bf16"))
        skipped["trainer_bf16"] = (
            f"no native bf16 on this CPU (no AVX512-BF16 or AMX): a 512^2 matmul ran at "
            f"{emulated['bf16']:.1f} GFLOP/s in bf16 against {emulated['fp32']:.1f} in fp32, "
            "so a bf16 Trainer step of this model would take minutes"
        )
        variants.remove("trainer_bf16")
    return variants, skipped


def probed(s: dict):
    if s["device"] == "cuda":  # the datasheet is the peak there
        return ()
    return ("fp32", "bf16") if s["bf16_native"] else ("fp32",)


def measure(variants, s: dict) -> dict:
    """The matmul peak before, the interleaved run (with a probe at the start of every round), the peak after."""

    def probe():
        return matmul_gflops(s["matmul_size"], s["matmul_reps"], s["threads"], probed(s))

    t_all, load_before = time.perf_counter(), os.getloadavg()
    if probed(s):
        print(
            f"matmul peak (from {s['matmul_size']}x{s['matmul_size']}, {s['threads']} threads) ...",
            file=sys.stderr,
            flush=True,
        )
    before = probe()
    with tempfile.TemporaryDirectory() as tmp:
        results, rounds = run_interleaved(variants, s, Path(tmp), probe)
    after = probe()
    return {
        "results": results,
        "rounds": rounds,
        "before": before,
        "after": after,
        "loadavg_before": load_before,
        "t_all": t_all,
    }


def window_stats(step_s, warmup: int, steps: int, reps: int, tokens_per_step: int) -> dict:
    windows = [sum(step_s[warmup + r * steps : warmup + (r + 1) * steps]) for r in range(reps)]
    rates = [steps * tokens_per_step / w for w in windows]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_reps": rates, "window_s": windows}


FIGURES = (
    "tokens_per_s",
    "compute_only_tokens_per_s",
    "flops_per_step",
    "model_gflops_achieved",
    "mfu",
    "mfu_vs_best_peak",
    "peak_memory_mb",
    "peak_memory_minus_rss_before_training_mb",
)


def variant_figures(r: dict, rounds, s: dict, best: float, precision: str) -> dict:
    """One variant's FIGURES and its "details" entry; the figures are None for a failed worker.

    `best` is the best matmul peak of the run at the variant's precision."""
    if "error" in r:
        return {**dict.fromkeys(FIGURES), "details": r}
    tokens_per_step = s["batch_size"] * s["block_size"]
    w = window_stats(r["step_s"], s["warmup"], s["steps"], s["reps"], tokens_per_step)
    c = window_stats(r["compute_s"], s["warmup"], s["steps"], s["reps"], tokens_per_step)
    timed_masked = r["masked_per_step"][s["warmup"] :]
    masked_mean = statistics.mean(timed_masked) if timed_masked else 0.15 * tokens_per_step
    fps = r["flops_per_token"] * tokens_per_step + r["flops_per_prediction"] * masked_mean  # mlm.flops.count_flops
    achieved = fps * w["tokens_per_s"] / tokens_per_step / 1e9
    # CPU: MFU of each window against the matmul peak measured at the start of the same round, then the median:
    # background load slows the matmul probe and the training alike, so this stays comparable across rounds.
    # CUDA: against the datasheet peak (None for a GPU not in mlm.flops.GPU_PEAKS)
    peaks = (
        [best] * s["reps"]
        if s["device"] == "cuda"
        else [rounds[i + 1]["matmul_gflops"][precision] for i in range(s["reps"])]
    )
    mfu_reps = [fps * rate / tokens_per_step / 1e9 / peak for rate, peak in zip(w["tokens_per_s_reps"], peaks) if peak]
    device_mem = "peak_cuda_allocated_mb" in r  # CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS
    peak_mem = r["peak_cuda_allocated_mb"] if device_mem else r["peak_rss_mb"]
    before_mem = r["cuda_allocated_before_train_mb"] if device_mem else r["rss_before_train_mb"]
    return {
        "tokens_per_s": w["tokens_per_s"],
        "compute_only_tokens_per_s": c["tokens_per_s"],
        "flops_per_step": fps,
        "model_gflops_achieved": achieved,
        "mfu": statistics.median(mfu_reps) if mfu_reps else None,
        "mfu_vs_best_peak": achieved / best if best else None,
        "peak_memory_mb": peak_mem,
        "peak_memory_minus_rss_before_training_mb": peak_mem - before_mem,
        "details": {
            **r,
            **{f"window_{k}": val for k, val in w.items()},
            "compute_tokens_per_s_reps": c["tokens_per_s_reps"],
            "masked_per_step_mean_timed": masked_mean,
            "model_gflop_per_step": fps / 1e9,
            "mfu_reps": mfu_reps,
        },
    }


def speedups(tps: dict, details: dict, compile_: bool) -> dict:
    """Harness against Trainer: the ratio of median tokens/s, and the median over rounds of same-round ratios."""

    def ratio(x, y):
        return x / y if x and y else None

    def window_ratio(x, y):  # robust to load drift: both windows of a round ran minutes apart at most
        if tps.get(x) is None or tps.get(y) is None:
            return None, None
        per = [a / b for a, b in zip(details[x]["window_tokens_per_s_reps"], details[y]["window_tokens_per_s_reps"])]
        return statistics.median(per), per

    pairs = {
        "harness_vs_trainer_fp32": ("harness", "trainer_fp32"),
        "harness_vs_trainer_bf16": ("harness", "trainer_bf16"),
        "trainer_bf16_vs_trainer_fp32": ("trainer_bf16", "trainer_fp32"),
    }
    if compile_:
        pairs["harness_compile_vs_harness"] = ("harness_compile", "harness")
    if "trainer_bf16_compile" in tps:  # CUDA
        pairs.update(
            {
                "harness_vs_trainer_bf16_compile": ("harness", "trainer_bf16_compile"),
                "harness_compile_vs_trainer_bf16": ("harness_compile", "trainer_bf16"),
                "harness_compile_vs_trainer_bf16_compile": ("harness_compile", "trainer_bf16_compile"),
            }
        )
    per_round = {k: window_ratio(x, y) for k, (x, y) in pairs.items()}
    out = {
        "speedup_vs_trainer_fp32": ratio(tps.get("harness"), tps.get("trainer_fp32")),
        "speedup_vs_trainer_bf16": ratio(tps.get("harness"), tps.get("trainer_bf16")),
        "speedup_median_of_rounds": {k: m for k, (m, _) in per_round.items()},
        "speedup_per_round": {k: per for k, (_, per) in per_round.items()},
    }
    if compile_:
        out["speedup_compile_vs_harness"] = ratio(tps.get("harness_compile"), tps.get("harness"))
    best = {
        side: max(
            ((v, x) for v, x in tps.items() if v.startswith(side) and x), key=lambda vx: vx[1], default=(None, None)
        )
        for side in ("harness", "trainer")
    }
    out["best_vs_best_trainer"] = {
        "harness": best["harness"][0],
        "trainer": best["trainer"][0],
        "speedup": ratio(best["harness"][1], best["trainer"][1]),
    }
    return out


def eval_summary(results: dict, s: dict) -> dict:
    """The learning check: the harness's fp32 eval loss against the Trainer's at the harness's precision."""

    def ev(v):
        return results.get(v, {}).get("eval", {}).get("loss")

    reference = f"trainer_{s['harness_precision']}"
    b_loss, c_loss = ev(reference), ev("harness")
    rel = (c_loss - b_loss) / b_loss if b_loss and c_loss else None
    return {
        "reference": reference,
        "harness": c_loss,
        "rel_diff": rel,
        "harness_within_2pct_of_reference": None if rel is None else abs(rel) <= 0.02,
        "trainer_fp32": ev("trainer_fp32"),
        "trainer_bf16": ev("trainer_bf16"),
        "init": next((r["eval_init"]["loss"] for r in results.values() if "eval_init" in r), None),
        "after_steps": s["total_steps"],
        "eval_blocks": s["eval_blocks"],
        "masked_tokens": next((r["eval"]["masked_tokens"] for r in results.values() if "eval" in r), None),
        "eval_dtype": {v: r["eval"]["dtype"] for v, r in results.items() if "eval" in r},
        "note": "fp32 eval, harness eval masks (EVAL_STREAM) on the first test blocks, identical for all variants; "
        "same init and data, but Trainer and harness draw training order and masks differently",
    }


def summarize(run: dict, s: dict, skipped: dict, command: str) -> dict:
    """The JSON: figures per variant, speedups, the learning check, the matmul probes, settings and machine."""
    import torch
    import transformers

    results, rounds = run["results"], run["rounds"]
    precision = {**TRAINER_PRECISION, "harness": s["harness_precision"], "harness_compile": s["harness_precision"]}
    probes = [run["before"], run["after"]] + [r["matmul_gflops"] for r in rounds]
    peak = s["datasheet_peak_gflops"] if s["device"] == "cuda" else {k: max(m[k] for m in probes) for k in probed(s)}
    figs = {v: variant_figures(r, rounds, s, peak[precision[v]], precision[v]) for v, r in results.items()}
    col = {k: {v: f[k] for v, f in figs.items()} for k in (*FIGURES, "details")}
    checksums = {v: r.get("init_checksum") for v, r in results.items() if "error" not in r}
    more = speedups(col["tokens_per_s"], col["details"], s["compile"])
    compile_speedup = {"speedup_compile_vs_harness": more.pop("speedup_compile_vs_harness")} if s["compile"] else {}
    return {
        "tokens_per_s": col["tokens_per_s"],
        **more,
        "skipped": skipped,
        "eval_loss": eval_summary(results, s),
        "mfu": col["mfu"],
        "mfu_peak": {v: precision[v] for v in results},
        "mfu_note": "mfu: median over windows of (window's model FLOP/s / matmul peak at the variant's precision "
        "measured at the start of the same round); mfu_vs_best_peak: median tokens/s against the best "
        "matmul peak seen in the whole run (lower when the machine was busier during training than at its best)",
        "mfu_vs_best_peak": col["mfu_vs_best_peak"],
        "model_gflops_achieved": col["model_gflops_achieved"],
        "model_gflop_per_step": {v: (x / 1e9 if x else None) for v, x in col["flops_per_step"].items()},
        "compute_only_tokens_per_s": col["compute_only_tokens_per_s"],
        "peak_memory_mb": col["peak_memory_mb"],
        "peak_memory_minus_rss_before_training_mb": col["peak_memory_minus_rss_before_training_mb"],
        "matmul_gflops": {
            **peak,
            "size": s["matmul_size"],
            "before": run["before"],
            "after": run["after"],
            "per_round": [r["matmul_gflops"] for r in rounds],
            "threads": s["threads"],
            "note": "fp32/bf16 = the best of all probes (before, at the start of every round, after)",
        },
        "flops_counted": FLOPS_COUNTED,
        "peak_memory_note": "CUDA: torch.cuda.max_memory_allocated during training (the +train column: minus what was allocated "
        "before it); CPU: the worker's peak RSS (+train: minus its RSS before training)",
        "same_init": len(set(checksums.values())) == 1 if checksums else None,
        "command": command,
        "settings": s,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "device": s["device_name"],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": run["loadavg_before"],
            "loadavg_after": os.getloadavg(),
            "transformers": transformers.__version__,
        },
        "total_wall_s": time.perf_counter() - run["t_all"],
        "rounds": rounds,
        "details": col["details"],
        **compile_speedup,
    }


def table(out: dict) -> list:
    """The readable lines, from the JSON alone."""
    s, ev, mm = out["settings"], out["eval_loss"], out["matmul_gflops"]
    m = s["model"]
    where = f"{s['device_name']}, {CUDA_WORKERS} loader workers" if s["device"] == "cuda" else f"{s['threads']} threads"
    lines = [
        f"train throughput: {m['model_type']} {m['num_hidden_layers']}x{m['hidden_size']} (vocab {m['vocab_size']}), batch "
        f"{s['batch_size']} x {s['block_size']} tokens, {where}, "
        f"{s['warmup']} warm-up + median of {s['reps']} x {s['steps']} steps, variants interleaved; harness in {s['harness_precision']}",
        f"{'variant':<20} {'tokens/s':>9} {'step ms':>8} {'compute':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6} "
        f"{'peak MB' if s['device'] == 'cuda' else 'peak RSS MB':>11} {'+train MB':>9} {'eval loss':>9}",
    ]
    tokens_per_step = s["batch_size"] * s["block_size"]
    for v, d in out["details"].items():
        mfu = out["mfu"][v]
        tps = out["tokens_per_s"][v]
        lines.append(
            f"{v:<20} {fmt(tps):>9} {fmt(tps and 1e3 * tokens_per_step / tps):>8} {fmt(out['compute_only_tokens_per_s'][v]):>9} "
            f"{fmt(out['model_gflop_per_step'][v]):>10} {fmt(out['model_gflops_achieved'][v]):>8} "
            f"{fmt(mfu and 100 * mfu) + '%':>6} {fmt(out['peak_memory_mb'][v], '.0f'):>11} "
            f"{fmt(out['peak_memory_minus_rss_before_training_mb'][v], '.0f'):>9} {fmt(d.get('eval', {}).get('loss'), '.4f'):>9}"
        )
    lines += [f"{v:<20} skipped: {why}" for v, why in out["skipped"].items()]
    rel = ev["rel_diff"]
    lines += [
        "harness speedup: "
        + ", ".join(
            f"{fmt(out[f'speedup_vs_{t}'], '.2f')}x vs {t}"
            for t in ("trainer_fp32", "trainer_bf16")
            if out[f"speedup_vs_{t}"] is not None
        )
        + (f"; compile vs harness: {fmt(out['speedup_compile_vs_harness'], '.2f')}x" if s["compile"] else "")
        + " (ratio of medians)",
        "median of per-round ratios: "
        + ", ".join(f"{k} {fmt(m, '.2f')}x" for k, m in out["speedup_median_of_rounds"].items() if m),
        f"best harness row vs best Trainer row: {out['best_vs_best_trainer']['harness']} / {out['best_vs_best_trainer']['trainer']} "
        f"= {fmt(out['best_vs_best_trainer']['speedup'], '.2f')}x",
        (
            f"MFU against the datasheet peak of {s['device_name']}: "
            + ", ".join(f"{k} {fmt(g, '.0f')} GFLOP/s" for k, g in mm.items() if k in ("bf16", "fp32"))
            if s["device"] == "cuda"
            else f"matmul {'/'.join(mm['before'])} GFLOP/s (from {mm['size']}^2): best {gflops({k: mm[k] for k in mm['before']})}; "
            f"before {gflops(mm['before'])}, rounds "
            + ", ".join(gflops(r) for r in mm["per_round"])
            + f", after {gflops(mm['after'])} (MFU: vs the same round's probe)"
        ),
        f"eval loss after {ev['after_steps']} steps (init {fmt(ev['init'], '.4f')}): {ev['reference']} {fmt(ev.get(ev['reference']), '.4f')}, "
        f"harness {fmt(ev['harness'], '.4f')}, rel diff {fmt(rel and 100 * rel, '+.2f')}% -> "
        f"{'within' if rel is not None and abs(rel) <= 0.02 else 'NOT within'} 2%",
        f"same initial weights in every variant: {out['same_init']}; load average before/after: "
        f"{out['machine']['loadavg_before'][0]:.2f} / {out['machine']['loadavg_after'][0]:.2f}",
        f"total {out['total_wall_s']:.0f}s. command: {out['command']}",
    ]
    return lines


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._worker:  # one variant, started by run_interleaved
        result = worker(a._worker, json.loads(a._settings))
        Path(a._out).write_text(json.dumps(result))
        _signal("finished")
        return 0
    settings = make_settings(a)
    variants, skipped = choose_variants(settings)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/train_throughput.py", *argv])
    run = measure(variants, settings)
    out = summarize(run, settings, skipped, command)
    emit(table(out), out, a.json)
    return 0 if all("error" not in r for r in run["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
