"""A checkpoint write that failed, as one paragraph: which directory, why, and for a full disk
the bytes needed and the bytes free (:class:`igniter.errors.CheckpointWriteFailed`, exit 5)."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from igniter.errors import CheckpointWriteFailed

__all__ = ["tensor_bytes", "write_failed"]

logger = logging.getLogger("igniter")


def _size(n: int, about: str = "") -> str:
    """``"134387 bytes (131.2 KiB)"``; with ``about`` (how ``n`` was estimated): ``"about 134387 bytes (131.2 KiB; <about>)"``."""
    notes = [f"{n / 1024**k:.1f} {unit}" for k, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k][:1]
    notes += [about] if about else []
    return f"{'about ' if about else ''}{n} bytes" + (f" ({'; '.join(notes)})" if notes else "")


def write_failed(
    error: BaseException, directory: Path, name: str, needed: int, about: str = ""
) -> CheckpointWriteFailed | None:
    """The :class:`CheckpointWriteFailed` for ``error``, raised while writing checkpoint ``name``
    in ``directory`` once its partial file is removed, or ``None`` when it is no write error.

    A write error is an ``OSError``, itself or behind ``error`` (``__cause__``/``__context__``:
    ``torch.save``'s C++ writer raises a ``RuntimeError`` over a full disk's ``OSError``), or
    any error when fewer bytes are free than ``needed`` (an ``OSError`` pickled across ranks
    loses that chain). The message is one paragraph naming the directory, the OS error and, for
    a full disk, the bytes ``needed`` and the bytes free now (``shutil.disk_usage``); ``about``:
    how ``needed`` was estimated, when it was. The original traceback goes to the rank log only.
    """
    cause, seen = error, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    cause = cause if isinstance(cause, OSError) else None
    try:
        free: int | None = shutil.disk_usage(directory).free
    except OSError:
        free = None
    full = isinstance(error, Exception) and free is not None and free < needed  # never for Ctrl-C
    if cause is None and not full:
        return None
    code = cause.errno if cause else None
    reason = (
        (cause.strerror or str(cause) or type(cause).__name__)
        if cause
        else f"{type(error).__name__} while fewer bytes were free than it needs"
    )
    if code == errno.ENOSPC or full:
        space = f"it needs {_size(needed, about)} and {'an unknown number of bytes' if free is None else _size(free)} are free there"
        fix = "Free some space there (or point output_dir at a larger disk)"
    else:
        space, fix = f"it is {_size(needed, about)}", "Fix that"
    message = (
        f"checkpoint {name} could not be written to {directory}: {reason}; {space}. The run stopped; the checkpoints "
        f"already in {directory} are intact and the partial {name} was removed. {fix} and run the same command again: "
        "it resumes from the newest checkpoint."
    )
    logger.error("checkpoint %s could not be written:", name, exc_info=error, extra={"console": False})
    return CheckpointWriteFailed(
        " ".join(message.split()), code or (errno.ENOSPC if full else None), str(directory), needed, free
    )


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors, strings and bytes in ``value`` (nested mappings, lists, tuples;
    a ``DTensor`` counts its global size): about what a checkpoint of ``value`` takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0
