"""The checkpoint handlers of a run: when checkpoints are taken, through which saver, and what
they hold (Ignite ``Checkpoint``s over the io-registry saver ``checkpoint.saver``).

:func:`attach_checkpoints` wires them; :func:`save_now` takes one and waits for it (before a
requeue); :func:`flush_checkpoints` waits for those in flight.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, global_step_from_engine

from igniter.checkpoint.resume import TrainerState
from igniter.handlers import any_rank, epoch_end, nonfinite_loss
from igniter.parallel.strategy import unwrap_model
from igniter.supervision.progress import checkpoint_phase

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = ["attach_checkpoints", "flush_checkpoints", "save_now"]


class _Cadence:
    """When the run's last ``last_checkpoint_*`` was taken (monotonic seconds): shared by the
    event filters, so that "at most once every N seconds" counts every checkpoint, whichever
    event took it."""

    def __init__(self) -> None:
        self.time = time.monotonic()

    def started(self, engine: Engine) -> None:
        """At the start (or a resume): the clock starts."""
        self.time = time.monotonic()

    def elapsed(self, seconds: float) -> bool:
        """Whether ``seconds`` have passed since the last checkpoint, as rank 0's clock says (broadcast)."""
        due = time.monotonic() - self.time >= seconds
        if idist.get_world_size() > 1:
            due = bool(idist.broadcast(torch.tensor(int(due)), src=0).item())
        return due


def _guarded(save: Checkpoint, ctx: RunContext, cadence: _Cadence | None = None) -> Callable[[Engine], None]:
    """Call ``save`` unless the run has diverged or the current loss is not finite on
    any rank (the NaN guard may read the flag only every few steps): a NaN state
    never overwrites a good checkpoint. Every rank reaches the same decision."""

    trainer = ctx.trainer

    def handler(engine: Engine) -> None:
        if ctx.status.diverged is None and not any_rank(nonfinite_loss(trainer.state.output)):
            with checkpoint_phase(ctx.checkpoints.root):  # bytes written are progress for the watchdog
                save(engine)
            if cadence is not None:
                cadence.time = time.monotonic()

    return handler


def _every_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Event filter: every ``n`` iterations, except at the end of an epoch (:func:`igniter.handlers.epoch_end`)."""
    return lambda engine, iteration: iteration % n == 0 and not epoch_end(engine)


def _seconds_elapsed(seconds: float, cadence: _Cadence) -> Callable[[Engine, int], bool]:
    """Event filter (iterations): ``True`` when ``seconds`` have passed since the last checkpoint
    (checked every 10 iterations, not at an epoch's end; rank 0's clock decides, so every rank
    saves at the same iteration: taking a checkpoint is collective)."""
    return lambda engine, event: not (event % 10 or epoch_end(engine)) and cadence.elapsed(seconds)


def _epochs_bounded(every: int, min_seconds: float, cadence: _Cadence) -> Callable[[Engine, int], bool]:
    """Event filter (epochs): every ``every`` epochs, unless the last checkpoint is less than
    ``min_seconds`` old (rank 0's clock decides); always at the last epoch and when the run is
    stopping (early stopping's ``terminate()`` runs in the evaluation before this filter)."""

    def event_filter(engine: Engine, epoch: int) -> bool:
        if epoch == engine.state.max_epochs or engine.should_terminate:
            return True
        return epoch % every == 0 and (min_seconds <= 0 or cadence.elapsed(min_seconds))

    return event_filter


def flush_checkpoints(checkpointer: Checkpoint) -> None:
    """Wait until the checkpoints taken so far are on disk (savers that write in the
    background have ``flush()``, e.g. :class:`igniter.checkpoint.saver.AtomicDiskSaver`)."""
    flush = getattr(checkpointer.save_handler, "flush", None)
    if flush is not None:
        flush()


def save_now(checkpointer: Checkpoint) -> Callable[[Engine], None]:
    """A handler that takes a checkpoint and returns once it is on disk (before a requeue)."""

    def save(engine: Engine) -> None:
        checkpointer(engine)
        flush_checkpoints(checkpointer)

    return save


def attach_checkpoints(ctx: RunContext) -> dict[str, Any]:
    """Ignite ``Checkpoint``s through the io-registry saver ``checkpoint.saver`` into
    ``ctx.checkpoints`` (:class:`~igniter.checkpoint.location.CheckpointLocation`; contents:
    :mod:`igniter.checkpoint.resume`).

    Keeps the last ``checkpoint.n_saved`` (``last_checkpoint_<iteration>.pt``) and
    the ``checkpoint.n_best`` best by ``evaluation.monitor``
    (``best_model_<iteration>_<metric>=<value>.pt``). Every rank must call this
    (taking a checkpoint gathers every rank's RNG state); only rank 0 writes, except
    with ``checkpoint.format=dcp`` (``.dcp`` directories every rank writes its shards to,
    :mod:`igniter.checkpoint.dcp`).

    Returns:
        The objects a resume loads into (``Checkpoint.load_objects``), empty when
        checkpoints are disabled.
    """
    cfg = ctx.cfg.checkpoint
    if not cfg.enabled:
        return {}
    step = global_step_from_engine(ctx.trainer, Events.ITERATION_COMPLETED)
    location = ctx.checkpoints
    saver = location.kind.saver(cfg, location.root)
    # unwrapped: keys without DDP's "module." or torch.compile's "_orig_mod."
    model, optimizer = location.kind.states(unwrap_model(ctx.model), ctx.optimizer)
    names = location.kind.filenames
    to_save: dict[str, Any] = {"model": model, "optimizer": optimizer, "trainer": TrainerState(ctx.trainer)}
    if ctx.scheduler is not None:
        to_save["lr_scheduler"] = ctx.scheduler
    if ctx.scaler is not None and ctx.scaler.is_enabled():
        to_save["scaler"] = ctx.scaler
    monitor = ctx.cfg.evaluation.monitor
    if ctx.evaluator is not None and monitor and cfg.n_best > 0:
        sign = 1.0 if ctx.cfg.evaluation.mode == "max" else -1.0
        best = Checkpoint(
            {"model": model},
            saver,
            filename_prefix="best",
            n_saved=cfg.n_best,
            score_function=Checkpoint.get_default_score_fn(monitor, sign),
            score_name=monitor,
            global_step_transform=step,
            filename_pattern=names["best"],
        )
        ctx.evaluator.add_event_handler(Events.COMPLETED, _guarded(best, ctx))
        to_save["best_checkpointer"] = best
    last = Checkpoint(
        to_save,
        saver,
        filename_prefix="last",
        n_saved=cfg.n_saved,
        global_step_transform=step,
        include_self=True,
        filename_pattern=names["last"],
    )
    cadence = _Cadence()
    ctx.trainer.add_event_handler(Events.STARTED, cadence.started)
    event = Events.EPOCH_COMPLETED(event_filter=_epochs_bounded(cfg.every_epochs, cfg.min_interval_seconds, cadence))
    if cfg.every_iterations:
        event = event | Events.ITERATION_COMPLETED(event_filter=_every_iterations(cfg.every_iterations))
    if cfg.every_seconds:
        event = event | Events.ITERATION_COMPLETED(event_filter=_seconds_elapsed(cfg.every_seconds, cadence))
    ctx.trainer.add_event_handler(event, _guarded(last, ctx, cadence))
    return {**to_save, "checkpointer": last}
