"""Built-in entries of the solver registry (beside ``torch.optim`` and its schedulers).

An optimizer factory is called as ``factory(params, lr=..., weight_decay=..., **solver.params)``;
a scheduler factory as ``factory(optimizer, **solver.scheduler.params)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from igniter.registry import solver_registry

__all__ = ["warmup_cosine", "adamw_matrices"]


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


@solver_registry("adamw_matrices")
def adamw_matrices(
    params: Iterable[torch.nn.Parameter],
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_decay_dims: int = 2,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with weight decay only on parameters of ``min_decay_dims`` or more
    dimensions: matrices and embeddings decay, biases and norm gains do not (the rule of
    nanoGPT, Lightning's examples and torchtitan).

    Two parameter groups: ``weight_decay`` on the parameters with ``p.dim() >= min_decay_dims``,
    0 on the others (a group with no parameter is left out). ``betas``: AdamW's
    ``(beta1, beta2)``; ``lr`` and ``weight_decay`` come from ``solver.lr`` and ``solver.weight_decay``.

    Raises:
        ValueError: no parameter requires a gradient, or ``betas`` is not two numbers.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("adamw_matrices: the model has no parameter that requires a gradient")
    if len(betas) != 2:
        raise ValueError(f"adamw_matrices: betas must be two numbers (beta1, beta2), got {list(betas)}")
    decay = [p for p in params if p.dim() >= min_decay_dims]
    other = [p for p in params if p.dim() < min_decay_dims]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps)
