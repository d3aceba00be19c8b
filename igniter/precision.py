"""Mixed precision and gradient accumulation: ``trainer.precision`` and ``trainer.accumulate_grad_batches``.

Precision names follow Lightning's ``Trainer(precision=...)``:

==============  =====================================================================
``32``          float32 everywhere (the default): no autocast, the scaler is disabled
``bf16-mixed``  forward pass and loss under ``torch.autocast(<device type>, torch.bfloat16)``
                on CPU or CUDA; weights, gradients and optimizer state stay float32;
                no loss scaling (bfloat16 has float32's exponent range)
``16-mixed``    float16 autocast plus ``torch.amp.GradScaler`` (dynamic loss scaling,
                Micikevicius et al., "Mixed Precision Training", ICLR 2018); CUDA only
==============  =====================================================================

A step factory asks for ``autocast`` (a zero-argument callable returning the context
manager), ``scaler`` (a ``torch.amp.GradScaler``, enabled only with ``16-mixed``, so
``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()`` is right
at every precision) and ``accumulate_grad_batches`` (``k``) by parameter name
(:class:`igniter.build.StepArgs`).

Accumulation: one optimizer step consumes the global batch ``data.loader.batch_size``;
each process splits its share (``batch_size / W``) into ``k`` micro-batches of
``batch_size / (W k)`` (:func:`micro_batches`), scales each micro-batch's mean loss by
``1/k`` so that the accumulated gradient is the gradient of the whole batch's mean loss,
and steps once. One Ignite iteration is one optimizer step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch

from igniter.errors import Problem

__all__ = [
    "PRECISIONS",
    "Autocast",
    "make_autocast",
    "make_scaler",
    "micro_batches",
    "precision_problems",
    "accumulation_problems",
]

#: ``trainer.precision`` values -> the autocast dtype (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

#: What a step enters around its forward pass and loss: ``with autocast(): ...``.
Autocast = Callable[[], ContextManager[Any]]


def make_autocast(precision: str, device: torch.device) -> Autocast:
    """The ``autocast`` a step factory gets: ``torch.autocast(device.type, dtype)`` for a
    mixed precision, ``contextlib.nullcontext`` for ``32`` (free when precision is off).

    Args:
        precision: a key of :data:`PRECISIONS`.
        device: this process's device (``idist.device()``).

    Raises:
        KeyError: ``precision`` is not a key of :data:`PRECISIONS` (validation reports it first).
    """
    dtype = PRECISIONS[str(precision)]
    if dtype is None:
        return contextlib.nullcontext

    def autocast() -> ContextManager[Any]:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` for ``device``, enabled only for ``16-mixed``.

    A disabled scaler's ``scale`` returns the loss unchanged and its ``step`` calls
    ``optimizer.step()``, so a step written with it is right at every precision. Its
    ``state_dict()`` goes into checkpoints when it is enabled (:mod:`igniter.checkpoint.resume`).
    """
    return torch.amp.GradScaler(device.type, enabled=str(precision) == "16-mixed")


def micro_batches(batch: Any, k: int) -> list[Any]:
    """Split a batch into ``k`` micro-batches along dimension 0 (``Tensor.tensor_split``).

    Tensors are split; tuples, lists and dicts are split element-wise and rebuilt with
    the same structure; any other value (a string, a number) is repeated in every
    micro-batch. ``k == 1`` returns ``[batch]`` untouched.

    Args:
        batch: e.g. ``(x [B, ...], y [B])`` as the data loader yields it.
        k: number of micro-batches; ``B`` should be divisible by ``k`` (validation
            checks ``data.loader.batch_size`` against ``W * k``), else the first
            ``B % k`` micro-batches are one sample larger.

    Returns:
        ``k`` batches of ``B / k`` samples each.
    """
    if k == 1:
        return [batch]
    return list(_split(batch, k))


def _split(value: Any, k: int) -> Iterator[Any]:
    if isinstance(value, torch.Tensor):
        return iter(value.tensor_split(k))
    if isinstance(value, Mapping):
        parts = {key: list(_split(v, k)) for key, v in value.items()}
        kind = type(value) if isinstance(value, dict) else dict
        return iter([kind({key: parts[key][i] for key in parts}) for i in range(k)])
    if isinstance(value, (tuple, list)):
        columns = [list(_split(v, k)) for v in value]
        rows = [[column[i] for column in columns] for i in range(k)]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return iter([type(value)(*row) for row in rows])
        return iter([type(value)(row) for row in rows])
    return iter([value] * k)


def precision_problems(precision: Any, cuda_here: bool | None) -> list[Problem]:
    """Problems with ``trainer.precision``.

    Args:
        precision: the configured value.
        cuda_here: whether the run's processes will have CUDA (``None``: unknown, e.g. a
            job submitted to a cluster: ``16-mixed`` is then checked when the run is built).
    """
    value = str(precision)
    if value not in PRECISIONS:
        return [Problem("trainer.precision", f"expected one of {', '.join(PRECISIONS)} (Lightning's names)", precision)]
    if value == "16-mixed" and cuda_here is False:
        return [
            Problem(
                "trainer.precision",
                "16-mixed (float16 with loss scaling) needs CUDA and this run has no GPU; bf16-mixed works on CPU",
                precision,
            )
        ]
    return []


def accumulation_problems(k: Any, batch_size: Any, world_size: int) -> list[Problem]:
    """Problems with ``trainer.accumulate_grad_batches`` against ``data.loader.batch_size``.

    The global batch must split into ``world_size * k`` equal micro-batches; the message
    names both keys and the nearest valid values of each.
    """
    if not isinstance(k, int) or k < 1:
        return [Problem("trainer.accumulate_grad_batches", "expected a positive integer (1: no accumulation)", k)]
    if not isinstance(batch_size, int) or batch_size <= 0 or k == 1:
        return []  # batch_size itself is checked against the world size with the loader
    parts = world_size * k
    if batch_size % parts == 0:
        return []
    lower, upper = batch_size // parts * parts, (batch_size // parts + 1) * parts
    sizes = " or ".join(str(b) for b in (lower, upper) if b > 0)
    per_process = batch_size // world_size if batch_size % world_size == 0 else 0
    divisors = [d for d in range(1, per_process + 1) if per_process % d == 0] or [1]
    nearest = {max([d for d in divisors if d < k] or [1]), min([d for d in divisors if d > k] or [divisors[-1]])}
    nearest_k = " or ".join(str(d) for d in sorted(nearest))
    return [
        Problem(
            "trainer.accumulate_grad_batches",
            f"data.loader.batch_size = {batch_size} (the global batch of one optimizer step) must split into "
            f"world size {world_size} x accumulate_grad_batches {k} = {parts} equal micro-batches: "
            f"set data.loader.batch_size={sizes}, or trainer.accumulate_grad_batches={nearest_k}",
            k,
        )
    ]
