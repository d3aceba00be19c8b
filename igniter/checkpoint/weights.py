"""A checkpoint's model weights, read safely in one process: a ``.pt`` file (``last_*`` or
``best_model_*``) or a ``checkpoint.format=dcp`` directory consolidated whole.

The readers of the two formats (:mod:`igniter.checkpoint.formats` picks one: ``read_weights``);
used by ``igniter eval``/``export``. Resuming reads whole checkpoints (:mod:`igniter.checkpoint.resume`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.api import CheckpointException

from igniter.checkpoint.dcp import check_metadata, dcp_model_state
from igniter.checkpoint.files import CheckpointInvalid, load_checkpoint

__all__ = ["model_state", "read_dcp_weights", "read_file_weights"]


def model_state(ckpt: Any) -> Mapping[str, torch.Tensor]:
    """The model's state dict inside a checkpoint: ``ckpt["model"]`` for ``last_*`` files,
    the file itself for ``best_model_*`` files (Ignite stores a single object unwrapped).

    Raises:
        ValueError: ``ckpt`` holds no model weights (the message reads after the file name).
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"holds a {type(ckpt).__name__}, not model weights")
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        return ckpt["model"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"has no model weights (entries: {', '.join(map(str, ckpt)) or 'none'})")


def read_file_weights(path: Path) -> Mapping[str, torch.Tensor]:
    """The model weights in the ``.pt`` file ``path`` (``torch.load(weights_only=True)``).

    Raises:
        CheckpointInvalid: the file cannot be opened, is not a PyTorch checkpoint, holds pickled
            objects, or has no model weights (:func:`igniter.checkpoint.files.load_checkpoint`).
    """
    try:
        return model_state(load_checkpoint(path))
    except ValueError as e:
        raise CheckpointInvalid(str(e)) from None


def read_dcp_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The full model weights of DCP checkpoint ``path`` (a directory or a URL), read whole in
    this process (:func:`igniter.checkpoint.dcp.dcp_model_state`), its ``.metadata`` checked first.

    Raises:
        CheckpointInvalid: no readable or safe ``.metadata``, no model weights, or damaged data.
    """
    incomplete = "is not a complete distributed checkpoint"
    try:
        check_metadata(path)
    except OSError as e:
        raise CheckpointInvalid(
            f"{incomplete} (no readable .metadata: {e.strerror or e}; an interrupted write?)"
        ) from None
    except Exception as e:
        raise CheckpointInvalid(
            f"{incomplete} ({e})"
            if "nothing from it was run" in str(e)
            else f"{incomplete} (damaged .metadata: {type(e).__name__})"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
            return dcp_model_state(path)
    except ValueError as e:
        raise CheckpointInvalid(str(e)) from None
    except (
        Exception,
        CheckpointException,
    ) as e:  # a missing or truncated data file (CheckpointException: a traceback per rank)
        detail = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise CheckpointInvalid(
            f"{incomplete} (its data cannot be read: {detail.split('. This is an internal miniz error')[0][:200]})"
        ) from None
