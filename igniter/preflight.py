"""Can the model take the data? One real batch through the step functions.

A model that does not fit its dataset (``model=lenet`` on 8x8 digits flattened to
64 features) passes every config check and fails only on the first batch, deep
inside ``conv2d``. The first call of each step function is therefore guarded: its
failure becomes one paragraph naming ``model.name``, the dataset, the batch's
shapes and dtypes and the original message (:class:`StepFailed`, exit status 2),
in ``igniter check`` and in a real run alike. Later steps are not wrapped in any
``try``: a failure after the first step is a training failure, not a mismatch. A first step
that runs out of memory (:func:`out_of_memory`) is not a mismatch either: it is reported as a
batch too large (:class:`StepOutOfMemory`, naming ``data.loader.batch_size``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from igniter.errors import ConfigError, Problem

__all__ = [
    "StepFailed",
    "StepOutOfMemory",
    "describe_batch",
    "guard_first_step",
    "first_batch",
    "out_of_memory",
    "memory_message",
    "batch_size_key",
    "MEMORY_LEVERS",
]

#: What lowers a step's memory besides a smaller batch (the advice of every "does not fit" message).
MEMORY_LEVERS = (
    "trainer.activation_checkpointing=[<block class>] recomputes blocks in the backward pass, "
    "trainer.accumulate_grad_batches=k runs the batch as k micro-batches, more processes (runner.nproc_per_node) "
    "split it"
)


class StepFailed(ConfigError):
    """The first training or evaluation step raised: the model cannot take the data.

    ``problems[0]`` names ``model.name``; ``__cause__`` is the original exception
    (its traceback goes to ``rank{N}.log``, not to the console).
    """


class StepOutOfMemory(StepFailed):
    """The first training or evaluation step ran out of memory: the batch is too large for the
    device. ``problems[0]`` names ``data.loader.batch_size`` (``data.loader.val_batch_size``);
    ``__cause__`` is the allocator's error."""


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says an allocation failed: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``,
    or the ``RuntimeError`` of PyTorch's CPU allocator (``DefaultCPUAllocator: can't allocate memory``,
    e.g. under ``RLIMIT_AS`` or a refused overcommit)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def memory_message(error: BaseException) -> str:
    """The allocator's message of an :func:`out_of_memory` error on one line, shortened: without
    the C++ ``enforce fail`` prefix of the CPU allocator and the advice that follows CUDA's first
    two sentences (e.g. ``CUDA out of memory. Tried to allocate 2.00 GiB``)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split("DefaultCPUAllocator: ", 1)[-1]
    return ". ".join(text.split(". ")[:2]).rstrip(".")


def describe_batch(batch: Any) -> str:
    """Shapes and dtypes of a batch, e.g. ``(float32[32, 64], int64[32])``.

    Tensors show ``dtype[shape]``; tuples, lists and dicts are walked; anything
    else shows its type name.
    """
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def _failure(cfg: DictConfig, phase: str, batch: Any, error: BaseException) -> StepFailed:
    split = cfg.data.train if phase == "training" else cfg.data.val
    key = "data.train" if phase == "training" else "data.val"
    message = " ".join(str(error).split()) or type(error).__name__
    text = (
        f"model '{cfg.model.name}' cannot take the {phase} data: its first {phase} step failed on a batch of "
        f"{key} (dataset '{split.name}') of shapes and dtypes {describe_batch(batch)}: {type(error).__name__}: "
        f"{message}. Choose a model whose input fits the dataset, or a dataset or transforms that give the model's "
        "input"
    )
    return StepFailed([Problem("model.name", text, cfg.model.name)], header="the model cannot take the data")


def batch_size_key(cfg: DictConfig, phase: str) -> tuple[str, int]:
    """``(config key, global batch size)`` of ``phase``'s batches: ``data.loader.batch_size`` for
    ``"training"``, ``data.loader.val_batch_size`` (or the training one where unset) for ``"evaluation"``."""
    if phase == "evaluation":
        return "data.loader.val_batch_size", cfg.data.loader.val_batch_size or cfg.data.loader.batch_size
    return "data.loader.batch_size", cfg.data.loader.batch_size


def _too_large(cfg: DictConfig, phase: str, batch: Any, error: BaseException) -> StepOutOfMemory:
    key, size = batch_size_key(cfg, phase)
    text = (
        f"the first {phase} step ran out of memory on a batch of shapes and dtypes {describe_batch(batch)} per "
        f"process ({memory_message(error)}). Lower {key}, or use less memory per sample: {MEMORY_LEVERS}. "
        "`igniter check` estimates a step's activations before it runs it"
    )
    return StepOutOfMemory([Problem(key, text, size)], header="the batch does not fit in memory")


def guard_first_step(step: Callable[[Any, Any], Any], cfg: DictConfig, phase: str) -> Callable[[Any, Any], Any]:
    """Wrap an engine's process function ``step(engine, batch)`` so that an exception in
    its first call raises :class:`StepFailed` (``from`` the original).

    Args:
        step: the process function.
        cfg: the run's config (model and dataset names for the message).
        phase: ``"training"`` or ``"evaluation"``.

    Later calls go straight to ``step`` apart from one attribute test. An error that
    :func:`out_of_memory` recognises raises :class:`StepOutOfMemory` instead (the batch is too
    large, not of the wrong shape).
    """
    guard = {"first": True}

    def guarded(engine: Any, batch: Any) -> Any:
        if not guard["first"]:
            return step(engine, batch)
        try:
            output = step(engine, batch)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if out_of_memory(e):
                raise _too_large(cfg, phase, batch, e) from e
            raise _failure(cfg, phase, batch, e) from e
        guard["first"] = False
        return output

    guarded.__wrapped__ = step  # type: ignore[attr-defined]
    return guarded


def first_batch(dataset: Dataset, batch_size: int, collate: Callable[[Sequence[Any]], Any] | None = None) -> Any:
    """The first ``batch_size`` samples of ``dataset`` collated as the loader would
    (``collate`` or torch's ``default_collate``): a batch of the per-process size."""
    n = min(batch_size, len(dataset))  # type: ignore[arg-type]
    return (collate or default_collate)([dataset[i] for i in range(n)])
