"""optimizer=stable_adamw: the update rule by hand, AdamW when nothing is clipped, foreach = loop,
exact resume from a state_dict, and runs (plain, and FSDP2 on 2 processes) that train."""

import io
import json
import math

import pytest
import torch

from mlm.config import UserError
from mlm.stable_adamw import StableAdamW
from tests.conftest import TINY_RUN, compose

LR, BETAS, EPS, WD = 0.1, (0.9, 0.99), 1e-8, 0.1


def by_hand(p, grads, lr=LR, betas=BETAS, eps=EPS, wd=WD, clip=True):
    """The paper's rule in plain Python floats, one list element at a time; returns the weights and each step's rms.
    clip=False: plain AdamW."""
    (b1, b2), m, v, rms_seen = betas, [0.0] * len(p), [0.0] * len(p), []
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - b1**t) for mi in m]
        v_hat = [vi / (1 - b2**t) for vi in v]
        rms = math.sqrt(sum(gi * gi / max(vh, eps * eps) for gi, vh in zip(g, v_hat)) / len(g))
        rms_seen.append(rms)
        lr_t = lr / max(1.0, rms) if clip else lr
        p = [pi * (1 - lr_t * wd) - lr_t * mh / (math.sqrt(vh) + eps) for pi, mh, vh in zip(p, m_hat, v_hat)]
    return p, rms_seen


def run_steps(optimizer, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = None if g is None else g.clone()
        optimizer.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_a_hand_computation_with_and_without_clipping(foreach):
    start = [1.0, -2.0, 0.5]
    grads = [[0.1, 0.2, -0.3], [0.1, -0.1, -0.2], [10.0, 5.0, 8.0]]  # small, small, then far larger than its history
    expected, rms = by_hand(start, grads)
    assert rms[0] <= 1 and rms[1] <= 1 < rms[2]  # steps 1-2 unclipped (rms 1 and 0.82), step 3 clipped (rms 1.72)
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    run_steps(
        StableAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=foreach),
        [p],
        [[torch.tensor(g, dtype=torch.float64)] for g in grads],
    )
    assert p.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    adamw, _ = by_hand(start, grads, clip=False)  # the clip changed step 3: AdamW's step lands elsewhere
    assert max(abs(a - b) for a, b in zip(adamw, expected)) > 0.01
    assert by_hand(start, grads[:2], clip=False)[0] == pytest.approx(by_hand(start, grads[:2])[0], rel=1e-15)


def shrinking_gradients(shapes, steps, seed=0):
    """Gradients whose magnitude only falls (g_t = 0.8^t * a fixed tensor): g^2 never exceeds v_hat, nothing is clipped."""
    gen = torch.Generator().manual_seed(seed)
    fixed = [torch.randn(s, generator=gen) for s in shapes]
    return [[0.8**t * f for f in fixed] for t in range(steps)]


def test_is_torch_adamw_when_nothing_is_clipped():
    shapes = [(6, 4), (4,), (3, 3)]
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.05}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    grads = shrinking_gradients(shapes, 6)
    run_steps(StableAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.98), eps=1e-6), ours, grads)
    run_steps(torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False), theirs, grads)
    for a, b, before in zip(ours, theirs, start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert (a - before).abs().max() > 1e-2  # six steps of lr 1e-2 moved every tensor


def random_history(shapes, steps, seed):
    """Gradients with a spike (x50) at step 3 and a tensor without a gradient at step 2: clipping and skipping both happen."""
    gen = torch.Generator().manual_seed(seed)
    history = [[torch.randn(s, generator=gen) * (50.0 if t == 3 else 1.0) for s in shapes] for t in range(5)]
    history[2][1] = None
    return history[:steps]


def test_foreach_and_loop_agree():
    shapes = [(8, 5), (5,), (2, 3)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    results = {}
    for foreach in (True, False):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = StableAdamW(
            [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
            lr=1e-2,
            foreach=foreach,
        )
        run_steps(optimizer, params, random_history(shapes, 5, seed=3))
        results[foreach] = params
        assert float(optimizer.state[params[1]]["step"]) == 4  # the step without a gradient was not counted
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_resumes_identically():
    shapes = [(8, 5), (5,)]
    history = random_history(shapes, 5, seed=4)
    straight = [torch.ones(s, requires_grad=True) for s in shapes]
    run_steps(StableAdamW(straight, lr=1e-2), straight, history)

    first = [torch.ones(s, requires_grad=True) for s in shapes]
    optimizer = StableAdamW(first, lr=1e-2)
    run_steps(optimizer, first, history[:3])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as mlm/parallel.py saves it
    buffer.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    again = StableAdamW(resumed, lr=1e-2)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert again.state[resumed[0]]["step"].dtype == torch.float32 and float(again.state[resumed[0]]["step"]) == 3
    run_steps(again, resumed, history[3:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)  # bit for bit: moments and step counts (bias correction) came back


def test_fused_is_refused_with_a_fix():
    with pytest.raises(UserError, match="optimizer.impl=fused.*foreach"):
        compose(["optimizer=stable_adamw", "optimizer.impl=fused"]).validate()
    cfg = compose(["optimizer=stable_adamw", "optimizer.impl=loop"])
    cfg.validate()  # foreach, loop and auto are fine
    from mlm.optim import build_optimizer

    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg.optimizer)
    assert isinstance(optimizer, StableAdamW) and optimizer.param_groups[0]["foreach"] is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optimizer.weight_decay, 0.0]  # matrices only


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_a_tiny_run_trains_with_it(corpus, tmp_path):
    from mlm.train import train

    run_dir = tmp_path / "run"
    args = ["optimizer=stable_adamw", "optimizer.lr=3e-3", "trainer.max_grad_norm=0", "trainer.max_steps=20"]
    train(
        compose([*TINY_RUN, f"dataset.path={corpus}", *args, "trainer.eval_every=20", "trainer.save_model=false"]),
        run_dir,
    )
    losses = train_losses(run_dir)
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # ln(vocab) ~ 10.3 at the start; it learns
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["optimizer.name"] == "stable_adamw" and results["config"]["trainer.max_grad_norm"] == 0


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does(tmp_path):
    """2 CPU processes: a tensor's rms is that of the whole tensor, so sharded and replicated runs end alike."""
    from tests.test_sharding import ddp_and_fsdp_weights, max_difference

    extra = [
        "optimizer=stable_adamw",
        "trainer.max_grad_norm=0",
        "optimizer.lr=3e-3",
        "trainer.max_steps=3",
        "trainer.checkpoint_every=0",
    ]
    _, weights = ddp_and_fsdp_weights(tmp_path, extra, 29561)
    assert max_difference(weights["fsdp"], weights["none"]) <= 1e-5
