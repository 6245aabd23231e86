"""Parameter groups, optimizer and learning-rate schedule, each chosen by name from a registry."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from mlm.config import OptimizerConfig, SchedulerConfig, UserError
from mlm.models import encoder_layers, new_head_parameters
from mlm.schedules import SCHEDULES, decay_start, stable_then_decay, warmup_length
from mlm.stable_adamw import StableAdamW


def lr_scales(model: nn.Module, new_head_lr_scale: float = 1.0, layer_lr_decay: float = 1.0) -> Dict[int, float]:
    """id(parameter) -> its multiple of the peak rate (unlisted: 1).

    With new_head_lr_scale != 1 the new MLM head's weights (head weights the checkpoint did not have)
    learn at lr * new_head_lr_scale. With layer_lr_decay != 1 (layer-wise rates) the top encoder
    layer keeps lr, each layer below gets the rate of the one above times layer_lr_decay, and the
    rest of the encoder (the embeddings, and any table or norm outside the layer stack) that of the
    bottom layer times it once more; head weights are not scaled by it."""
    inner = getattr(model, "model", model)  # the objective wraps the Hugging Face model
    hf_model = hasattr(inner, "base_model")
    scale = {}
    if layer_lr_decay != 1.0 and hf_model:
        layers = encoder_layers(inner)
        scale.update({id(p): layer_lr_decay ** len(layers) for p in inner.base_model.parameters()})
        for depth, layer in enumerate(reversed(layers)):
            scale.update({id(p): layer_lr_decay**depth for p in layer.parameters()})
    if new_head_lr_scale != 1.0 and hf_model:
        scale.update({id(p): new_head_lr_scale for p in new_head_parameters(inner).values()})
    return scale


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    new_head_lr_scale: float = 1.0,
    layer_lr_decay: float = 1.0,
    skip: frozenset = frozenset(),
) -> List[dict]:
    """Decay matrices only: biases, norm weights and other 1-D parameters get no weight decay.

    Groups of their own for the rates lr_scales gives (new head, layer-wise rates); the schedule
    scales every group alike. Parameters whose id is in `skip` are left out (another optimizer's)."""
    scale = lr_scales(model, new_head_lr_scale, layer_lr_decay)
    groups: Dict[tuple, List[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        groups.setdefault((scale.get(id(p), 1.0), not (p.ndim < 2 or "norm" in name.lower())), []).append(p)
    # the groups at lr first (the order checkpoints were saved with)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], not key[1]))
    return [
        {"params": groups[s, decay], "weight_decay": weight_decay if decay else 0.0, "lr": lr * s}
        for s, decay in order
        if groups[s, decay] or s == 1.0
    ]


def build_adamw(model: nn.Module, cfg: OptimizerConfig, skip: frozenset = frozenset()) -> torch.optim.Optimizer:
    # fused: one kernel for the whole update (CPU and CUDA in torch >= 2.4); foreach: a few batched ops.
    impl = cfg.impl
    if impl == "auto":
        impl = "fused"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, cfg.new_head_lr_scale, cfg.layer_lr_decay, skip),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kwargs,
    )


def build_stable_adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # auto and foreach: batched ops over each group; loop: one tensor at a time (impl=fused is refused by OptimizerConfig.validate)
    return StableAdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, cfg.new_head_lr_scale, cfg.layer_lr_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=cfg.impl != "loop",
    )


def muon_groups(model: nn.Module, cfg: OptimizerConfig) -> List[dict]:
    """The trainable matrices of the encoder layers (attention and feed-forward weights; not their
    biases and norms), one group per rate lr_scales gives them (layer-wise rates), the top rate first."""
    scale = lr_scales(model, cfg.new_head_lr_scale, cfg.layer_lr_decay)
    groups: Dict[float, List[nn.Parameter]] = {}
    for layer in encoder_layers(getattr(model, "model", model)):
        for p in layer.parameters():
            if p.requires_grad and p.ndim == 2:
                groups.setdefault(scale.get(id(p), 1.0), []).append(p)
    return [
        {"params": groups[s], "lr": cfg.muon_lr * s, "weight_decay": cfg.weight_decay}
        for s in sorted(groups, reverse=True)
    ]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer (for the scheduler, gradient clipping, Accelerate and the
    checkpoint piece "optimizer"): its param_groups are Muon's groups then AdamW's, the same dicts,
    and both parts keep their state in this optimizer's (keyed by parameter; the two sets are
    disjoint). So state_dict is torch's own over all groups, and load_state_dict hands the loaded
    groups and state back to the parts."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with the loaded ones
        self._share()


def build_muon(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's Muon for the encoder layers' matrices, AdamW (build_adamw, its decay rules and impl) for
    embeddings, norms, biases and the head, as the Muon papers split them."""
    groups = muon_groups(model, cfg)
    muon = torch.optim.Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, adjust_lr_fn=str(cfg.muon_adjust_lr))
    adamw = build_adamw(model, cfg, skip=frozenset(id(p) for g in groups for p in g["params"]))
    return MuonWithAdamW(muon, adamw)


OPTIMIZERS: Dict[str, Callable[[nn.Module, OptimizerConfig], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "stable_adamw": build_stable_adamw,
    "muon": build_muon,
}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model, cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedulerConfig,
    total_steps: int,
    progress: Optional[Callable[[], float]] = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then the named decay (mlm.schedules: progress after warmup, 0 -> 1,
    -> multiplier of the peak); stepped once per optimizer step. wsd instead holds the peak up to
    its decay start and decays over the last scheduler.decay_ratio of training
    (mlm.schedules.stable_then_decay).

    With `progress` (the fraction of a time budget spent, 0 -> 1), the schedule follows
    max(step, progress() * total_steps) instead of the step alone (cramming-style): warmup and
    decay end when either the steps or the budget run out. While the steps lead, the rates are
    exactly the step-based ones. It is read when the scheduler steps, so the rate depends on wall
    time and a resumed run cannot repeat it bit for bit.

    The multipliers are plain functions, rebuilt from this config: LambdaLR's state_dict saves only
    last_epoch and the rates (it would save a callable object's attributes, and a resume would then
    restore the old config's over the new), so a branch from a checkpoint follows its own schedule.
    """
    decay, warmup = SCHEDULES.get(cfg.name), warmup_length(cfg.warmup_steps, cfg.warmup_ratio, total_steps)
    hold = decay_start(total_steps, cfg.decay_ratio)  # wsd: the last step at the peak
    if cfg.name == "wsd":
        check_wsd_fits(cfg, warmup, hold, total_steps)

    def after_warmup(at: float) -> float:
        if cfg.name == "wsd":
            return stable_then_decay(at, hold, total_steps, cfg.decay_shape)
        return max(0.0, decay(min(1.0, (at - warmup) / max(1, total_steps - warmup))))

    def multiplier(step: int) -> float:
        """The rate of step `step` + 1, after `step` steps: the warmup counts the step about to run, the rest the steps done."""
        return (step + 1) / warmup if step < warmup else after_warmup(step)

    def multiplier_by_progress(step: int) -> float:
        # the spent budget in steps; step 0 is the scheduler's own construction, before any training time exists
        spent = progress() * total_steps if step > 0 else 0.0
        if max(step, spent) < warmup:
            return min(1.0, max(step + 1, spent) / warmup)
        return after_warmup(min(float(total_steps), max(step, spent)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier if progress is None else multiplier_by_progress)


def check_wsd_fits(cfg: SchedulerConfig, warmup: int, hold: int, total_steps: int) -> None:
    """The warmup must end by the decay's start, and the decay must get a step (known once the run's length is)."""
    if warmup > hold:
        raise UserError(
            f"{warmup} warmup steps run past the start of the wsd decay after step {hold} of {total_steps} "
            f"(scheduler.decay_ratio={cfg.decay_ratio}); lower scheduler.warmup_steps or warmup_ratio, or decay_ratio"
        )
    if hold == total_steps:
        raise UserError(
            f"scheduler.decay_ratio={cfg.decay_ratio} of {total_steps} steps rounds to no decay step; "
            f"raise it to at least {1 / total_steps:.3g} or train longer"
        )
