"""Distributed checkpoints (``checkpoint.format=dcp``): a ``torch.distributed.checkpoint`` directory per checkpoint.

A checkpoint ``<run dir>/checkpoints/last_checkpoint_<iteration>.dcp/`` holds:

* the model and optimizer states, written by every rank in parallel (its own shards under
  FSDP; DCP writes a replicated DDP tensor once), keyed by parameter name
  (``torch.distributed.checkpoint.state_dict.get_state_dict``), so the checkpoint loads at
  any world size and into either strategy;
* ``extra.pt``: everything else (trainer position and RNG states, LR scheduler, loss
  scaler, the checkpointers' lists), small and plain, written by rank 0 and read with
  ``torch.load(weights_only=True)``; DCP's own non-tensor entries (the optimizer's
  ``param_groups``) are read with ``weights_only=True`` as well (:class:`SafeLoadPlanner`):
  nothing from a checkpoint can run code.

Atomic as single files are: every rank writes under ``.<name>.tmp``; rank 0 renames it to
``<name>`` once DCP has written its ``.metadata`` (which it does after every rank's data),
so a directory with the final name is complete. Older checkpoints are removed only after
their successor is renamed.
"""

from __future__ import annotations

import io
import pickle
import sys
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
import torch.distributed.checkpoint as dcp
from ignite.handlers.checkpoint import BaseSaveHandler
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from igniter.checkpoint.remote import is_url, open_store, storage_options
from igniter.checkpoint.store import CheckpointStore, open_checkpoint_store, serialized
from igniter.checkpoint.write_errors import tensor_bytes
from igniter.errors import ConfigError, Problem
from igniter.registry import io_registry

# One process without a process group (world size 1, or eval/export) saves and loads DCP
# checkpoints on purpose: torch's warning that it assumes so is noise on every such run.
warnings.filterwarnings(
    "ignore",
    message=r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in a single process",
    category=UserWarning,
)

__all__ = [
    "dcp_saver",
    "check_metadata",
    "check_dcp",
    "SHARDED_KEYS",
    "ModelState",
    "OptimizerState",
    "SafeLoadPlanner",
    "DcpSaver",
    "dcp_metadata",
    "read_dcp",
    "dcp_model_state",
]


#: Entries of a checkpoint that DCP writes; the others go to ``extra.pt``.
SHARDED_KEYS = ("model", "optimizer")
EXTRA_FILE = "extra.pt"


class ModelState:
    """The model's state by parameter name at any world size and strategy (``state_dict`` /
    ``load_state_dict`` of ``get_model_state_dict`` / ``set_model_state_dict``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_model_state_dict(self.model, dict(state))


class OptimizerState:
    """The optimizer's state keyed by parameter name (``get_optimizer_state_dict``), not by
    position: it loads into a run of another world size or strategy."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, dict(state))


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor entries with ``torch.load(weights_only=True)``
    first (DCP's own reads them with ``weights_only=False``, which would run code from the
    file); only bytes that pass are handed to DCP's reader."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # type: ignore[override]
        torch.load(value, weights_only=True)  # raises on anything but tensors and plain containers
        value.seek(0)
        super().load_bytes(read_item, value)  # the same bytes, now known to be plain


class DcpSaver(BaseSaveHandler):
    """Ignite save handler writing ``torch.distributed.checkpoint`` directories (every rank)
    through a :class:`~igniter.checkpoint.store.CheckpointStore`.

    Ignite's ``Checkpoint`` calls it on every rank with the same ``filename``
    (``<prefix>_<name>_<iteration>.dcp``). Rank 0 starts the checkpoint
    (:meth:`CheckpointStore.begin`: a temporary directory on disk, the prefix in an object
    store) and writes ``extra.pt`` into it; every rank writes its shards (DCP's writer for the
    store); once DCP has written ``.metadata`` (after every rank's data), rank 0 publishes it
    (renamed into place on disk; in a store, a manifest listing every object and its size,
    without SHA-256: hashing every shard would read it back). ``remove`` is deferred until the
    next checkpoint is complete, as :class:`igniter.checkpoint.saver.CheckpointSaver` does;
    what interrupted writes left is removed at start-up.

    Args:
        where: the checkpoint directory (created by rank 0), an fsspec URL
            (``s3://bucket/prefix``), or a store.
        async_save: write with ``dcp.async_save``: the training thread waits only for the
            copy to host memory; :meth:`flush` waits for the write.

    Raises:
        ConfigError: a URL's store cannot be reached (before training).
    """

    def __init__(self, where: str | Path | CheckpointStore, async_save: bool = False) -> None:
        self.store = open_checkpoint_store(where) if isinstance(where, (str, Path)) else where
        self.dirname = self.store.location  # for messages
        self.async_save = async_save
        self._pending_removal: list[str] = []
        self._in_flight: Future | None = None
        if idist.get_rank() == 0:
            self.store.prepare()
        self._group = None
        if idist.get_world_size() > 1:
            idist.barrier()  # no rank writes into a location rank 0 is still cleaning
            if async_save:  # background saves coordinate on a group of their own, never on training's
                self._group = torch.distributed.new_group(backend="gloo")

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` as checkpoint ``filename`` (a directory), collectively (a failure: :meth:`_failed`)."""
        self.flush()
        if "model" not in checkpoint:  # Ignite passes a single object's state unwrapped (best_model_*)
            checkpoint = {"model": checkpoint}
        sharded = {k: v for k, v in checkpoint.items() if k in SHARDED_KEYS}
        extra = {k: v for k, v in checkpoint.items() if k not in SHARDED_KEYS}
        target = self.store.target(filename)
        failed: BaseException | None = None
        if idist.get_rank() == 0:
            try:
                self.store.begin(filename)
                self.store.put(target, EXTRA_FILE, serialized(extra).getbuffer())
            except Exception as e:  # a full disk: torch.save raises RuntimeError over the OSError
                failed = e
        if idist.get_world_size() > 1 and idist.all_reduce(int(failed is not None), op="MAX"):  # (and a barrier)
            failed = failed or OSError(f"rank 0 could not write {EXTRA_FILE}")
        removals, self._pending_removal = self._pending_removal, []
        self._in_flight_write = (filename, target, checkpoint)
        try:
            if failed is not None:
                raise failed
            if self.async_save:
                writer = self.store.storage_writer(target)
                future = dcp.async_save(dict(sharded), storage_writer=writer, process_group=self._group)
                future.add_done_callback(lambda done: self._publish(done, filename, target, removals))
                self._in_flight = future
            else:
                self.write(sharded, target)
                self._publish(None, filename, target, removals)
        except (Exception, CheckpointException) as e:
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        """Rank 0 removes the failed write; every rank raises
        :class:`~igniter.errors.CheckpointWriteFailed` for a write error (the store's
        :meth:`~igniter.checkpoint.store.CheckpointStore.failed`; inside DCP's
        ``CheckpointException`` too), what it was for anything else."""
        name, target, states = self._in_flight_write  # states: Ignite passes every object's state_dict()
        if idist.get_rank() == 0:
            self.store.drop(target)
        failure = (
            error.failures[min(error.failures)][0]
            if isinstance(error, CheckpointException) and error.failures
            else error
        )
        about = "its tensors and strings, without file overhead"
        written = self.store.failed(failure, name, tensor_bytes(states), about)
        if written is None:
            raise error
        raise written from error

    def write(self, sharded: Mapping[str, Any], target: Any) -> None:
        """``dcp.save`` of the model and optimizer states into ``target`` (a hook for tests)."""
        dcp.save(dict(sharded), storage_writer=self.store.storage_writer(target))

    def _publish(self, done: Future | None, name: str, target: Any, removals: list[str]) -> None:
        """Rank 0: publish the complete checkpoint, then remove the rotated-out ones."""
        if (done is not None and done.exception() is not None) or idist.get_rank() != 0:
            return  # flush() raises a failed write's error
        self.store.publish(name, target)
        for old in removals:
            if old != name:
                self.store.remove(old)

    def flush(self) -> None:
        """Wait until the last checkpoint is written. Raises what its write raised (see :meth:`_failed`)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            try:
                in_flight.result()
            except (Exception, CheckpointException) as e:
                self._failed(e)

    def remove(self, filename: str) -> None:
        """Forget ``filename`` once the next checkpoint is complete (rank 0 removes it)."""
        self._pending_removal.append(filename)


def _reader(path: Path | str) -> Any:
    """DCP's reader for checkpoint ``path``: the file-system reader, or the fsspec one for a URL."""
    if not is_url(path):
        return dcp.FileSystemReader(str(path))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(str(path), **storage_options(str(path)))


def _open(path: Path | str, name: str) -> Any:
    """Open file ``name`` of checkpoint ``path`` (a local directory or a URL) for reading."""
    if not is_url(path):
        return open(Path(path) / name, "rb")
    fs, root = open_store(str(path), "resume")
    return fs.open(f"{root}/{name}", "rb")


def dcp_saver(cfg: Any, where: Path | str) -> DcpSaver:
    """The saver of ``checkpoint.format=dcp``: a :class:`DcpSaver` into ``where`` (a directory
    or a URL), or what the io-registry entry ``checkpoint.saver`` returns for ``where`` when it
    is not ``disk``.

    Raises:
        ConfigError: that entry does not return a :class:`DcpSaver` (it writes single files).
    """
    if cfg.saver == "disk":
        return DcpSaver(where, cfg.async_save)
    saver = io_registry.get(cfg.saver, "checkpoint.saver")(str(where))
    if not isinstance(saver, DcpSaver):
        raise ConfigError(
            [
                Problem(
                    "checkpoint.saver",
                    f"writes single files ({type(saver).__name__}); checkpoint.format=dcp needs disk or a DcpSaver",
                    cfg.saver,
                )
            ],
            header="cannot build the run",
        )
    return saver


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``, allowed to name only DCP's metadata classes, torch sizes, dtypes,
    layouts and paths (DCP itself reads it with a plain ``pickle.load``, which runs any code)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        obj = (
            getattr(sys.modules.get(module), name, None)
            if module in ("torch", "torch.distributed.checkpoint.metadata")
            else None
        )
        torch_value = module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        if (module, name) in self.ALLOWED or torch_value or (module.endswith(".metadata") and isinstance(obj, type)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"its .metadata references {module}.{name}, not only DCP metadata; nothing from it was run"
        )


def check_metadata(path: Path) -> None:
    """Unpickle ``<path>/.metadata`` allowing only DCP's metadata classes (before DCP reads it
    with a plain ``pickle.load``).

    Raises:
        OSError: no readable file.
        pickle.UnpicklingError: it references anything else ("... nothing from it was run").
    """
    with _open(path, ".metadata") as f:
        _MetadataUnpickler(f).load()


def dcp_metadata(path: Path) -> Any:
    """DCP's ``Metadata`` of checkpoint directory ``path`` (keys, shapes, dtypes of every entry),
    its file checked by :func:`check_metadata` first.

    Raises:
        OSError, pickle.UnpicklingError, ValueError...: the directory has no readable or safe ``.metadata``.
    """
    check_metadata(path)
    return _reader(path).read_metadata()


def read_extra(path: Path) -> dict[str, Any]:
    """``extra.pt`` of a DCP checkpoint (plain containers; ``weights_only=True``)."""
    with _open(path, EXTRA_FILE) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def check_dcp(path: Path, expected: Mapping[str, torch.Tensor], required: tuple[str, ...]) -> dict[str, Any]:
    """Check a DCP checkpoint directory without reading its tensors.

    Args:
        path: the directory.
        expected: the model's ``state_dict()`` (global shapes, also for sharded tensors).
        required: entries the checkpoint must have.

    Returns:
        ``extra.pt``'s entries.

    Raises:
        ValueError: a one-line reason, read after the path: no readable ``.metadata`` (an
            interrupted write), no readable ``extra.pt``, a missing entry, or model keys or
            shapes that differ from ``expected``.
    """
    try:
        entries = dcp_metadata(path).state_dict_metadata
    except Exception as e:  # the write never finished, or the file is damaged
        raise ValueError(
            f"is not a complete distributed checkpoint (no readable .metadata: {type(e).__name__}: {e})"
        ) from None
    try:
        extra = read_extra(path)
    except Exception as e:
        raise ValueError(
            f"has no readable {EXTRA_FILE} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    present = set(extra) | {key.split(".", 1)[0] for key in entries}
    missing = [k for k in required if k not in present]
    if missing:
        raise ValueError(f"has no {', '.join(missing)} entry (has: {', '.join(sorted(present))})")
    shapes = {
        key[len("model.") :]: tuple(meta.size)
        for key, meta in entries.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    if set(shapes) != set(expected):
        extra_keys, absent = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
        raise ValueError(f"does not fit the model: unexpected keys {extra_keys[:5]}, missing keys {absent[:5]}")
    for key, tensor in expected.items():
        if shapes[key] != tuple(tensor.shape):
            raise ValueError(
                f"does not fit the model: '{key}' has shape {shapes[key]}, the model has {tuple(tensor.shape)}"
            )
    return extra


def read_dcp(path: Path, to_load: Mapping[str, Any]) -> dict[str, Any]:
    """Read a DCP checkpoint into states for ``to_load``'s objects (every rank, collectively).

    The model and optimizer entries are read into templates from their current
    ``state_dict()`` (DCP reshards into whatever this run's world size and strategy hold);
    the rest comes from ``extra.pt``.

    Returns:
        ``{name: state}`` for ``Checkpoint.load_objects(to_load, ...)``.
    """
    check_metadata(path)
    template = {k: to_load[k].state_dict() for k in SHARDED_KEYS if k in to_load}
    dcp.load(template, storage_reader=_reader(path), planner=SafeLoadPlanner())
    return {**read_extra(path), **template}


def dcp_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a DCP checkpoint, read in this process alone
    (no process group): ``igniter export`` and ``igniter eval``.

    Raises:
        ValueError: the checkpoint holds no model weights.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp_metadata(path).state_dict_metadata
    template = {
        key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in entries.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }  # fmt: skip
    if not template:
        raise ValueError("has no model weights")
    state = {"model": template}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=_reader(path), planner=SafeLoadPlanner(), no_dist=True)
    return state["model"]
