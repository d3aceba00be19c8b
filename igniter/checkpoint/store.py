"""Checkpoint stores: where checkpoints live, behind one protocol.

A :class:`CheckpointStore` lists its complete checkpoints, writes one whole or not at all,
removes one, and cleans up what an interrupted write left. A checkpoint is one file
(``checkpoint.format=torch``: :meth:`CheckpointStore.write`) or a directory of files every
rank writes into (``dcp``: :meth:`CheckpointStore.begin`, DCP's
:meth:`CheckpointStore.storage_writer`, then :meth:`CheckpointStore.publish`).
:class:`LocalStore` is a directory (temporary name, fsync, rename); :class:`FsspecStore` an
fsspec URL (``s3://``, ``gs://``, ``file://``: the objects, then a manifest written last,
:mod:`igniter.checkpoint.object_store`). The savers (:mod:`igniter.checkpoint.saver` for
files, :class:`igniter.checkpoint.dcp.DcpSaver` for directories) write through either;
:func:`open_checkpoint_store` picks one for a path or a URL.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from igniter.atomic_files import atomic_write, fsync_dir
from igniter.checkpoint.files import checkpoint_files
from igniter.checkpoint.object_store import (
    complete_checkpoints,
    delete_checkpoint,
    delete_orphans,
    upload_failed,
    write_checkpoint,
    write_manifest,
)
from igniter.checkpoint.remote import is_url, open_store, storage_options
from igniter.checkpoint.write_errors import write_failed
from igniter.errors import CheckpointWriteFailed

__all__ = ["CheckpointStore", "FsspecStore", "LocalStore", "WriteBytes", "open_checkpoint_store"]

logger = logging.getLogger("igniter")

#: ``write_bytes(open file, serialized checkpoint)``: fills an open file (a hook for tests).
WriteBytes = Callable[[BinaryIO, memoryview], Any]


class CheckpointStore(Protocol):
    """Where checkpoints live: single files (``torch``) and directories of files (``dcp``).

    Attributes:
        location: the directory or URL, for messages.
    """

    location: str

    def prepare(self) -> None:
        """Create the location if needed and remove what interrupted writes left (the writing rank)."""

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        """The names of the complete checkpoints ``<prefix>_<iteration>.pt`` / ``.dcp``, newest first."""

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        """Write the one-file checkpoint ``name`` whole or not at all.

        Raises:
            CheckpointWriteFailed: it could not be written (the store holds what it held before).
        """

    def target(self, name: str) -> Any:
        """Where the files of directory checkpoint ``name`` are written until :meth:`publish`
        (a temporary directory, or its prefix in a store); the same on every rank."""

    def begin(self, name: str) -> None:
        """Start the directory checkpoint ``name`` (rank 0, before any rank writes): an empty :meth:`target`."""

    def put(self, target: Any, filename: str, data: bytes | memoryview) -> None:
        """Write the small file ``filename`` into ``target`` (what :meth:`begin` returned)."""

    def storage_writer(self, target: Any) -> Any:
        """DCP's ``StorageWriter`` for ``target`` (every rank writes its shards through it)."""

    def publish(self, name: str, target: Any) -> None:
        """Make the directory checkpoint ``name`` complete once every rank has written into
        ``target`` (rank 0): before this, no listing counts it."""

    def drop(self, target: Any) -> None:
        """Remove what a failed directory write left in ``target`` (rank 0)."""

    def failed(self, error: BaseException, name: str, needed: int, about: str = "") -> CheckpointWriteFailed | None:
        """The error to raise for ``error`` while writing checkpoint ``name`` (``needed`` bytes, estimated
        as ``about`` says), or ``None`` when it is not a write error (then the original is raised)."""

    def remove(self, name: str) -> None:
        """Remove checkpoint ``name``, file or directory (nothing happens if it is gone)."""


class LocalStore:
    """A local directory: a file written to a temporary name, fsynced and renamed into place
    (:func:`igniter.atomic_files.atomic_write`); a directory written under ``.<name>.tmp`` and
    renamed once complete (a directory with the final name is complete)."""

    def __init__(self, directory: str | Path, create: bool = True) -> None:
        self.directory = Path(directory).expanduser()
        self.location = str(self.directory)
        self.create = create

    def prepare(self) -> None:
        if self.create:
            self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp"):  # an interrupted write's temporary file or directory
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        return [p.name for p in checkpoint_files(self.directory, prefix)]

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        try:
            atomic_write(self.directory / name, lambda f: write_bytes(f, data))
        except OSError as e:  # the temporary file is gone; nothing else changed
            raise self.failed(e, name, len(data)) from e  # type: ignore[misc]  (an OSError: never None)

    def target(self, name: str) -> Path:
        return self.directory / f".{name}.tmp"

    def begin(self, name: str) -> None:
        shutil.rmtree(self.target(name), ignore_errors=True)
        self.target(name).mkdir(parents=True)

    def put(self, target: Path, filename: str, data: bytes | memoryview) -> None:
        atomic_write(target / filename, lambda f: f.write(data))

    def storage_writer(self, target: Path) -> Any:
        import torch.distributed.checkpoint as dcp

        return dcp.FileSystemWriter(str(target))

    def publish(self, name: str, target: Path) -> None:
        final = self.directory / name
        _discard(final)  # the same iteration saved again (a resumed run)
        os.replace(target, final)
        fsync_dir(self.directory)

    def drop(self, target: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)

    def failed(self, error: BaseException, name: str, needed: int, about: str = "") -> CheckpointWriteFailed | None:
        return write_failed(error, self.directory, name, needed, about)

    def remove(self, name: str) -> None:
        # missing_ok: a resumed run's handler may list files an earlier run already rotated out
        path = self.directory / name
        _discard(path) if path.is_dir() else path.unlink(missing_ok=True)


class FsspecStore:
    """An fsspec URL: a checkpoint is its objects (one ``.pt`` object, or a ``.dcp`` prefix
    every rank writes its shards under) plus a manifest written last; it is complete only when
    its manifest exists and matches (:mod:`igniter.checkpoint.object_store`).

    Raises:
        ConfigError: the store cannot be reached or used (on construction: before training).
    """

    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.root = open_store(self.location, create=True)

    def prepare(self) -> None:
        """Delete the checkpoints a killed upload or save left without a manifest."""
        delete_orphans(self.fs, self.root, self.location)

    def complete(self, prefix: str = "last_checkpoint") -> list[str]:
        return [name for name, _ in complete_checkpoints(self.fs, self.root, prefix=f"{prefix}_")]

    def write(self, name: str, data: memoryview, write_bytes: WriteBytes) -> None:
        try:
            write_checkpoint(self.fs, self.root, name, data, write_bytes)
        except Exception as e:
            raise upload_failed(f"{name} to {self.location}", e) from e

    def target(self, name: str) -> str:
        return f"{self.location}/{name}"  # written in place: the manifest, written last, makes it complete

    def begin(self, name: str) -> None:
        delete_checkpoint(self.fs, self.root, name)  # the same iteration saved again (a resumed run)

    def put(self, target: str, filename: str, data: bytes | memoryview) -> None:
        self.fs.pipe(f"{self.root}/{_name(target)}/{filename}", bytes(data))

    def storage_writer(self, target: str) -> Any:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(target, **storage_options(target))

    def publish(self, name: str, target: str) -> None:
        write_manifest(self.fs, self.root, name)

    def drop(self, target: str) -> None:
        delete_checkpoint(self.fs, self.root, _name(target))

    def failed(self, error: BaseException, name: str, needed: int, about: str = "") -> CheckpointWriteFailed:
        return upload_failed(f"{name} to {self.location}", error)

    def remove(self, name: str) -> None:
        delete_checkpoint(self.fs, self.root, name)


def open_checkpoint_store(where: str | Path, create: bool = True) -> CheckpointStore:
    """The store for ``where``: a :class:`FsspecStore` for an fsspec URL, else a :class:`LocalStore`.

    Raises:
        ConfigError: a URL's store cannot be reached or used.
    """
    return FsspecStore(str(where)) if is_url(where) else LocalStore(where, create=create)


def serialized(obj: Any) -> io.BytesIO:
    """``torch.save`` of ``obj`` into memory (``.getbuffer()``: its bytes, not copied)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer


def _name(target: str) -> str:
    return target.rstrip("/").rsplit("/", 1)[-1]


def _discard(path: Path) -> None:
    """Remove checkpoint directory ``path``: renamed to a temporary name first, so a kill in the
    middle of the removal leaves a ``.*.tmp`` directory (deleted at the next start), never a
    partial directory under a checkpoint's name."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.removed.tmp")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
