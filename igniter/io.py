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

import ignite.distributed as idist
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
    """Ignite's ``DiskSaver`` (rank 0 writes) made crash-safe.

    * fsync before the atomic rename (Ignite's own atomic mode renames without
      fsync, so a power loss could leave a truncated file behind the final name);
    * ``remove`` is deferred until the next checkpoint is complete on disk:
      Ignite's ``Checkpoint`` removes the oldest file *before* writing the new
      one, so a kill in between would otherwise leave ``n_saved - 1`` files
      (none with ``n_saved=1``);
    * leftover temporary files of interrupted writes are deleted at start-up.
    """

    def __init__(self, dirname: str, **kwargs: Any) -> None:
        super().__init__(dirname, **kwargs)
        self._pending_removal: list[str] = []
        if idist.get_rank() == 0:
            for stale in Path(dirname).glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_write(Path(path), lambda f: func(checkpoint, f, **self.kwargs))
        pending, self._pending_removal = self._pending_removal, []
        for filename in pending:
            if filename != Path(path).name:
                # missing_ok: a resumed run's handler may list files an earlier run already rotated out
                (Path(self.dirname) / filename).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        if idist.get_rank() == 0:  # only rank 0 writes, so only rank 0 removes
            self._pending_removal.append(filename)


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

    # purge_step: a resumed run hides the steps the interrupted run logged after its checkpoint.
    tb = TensorboardLogger(log_dir=str(ctx.output_dir / "tb"), purge_step=ctx.trainer.state.iteration or None)
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
