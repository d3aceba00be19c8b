"""Files written whole or not at all: a crash or a full disk never leaves half a file.

:func:`atomic_write` (temporary file, fsync, rename, fsync of the directory) is how every file
igniter writes is written: checkpoints, ``metrics.json``, ``config.yaml``, ``submitted.json``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "fsync_dir"]


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
