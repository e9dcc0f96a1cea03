"""Learning-rate schedules (BLIP's cosine-per-epoch; ContextBLIP's per-step warm-up then per-epoch
decay) and the optimiser factory. A schedule is a pure function of (epoch, global step), so resuming
needs only those two numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class CosineSchedule:
    """BLIP: ``min_lr + (init_lr - min_lr) * (1 + cos(pi * epoch / max_epoch)) / 2``, set per epoch,
    optionally after a linear per-step warm-up from ``warmup_lr``."""

    init_lr: float
    min_lr: float
    max_epoch: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0

    def __call__(self, epoch: int, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * (step + 1) / self.warmup_steps
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.max_epoch)) + self.min_lr


@dataclass
class WarmupStepSchedule:
    """ContextBLIP/BLIP pretraining: linear warm-up from ``warmup_lr`` to ``init_lr`` over
    ``warmup_steps`` steps of the first epoch, then ``max(min_lr, init_lr * decay_rate ** epoch)``
    (with no warm-up: ImageCoDe fine-tuning's ``lr *= 0.95`` per epoch)."""

    init_lr: float
    min_lr: float
    decay_rate: float
    warmup_steps: int = 0
    warmup_lr: float = 1e-6

    def __call__(self, epoch: int, step: int) -> float:
        if epoch == 0 and step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps
        return max(self.min_lr, self.init_lr * self.decay_rate ** epoch)


def build_adamw(params: Iterable, lr: float, weight_decay: float, betas=(0.9, 0.999),
                eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on all of them (as BLIP does).
    ``params`` is an iterable of parameters or a list of param-group dicts (two-rate recipes)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
