"""Checkpoint files on disk: find them, read them safely, check they fit a model.

Reading never runs code from a file (``torch.load(weights_only=True)``) and a file
that cannot be used raises :class:`CheckpointInvalid` with a one-line reason that
reads after the file's path. What a checkpoint holds and how a run continues from
one is :mod:`igniter.checkpoint.resume` (which re-exports these names).
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from igniter.checkpoint.remote import is_url
from igniter.parallel.strategy import unwrap_model

__all__ = [
    "CheckpointInvalid",
    "checkpoint_files",
    "checkpoint_iteration",
    "is_checkpoint",
    "is_dcp",
    "load_checkpoint",
    "check_model_state",
    "check_checkpoint",
]

_STEP = re.compile(
    r"_(\d+)\.(pt|dcp)$"
)  # the iteration in last_checkpoint_<iteration>.pt (a file) or .dcp (a directory)


class CheckpointInvalid(Exception):
    """A checkpoint file cannot be used; the message says why."""


def checkpoint_files(directory: Path, prefix: str = "last_checkpoint") -> list[Path]:
    """``<prefix>_<iteration>.pt`` files and ``.dcp`` directories (``checkpoint.format=dcp``)
    in ``directory``, newest (highest iteration) first.

    Temporary files and directories of interrupted writes (``.<name>...tmp``) never match.
    """
    files = [p for p in Path(directory).glob(f"{prefix}_*") if _STEP.search(p.name)]
    return sorted(files, key=lambda p: int(_STEP.search(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def is_dcp(path: Path | str) -> bool:
    """Whether checkpoint ``path`` is in the ``dcp`` format: a local directory, or a URL whose
    name ends in ``.dcp`` (a prefix of objects in a store)."""
    if is_url(path):
        return str(path).rstrip("/").endswith(".dcp")
    return Path(path).is_dir()


def is_checkpoint(path: Path | str) -> bool:
    """Whether local ``path`` is a checkpoint to resume from: a file, or a ``.dcp`` directory."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and path.suffix == ".dcp")


def checkpoint_iteration(path: Path) -> int:
    """The iteration in a checkpoint's name (``last_checkpoint_<iteration>.pt`` or ``.dcp``).

    Raises:
        ValueError: ``path``'s name holds none.
    """
    match = _STEP.search(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint name (<prefix>_<iteration>.pt or .dcp)")
    return int(match.group(1))


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_GLOBAL_REFUSED = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def _printable(text: str, limit: int = 200) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names_an_object(path: str) -> bool:
    """Whether a global the safe unpickler refused names a Python object, rather than
    being bytes of a damaged file: a dotted identifier, and in the modules torch's own
    pickles reference (``torch``, ``collections``) a name that exists."""
    parts = path.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    if parts[0] not in ("torch", "collections"):
        return True
    obj: Any = sys.modules.get(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part, None)
    return obj is not None


def _load_error(error: Exception, zipped: bool) -> CheckpointInvalid:
    """What ``torch.load(weights_only=True)`` raising ``error`` says about the file.

    Only a refused *global* (a class or function the pickle references by a valid
    dotted name: ``__main__.Thing``, ``posix.system``) means the file holds real
    pickled objects; everything else (random bytes, truncation, a text file) means it
    is not a checkpoint. torch's own message is never passed on: it advises re-running
    with ``weights_only=False``, which would run code from the file.
    """
    text = str(error)
    refused = _GLOBAL_REFUSED.search(text)
    if refused and _names_an_object(refused.group(1)):
        return CheckpointInvalid(
            f"contains pickled Python objects, not only tensors and plain containers (it references "
            f"{refused.group(1)}); torch.load(weights_only=True) refused it and nothing from it was run"
        )
    if isinstance(error, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        # torch's advice, then the unpickler's own message: keep the message alone
        text = text.split("\n\nCheck the documentation of torch.load", 1)[0]
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1]
        elif "\n\n" in text:
            text = text.rsplit("\n\n", 1)[1]
        else:  # "Weights only load failed. <message>\n <advice>"
            text = text[len("Weights only load failed.") :].strip().split("\n", 1)[0]
            if "must be imported to load" in text:  # torch objects (DTensor, NJT) whose module must be imported first
                return CheckpointInvalid(
                    f"contains pickled objects that are not plain tensors ({_printable(text)}); "
                    "torch.load(weights_only=True) refused it and nothing from it was run"
                )
    detail = (
        _printable(text.strip().split(". This is an internal miniz error", 1)[0].split("\n\n", 1)[0])
        or "unexpected end of file"
    )
    if "weights_only" in detail:  # never pass on torch's advice to load unsafely
        detail = "refused by the safe loader"
    if not isinstance(error, (pickle.UnpicklingError, RuntimeError, OSError)):
        detail = f"{type(error).__name__}: {detail}"
    what = f"damaged or truncated zip archive ({detail})" if zipped else f"unpickling failed ({detail})"
    return CheckpointInvalid(f"is not a PyTorch checkpoint (cannot be read as one: {what})")


def load_checkpoint(path: Path) -> Any:
    """Read ``path`` with ``torch.load(map_location="cpu", weights_only=True)``: tensors and
    plain containers only, no code from the file is run. torch's warnings about the
    file (e.g. an unusual pickle protocol in random bytes) are not shown.

    Returns:
        What the file holds (for igniter's checkpoints a dict of states).

    Raises:
        CheckpointInvalid: with a one-line reason, to be shown after the file's path:
            the file cannot be opened; it is empty, truncated, damaged or not a
            PyTorch checkpoint at all ("is not a PyTorch checkpoint (cannot be read as
            one: ...)"); or it holds pickled Python objects that ``weights_only``
            refuses ("contains pickled Python objects ..."). The message never
            suggests ``weights_only=False``.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as e:
        raise CheckpointInvalid(f"cannot be opened: {e.strerror or e}") from None
    if not head:
        raise CheckpointInvalid("is not a PyTorch checkpoint (cannot be read as one: the file is empty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _load_error(e, head == _ZIP_MAGIC) from None


def check_model_state(state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Check that a model state dict (``ckpt["model"]``) has ``model``'s keys and shapes.

    Raises:
        CheckpointInvalid: ``state`` is not a mapping, a key is missing or extra, or a
            tensor's shape differs.
    """
    if not isinstance(state, Mapping):
        raise CheckpointInvalid(f"has model weights of type {type(state).__name__}, not a state dict")
    expected = unwrap_model(model).state_dict()
    if set(state) != set(expected):
        extra, absent = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CheckpointInvalid(f"does not fit the model: unexpected keys {extra[:5]}, missing keys {absent[:5]}")
    for k, v in expected.items():
        if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape:
            shape = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise CheckpointInvalid(f"does not fit the model: '{k}' has shape {shape}, the model has {tuple(v.shape)}")


def check_checkpoint(path: Path, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any]:
    """Load the ``.pt`` file ``path`` safely (:func:`load_checkpoint`) and check it fits ``model``.

    Returns:
        The loaded checkpoint (a dict of plain containers and tensors).

    Raises:
        CheckpointInvalid: the file cannot be read as a checkpoint or holds pickled
            objects (see :func:`load_checkpoint`; nothing from it is executed), it is
            not a dict, an entry of ``required`` is missing, or the model keys/shapes
            differ from ``model``'s.
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointInvalid(f"holds a {type(ckpt).__name__}, not a dict of states")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointInvalid(f"has no {', '.join(missing)} entry (has: {', '.join(map(str, ckpt))})")
    check_model_state(ckpt["model"], model)
    return ckpt
