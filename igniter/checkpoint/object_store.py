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
from typing import Any

from igniter.checkpoint.remote import MANIFEST_SUFFIX, one_line, sha256_of
from igniter.errors import CheckpointWriteFailed

__all__ = [
    "write_checkpoint",
    "delete_checkpoint",
    "write_manifest",
    "delete_orphans",
    "upload_failed",
    "complete_checkpoints",
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


#: What an orphan (a checkpoint without its manifest) is, said when it is deleted, by its suffix.
_ORPHANS = {
    ".pt": "an upload that never completed (no manifest)",
    ".dcp": "a checkpoint a killed run left without its manifest",
}


def delete_orphans(fs: Any, root: str, location: str) -> None:
    """Delete the checkpoints (``.pt`` objects and ``.dcp`` prefixes) under ``root`` that have no
    complete manifest: what a kill during an upload or a save left. ``location``: for the log."""
    complete = {name for name, _ in complete_checkpoints(fs, root, prefix="")}
    try:
        listing = fs.ls(root, detail=False)
    except FileNotFoundError:  # a prefix nothing was written under yet
        listing = []
    for entry in listing:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        suffix = Path(name).suffix
        if suffix in _ORPHANS and name not in complete:
            logger.info("%s/%s: %s; deleting it", location, name, _ORPHANS[suffix])
            delete_checkpoint(fs, root, name)


def upload_failed(what: str, error: BaseException) -> CheckpointWriteFailed:
    """The error for checkpoint ``what`` (a name in a store, or its URL) that could not be uploaded."""
    return CheckpointWriteFailed(
        f"cannot write checkpoint {what}: {type(error).__name__}: {one_line(error)}; the earlier checkpoints are "
        "kept. Check the store's credentials, quota and endpoint (AWS_ENDPOINT_URL) and resume with the same command."
    )
