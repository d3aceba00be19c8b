"""Checkpoint formats: one reader/writer interface, two implementations.

``checkpoint.format=torch`` (:class:`TorchFile`): one ``last_checkpoint_<iteration>.pt`` file
written by rank 0 (``torch.save`` of every state), read with ``torch.load(weights_only=True)``.
``checkpoint.format=dcp`` (:class:`DcpDirectory`): a ``last_checkpoint_<iteration>.dcp``
directory every rank writes its shards into (``torch.distributed.checkpoint``), read back at
any world size and strategy (:mod:`igniter.checkpoint.dcp`). Both write through a
:class:`~igniter.checkpoint.store.CheckpointStore` (local disk or an fsspec URL).

Code that saves, resumes, evaluates or exports asks :func:`format_of` (a checkpoint on disk
or in a store) or :data:`FORMATS` (``checkpoint.format``) for the format and calls it; only
this module knows which is which. A new format is one more class with these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from igniter.checkpoint.dcp import ModelState, OptimizerState, check_dcp, dcp_saver, read_dcp
from igniter.checkpoint.files import CheckpointInvalid, check_checkpoint, is_dcp
from igniter.checkpoint.remote import is_url
from igniter.checkpoint.weights import read_dcp_weights, read_file_weights
from igniter.parallel.strategy import unwrap_model
from igniter.registry import io_registry

__all__ = ["CheckpointFormat", "DcpDirectory", "FORMATS", "TorchFile", "format_of", "read_weights"]


class CheckpointFormat(Protocol):
    """How checkpoints of one format are written and read.

    Attributes:
        name: the ``checkpoint.format`` value.
        read_in_place: every rank reads its part from where the checkpoint is (a checkpoint
            in a store is not downloaded first).
        filenames: Ignite ``Checkpoint`` ``filename_pattern`` for ``"last"`` and ``"best"``
            (``None``: Ignite's default, ``<prefix>_<name>_<iteration>.pt``).
    """

    name: str
    read_in_place: bool
    filenames: Mapping[str, str | None]

    def saver(self, cfg: Any, root: Path | str) -> BaseSaveHandler:
        """The save handler writing into ``root`` (a directory or a URL) for config section ``cfg`` (``checkpoint``).

        Raises:
            ConfigError: the store cannot be reached, or ``checkpoint.saver`` does not fit the format.
        """

    def states(self, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        """The objects that stand for ``model`` (unwrapped) and ``optimizer`` in ``to_save``."""

    def check(self, path: Path | str, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any]:
        """Check checkpoint ``path`` fits ``model`` and has the ``required`` entries (rank 0).

        Returns:
            What was read: the whole checkpoint (``torch``) or its small entries (``dcp``).

        Raises:
            CheckpointInvalid: a one-line reason that reads after the path.
        """

    def read(
        self,
        path: Path | str,
        to_load: Mapping[str, Any],
        model: torch.nn.Module,
        required: tuple[str, ...],
        checked: dict | None,
    ) -> dict[str, Any]:
        """The states of checkpoint ``path`` for ``Checkpoint.load_objects(to_load, ...)`` (every
        rank; collective for ``dcp``). ``checked``: what :meth:`check` (``model``, ``required``)
        returned on this rank, if it ran.

        Raises:
            CheckpointInvalid: the checkpoint cannot be read (``torch``, on a rank that did not check it).
        """

    def weights(self, path: Path | str) -> Mapping[str, torch.Tensor]:
        """The whole model's weights, read safely in this process alone (eval, export).

        Raises:
            CheckpointInvalid: the checkpoint cannot be read or holds no model weights.
        """


class TorchFile:
    """``checkpoint.format=torch``: one file, written by rank 0 in a background thread
    (:class:`~igniter.checkpoint.saver.CheckpointSaver`)."""

    name = "torch"
    read_in_place = False  # one object: downloaded once per host, SHA-256 checked
    filenames: Mapping[str, str | None] = {"last": None, "best": None}

    def saver(self, cfg: Any, root: Path | str) -> BaseSaveHandler:
        # The default saver writes to local disk; for a URL, the object-store one.
        name = "object_store" if is_url(root) and cfg.saver == "disk" else cfg.saver
        return io_registry.get(name, "checkpoint.saver")(str(root))

    def states(self, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        return model, optimizer

    def check(self, path: Path | str, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any]:
        return check_checkpoint(Path(path), model, required)

    def read(
        self,
        path: Path | str,
        to_load: Mapping[str, Any],
        model: torch.nn.Module,
        required: tuple[str, ...],
        checked: dict | None,
    ) -> dict[str, Any]:
        return checked if checked is not None else self.check(path, model, required)

    def weights(self, path: Path | str) -> Mapping[str, torch.Tensor]:
        return read_file_weights(Path(path))


class DcpDirectory:
    """``checkpoint.format=dcp``: a ``torch.distributed.checkpoint`` directory, every rank its
    shards (:class:`~igniter.checkpoint.dcp.DcpSaver`), keyed by parameter name so that it
    loads at any world size and into either strategy."""

    name = "dcp"
    read_in_place = True
    filenames: Mapping[str, str | None] = {
        "last": "{filename_prefix}_{name}_{global_step}.dcp",
        "best": "{filename_prefix}_{name}_{global_step}_{score_name}={score}.dcp",
    }

    def saver(self, cfg: Any, root: Path | str) -> BaseSaveHandler:
        return dcp_saver(cfg, root)

    def states(self, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        return ModelState(model), OptimizerState(model, optimizer)

    def check(self, path: Path | str, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any]:
        try:  # from its metadata and extra.pt; the tensors are read collectively by read()
            return check_dcp(path, unwrap_model(model).state_dict(), required)  # type: ignore[arg-type]
        except ValueError as e:
            raise CheckpointInvalid(str(e)) from None

    def read(
        self,
        path: Path | str,
        to_load: Mapping[str, Any],
        model: torch.nn.Module,
        required: tuple[str, ...],
        checked: dict | None,
    ) -> dict[str, Any]:
        return read_dcp(path, to_load)  # type: ignore[arg-type]  (every rank its shards, resharded to this run)

    def weights(self, path: Path | str) -> Mapping[str, torch.Tensor]:
        return read_dcp_weights(path)


#: The formats by ``checkpoint.format`` value.
FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (TorchFile(), DcpDirectory())}


def format_of(path: Path | str) -> CheckpointFormat:
    """The format of the checkpoint at ``path``: ``dcp`` for a local directory or a URL ending in
    ``.dcp`` (a prefix of objects), else ``torch`` (a file or one object)."""
    return FORMATS["dcp" if is_dcp(path) else "torch"]


def read_weights(path: Path | str) -> Mapping[str, torch.Tensor]:
    """The model weights in checkpoint ``path`` (a ``.pt`` file, ``last_*`` or ``best_model_*``,
    or a ``dcp`` directory consolidated whole, on disk or behind a URL), loaded safely: no code
    from the checkpoint runs.

    Raises:
        CheckpointInvalid: the file cannot be opened, is not a PyTorch checkpoint, holds pickled
            objects, or has no model weights; the directory has no readable ``.metadata`` or
            damaged data; the message reads after the path.
    """
    return format_of(path).weights(path)
