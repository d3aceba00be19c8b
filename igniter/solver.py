"""Built-in entries of the solver registry (beside ``torch.optim`` and its schedulers).

An optimizer factory is called as ``factory(params, lr=..., weight_decay=..., **solver.params)``;
a scheduler factory as ``factory(optimizer, **solver.scheduler.params)``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from igniter.registry import solver_registry

__all__ = ["warmup_cosine"]


@solver_registry("warmup_cosine")
def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_factor * lr`` at ``total_steps``.

    Steps are scheduler calls (iterations with ``step_on: iteration``). The cosine
    follows SGDR (Loshchilov & Hutter, 2017) without restarts.

    Raises:
        ValueError: ``total_steps <= warmup_steps`` or negative ``warmup_steps``.
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
