"""Checkpoint stores: where checkpoint files live, behind one protocol.

A :class:`CheckpointStore` lists its complete checkpoints, writes one atomically, removes
one, and cleans up what an interrupted write left. :class:`LocalStore` is a directory
(temporary file, fsync, rename); :class:`FsspecStore` an fsspec URL (``s3://``, ``gs://``,
``file://``: the object, then a manifest written last,
:mod:`igniter.checkpoint.object_store`). The background saver
(:class:`igniter.checkpoint.saver.CheckpointSaver`) writes through either.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from igniter.atomic_files import atomic_write
from igniter.checkpoint.files import checkpoint_files
from igniter.checkpoint.object_store import (
    complete_checkpoints,
    delete_checkpoint,
    delete_orphans,
    upload_failed,
    write_checkpoint,
)
from igniter.checkpoint.remote import open_store
from igniter.checkpoint.write_errors import write_failed

__all__ = ["CheckpointStore", "FsspecStore", "LocalStore", "WriteBytes"]

logger = logging.getLogger("igniter")

#: ``write_bytes(open file, serialized checkpoint)``: fills an open file (a hook for tests).
WriteBytes = Callable[[BinaryIO, memoryview], Any]


class CheckpointStore(Protocol):
    """Where checkpoint files live.

    Attributes:
        location: the directory or URL, for messages.
    """

    location: str

    def prepare(self) -> None:
        """Create the location if needed and remove what interrupted writes left (the writing rank)."""

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        """The names of the complete checkpoints ``<prefix>_<iteration>.pt``, newest first."""

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        """Write checkpoint ``name`` whole or not at all.

        Raises:
            CheckpointWriteFailed: it could not be written (the store holds what it held before).
        """

    def remove(self, name: str) -> None:
        """Remove checkpoint ``name`` (nothing happens if it is gone)."""


class LocalStore:
    """A local directory: each checkpoint written to a temporary file, fsynced and renamed
    into place (:func:`igniter.atomic_files.atomic_write`)."""

    def __init__(self, directory: str | Path, create: bool = True) -> None:
        self.directory = Path(directory).expanduser()
        self.location = str(self.directory)
        self.create = create

    def prepare(self) -> None:
        if self.create:
            self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp"):  # an interrupted write's temporary file
            stale.unlink(missing_ok=True)

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        return [p.name for p in checkpoint_files(self.directory, prefix)]

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        path = self.directory / name
        try:
            atomic_write(path, lambda f: write_bytes(f, data))
        except OSError as e:  # the temporary file is gone; nothing else changed
            raise write_failed(e, self.directory, name, len(data)) from e  # type: ignore[misc]  (an OSError: never None)

    def remove(self, name: str) -> None:
        # missing_ok: a resumed run's handler may list files an earlier run already rotated out
        (self.directory / name).unlink(missing_ok=True)


class FsspecStore:
    """An fsspec URL: each checkpoint an object plus a manifest written last; a checkpoint is
    complete only when its manifest exists and matches (:mod:`igniter.checkpoint.object_store`).

    Raises:
        ConfigError: the store cannot be reached or used (on construction: before training).
    """

    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.root = open_store(self.location, create=True)

    def prepare(self) -> None:
        """Delete the objects a killed upload left without a manifest."""
        delete_orphans(self.fs, self.root, self.location, ".pt")

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        return [name for name, _ in complete_checkpoints(self.fs, self.root, prefix=f"{prefix}_")]

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        try:
            write_checkpoint(self.fs, self.root, name, data, write_bytes)
        except Exception as e:
            raise upload_failed(f"{name} to {self.location}", e) from e

    def remove(self, name: str) -> None:
        delete_checkpoint(self.fs, self.root, name)
