"""Built-in entries of the io registry: checkpoint savers and experiment loggers.

* A **saver** factory is called as ``factory(dirname)`` and returns an Ignite
  save handler (``ignite.handlers.BaseSaveHandler``), used by ``Checkpoint``.
* A **logger** factory is called as ``factory(ctx)`` on rank 0 only, attaches
  itself to ``ctx.trainer``/``ctx.evaluator`` and returns an object with ``close()``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import global_step_from_engine
from ignite.handlers.checkpoint import BaseSaveHandler

from igniter.errors import CheckpointWriteFailed
from igniter.events import PeriodicEvents
from igniter.registry import io_registry

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = ["AtomicDiskSaver", "BatchedScalars", "CheckpointWriteError", "atomic_write", "disk", "fsync_dir", "tensorboard", "tensor_bytes", "write_failed"]

logger = logging.getLogger("igniter")


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import, before any writer thread exists


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` so that it is either the old complete file or the new complete one.

    ``write(f)`` fills a temporary file in the same directory; it is flushed,
    fsynced and renamed over ``path`` (``os.replace`` is atomic on POSIX within a
    file system), then the directory is fsynced so the rename survives a crash.
    The file gets the permissions ``open()`` would give it (``0o666`` minus the
    umask), not ``mkstemp``'s owner-only ``0o600``: on a shared cluster the
    group may read the run's checkpoints and metrics, as with Ignite's own
    ``DiskSaver``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync directory ``path``: a rename or removal in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(CheckpointWriteFailed, OSError):
    """:class:`~igniter.errors.CheckpointWriteFailed` (exit status 5) that is also the ``OSError``
    it stands for (``errno``), so code catching ``OSError`` around a save still catches it.
    ``str()`` is the one-paragraph message; ``directory``, ``needed`` and ``free`` (bytes, or
    ``None``) are kept for programs. Pickles whole (a spawned worker hands it to the launcher)."""

    def __init__(self, message: str, code: int | None = None, directory: str | None = None, needed: int | None = None, free: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno, self.directory, self.needed, self.free = code, directory, needed, free

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.errno, self.directory, self.needed, self.free))


def _size(n: int, about: str = "") -> str:
    """``"134387 bytes (131.2 KiB)"``; with ``about`` (how ``n`` was estimated): ``"about 134387 bytes (131.2 KiB; <about>)"``."""
    notes = [f"{n / 1024**k:.1f} {unit}" for k, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k][:1]
    notes += [about] if about else []
    return f"{'about ' if about else ''}{n} bytes" + (f" ({'; '.join(notes)})" if notes else "")


def write_failed(error: BaseException, directory: Path, name: str, needed: int, about: str = "") -> CheckpointWriteError | None:
    """The :class:`CheckpointWriteError` for ``error``, raised while writing checkpoint ``name``
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
    reason = (cause.strerror or str(cause) or type(cause).__name__) if cause else f"{type(error).__name__} while fewer bytes were free than it needs"
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
    return CheckpointWriteError(" ".join(message.split()), code or (errno.ENOSPC if full else None), str(directory), needed, free)


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


class AtomicDiskSaver(BaseSaveHandler):
    """A crash-safe checkpoint writer (rank 0 writes), written in the background: Ignite's
    public ``BaseSaveHandler`` (``__call__``, ``remove``).

    * The checkpoint is serialized (:meth:`serialize`, ``torch.save`` into memory) in the
      calling thread, so the file holds the state of that moment; writing, fsync, rename
      and the removal of rotated-out files run in one background thread (serializing there
      too was slower: the pickler holds the GIL). One write is in flight at a time, so
      files appear in order; costs host RAM for one serialized checkpoint.
    * fsync before the atomic rename (a power loss leaves no truncated file behind the name);
    * ``remove`` is deferred until the next checkpoint is complete on disk: Ignite's
      ``Checkpoint`` removes the oldest file *before* writing the new one, so a kill in
      between would otherwise leave ``n_saved - 1`` files;
    * leftover temporary files of interrupted writes are deleted at start-up.

    Call :meth:`flush` before relying on the newest file (end of training, requeue); a
    write error is raised there or by the next save, as :class:`CheckpointWriteError`
    (exit status 5, a paragraph naming the directory and, for a full disk, the bytes needed
    and free), its temporary file removed and the files it would have replaced kept. At
    interpreter exit Python waits for the write in flight.

    Args:
        dirname: the checkpoint directory (created by rank 0 when ``create_dir``).
        create_dir: create ``dirname`` if it is missing.
        require_empty: raise ``ValueError`` if ``dirname`` already holds ``.pt`` files.
        save_on_rank: the rank that writes (and removes).
    """

    def __init__(self, dirname: str | Path, create_dir: bool = True, require_empty: bool = False, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname).expanduser()
        self._start_writer(save_on_rank)
        if idist.get_rank() == save_on_rank:
            if create_dir:
                self.dirname.mkdir(parents=True, exist_ok=True)
            if require_empty and any(self.dirname.glob("*.pt")):
                raise ValueError(f"{self.dirname} already holds checkpoints (.pt files)")
            for stale in self.dirname.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def _start_writer(self, save_on_rank: int) -> None:
        self.save_on_rank = save_on_rank
        self._pending_removal: list[str] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="igniter-checkpoint")
        self._in_flight: Future | None = None

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Serialize ``checkpoint`` now and write it to ``<dirname>/<filename>`` in the background."""
        if idist.get_rank() != self.save_on_rank:
            return
        buffer = self.serialize(checkpoint)
        self.flush()
        removals, self._pending_removal = self._pending_removal, []
        self._in_flight = self._writer.submit(self._write, filename, buffer, removals)

    def serialize(self, checkpoint: Mapping) -> io.BytesIO:
        """``torch.save`` into memory (a hook for benchmarks that write nothing)."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        return buffer

    def _write(self, filename: str, buffer: io.BytesIO, removals: list[str]) -> None:
        """Write ``buffer`` as ``filename``, then remove the rotated-out ``removals`` (the writer thread)."""
        path = self.dirname / filename
        try:
            atomic_write(path, lambda f: self.write_bytes(f, buffer.getbuffer()))
        except OSError as e:  # the temporary file is gone; the rotated-out files stay (removals never run)
            raise write_failed(e, self.dirname, path.name, buffer.seek(0, io.SEEK_END)) from e  # type: ignore[misc]  (an OSError: never None)
        for filename in removals:
            if filename != path.name:
                # missing_ok: a resumed run's handler may list files an earlier run already rotated out
                (Path(self.dirname) / filename).unlink(missing_ok=True)

    def write_bytes(self, f: BinaryIO, data: memoryview) -> None:
        """Write a serialized checkpoint to the open temporary file (a hook for tests)."""
        f.write(data)

    def flush(self) -> None:
        """Wait until the last checkpoint is on disk. Raises what its write raised
        (:class:`CheckpointWriteError` for an ``OSError``, e.g. a full disk)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def remove(self, filename: str) -> None:
        """Forget ``filename`` once the next checkpoint is on disk (only the writing rank removes)."""
        if idist.get_rank() == self.save_on_rank:
            self._pending_removal.append(filename)


@io_registry("disk")
def disk(dirname: str) -> AtomicDiskSaver:
    """Checkpoints on the local disk under ``dirname`` (created if missing)."""
    return AtomicDiskSaver(dirname, require_empty=False, create_dir=True)


class BatchedScalars:
    """A TensorBoard ``SummaryWriter`` whose ``add_scalar`` calls are handed to it in
    batches: each hand-off wakes TensorBoard's writer thread, which costs the training
    thread more than the scalar (~0.2 ms on a 2-core VM; TensorBoard's share of the
    digits run ~4% -> ~1%, ``bench/overhead.py --variants igniter igniter_no_tensorboard``).

    Scalars are kept, as Python numbers with their wall time, until ``max_events`` are
    pending, the oldest is ``max_delay_s`` seconds old (checked when a scalar is added),
    or :meth:`flush_pending` / ``flush`` / ``close`` is called. TensorBoard itself writes
    its file every 120 s (``flush_secs``), so this adds no visible delay; a process
    killed outright loses the kept scalars as it loses what TensorBoard has not written
    yet. A tensor value is read (``.item()``, a host sync on GPU) when it is added, as
    ``SummaryWriter`` does. Every other attribute is the wrapped writer's.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's).
        max_events: scalars kept before they are handed on.
        max_delay_s: age of the oldest kept scalar, seconds, at which all are handed on.
    """

    def __init__(self, writer: Any, max_events: int = 64, max_delay_s: float = 10.0) -> None:
        self.writer, self.max_events, self.max_delay_s = writer, max_events, max_delay_s
        self._pending: list[tuple[str, float, int | None, dict[str, Any]]] = []
        self._oldest = 0.0

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None, walltime: float | None = None, **kwargs: Any) -> None:
        """``SummaryWriter.add_scalar``, kept for later; ``walltime`` (s since the epoch) defaults to now."""
        value = scalar_value.item() if hasattr(scalar_value, "item") else float(scalar_value)
        now = time.monotonic()
        if not self._pending:
            self._oldest = now
        kwargs["walltime"] = time.time() if walltime is None else walltime
        self._pending.append((tag, value, global_step, kwargs))
        if len(self._pending) >= self.max_events or now - self._oldest >= self.max_delay_s:
            self.flush_pending()

    def flush_pending(self, *_: Any) -> None:
        """Hand every kept scalar to the writer (usable as an event handler)."""
        pending, self._pending = self._pending, []
        for tag, value, step, kwargs in pending:
            self.writer.add_scalar(tag, value, step, **kwargs)

    def flush(self) -> None:
        self.flush_pending()
        self.writer.flush()

    def close(self) -> None:
        self.flush_pending()
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


@io_registry("tensorboard")
def tensorboard(ctx: RunContext) -> Any:
    """TensorBoard events in ``<run dir>/tb`` through Ignite's ``TensorboardLogger``.

    Scalars: ``train/loss`` every ``logging.log_every`` iterations, ``train/lr``
    per iteration group, ``val/<metric>`` after every evaluation (step = trainer
    iteration), ``train/samples_per_s`` per epoch. Scalars reach TensorBoard's writer
    in batches (:class:`BatchedScalars`); an evaluation's are handed on at once.
    """
    from ignite.handlers.tensorboard_logger import TensorboardLogger

    # purge_step: a resumed run hides the steps the interrupted run logged after its checkpoint.
    tb = TensorboardLogger(log_dir=str(ctx.output_dir / "tb"), purge_step=ctx.trainer.state.iteration or None)
    tb.writer = BatchedScalars(tb.writer)
    every = PeriodicEvents.LOG  # every logging.log_every iterations
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
        ctx.evaluator.add_event_handler(Events.COMPLETED, tb.writer.flush_pending)
    return tb
