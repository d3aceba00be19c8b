"""Checkpoint contents and resuming: the one place that knows how a run continues.

Which checkpoint a run continues from (:func:`select_checkpoint`, :func:`resume_run`),
how its ``metrics.json`` history continues (:func:`continue_record`) and what an
interrupted run tells the user to type (:func:`resume_hint`). Reading files safely is
:mod:`igniter.checkpoint.files`.

A ``last_checkpoint_<iteration>.pt`` holds (all plain tensors and containers, so
``torch.load(weights_only=True)`` reads it without running code from the file):

``model``, ``optimizer``, ``lr_scheduler``
    their ``state_dict()``s; the model's is the user's module's own, without DDP's
    ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefixes
    (:func:`igniter.parallel.strategy.unwrap_model`).
``trainer``
    epoch, iteration, epoch_length, max_epochs, the ``DeterministicEngine``
    seed, and the RNG states (python, torch, numpy) of *every* rank as JSON
    strings, gathered from all ranks when the checkpoint is taken.
``scaler``
    the ``torch.amp.GradScaler``'s ``state_dict()`` (loss scale and growth tracker),
    with ``trainer.precision=16-mixed`` only.
``checkpointer``, ``best_checkpointer``
    the ``Checkpoint`` handlers' own lists of saved files, so "keep the last N"
    keeps working across restarts.

The data order needs no extra state: :class:`~igniter.parallel.sampler.ShardedSampler`
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
import random
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from igniter.checkpoint.files import (
    CheckpointInvalid,
    checkpoint_files,
    checkpoint_iteration,
    is_checkpoint,
)
from igniter.checkpoint.formats import format_of
from igniter.checkpoint.location import checkpoint_path, resume_mode
from igniter.checkpoint.object_store import complete_checkpoints
from igniter.checkpoint.remote import DigestMismatch, discard_copy, fetch, is_url, open_store, resume_cache
from igniter.errors import ConfigError, Problem

if TYPE_CHECKING:
    from igniter.context import RunContext
    from igniter.record import MetricsRecord

__all__ = [
    "TrainerState",
    "select_checkpoint",
    "resume_run",
    "continue_record",
    "resume_hint",
]

logger = logging.getLogger("igniter")


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
                "world size changed: the checkpoint was written by %d processes, this run has %d; the global batches "
                "continue at the same sample, optimizer state and weights carry over (up to float summation order), "
                "per-process random streams (dropout, augmentation) restart from the trainer's seed",
                len(rng), idist.get_world_size(),
            )  # fmt: skip


def _check(path: Path, model: torch.nn.Module, required: tuple[str, ...], fmt: str) -> dict[str, Any]:
    """The checkpoint's format against ``checkpoint.format``, then the format's own check."""
    kind = format_of(path)
    if kind.name != fmt:
        raise CheckpointInvalid(
            f"was written with checkpoint.format={kind.name} and this run writes checkpoint.format={fmt}: "
            f"resume it with checkpoint.format={kind.name}"
            + (" (runner.strategy=fsdp needs dcp)" if fmt == "dcp" else "")
        )
    return kind.check(path, model, required)


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
    if resume != "auto":
        candidates = [resume]
    else:
        fs, root = open_store(url)
        candidates = [f"{url}/{name}" for name, _ in complete_checkpoints(fs, root)]
    problems = []
    for candidate in candidates:
        local = None
        try:
            if format_of(candidate).read_in_place:  # every rank reads its shards from the store: nothing to download
                return candidate, check(candidate)
            local = fetch(candidate, "resume", into=resume_cache(), reuse=False)  # kept for this host's other ranks
            return candidate, check(local)
        except (
            CheckpointInvalid,
            DigestMismatch,
        ) as e:  # a store that cannot be read is no reason to take an older one
            if local is not None:
                discard_copy(candidate, resume_cache())
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


def select_checkpoint(
    resume: Any, directory: Path | str, model: torch.nn.Module, required: tuple[str, ...], fmt: str = "torch"
) -> tuple[Path | str | None, dict | None]:
    """Pick the checkpoint to resume from (call on rank 0).

    ``auto``: the newest valid ``last_checkpoint_*.pt`` in ``directory`` (invalid
    newer ones are reported with their path and reason, and skipped); ``None``
    when there is none at all. A path: that file, which must be valid. A URL, or
    ``directory`` a URL: the same from object storage (the URL, a ``str``, is returned;
    :func:`select_from_store`).

    Raises:
        ConfigError: checkpoints exist but none is valid, or the given file is invalid.
    """
    mode = resume_mode(resume)
    if mode is None:
        return None, None
    if is_url(mode) or (mode == "auto" and is_url(directory)):
        return select_from_store(mode, str(directory), lambda local: _check(local, model, required, fmt))
    if mode != "auto":
        path = Path(mode)
        if not is_checkpoint(path):
            raise ConfigError(
                [Problem("resume", "no such checkpoint (a .pt file or a .dcp directory)", mode)], "cannot resume"
            )
        try:
            return path, _check(path, model, required, fmt)
        except CheckpointInvalid as e:
            raise ConfigError([Problem("resume", f"{path} {e}", mode)], "cannot resume") from None
    candidates = checkpoint_files(directory)
    problems = []
    for path in candidates:
        try:
            ckpt = _check(path, model, required, fmt)
        except CheckpointInvalid as e:
            logger.warning("skipping checkpoint %s: it %s", path, e)
            problems.append(Problem("resume", f"{path} {e}", "auto"))
            continue
        return path, ckpt
    if candidates:
        raise ConfigError(
            problems
            + [Problem("resume", f"no valid checkpoint in {directory}; use resume=false to start over", "auto")],
            "cannot resume",
        )
    return None, None


def resume_run(ctx: RunContext, to_load: dict[str, Any]) -> Path | str | None:
    """Load the checkpoint chosen by ``cfg.resume`` into ``to_load`` on every rank.

    Rank 0 chooses (newest valid file) and broadcasts its choice, or its error, so
    that no rank waits on a collective another rank never reaches.

    Args:
        ctx: the built run (model, trainer, output directory, rank).
        to_load: what :func:`igniter.handlers.attach_checkpoints` returned (empty: no
            checkpoints, nothing to resume).

    Returns:
        The checkpoint loaded, or ``None`` when the run starts from scratch.

    Raises:
        ConfigError: no valid checkpoint where one was expected, or the checkpoint was taken
            at a later epoch than ``trainer.max_epochs`` (exit status 2).
    """
    if not to_load:
        return None
    # The scaler is optional: a 32 or bf16-mixed checkpoint resumes under 16-mixed with a fresh scale.
    required = tuple(k for k in to_load if k not in ("checkpointer", "scaler")) + ("checkpointer",)
    directory, fmt = ctx.checkpoints.root, ctx.checkpoints.format
    choice, ckpt = "", None
    if ctx.rank == 0:
        try:
            path, ckpt = select_checkpoint(ctx.cfg.resume, directory, ctx.model, required, fmt)
            choice = str(path) if path else ""
        except ConfigError as e:
            choice = "ERROR:" + "\n".join(str(p) for p in e.problems)
    if ctx.world_size > 1:
        choice = idist.broadcast(choice, src=0, safe_mode=True)
    if choice.startswith("ERROR:"):
        lines = choice[len("ERROR:") :].split("\n")
        raise ConfigError([Problem("resume", line) for line in lines], "cannot resume")
    if not choice:
        return None
    kind = format_of(choice)
    remote = is_url(choice) and not kind.read_in_place  # one object, downloaded once per host
    if remote:
        _download_once_per_host(choice, ctx)
    try:  # ranks > 0 read what rank 0 chose (from a URL: this host's copy)
        local = fetch(choice, "resume", into=resume_cache()) if remote and ckpt is None else checkpoint_path(choice)
        ckpt = kind.read(local, to_load, ctx.model, required, ckpt)
    except CheckpointInvalid as e:
        raise ConfigError([Problem("resume", f"{choice} {e}")], "cannot resume") from None
    from ignite.handlers import Checkpoint

    Checkpoint.load_objects({k: v for k, v in to_load.items() if k in ckpt}, ckpt)
    if remote:  # every rank of this host has read the copy
        if ctx.world_size > 1:
            idist.barrier()
        if idist.get_local_rank() == 0:
            discard_copy(choice, resume_cache())
    epoch, max_epochs = ctx.trainer.state.epoch, ctx.cfg.trainer.max_epochs
    if max_epochs is not None and epoch > max_epochs:  # Ignite's engine.run would raise a ValueError
        why = f"{choice} was taken at epoch {epoch}: continue with trainer.max_epochs={epoch} or more, or start over with resume=false"
        raise ConfigError([Problem("trainer.max_epochs", why, max_epochs)], "cannot resume")
    logger.info(
        "resumed from %s (epoch %d, iteration %d)", choice, ctx.trainer.state.epoch, ctx.trainer.state.iteration
    )
    if "checkpointer" in to_load and not is_url(choice) and Path(choice).parent == directory:
        _forget_leftovers(to_load["checkpointer"], Path(directory), Path(choice))
    return choice if is_url(choice) else Path(choice)


def _download_once_per_host(url: str, ctx: RunContext) -> None:
    """Download checkpoint ``url`` once per host before the ranks read it: rank 0 did while
    choosing it; the first rank of each other host does now, the others wait for it (a
    multi-GB checkpoint fetched by every rank would multiply the traffic by the ranks per host)."""
    if ctx.world_size == 1:
        return
    error = None
    if idist.get_local_rank() == 0 and ctx.rank != 0:
        try:
            fetch(url, "resume", into=resume_cache(), reuse=False)
        except ConfigError as e:  # every rank still reaches the barrier: no rank waits forever
            error = e
    idist.barrier()
    if error is not None:
        raise error


def _forget_leftovers(checkpointer: Any, directory: Path, resumed: Path) -> None:
    """Hand the saver the checkpoints older than ``resumed`` that its checkpointer no longer
    lists: a kill between a new checkpoint's rename and the removal of the one it replaced
    left them (found by bench/soak.py). The saver removes them once the next checkpoint is
    complete, as any rotated-out file."""
    listed = {name for _, name in checkpointer.state_dict()["_saved"]}
    newest = checkpoint_iteration(resumed)
    for path in checkpoint_files(directory):
        if checkpoint_iteration(path) < newest and path.name not in listed:
            logger.info(
                "%s: a checkpoint rotated out before an earlier run was killed; it goes with the next save", path.name
            )
            checkpointer.save_handler.remove(path.name)


def continue_record(record: MetricsRecord, iteration: int) -> None:
    """Continue the ``metrics.json`` history of an interrupted run: keep the rows of the
    file already at ``record.path`` up to ``iteration`` (the checkpoint's) and count one
    more restart. Nothing happens when there is no such file."""
    if not record.path.is_file():
        return
    old = json.loads(record.path.read_text())
    record.data["train_loss_history"] = [p for p in old.get("train_loss_history", []) if p[0] <= iteration]
    for row in old.get("epochs", []):
        if row["iteration"] <= iteration:
            record.add_epoch(
                row["epoch"], row["iteration"], {k: v for k, v in row.items() if k not in ("epoch", "iteration")}
            )
    record.data["restarts"] = old.get("restarts", 0) + 1


def resume_hint(ctx: RunContext, job: dict[str, Any] | None) -> str:
    """Where an interrupted run stopped, its newest checkpoint, and the command that resumes it.

    Args:
        ctx: the run.
        job: Hydra's job info; its ``overrides`` are repeated in the command.
    """
    state = ctx.trainer.state
    directory = ctx.checkpoints.root
    if not ctx.cfg.checkpoint.enabled:
        newest: list[Any] = []
    elif is_url(directory):
        try:  # the store may be what interrupted the run: an unreadable listing must not end it with another error
            newest = [f"{directory}/{name}" for name, _ in complete_checkpoints(*open_store(str(directory)))[:1]]
        except ConfigError:
            newest = [f"in {directory} (the store could not be listed now)"]
    else:
        newest = checkpoint_files(Path(directory))[:1]
    overrides = [o for o in (job or {}).get("overrides", []) if not o.startswith("output_dir=")]
    where = f"interrupted at epoch {state.epoch}, iteration {state.iteration}"
    if not newest:
        return f"{where}; no checkpoint was written: a new run starts over"
    command = shlex.join(["igniter", *overrides, f"output_dir={ctx.output_dir}"])
    return f"{where}; newest checkpoint {newest[0]}; to resume from it: {command}"
