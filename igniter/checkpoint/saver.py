"""Checkpoint savers of the io registry: a crash-safe writer in a background thread.

A **saver** factory is called as ``factory(dirname)`` and returns an Ignite save handler
(``ignite.handlers.BaseSaveHandler``: ``__call__``, ``remove``), used by ``Checkpoint``.
"""

from __future__ import annotations

import errno
import io
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

import ignite.distributed as idist
import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from igniter.atomic_files import atomic_write
from igniter.errors import CheckpointWriteFailed
from igniter.registry import io_registry

if TYPE_CHECKING:
    pass

__all__ = ["AtomicDiskSaver", "disk", "tensor_bytes", "write_failed"]

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
    write error is raised there or by the next save, as :class:`CheckpointWriteFailed`
    (exit status 5, a paragraph naming the directory and, for a full disk, the bytes needed
    and free), its temporary file removed and the files it would have replaced kept. At
    interpreter exit Python waits for the write in flight.

    Args:
        dirname: the checkpoint directory (created by rank 0 when ``create_dir``).
        create_dir: create ``dirname`` if it is missing.
        require_empty: raise ``ValueError`` if ``dirname`` already holds ``.pt`` files.
        save_on_rank: the rank that writes (and removes).
    """

    def __init__(
        self, dirname: str | Path, create_dir: bool = True, require_empty: bool = False, save_on_rank: int = 0
    ) -> None:
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
        (:class:`CheckpointWriteFailed` for an ``OSError``, e.g. a full disk)."""
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
