"""Checkpoints in object storage: ``checkpoint.dir`` an fsspec URL (``s3://``, ``gs://``, ``file://``).

A checkpoint in object storage is its object (``last_checkpoint_<iteration>.pt``) plus a
manifest written last (``<name>.manifest.json``: each object's size in bytes and SHA-256).
Only a checkpoint whose manifest exists and matches is complete, so an upload killed at any
moment is never taken for the newest checkpoint (an S3 PUT is atomic per object, but the
object alone does not say it is whole). An old checkpoint's manifest is deleted before its
object, and only once its successor is complete: the promises of
:class:`igniter.checkpoint.saver.CheckpointSaver` on local disk. The saver writes through
:class:`igniter.checkpoint.store.FsspecStore`.

Reaching the store and downloading are :mod:`igniter.checkpoint.remote`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from igniter.checkpoint.remote import (
    MANIFEST_SUFFIX,
    DigestMismatch,
    fetch,
    open_store,
    resume_cache,
    sha256_of,
)
from igniter.errors import ConfigError, Problem

__all__ = [
    "write_checkpoint",
    "delete_checkpoint",
    "write_manifest",
    "complete_checkpoints",
    "select_from_store",
]

logger = logging.getLogger("igniter")


def write_checkpoint(fs: Any, root: str, name: str, data: memoryview, write: Any = None) -> None:
    """Upload checkpoint ``name`` (serialized bytes ``data``) under ``root``, then its manifest.

    ``write(f, data)`` fills the open object (default ``f.write(data)``; a hook for tests).
    A kill before the manifest leaves an object no listing counts as a checkpoint.
    """
    digest, size = sha256_of([data])
    with fs.open(f"{root}/{name}", "wb") as f:
        (write or (lambda out, d: out.write(d)))(f, data)
    manifest = {"checkpoint": name, "objects": {name: {"bytes": size, "sha256": digest}}}
    fs.pipe(f"{root}/{name}{MANIFEST_SUFFIX}", json.dumps(manifest, indent=1).encode())


def write_manifest(fs: Any, root: str, name: str) -> None:
    """Write the manifest of the ``dcp`` checkpoint ``name`` (a prefix of objects under ``root``):
    every object's path below ``root`` and size; it makes the checkpoint complete."""
    fs.invalidate_cache()
    found = fs.find(f"{root}/{name}", detail=True)
    objects = {f"{name}/{path[len(root) + len(name) + 2 :]}": {"bytes": info["size"]} for path, info in found.items()}
    manifest = {"checkpoint": name, "objects": objects}
    fs.pipe(f"{root}/{name}{MANIFEST_SUFFIX}", json.dumps(manifest, indent=1).encode())


def delete_checkpoint(fs: Any, root: str, name: str) -> None:
    """Delete checkpoint ``name``: its manifest first (it is then incomplete), then its objects
    (one object, or every object under a ``dcp`` checkpoint's prefix)."""
    for path in (f"{root}/{name}{MANIFEST_SUFFIX}", f"{root}/{name}"):
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def complete_checkpoints(fs: Any, root: str, prefix: str = "last_checkpoint_") -> list[tuple[str, dict[str, Any]]]:
    """``(name, manifest)`` of the complete checkpoints ``<prefix><iteration>.pt`` under
    ``root``, newest (highest iteration) first: the manifest exists and every object it lists
    exists with the listed size. Objects without a manifest (killed uploads) are left out."""
    try:
        listing = {Path(e["name"]).name: e for e in fs.ls(root, detail=True)}
    except FileNotFoundError:
        return []
    found = []
    for key in listing:
        name = key[: -len(MANIFEST_SUFFIX)]
        if not (key.endswith(MANIFEST_SUFFIX) and name.startswith(prefix) and name.endswith((".pt", ".dcp"))):
            continue
        try:
            manifest = json.loads(fs.cat(f"{root}/{key}"))
            objects = manifest["objects"]
            sizes = {k: e.get("size") for k, e in listing.items()}
            if name.endswith(".dcp"):  # objects under the checkpoint's prefix
                found_below = fs.find(f"{root}/{name}", detail=True)
                sizes = {f"{name}/{p[len(root) + len(name) + 2 :]}": e.get("size") for p, e in found_below.items()}
            if objects and all(sizes.get(o) == meta["bytes"] for o, meta in objects.items()):
                found.append((_iteration(name), name, manifest))
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            logger.warning("skipping %s/%s: not a readable manifest", root, key)
    return [(name, manifest) for _, name, manifest in sorted(found, key=lambda t: t[0], reverse=True)]


def _iteration(name: str) -> int:
    match = re.search(r"_(\d+)\.(pt|dcp)$", name)  # last_checkpoint_<iteration>.pt; best_... names sort last
    return int(match.group(1)) if match else -1


def select_from_store(resume: str, url: str, check: Callable[[Path], dict]) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from in object storage: ``(its URL, what check returned)``.

    ``resume``: ``"auto"`` (the newest complete checkpoint under ``url`` that ``check`` accepts;
    invalid newer ones are reported and skipped; ``(None, None)`` when there is none) or one
    checkpoint's URL. ``check(local copy)`` reads and checks a downloaded copy, kept in
    :func:`~igniter.checkpoint.remote.resume_cache` for the other ranks of this host when chosen.

    Raises:
        ConfigError: the store cannot be reached or read (a read failure never falls back to an
            older checkpoint), the named checkpoint is invalid, or checkpoints exist and none is valid.
    """
    from igniter.checkpoint.files import CheckpointInvalid

    if resume != "auto":
        candidates = [resume]
    else:
        fs, root = open_store(url)
        candidates = [f"{url}/{name}" for name, _ in complete_checkpoints(fs, root)]
    problems = []
    for candidate in candidates:
        local = None
        try:
            if candidate.rstrip("/").endswith(".dcp"):  # read in place, every rank its shards: nothing to download
                return candidate, check(candidate)
            local = fetch(candidate, "resume", into=resume_cache(), reuse=False)  # kept for this host's other ranks
            return candidate, check(local)
        except (
            CheckpointInvalid,
            DigestMismatch,
        ) as e:  # a store that cannot be read is no reason to take an older one
            if local is not None:
                local.unlink(missing_ok=True)
            reason = f"it {e}" if isinstance(e, CheckpointInvalid) else "; ".join(p.expected for p in e.problems)
            if resume != "auto":
                raise ConfigError([Problem("resume", f"{candidate}: {reason}", resume)], "cannot resume") from None
            logger.warning("skipping checkpoint %s: %s", candidate, reason)
            problems.append(Problem("resume", f"{candidate}: {reason}", "auto"))
    if problems:
        raise ConfigError(
            problems + [Problem("resume", f"no valid checkpoint in {url}; use resume=false to start over", "auto")],
            "cannot resume",
        )
    return None, None
