"""Built-in entries of the io registry: checkpoint savers and experiment loggers.

* A **saver** factory is called as ``factory(dirname)`` and returns an Ignite
  save handler (``ignite.handlers.BaseSaveHandler``), used by ``Checkpoint``.
* A **logger** factory is called as ``factory(ctx)`` on rank 0 only, attaches
  itself to ``ctx.trainer``/``ctx.evaluator`` and returns an object with ``close()``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver, global_step_from_engine

from igniter.registry import io_registry

__all__ = ["AtomicDiskSaver", "atomic_write", "disk", "tensorboard"]


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` so that it is either the old complete file or the new complete one.

    ``write(f)`` fills a temporary file in the same directory; it is flushed,
    fsynced and renamed over ``path`` (``os.replace`` is atomic on POSIX within a
    file system), then the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` (rank 0 writes) with fsync before the atomic rename.

    Ignite's own atomic mode renames a temporary file without fsync, so a power
    loss can still leave a truncated checkpoint behind the final name.
    """

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_write(Path(path), lambda f: func(checkpoint, f, **self.kwargs))


@io_registry("disk")
def disk(dirname: str) -> AtomicDiskSaver:
    """Checkpoints on the local disk under ``dirname`` (created if missing)."""
    return AtomicDiskSaver(dirname, require_empty=False, create_dir=True)


@io_registry("tensorboard")
def tensorboard(ctx: Any) -> Any:
    """TensorBoard events in ``<run dir>/tb`` through Ignite's ``TensorboardLogger``.

    Scalars: ``train/loss`` every ``logging.log_every`` iterations, ``train/lr``
    per iteration group, ``val/<metric>`` after every evaluation (step = trainer
    iteration), ``train/samples_per_s`` per epoch.
    """
    from ignite.handlers.tensorboard_logger import TensorboardLogger

    tb = TensorboardLogger(log_dir=str(ctx.output_dir / "tb"))
    every = Events.ITERATION_COMPLETED(every=ctx.cfg.logging.log_every)
    tb.attach_output_handler(ctx.trainer, event_name=every, tag="train", output_transform=lambda out: out)
    tb.attach_opt_params_handler(ctx.trainer, event_name=every, optimizer=ctx.optimizer, param_name="lr")
    tb.attach_output_handler(
        ctx.trainer,
        event_name=Events.EPOCH_COMPLETED,
        tag="train",
        state_attributes=["samples_per_s"],
        global_step_transform=global_step_from_engine(ctx.trainer, Events.ITERATION_COMPLETED),
    )
    if ctx.evaluator is not None:
        tb.attach_output_handler(
            ctx.evaluator,
            event_name=Events.COMPLETED,
            tag="val",
            metric_names="all",
            global_step_transform=global_step_from_engine(ctx.trainer, Events.ITERATION_COMPLETED),
        )
    return tb
