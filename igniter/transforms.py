"""Built-in per-sample transforms (no torchvision needed).

A transforms-registry entry is a factory: ``factory(**params)`` returns a
callable ``x -> x`` on one sample. Config lists them in order and
:func:`igniter.build.build_transform` composes them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from igniter.registry import transforms_registry

__all__ = ["normalize", "flatten", "random_shift", "gaussian_noise"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@transforms_registry("normalize")
def normalize(mean: Sequence[float], std: Sequence[float]) -> Fn:
    """``(x - mean) / std`` per channel (first dimension of a ``[C, H, W]`` sample, or scalar for 1-d)."""
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize: std must be > 0, got {list(std)}")
    m = torch.tensor(list(mean), dtype=torch.float32)
    s = torch.tensor(list(std), dtype=torch.float32)

    def apply(x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1) if x.dim() > 1 else (-1,)
        return (x - m.view(shape)) / s.view(shape)

    return apply


@transforms_registry("flatten")
def flatten() -> Fn:
    """Reshape a sample to one dimension."""
    return lambda x: x.reshape(-1)


@transforms_registry("random_shift")
def random_shift(pixels: int = 2) -> Fn:
    """Shift a ``[C, H, W]`` image by up to ``pixels`` in each direction, zero-filling (augmentation)."""
    if pixels < 0:
        raise ValueError(f"random_shift: pixels must be >= 0, got {pixels}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,)))
        out = torch.zeros_like(x)
        h, w = x.shape[-2:]
        out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
            ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        return out

    return apply


@transforms_registry("gaussian_noise")
def gaussian_noise(std: float = 0.05) -> Fn:
    """Add zero-mean Gaussian noise with standard deviation ``std`` (augmentation)."""
    return lambda x: x + std * torch.randn_like(x)
