"""Speed switches change speed only: each gives the same result as the plain implementation."""

import numpy as np
import pytest
import torch

from mlm.config import MaskingConfig
from mlm.masking import MLMCollator
from mlm.models import MLMObjective, build_model
from mlm.optim import build_optimizer
from tests.conftest import compose


def run_steps(impl: str, steps: int = 3, compile_encoder: bool = False):
    cfg = compose(["model=tiny", f"optimizer.impl={impl}", "model.dropout=0"])
    model, tokenizer = build_model(cfg.model, 64, seed=0)
    if compile_encoder:
        model.base_model.compile()
    objective = MLMObjective(model, sparse=True)
    opt = build_optimizer(objective, cfg.optimizer)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        batch = MLMCollator(tokenizer, MaskingConfig(), seed=0, stream=step)(
            {"input_ids": rng.integers(1000, 20000, (8, 64)), "index": np.arange(8)}
        )
        loss, n, _ = objective(**batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_kernels_give_the_same_update(impl):
    ref_losses, ref_params = run_steps("loop")
    losses, params = run_steps(impl)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_weight_decay_on_biases_and_norms():
    from mlm.optim import param_groups

    cfg = compose(["model=tiny"])
    model, _ = build_model(cfg.model, 64, seed=0)
    decay, no_decay = param_groups(model, 0.01, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "norm" not in names[id(p)].lower() for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"]) and any(
        names[id(p)].endswith("bias") for p in no_decay["params"]
    )
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_losses():
    ref_losses, ref_params = run_steps("loop")
    losses, params = run_steps("loop", compile_encoder=True)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
