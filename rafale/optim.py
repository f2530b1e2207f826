"""What Composer and torch lack for rafale's optimizer menu: the Lion optimizer and two LR schedules
(inverse square root, and WSD: warmup-stable-decay), all written as the libraries' own interfaces
(`torch.optim.Optimizer`, `composer.optim.ComposerScheduler`) so the Trainer treats them as its own.
"""

import math

import torch
from composer.core import State, Time
from composer.optim import ComposerScheduler
from composer.optim.scheduler import _convert_time  # Composer's own time-string -> Time conversion


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, https://arxiv.org/abs/2302.06675): the update is the sign of an
    interpolation of momentum and gradient; weight decay is decoupled. Neither torch 2.7 nor
    Composer 0.32 ships it."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _warmup_factor(state: State, t_warmup: Time) -> float | None:
    """Linear warmup from 0 to 1 over t_warmup; None once warmup is over."""
    if t_warmup.value > 0 and state.timestamp < t_warmup:
        return state.timestamp.get(t_warmup.unit).value / t_warmup.value
    return None


class InverseSqrtWithWarmupScheduler(ComposerScheduler):
    """Linear warmup to 1, then lr factor sqrt(warmup / t) (Vaswani et al. 2017), in batches.

    Without warmup the decay starts from one batch: factor 1 / sqrt(t).
    """

    def __init__(self, t_warmup: str):
        self.t_warmup = t_warmup

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        t_warmup = _convert_time(self.t_warmup, state)
        warm = _warmup_factor(state, t_warmup)
        if warm is not None:
            return warm
        t = state.timestamp.get(t_warmup.unit).value
        return math.sqrt(max(t_warmup.value, 1) / max(t, 1))


class WSDScheduler(ComposerScheduler):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup to 1, hold 1, and over the last
    `t_decay` of training decay to `alpha_f` with a linear, cosine or 1-sqrt shape."""

    def __init__(self, t_warmup: str, t_decay: str, alpha_f: float = 0.0, shape: str = "linear"):
        assert shape in ("linear", "cosine", "sqrt"), shape
        self.t_warmup, self.t_decay, self.alpha_f, self.shape = t_warmup, t_decay, alpha_f, shape

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        t_warmup = _convert_time(self.t_warmup, state)
        warm = _warmup_factor(state, t_warmup)
        if warm is not None:
            return warm
        t_max = _convert_time("1dur", state, ssr=ssr)
        t_decay = _convert_time(self.t_decay, state)
        assert t_decay.unit == t_max.unit, "config validation keeps schedule.decay in max_duration's unit"
        t = state.timestamp.get(t_max.unit).value
        decay_start = t_max.value - t_decay.value
        if t < decay_start or t_decay.value == 0:
            return 1.0
        x = min((t - decay_start) / t_decay.value, 1.0)
        shape = {"linear": x, "cosine": (1 - math.cos(math.pi * x)) / 2, "sqrt": math.sqrt(x)}[self.shape]
        return 1.0 - (1.0 - self.alpha_f) * shape
