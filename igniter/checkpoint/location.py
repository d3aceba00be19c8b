"""Where a run's checkpoints live: ``checkpoint.dir`` resolved once, when the run starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from igniter.checkpoint.remote import is_url

__all__ = ["checkpoint_dir"]


def checkpoint_dir(cfg: Any, output_dir: Path) -> str | Path:
    """``checkpoint.dir`` of ``cfg``: a local ``Path`` (``~`` expanded), or an fsspec URL (a
    ``str`` without a trailing ``/``) for object storage; ``<output_dir>/checkpoints`` when unset."""
    where = cfg.checkpoint.get("dir")
    if not where:
        return Path(output_dir) / "checkpoints"
    return str(where).rstrip("/") if is_url(where) else Path(str(where)).expanduser()
