"""Checkpoint contents and resuming: the one place that knows how a run continues.

A ``last_checkpoint_<iteration>.pt`` holds (all plain tensors and containers, so
``torch.load(weights_only=True)`` reads it without running code from the file):

``model``, ``optimizer``, ``lr_scheduler``
    their ``state_dict()``s (DDP unwrapped by Ignite's ``Checkpoint``).
``trainer``
    epoch, iteration, epoch_length, max_epochs, the ``DeterministicEngine``
    seed, and the RNG states (python, torch, numpy) of *every* rank as JSON
    strings, gathered from all ranks when the checkpoint is taken.
``checkpointer``, ``best_checkpointer``
    the ``Checkpoint`` handlers' own lists of saved files, so "keep the last N"
    keeps working across restarts.

The data order needs no extra state: :class:`~igniter.distributed.ShardedSampler`
permutes with ``seed + epoch`` and Ignite's ``DeterministicEngine`` skips the
batches already consumed in the interrupted epoch (its ``ReproducibleBatchSampler``)
and restores the RNG states mid-epoch. Resumed runs are therefore bit-identical
to uninterrupted ones on CPU.
"""

from __future__ import annotations

import array
import base64
import json
import logging
import pickle
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from igniter.errors import ConfigError, Problem

__all__ = [
    "TrainerState",
    "CheckpointInvalid",
    "checkpoint_files",
    "check_checkpoint",
    "check_model_state",
    "load_checkpoint",
    "select_checkpoint",
    "resume_mode",
]

logger = logging.getLogger("igniter")

_STEP = re.compile(r"_(\d+)\.pt$")


def _b64(values: np.ndarray | array.array) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def _from_b64(text: str, dtype: type) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def _rng_json() -> str:
    """This process's python, torch and numpy RNG states as a JSON string (the state
    arrays base64-encoded: a JSON list of the ~6,300 numbers costs ten times more)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return json.dumps(
        {
            "python": [version, _b64(array.array("I", words)), gauss],  # array.array: 2x faster than np.array here
            "torch": _b64(torch.get_rng_state().numpy()),
            "numpy": [name, _b64(keys), int(pos), int(has_gauss), float(cached)],
        }
    )


def _rng_states(text: str) -> list[Any]:
    """JSON from :func:`_rng_json` -> ``[python, torch, numpy]`` states, the layout of
    Ignite's ``DeterministicEngine`` (``ignite.engine.deterministic._set_rng_states``)."""
    d = json.loads(text)
    version, words, gauss = d["python"]
    py = (version, tuple(int(w) for w in _from_b64(words, np.uint32)), gauss)
    tstate = torch.from_numpy(_from_b64(d["torch"], np.uint8))
    name, keys, pos, has_gauss, cached = d["numpy"]
    return [py, tstate, (name, _from_b64(keys, np.uint32), pos, has_gauss, cached)]


class TrainerState:
    """The trainer's entry in a checkpoint: Ignite's engine state without its
    numpy-bearing ``rng_states``, plus every rank's RNG states as JSON strings.

    ``state_dict()`` is collective (``all_gather``): every rank must call it, as
    every rank calls Ignite's ``Checkpoint``.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        # Engine's, not DeterministicEngine's: that one captures the RNG states a second
        # time (~0.1 ms per checkpoint). After a mid-epoch resume the state still holds
        # the restored (numpy) rng_states as a user key: left out, they are in "rng".
        state = {k: v for k, v in Engine.state_dict(self.engine).items() if k != "rng_states"}
        state["seed"] = int(getattr(self.engine.state, "seed", 0) or 0)
        ranks = idist.all_gather(_rng_json()) if idist.get_world_size() > 1 else [_rng_json()]
        state["rng"] = list(ranks)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = ("iteration", "epoch", "epoch_length", "max_epochs")
        loaded = {k: state[k] for k in keys if k in state and state[k] is not None}
        loaded.update({k: None for k in self.engine.state_dict_user_keys})  # set below
        self.engine.load_state_dict(loaded)
        self.engine.state.seed = state["seed"]
        rng = state["rng"]
        if len(rng) == idist.get_world_size():
            # DeterministicEngine restores these when resuming in the middle of an epoch.
            self.engine.state.rng_states = _rng_states(rng[idist.get_rank()])
        else:
            logger.warning(
                "checkpoint has RNG states of %d ranks, this run has %d: random streams restart", len(rng), idist.get_world_size()
            )


class CheckpointInvalid(Exception):
    """A checkpoint file cannot be used; the message says why."""


def checkpoint_files(directory: Path, prefix: str = "last_checkpoint") -> list[Path]:
    """``<prefix>_<iteration>.pt`` files in ``directory``, newest (highest iteration) first.

    Temporary files of interrupted writes (``.<name>.*.tmp``) never match.
    """
    files = [p for p in Path(directory).glob(f"{prefix}_*.pt") if _STEP.search(p.name)]
    return sorted(files, key=lambda p: int(_STEP.search(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


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
    detail = _printable(text.strip().split(". This is an internal miniz error", 1)[0].split("\n\n", 1)[0]) or "unexpected end of file"
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
    expected = getattr(model, "module", model).state_dict()
    if set(state) != set(expected):
        extra, absent = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CheckpointInvalid(f"does not fit the model: unexpected keys {extra[:5]}, missing keys {absent[:5]}")
    for k, v in expected.items():
        if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape:
            shape = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise CheckpointInvalid(f"does not fit the model: '{k}' has shape {shape}, the model has {tuple(v.shape)}")


def check_checkpoint(path: Path, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any]:
    """Load ``path`` safely (:func:`load_checkpoint`) and check it fits ``model``.

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


def resume_mode(value: Any) -> str | None:
    """Normalize ``cfg.resume``: ``"auto"``, a path, or ``None`` (off: ``false``/``null``/``none``)."""
    if value is None or value is False or str(value).lower() in ("false", "none", "null", "no", "off", ""):
        return None
    return str(value)


def select_checkpoint(resume: Any, directory: Path, model: torch.nn.Module, required: tuple[str, ...]) -> tuple[Path | None, dict | None]:
    """Pick the checkpoint to resume from (call on rank 0).

    ``auto``: the newest valid ``last_checkpoint_*.pt`` in ``directory`` (invalid
    newer ones are reported with their path and reason, and skipped); ``None``
    when there is none at all. A path: that file, which must be valid.

    Raises:
        ConfigError: checkpoints exist but none is valid, or the given file is invalid.
    """
    mode = resume_mode(resume)
    if mode is None:
        return None, None
    if mode != "auto":
        path = Path(mode)
        if not path.is_file():
            raise ConfigError([Problem("resume", "checkpoint file does not exist", mode)], "cannot resume")
        try:
            return path, check_checkpoint(path, model, required)
        except CheckpointInvalid as e:
            raise ConfigError([Problem("resume", f"{path} {e}", mode)], "cannot resume") from None
    candidates = checkpoint_files(directory)
    problems = []
    for path in candidates:
        try:
            ckpt = check_checkpoint(path, model, required)
        except CheckpointInvalid as e:
            logger.warning("skipping checkpoint %s: it %s", path, e)
            problems.append(Problem("resume", f"{path} {e}", "auto"))
            continue
        return path, ckpt
    if candidates:
        raise ConfigError(problems + [Problem("resume", f"no valid checkpoint in {directory}; use resume=false to start over", "auto")], "cannot resume")
    return None, None
