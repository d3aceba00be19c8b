"""Can the model take the data? One real batch through the step functions.

A model that does not fit its dataset (``model=lenet`` on 8x8 digits flattened to
64 features) passes every config check and fails only on the first batch, deep
inside ``conv2d``. The first call of each step function is therefore guarded: its
failure becomes one paragraph naming ``model.name``, the dataset, the batch's
shapes and dtypes and the original message (:class:`StepFailed`, exit status 2),
in ``igniter check`` and in a real run alike. Later steps are not wrapped in any
``try``: a failure after the first step is a training failure, not a mismatch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from igniter.errors import ConfigError, Problem

__all__ = ["StepFailed", "describe_batch", "guard_first_step", "first_batch"]


class StepFailed(ConfigError):
    """The first training or evaluation step raised: the model cannot take the data.

    ``problems[0]`` names ``model.name``; ``__cause__`` is the original exception
    (its traceback goes to ``rank{N}.log``, not to the console).
    """


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


def guard_first_step(step: Callable[[Any, Any], Any], cfg: DictConfig, phase: str) -> Callable[[Any, Any], Any]:
    """Wrap an engine's process function ``step(engine, batch)`` so that an exception in
    its first call raises :class:`StepFailed` (``from`` the original).

    Args:
        step: the process function.
        cfg: the run's config (model and dataset names for the message).
        phase: ``"training"`` or ``"evaluation"``.

    Later calls go straight to ``step`` apart from one attribute test.
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
