"""How the model is wrapped for the run's processes: compile, then DDP; and back.

The one place that knows the wrapping order and how to see through it:

* :func:`wrap_model`: ``torch.compile`` first (``trainer.compile``), then
  ``idist.auto_model`` (device placement and, with several processes,
  ``DistributedDataParallel``), the order of PyTorch's DDP + ``torch.compile`` notes:
  the compiled module is what DDP's hooks see.
* :func:`unwrap_model`: the original ``nn.Module`` under DDP's ``.module`` and
  ``torch.compile``'s ``_orig_mod``: what checkpoints save and load, so their keys never
  carry ``module.`` or ``_orig_mod.`` prefixes.
* :func:`gradient_sync`: DDP's ``no_sync()`` for the micro-batches of an accumulation
  that are not the last (one gradient all-reduce per optimizer step).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import ignite.distributed as idist
import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["wrap_model", "unwrap_model", "gradient_sync"]


def wrap_model(model: torch.nn.Module, compile_options: dict[str, Any] | None, ddp_options: dict[str, Any]) -> torch.nn.Module:
    """``model`` compiled (when ``compile_options`` is not ``None``), moved to this
    process's device and, with several processes, wrapped in ``DistributedDataParallel``.

    Args:
        model: the built model (on the CPU).
        compile_options: keyword arguments of ``torch.compile`` (:func:`igniter.compile.compile_options`).
        ddp_options: keyword arguments of ``DistributedDataParallel`` (ignored with one process).
    """
    if compile_options is not None:
        model = torch.compile(model, **compile_options)  # type: ignore[assignment]
    return idist.auto_model(model, sync_bn=False, **(ddp_options if idist.get_world_size() > 1 else {}))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under any ``DistributedDataParallel``/``DataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        else:
            return model


def gradient_sync(model: torch.nn.Module, sync: bool) -> ContextManager[Any]:
    """The context a micro-batch's forward and backward run in: ``model.no_sync()`` when
    ``model`` is DDP and ``sync`` is false (gradients accumulate locally, no all-reduce),
    else nothing. The backward of the micro-batch run with ``sync=True`` all-reduces the
    accumulated gradients (PyTorch's ``DistributedDataParallel.no_sync`` documentation)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
