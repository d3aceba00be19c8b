"""Checkpoint savers of the io registry: one crash-safe writer in a background thread, over a
:class:`~igniter.checkpoint.store.CheckpointStore` (a local directory or an object store).

A **saver** factory is called as ``factory(dirname)`` and returns an Ignite save handler
(``ignite.handlers.BaseSaveHandler``: ``__call__``, ``remove``), used by ``Checkpoint``.
``disk`` writes to a directory, ``object_store`` to an fsspec URL (picked for a URL
``checkpoint.dir``).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Mapping

import ignite.distributed as idist
from ignite.handlers.checkpoint import BaseSaveHandler

from igniter.checkpoint.store import CheckpointStore, FsspecStore, LocalStore, serialized
from igniter.registry import io_registry

__all__ = ["AtomicDiskSaver", "CheckpointSaver", "ObjectStoreSaver", "disk", "object_store"]

logger = logging.getLogger("igniter")


class CheckpointSaver(BaseSaveHandler):
    """A crash-safe checkpoint writer (rank ``save_on_rank`` writes), written in the background
    to a :class:`~igniter.checkpoint.store.CheckpointStore`: Ignite's public ``BaseSaveHandler``
    (``__call__``, ``remove``).

    * The checkpoint is serialized (:meth:`serialize`, ``torch.save`` into memory) in the
      calling thread, so the file holds the state of that moment; writing (the store's atomic
      write: fsync and rename on disk, object then manifest in a store) and the removal of
      rotated-out checkpoints run in one background thread (serializing there too was slower:
      the pickler holds the GIL). One write is in flight at a time, so checkpoints appear in
      order; costs host RAM for one serialized checkpoint.
    * ``remove`` is deferred until the next checkpoint is complete: Ignite's ``Checkpoint``
      removes the oldest file *before* writing the new one, so a kill in between would
      otherwise leave ``n_saved - 1`` checkpoints;
    * what interrupted writes left is removed at start-up (:meth:`CheckpointStore.prepare`).

    Call :meth:`flush` before relying on the newest checkpoint (end of training, requeue); a
    write error is raised there or by the next save, as :class:`~igniter.errors.CheckpointWriteFailed`
    (exit status 5, a paragraph naming the directory and, for a full disk, the bytes needed
    and free), its partial write removed and the checkpoints it would have replaced kept. At
    interpreter exit Python waits for the write in flight.

    Args:
        store: where the checkpoints go.
        save_on_rank: the rank that writes (and removes).
    """

    def __init__(self, store: CheckpointStore, save_on_rank: int = 0) -> None:
        self.store = store
        self.save_on_rank = save_on_rank
        self._pending_removal: list[str] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="igniter-checkpoint")
        self._in_flight: Future | None = None
        if idist.get_rank() == save_on_rank:
            store.prepare()

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Serialize ``checkpoint`` now and write it as ``filename`` in the background."""
        if idist.get_rank() != self.save_on_rank:
            return
        buffer = self.serialize(checkpoint)
        self.flush()
        removals, self._pending_removal = self._pending_removal, []
        self._in_flight = self._writer.submit(self._write, filename, buffer, removals)

    def serialize(self, checkpoint: Mapping) -> io.BytesIO:
        """``torch.save`` into memory (a hook for benchmarks that write nothing)."""
        return serialized(checkpoint)

    def _write(self, filename: str, buffer: io.BytesIO, removals: list[str]) -> None:
        """Write ``buffer`` as ``filename``, then remove the rotated-out ``removals`` (the writer
        thread; a failed write raises before any removal)."""
        self.store.write(filename, buffer.getbuffer(), self.write_bytes)
        for name in removals:
            if name != filename:
                self.store.remove(name)

    def write_bytes(self, f: BinaryIO, data: memoryview) -> None:
        """Write a serialized checkpoint to the open file or object (a hook for tests)."""
        f.write(data)

    def flush(self) -> None:
        """Wait until the last checkpoint is written. Raises what its write raised
        (:class:`~igniter.errors.CheckpointWriteFailed` for a write error, e.g. a full disk)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def remove(self, filename: str) -> None:
        """Forget ``filename`` once the next checkpoint is written (only the writing rank removes)."""
        if idist.get_rank() == self.save_on_rank:
            self._pending_removal.append(filename)


class AtomicDiskSaver(CheckpointSaver):
    """:class:`CheckpointSaver` over a local directory (:class:`~igniter.checkpoint.store.LocalStore`).

    Args:
        dirname: the checkpoint directory (created by the writing rank when ``create_dir``).
        create_dir: create ``dirname`` if it is missing.
        require_empty: raise ``ValueError`` if ``dirname`` already holds ``.pt`` files.
        save_on_rank: the rank that writes (and removes).
    """

    def __init__(
        self, dirname: str | Path, create_dir: bool = True, require_empty: bool = False, save_on_rank: int = 0
    ) -> None:
        store = LocalStore(dirname, create=create_dir)
        self.dirname = store.directory
        if require_empty and idist.get_rank() == save_on_rank and any(self.dirname.glob("*.pt")):
            raise ValueError(f"{self.dirname} already holds checkpoints (.pt files)")
        super().__init__(store, save_on_rank)


class ObjectStoreSaver(CheckpointSaver):
    """:class:`CheckpointSaver` over an fsspec URL (:class:`~igniter.checkpoint.store.FsspecStore`):
    each checkpoint an object plus a manifest written last; a rotated-out checkpoint is deleted
    only once its successor's manifest exists; objects without a manifest (a killed upload) are
    deleted at start-up.

    Args:
        url: ``s3://bucket/prefix`` (any fsspec URL).
        save_on_rank: the rank that writes (and removes).

    Raises:
        ConfigError: the store cannot be reached or used (before training).
    """

    def __init__(self, url: str, save_on_rank: int = 0) -> None:
        store = FsspecStore(url)
        self.url = store.location
        super().__init__(store, save_on_rank)


@io_registry("disk")
def disk(dirname: str) -> AtomicDiskSaver:
    """Checkpoints on the local disk under ``dirname`` (created if missing)."""
    return AtomicDiskSaver(dirname, require_empty=False, create_dir=True)


@io_registry("object_store")
def object_store(dirname: str) -> ObjectStoreSaver:
    """Checkpoints under an fsspec URL (``checkpoint.dir=s3://...`` picks it instead of ``disk``)."""
    return ObjectStoreSaver(dirname)
