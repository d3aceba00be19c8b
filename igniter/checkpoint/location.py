"""Where a run's checkpoints live and in which format, resolved once when the run starts.

A :class:`CheckpointLocation` is the one answer to "local disk or object storage?" and
"one ``torch`` file or a ``dcp`` directory?": code outside :mod:`igniter.checkpoint` asks it,
and never looks at a path's scheme or whether a checkpoint is a directory.

The format (``checkpoint.format``) is, in this order: the one the config sets; when the run
resumes with ``runner.strategy=ddp``, the format of the checkpoint it resumes from (a ``fsdp``
run resumed by one process continues its ``dcp`` checkpoints); else ``dcp`` with
``runner.strategy=fsdp`` and ``torch`` with ``ddp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igniter.checkpoint.files import checkpoint_files, is_checkpoint
from igniter.checkpoint.formats import FORMATS, CheckpointFormat, format_of
from igniter.checkpoint.remote import is_url
from igniter.errors import ConfigError, Problem

__all__ = [
    "FORMATS",
    "CheckpointLocation",
    "checkpoint_path",
    "config_problems",
    "default_format",
    "find_in_run",
    "resolve_location",
    "resume_mode",
]


@dataclass(frozen=True)
class CheckpointLocation:
    """Where a run's checkpoints go and how they are written.

    Attributes:
        root: a local directory (``Path``), or an fsspec URL without a trailing ``/`` (``str``).
        format: ``"torch"`` (``last_checkpoint_<iteration>.pt``) or ``"dcp"`` (``.dcp`` directories).
    """

    root: Path | str
    format: str = "torch"

    @property
    def in_object_store(self) -> bool:
        """Whether the checkpoints are objects behind a URL (``s3://...``) rather than local files."""
        return isinstance(self.root, str)

    @property
    def sharded(self) -> bool:
        """Whether every rank writes its own shards (``dcp``) rather than rank 0 one file."""
        return self.format == "dcp"

    @property
    def kind(self) -> CheckpointFormat:
        """The format's reader and writer (:mod:`igniter.checkpoint.formats`)."""
        return FORMATS[self.format]

    def __str__(self) -> str:
        return str(self.root)


def resume_mode(value: Any) -> str | None:
    """Normalize ``cfg.resume``: ``"auto"``, a path or URL, or ``None`` (off: ``false``/``null``/``none``)."""
    if value is None or value is False or str(value).lower() in ("false", "none", "null", "no", "off", ""):
        return None
    return str(value)


def default_format(cfg: Any) -> str:
    """``checkpoint.format`` as set, else ``dcp`` with ``runner.strategy=fsdp`` and ``torch`` with ``ddp``."""
    return cfg.checkpoint.format or ("dcp" if cfg.runner.strategy == "fsdp" else "torch")


def _root(cfg: Any, output_dir: Path) -> Path | str:
    where = cfg.checkpoint.get("dir")
    if not where:
        return Path(output_dir) / "checkpoints"
    return str(where).rstrip("/") if is_url(where) else Path(str(where)).expanduser()


def _format_resumed_from(cfg: Any, root: Path | str) -> str | None:
    """The format of the checkpoint a resume would start from, when one exists locally."""
    mode = resume_mode(cfg.get("resume"))
    if mode is None:
        return None
    if mode != "auto":
        return format_of(mode).name if is_url(mode) or Path(mode).exists() else None
    if isinstance(root, str):  # the newest complete checkpoint in the store
        from igniter.checkpoint.object_store import complete_checkpoints
        from igniter.checkpoint.remote import open_store

        try:
            newest = [name for name, _ in complete_checkpoints(*open_store(root))][:1]
        except ConfigError:  # unreachable: the saver's check at start says so, naming checkpoint.dir
            return None
        return format_of(f"{root}/{newest[0]}").name if newest else None
    newest = checkpoint_files(Path(root))[:1]
    return format_of(newest[0]).name if newest else None


def resolve_location(cfg: Any, output_dir: Path) -> CheckpointLocation:
    """Where the checkpoints of the run configured by ``cfg`` live, and their format.

    Args:
        cfg: the whole config (``checkpoint.dir``, ``checkpoint.format``, ``resume``, ``runner.strategy``).
        output_dir: the run directory (``<output_dir>/checkpoints`` when ``checkpoint.dir`` is unset).
    """
    root = _root(cfg, output_dir)
    if cfg.checkpoint.format or cfg.runner.strategy == "fsdp":  # fsdp writes shards: dcp whatever was there
        return CheckpointLocation(root, default_format(cfg))
    fmt = _format_resumed_from(cfg, root) or default_format(cfg)
    return CheckpointLocation(root, fmt)


def config_problems(cfg: Any) -> list[Problem]:
    """Problems with ``checkpoint.format``, ``checkpoint.async_save`` and ``resume`` (nothing contacted)."""
    ckpt, problems = cfg.checkpoint, []
    if ckpt.format not in (None, *FORMATS):
        expected = "expected torch (one file), dcp (a torch.distributed.checkpoint directory) or null"
        problems.append(Problem("checkpoint.format", expected, ckpt.format))
    elif cfg.runner.strategy == "fsdp" and ckpt.format == "torch":
        why = "runner.strategy=fsdp writes sharded checkpoints: use dcp (the default with fsdp)"
        problems.append(Problem("checkpoint.format", why, "torch"))
    if ckpt.async_save and default_format(cfg) != "dcp":
        why = "needs checkpoint.format=dcp (torch-format files are already written in a background thread)"
        problems.append(Problem("checkpoint.async_save", why, True))
    resume = resume_mode(cfg.resume)
    if resume not in (None, "auto") and not is_url(resume) and not is_checkpoint(resume):
        expected = (
            "expected 'auto', false, the path of an existing checkpoint (a .pt file or a .dcp directory) or its URL"
        )
        problems.append(Problem("resume", expected, cfg.resume))
    return problems


def _run_location(run_dir: Path) -> CheckpointLocation:
    """Where the run in ``run_dir`` wrote its checkpoints (its ``config.yaml``'s ``checkpoint.dir``)."""
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    where = OmegaConf.select(OmegaConf.load(config), "checkpoint.dir") if config.is_file() else None
    if where and is_url(where):
        return CheckpointLocation(str(where).rstrip("/"))
    return CheckpointLocation(Path(str(where)).expanduser() if where else run_dir / "checkpoints")


def checkpoint_path(text: str) -> Path | str:
    """A checkpoint named by a string: a ``Path``, or the URL itself (a ``dcp`` checkpoint in a store)."""
    return text if is_url(text) else Path(text)


def find_in_run(target: Path, header: str = "cannot evaluate") -> tuple[Path, Path]:
    """``(run dir, local checkpoint)`` for ``target``: a run directory (its newest
    ``last_checkpoint_*``, from object storage when the run's ``checkpoint.dir`` is a URL:
    downloaded once into the cache, SHA-256 checked against its manifest) or a checkpoint (a
    ``.pt`` file or ``.dcp`` directory) inside ``<run dir>/checkpoints``. A ``dcp`` checkpoint
    in a store is returned as its URL (read in place).

    Raises:
        ConfigError: no such run or checkpoint, or the run has no complete checkpoint (``header``:
            the message's first line, e.g. "cannot export").
    """
    if target.is_dir() and target.suffix != ".dcp":
        location = _run_location(target)
        if location.in_object_store:
            from igniter.checkpoint.object_store import complete_checkpoints
            from igniter.checkpoint.remote import fetch, open_store

            newest = [name for name, _ in complete_checkpoints(*open_store(str(location.root)))][:1]
            if newest and format_of(f"{location.root}/{newest[0]}").read_in_place:  # as a resume does
                return target, f"{location.root}/{newest[0]}"  # type: ignore[return-value]
            if newest:
                return target, fetch(f"{location.root}/{newest[0]}", "checkpoint")
        else:
            files = checkpoint_files(Path(location.root))
            if files:
                return target, files[0]
        why = f"no last_checkpoint_*.pt or .dcp in {location.root}"
        raise ConfigError([Problem("run", why, str(target))], header)
    if target.exists():  # a .pt file or a .dcp directory
        return target.parent.parent, target
    raise ConfigError([Problem("run", "no such run directory or checkpoint file", str(target))], header)
