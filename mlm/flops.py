"""Model FLOPs of a training step and the device's peak: perf/tflops, perf/mfu and results' mfu.

What is counted (model FLOPs as executed, one multiply-add = 2 FLOPs):
  - every nn.Linear of the model, read from the module tree (so GeGLU's doubled input projection,
    fused QKV and the absence of biases count as built): 2 x weight size per row forward, and in
    backward 2 x weight size for the input gradient plus 2 x weight size for the weight gradient;
    6 x (matmul parameters) x tokens for a fully trained encoder;
  - attention's two matmuls (scores QK^T and the weighted sum of values): 4 x seq x hidden per token
    and layer forward, x3 with backward, over the whole block (local attention and padding run
    masked, not skipped, in the eager and sdpa kernels);
  - the MLM head (its transform and the vocabulary projection: the nn.Linear modules outside the
    encoder) at the masked positions only with the sparse head (runtime.sparse_prediction), else at
    every position.
Frozen weights (model.freeze_embeddings, model.freeze_layers) get no weight-gradient FLOPs, and the
layers below the lowest trainable one no backward at all. At the lowest trainable layer the input
gradient of its first projections is counted although autograd skips it (their input needs none):
a small overcount, only with model.freeze_layers. Not counted: embedding lookups, norms,
activations, softmax, the loss, the optimizer update, and activation recompute
(runtime.activation_checkpointing): MFU counts the model's FLOPs, not the extra work a memory
saving costs.

The peak: on CUDA, NVIDIA's datasheet figure for the device at the run's matmul precision (dense,
not the 2:4 sparsity figure); an unknown GPU gets no MFU. On CPU there is no datasheet to read: the
"peak" is this machine's measured torch.matmul rate (square matrices, the run's dtype and thread
count, best of a few), kept per machine in <cache>/matmul_peak.json and settled by a probe on a quiet
machine (cpu_peak). The peak is found when something first reads it (a logged perf/mfu, results.json's
mfu): a run that logs nothing never probes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from mlm.config import UserError
from mlm.files import atomic_write_json, default_cache_root, read_regular
from mlm.models import encoder_layers

log = logging.getLogger(__name__)

PEAK_CACHE = "matmul_peak.json"  # under the harness's cache dir (MLM_CACHE)
PEAK_CACHE_BYTES = 1 << 20  # read no more of it: a larger file is not one this code wrote
PLAUSIBLE_PEAK = (1e6, 1e16)  # FLOP/s a cached CPU peak may claim; anything outside was not measured here


@dataclass(frozen=True)
class FlopCount:
    """A step's FLOPs are linear in its tokens and its predicted (masked) positions."""

    per_token: float  # the encoder forward and backward (and the head, when it is dense) per input token
    per_prediction: float  # the sparse head per masked position (0 with a dense head)

    def of(self, tokens: float, predictions: float) -> float:
        return self.per_token * tokens + self.per_prediction * predictions


def count_flops(model: nn.Module, seq_len: int, sparse: bool) -> Optional[FlopCount]:
    """The FLOP rates of a Hugging Face masked-LM trained on blocks of `seq_len` tokens (module docstring);
    None for a model whose stack of encoder layers cannot be found."""
    try:
        layers = encoder_layers(model)
    except UserError:
        return None
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    embeddings = [
        m for m in (model.get_input_embeddings(), getattr(model.base_model, "embeddings", None)) if m is not None
    ]
    below = {id(m) for e in embeddings for m in e.modules()}
    trained = lambda module: any(p.requires_grad for p in module.parameters())  # noqa: E731
    lowest = (
        -1
        if any(map(trained, embeddings))
        else next((i for i, layer in enumerate(layers) if trained(layer)), len(layers))
    )
    encoder = {id(m) for m in model.base_model.modules()}
    per_token = per_prediction = 0.0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        # outside the stack: below it or above it
        level = layer_of.get(id(module), -1 if id(module) in below else len(layers))
        flops = linear_flops(module.weight, level, lowest)
        if id(module) in encoder or not sparse:
            per_token += flops
        else:
            per_prediction += flops
    hidden = model.config.hidden_size
    per_token += sum((3 if i >= lowest else 1) * 4 * seq_len * hidden for i in range(len(layers)))
    return FlopCount(per_token, per_prediction)


def linear_flops(weight: torch.Tensor, level: int, lowest: int) -> float:
    """FLOPs per row through one nn.Linear at `level` (-1 below the layers) when `lowest` is the lowest trained level."""
    size = weight.numel()  # a DTensor's numel is that of the whole weight
    if level < lowest:  # nothing below or in it is trained: autograd never reaches it
        return 2 * size
    return 2 * size + 2 * size + (2 * size if weight.requires_grad else 0)  # forward, input gradient, weight gradient


def step_flops(model: nn.Module, seq_len: int, sparse: bool, tokens: int, predictions: int) -> float:
    """FLOPs of one optimizer step over `tokens` input tokens of which `predictions` are masked."""
    count = count_flops(model, seq_len, sparse)
    if count is None:
        raise UserError(
            f"cannot count the FLOPs of model_type={model.config.model_type}: its encoder layers were not found"
        )
    return count.of(tokens, predictions)


# ---------------------------------------------------------------- the peak

# NVIDIA datasheets, dense Tensor Core figures (half the "with sparsity" ones), TFLOP/s per GPU;
# fp32: the non-Tensor-Core rate. First match of the lower-cased device name wins.
GPU_PEAKS = [
    (r"h100.*pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h100.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"h200.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM and PCIe, 40 and 80 GB
    # not the A10G (AWS's variant has no datasheet)
    (r"\ba10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\ba40\b", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"l40s", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bl4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"v100s", {"fp16": 130.0, "fp32": 16.4}),  # Volta: no bf16 or tf32 Tensor Cores
    (r"v100.*pcie", {"fp16": 112.0, "fp32": 14.0}),
    (r"v100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    (r"\bt4\b", {"fp16": 65.0, "fp32": 8.1}),
    # fp16/bf16 with fp32 accumulate, as torch runs them
    (r"rtx 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"rtx 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"rtx a6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_peak(name: str, precision: str) -> Optional[float]:
    """FLOP/s of the GPU called `name` (torch.cuda.get_device_name) at `precision` (bf16, fp16, tf32, fp32); None if unknown."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name.lower()):
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, cache_dir: Optional[str] = None) -> Optional[float]:
    """FLOP/s one device of this kind does at `dtype` matmuls: a datasheet figure (CUDA), a cached
    measurement (CPU), or None (an unknown GPU, another accelerator: no MFU)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = DTYPE_NAMES[dtype]
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:  # fp32 matmuls then run as tf32
            precision = "tf32"
        peak = gpu_peak(name, precision)
        if peak is None:
            log.info("no known %s peak for GPU %r: perf/mfu is not reported (perf/tflops is)", precision, name)
        return peak
    if device.type == "cpu":
        return cpu_peak(dtype, torch.get_num_threads(), cache_dir)
    log.info("no peak known for device type %s: perf/mfu is not reported", device.type)
    return None


def cpu_identity() -> str:
    """This CPU's model name and a digest of its feature flags (two machines with one name may differ in AVX-512/AMX)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    digest = hashlib.sha256(info.get("flags", info.get("Features", "")).encode()).hexdigest()[:12]
    return f"{info.get('model name') or platform.processor() or platform.machine()} | flags {digest}"


def cpu_peak(dtype: torch.dtype, threads: int, cache_dir: Optional[str] = None) -> float:
    """The torch.matmul rate (FLOP/s) of this CPU at this thread count and dtype, kept in <cache dir>/matmul_peak.json
    under the CPU's model and flags, the thread count, dtype and torch version. A probe (about a second) taken while
    the machine is quiet settles it: later runs read it without probing. One taken while other work shared the cores
    reads low (MFU near 1), so until a quiet one, every start probes again and the best rate is kept."""
    path = Path(cache_dir or default_cache_root()) / PEAK_CACHE
    key = f"{cpu_identity()} | {threads} threads | {DTYPE_NAMES[dtype]} | torch {torch.__version__}"
    cached = read_peaks(path)
    if cached.get(key, {}).get("settled"):
        return cached[key]["peak"]
    measured, settled = measure_matmul(dtype), not machine_busy()
    best = max(measured, cached.get(key, {}).get("peak", 0.0))
    log.info("CPU matmul peak: %.1f GFLOP/s (%s), %s in %s", best / 1e9, key, "settled" if settled else "kept", path)
    cached[key] = {"peak": best, "settled": settled}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cached)
    except OSError as e:  # the run goes on with this probe's value
        log.warning("cannot cache the CPU matmul peak in %s: %s", path, e.strerror)
    return best


def machine_busy() -> bool:
    """Other work shares the cores (a 1-minute load average over half of them): a matmul probe now reads low."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return os.getloadavg()[0] > cores / 2


def read_peaks(path: Path) -> Dict[str, Dict[str, Any]]:
    """The cached peaks, trusting none of it: a regular file (no link, no pipe) of at most PEAK_CACHE_BYTES holding
    a JSON object, read as data; only its entries of a plausible "peak" and a boolean "settled" count. Anything
    else is ignored, and the next probe rewrites the file."""
    try:
        cached = json.loads(read_regular(path, PEAK_CACHE_BYTES))
    except (OSError, ValueError, RecursionError):  # none yet, a link, not a file, too large, not JSON (or too nested)
        return {}
    entries = cached.items() if isinstance(cached, dict) else ()
    return {key: {"peak": float(e["peak"]), "settled": e["settled"]} for key, e in entries if plausible_entry(e)}


def plausible_entry(entry: Any) -> bool:
    low, high = PLAUSIBLE_PEAK  # NaN and inf fail these comparisons too
    return (
        isinstance(entry, dict)
        and type(entry.get("settled")) is bool
        and type(entry.get("peak")) in (int, float)
        and low < entry["peak"] < high
    )


def measure_matmul(dtype: torch.dtype, reps: int = 5, size: int = 1024) -> float:
    """Best FLOP/s of square torch.matmul, from `size` up to 4096 until one takes 50 ms (large enough for many cores)."""
    best = 0.0
    while True:
        gen = torch.Generator().manual_seed(0)  # its own: the run's random streams (dropout, masks) stay untouched
        a, b = torch.randn(size, size, generator=gen).to(dtype), torch.randn(size, size, generator=gen).to(dtype)
        torch.matmul(a, b)  # warm-up: kernel selection, page faults
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * size**3 / min(times))
        if min(times) >= 0.05 or size >= 4096:
            return best
        size *= 2


# ---------------------------------------------------------------- what a run reports


@dataclass(frozen=True)
class Utilisation:
    """A run's FLOP counts, how many devices (processes) share the work, and how to find the peak of one device."""

    count: FlopCount
    devices: int
    find_peak: Callable[[], Optional[float]] = lambda: None

    @functools.cached_property
    def peak(self) -> Optional[float]:
        """FLOP/s of one device; None: unknown, no MFU. Found at the first read, on every process at once."""
        return self.find_peak()

    def rates(self, tokens: float, predictions: float, seconds: float) -> Dict[str, float]:
        """A log window's achieved TFLOP/s per device and MFU (tokens and predictions of all processes)."""
        per_device = self.count.of(tokens, predictions) / max(seconds, 1e-9) / self.devices
        rates = {"perf/tflops": per_device / 1e12}
        if self.peak:
            rates["perf/mfu"] = per_device / self.peak
        return rates


def measure_utilisation(
    model: nn.Module, seq_len: int, sparse: bool, accelerator, mixed_precision: str
) -> Optional[Utilisation]:
    """The run's Utilisation (None when its FLOPs cannot be counted). Matmuls run in bf16 or fp16 under
    that autocast, else in fp32. The peak is found at its first read, which every process reaches together (a log
    step, the results): the main process finds it (on CPU: the cached probe) and hands it to the others in one
    all-reduce, so processes sharing a CPU never time it at once."""
    count = count_flops(model, seq_len, sparse)
    if count is None:
        log.info(
            "cannot count the FLOPs of model_type=%s (no encoder layer stack found): perf/mfu is not reported",
            model.config.model_type,
        )
        return None
    dtype = matmul_dtype(mixed_precision)

    def find_peak() -> Optional[float]:
        peak = peak_flops(accelerator.device, dtype) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            shared = torch.tensor([peak or 0.0], dtype=torch.float64, device=accelerator.device)
            peak = float(accelerator.reduce(shared, reduction="sum")[0]) or None
        return peak

    return Utilisation(count, accelerator.num_processes, find_peak)


def matmul_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a run's matmuls take under its resolved runtime.mixed_precision (bf16/fp16 autocast, else fp32): the
    one its peak is read at."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def run_totals(
    utilisation: Optional[Utilisation], tokens: int, predictions: int, seconds: float
) -> Dict[str, Optional[float]]:
    """results.json's train_flops (all processes) and mfu (the whole run's average); None where unknown."""
    if utilisation is None:
        return {"train_flops": None, "mfu": None}
    total = utilisation.count.of(tokens, predictions)
    mfu = total / seconds / (utilisation.peak * utilisation.devices) if utilisation.peak and seconds > 0 else None
    return {"train_flops": total, "mfu": mfu}
