"""AdamW with decay on matrices only, and a linear warm-up then cosine decay schedule.

The schedule is a pure function of training progress, not an LR-scheduler object: progress is the larger of the step
fraction and, with a time budget, the elapsed fraction of that budget. A run capped by `--max-minutes` therefore
still decays to its final LR by the end, and resuming needs only the step and elapsed time (both checkpointed).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases and the mask-token row
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def progress(step: int, warmup: int, total: int, elapsed_s: float = 0.0, budget_s: float | None = None) -> float:
    """How far through the decay phase training is, in [0, 1]."""
    by_steps = (step - warmup) / max(1, total - warmup)
    by_time = elapsed_s / budget_s if budget_s else 0.0
    return min(1.0, max(0.0, by_steps, by_time))


def lr_factor(step: int, warmup: int, decay_progress: float, min_ratio: float) -> float:
    """Multiplier of the peak LR for the update at `step` (0-based): linear warm-up, then cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * decay_progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
