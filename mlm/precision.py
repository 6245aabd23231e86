"""Which precision a run trains in, and the Accelerator that applies it.

`runtime.mixed_precision=auto` picks bf16 where the device runs it in hardware and fp32 elsewhere;
a CPU without AVX512-BF16 or AMX emulates bf16, ~45x slower than fp32 (measured on an AVX2 EPYC).
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run in hardware here. On a CPU that means AVX512-BF16 or AMX (oneDNN's check)."""
    # compute capability 8.0 (Ampere) on; V100/T4 only emulate it, which torch counts by default
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return True  # other accelerators (MPS, XPU): Accelerate's own bf16 autocast
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check: assume emulated
        return False


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else ("cpu" if not accelerator_available() else "other")


def precision_reason(requested: str, resolved: str) -> str:
    """Why the run trains in `resolved`, in words (the start banner's precision line)."""
    kind = device_kind()
    name = "fp32" if resolved == "no" else resolved
    native = native_bf16(kind)
    if requested == "auto":
        return (
            f"{name}: this {kind.upper()} has {'native' if native else 'no native'} bf16 (runtime.mixed_precision=auto)"
        )
    if resolved == "bf16" and not native:
        return f"bf16, emulated: this {kind.upper()} has no native bf16, far slower than fp32 (runtime.mixed_precision=bf16)"
    return f"{name}: runtime.mixed_precision={requested}"


def resolve_mixed_precision(requested: str) -> str:
    """runtime.mixed_precision=auto -> bf16 where the device runs it natively, else no (fp32)."""
    device_type = device_kind()
    if requested == "auto":
        resolved = "bf16" if native_bf16(device_type) else "no"
        log.info(
            "runtime.mixed_precision=auto -> %s (%s bf16 on this %s)",
            resolved,
            "native" if resolved == "bf16" else "no native",
            device_type.upper(),
        )
        return resolved
    if requested == "bf16" and not native_bf16(device_type):
        log.warning(
            "runtime.mixed_precision=bf16: this %s has no native bf16 (on a CPU: no AVX512-BF16 or AMX), so "
            "bf16 runs emulated, far slower than fp32; runtime.mixed_precision=auto picks fp32 here",
            device_type.upper(),
        )
    return str(requested)


def make_accelerator(mixed_precision: str) -> Accelerator:
    """A fresh Accelerator for `mixed_precision` (already resolved).

    Gradient accumulation is done by hand in train_step (normalised by the global count of masked
    tokens), so Accelerate's own accumulation stays at 1. Without an accelerator, Accelerate only
    sets up multi-process CPU training (gloo) when told cpu=True; otherwise torchrun's ranks would
    each train alone. Accelerate keeps one state per process and refuses a second configuration
    (another mixed_precision, device or distributed type); each job of a multirun starts from a
    fresh one. The process group is not part of that state: mlm.job.Job owns it.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not accelerator_available())
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate ignores fp16 on CPU (the run would train in fp32 without a word). Attach CPU
        # autocast and a loss scaler the way it attaches them on CUDA, so fp16 means fp16 everywhere.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator
