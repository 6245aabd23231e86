"""fp16 under a loss scaler: an overflow is a skipped update, never a failure, and resume stays exact."""

import numpy as np
import pytest
import torch

from mlm import checkpoint
from mlm.masking import MLMCollator
from mlm.models import MLMObjective, build_model
from mlm.parallel import Replicated
from mlm import precision
from mlm.precision import make_accelerator
from mlm.train import NonFiniteLoss, StepResult, build_optimization, enable_activation_checkpointing, train_step
from tests.conftest import compose


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one configuration per process; these tests need their own (fp16)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def setup(precision: str, seed: int = 0):
    cfg = compose(
        [
            "model=tiny",
            "model.dropout=0",
            f"runtime.mixed_precision={precision}",
            "scheduler.warmup_steps=2",
            "optimizer.lr=1e-3",
        ]
    )
    accelerator = make_accelerator(cfg.runtime.mixed_precision)
    model, tokenizer = build_model(cfg.model, 32, seed=seed)
    _, objective, optimizer, scheduler = build_optimization(cfg, model, 8, accelerator)  # as train() builds them
    collator = MLMCollator(tokenizer, cfg.masking, seed=0)
    return accelerator, model, objective, optimizer, scheduler, collator


def batch(collator, step: int):
    rng = np.random.default_rng(step)
    return collator({"input_ids": rng.integers(1000, 20000, (4, 32)), "index": np.arange(4) + 4 * step})


def step(parts, n: int, inf_grad: bool = False) -> StepResult:
    accelerator, model, objective, optimizer, scheduler, collator = parts
    hook = None
    if inf_grad:  # one overflowing gradient, as fp16 gives when the loss scale is too high
        hook = model.bert.encoder.layer[0].output.dense.weight.register_hook(lambda g: g * float("inf"))
    try:
        return train_step(objective, optimizer, scheduler, [batch(collator, n)], accelerator, max_grad_norm=1.0)
    finally:
        if hook is not None:
            hook.remove()


def test_fp16_on_cpu_really_runs_in_fp16(fresh_accelerate_state):
    parts = setup("fp16")
    accelerator, model = parts[0], parts[1]
    assert isinstance(accelerator.scaler, torch.amp.GradScaler)
    dtypes = []
    model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    step(parts, 0)
    assert dtypes == [torch.float16]


def test_overflow_skips_the_update_and_halves_the_scale(fresh_accelerate_state):
    parts = setup("fp16")
    accelerator, model, _, optimizer, scheduler, _ = parts
    assert not step(parts, 0).overflow
    scale, lr_steps = accelerator.scaler.get_scale(), scheduler.last_epoch
    weights = [p.detach().clone() for p in model.parameters()]
    result = step(parts, 1, inf_grad=True)
    assert result.overflow
    assert accelerator.scaler.get_scale() == scale / 2
    assert scheduler.last_epoch == lr_steps  # the schedule follows the updates
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for n in (2, 3):  # and training goes on
        assert not step(parts, n).overflow
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert scheduler.last_epoch == lr_steps + 2


def test_nonfinite_gradients_still_stop_without_a_scaler(fresh_accelerate_state):
    parts = setup("no")
    assert parts[0].scaler is None
    with pytest.raises(NonFiniteLoss, match="grad norm"):
        step(parts, 0, inf_grad=True)


FACTS = {"global_batch": 4, "config": {}}  # what read_state requires of a checkpoint's facts (the trainer's are more)


def checkpoints(parts, run_dir, writer=None) -> checkpoint.Checkpoints:
    """The pieces a trainer registers for these parts (mlm.train.checkpoints): model, optimizer, schedule, RNG, scaler."""
    accelerator, model, _, optimizer, scheduler, _ = parts
    pieces = {
        **Replicated().pieces(model, optimizer),
        "scheduler": scheduler,
        "rng": checkpoint.Piece(checkpoint.RNG(), "rank"),
    }
    if accelerator.scaler is not None:
        pieces["scaler"] = accelerator.scaler
    return checkpoint.Checkpoints(run_dir, pieces, accelerator, model, writer=writer or checkpoint.Writer())


def test_resume_across_an_overflow_is_exact(fresh_accelerate_state, tmp_path):
    """Train 6 steps with an overflow at step 2 and a checkpoint after step 3; a fresh process state
    restored from that checkpoint trains steps 4-6 to the same bits, scale included."""
    parts = setup("fp16")
    accelerator, model, _, optimizer, scheduler, _ = parts
    for n in range(6):
        step(parts, n, inf_grad=n == 2)
        if n == 3:
            checkpoints(parts, tmp_path).save(4, FACTS)
    reference = [p.detach().clone() for p in model.parameters()]
    reference_scale = accelerator.scaler.get_scale()

    resumed = setup("fp16", seed=1)  # other initial weights: everything must come from the checkpoint
    accelerator, model, _, optimizer, scheduler, _ = resumed
    checkpoints(resumed, tmp_path).load(checkpoint.resolve_resume("auto", tmp_path))
    assert accelerator.scaler.get_scale() < 65536.0  # the backed-off scale came back with the checkpoint
    for n in (4, 5):
        step(resumed, n)
    assert accelerator.scaler.get_scale() == reference_scale
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters()))


# Ops that make a CUDA host wait for the device: a scalar read (.item(), float()), and the data-dependent
# shapes of nonzero / boolean indexing. The step's one planned read (loss and grad norm together, via
# .tolist()) does not pass through the dispatcher, so on CPU this mode sees exactly the unplanned ones.
HOST_SYNC_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.is_nonzero.default",
}


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_a_training_step_has_no_hidden_host_syncs(fresh_accelerate_state, precision):
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            bool_index = name == "aten.index.Tensor" and any(t is not None and t.dtype == torch.bool for t in args[1])
            if name in HOST_SYNC_OPS or bool_index:
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    parts = setup(precision)
    step(parts, 0)  # the first step creates optimizer state
    accelerator, _, objective, optimizer, scheduler, collator = parts
    micro = [batch(collator, 1)]  # masking and masked positions happen on the host, before the step
    with SyncCounter() as counter:
        train_step(objective, optimizer, scheduler, micro, accelerator, max_grad_norm=1.0)
    assert counter.seen == {}


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing activations in backward changes memory and time, not the gradients (dropout off)."""
    grads, forwards = [], []
    for checkpointed in (False, True):
        cfg = compose(["model=tiny", "model.dropout=0"])
        model, tokenizer = build_model(cfg.model, 32, seed=0)
        if checkpointed:  # as mlm.train does with runtime.activation_checkpointing=true
            enable_activation_checkpointing(model)
        calls = []
        model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda *_: calls.append(1))
        model.train()
        loss, n, _ = MLMObjective(model, sparse=True)(**batch(MLMCollator(tokenizer, cfg.masking, seed=0), 0))
        (loss / n).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        forwards.append(len(calls))
    assert forwards == [1, 2]  # the checkpointed layer ran again in backward
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_runs_it(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: native)
    assert precision.resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert precision.resolve_mixed_precision("no") == "no"
    caplog.clear()
    assert (
        precision.resolve_mixed_precision("bf16") == "bf16"
    )  # asked for explicitly: kept, with a warning where emulated
    assert ("no native bf16" in caplog.text) is not native


def test_auto_precision_reaches_the_autocast_dtype(fresh_accelerate_state):
    """The default (auto) trains in bf16 on a CPU with AVX512-BF16/AMX and in fp32 on one without."""
    cfg = compose(["model=tiny"])
    assert cfg.runtime.mixed_precision == "auto"
    cfg.runtime.mixed_precision = precision.resolve_mixed_precision(cfg.runtime.mixed_precision)
    accelerator = make_accelerator(cfg.runtime.mixed_precision)
    layer = torch.nn.Linear(4, 4)
    with accelerator.autocast():
        dtype = layer(torch.ones(2, 4)).dtype
    assert dtype == (torch.bfloat16 if precision.native_bf16("cpu") else torch.float32)
