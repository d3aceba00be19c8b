"""The ``tensorboard`` logger of the io registry (TensorBoard's ``SummaryWriter``, batched).

A logger factory is called as ``factory(ctx)`` on rank 0 only, attaches itself to
``ctx.trainer``/``ctx.evaluator`` and returns an object with ``close()``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ignite.engine import Events
from ignite.handlers import global_step_from_engine

from igniter.events import PeriodicEvents
from igniter.registry import io_registry
from igniter.trackers.base import throughput_attributes

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = ["BatchedScalars", "tensorboard"]

logger = logging.getLogger("igniter")


class BatchedScalars:
    """A TensorBoard ``SummaryWriter`` whose ``add_scalar`` calls are handed to it in
    batches: each hand-off wakes TensorBoard's writer thread, which costs the training
    thread more than the scalar (~0.2 ms on a 2-core VM; TensorBoard's share of the
    digits run ~4% -> ~1%, ``bench/overhead.py --variants igniter igniter_no_tensorboard``).

    Scalars are kept, as Python numbers with their wall time, until ``max_events`` are
    pending, the oldest is ``max_delay_s`` seconds old (checked when a scalar is added),
    or :meth:`flush_pending` / ``flush`` / ``close`` is called. TensorBoard itself writes
    its file every 120 s (``flush_secs``), so this adds no visible delay; a process
    killed outright loses the kept scalars as it loses what TensorBoard has not written
    yet. A tensor value is read (``.item()``, a host sync on GPU) when it is added, as
    ``SummaryWriter`` does. Every other attribute is the wrapped writer's.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's).
        max_events: scalars kept before they are handed on.
        max_delay_s: age of the oldest kept scalar, seconds, at which all are handed on.
    """

    def __init__(self, writer: Any, max_events: int = 64, max_delay_s: float = 10.0) -> None:
        self.writer, self.max_events, self.max_delay_s = writer, max_events, max_delay_s
        self._pending: list[tuple[str, float, int | None, dict[str, Any]]] = []
        self._oldest = 0.0

    def add_scalar(
        self, tag: str, scalar_value: Any, global_step: int | None = None, walltime: float | None = None, **kwargs: Any
    ) -> None:
        """``SummaryWriter.add_scalar``, kept for later; ``walltime`` (s since the epoch) defaults to now."""
        value = scalar_value.item() if hasattr(scalar_value, "item") else float(scalar_value)
        now = time.monotonic()
        if not self._pending:
            self._oldest = now
        kwargs["walltime"] = time.time() if walltime is None else walltime
        self._pending.append((tag, value, global_step, kwargs))
        if len(self._pending) >= self.max_events or now - self._oldest >= self.max_delay_s:
            self.flush_pending()

    def flush_pending(self, *_: Any) -> None:
        """Hand every kept scalar to the writer (usable as an event handler)."""
        pending, self._pending = self._pending, []
        for tag, value, step, kwargs in pending:
            self.writer.add_scalar(tag, value, step, **kwargs)

    def flush(self) -> None:
        self.flush_pending()
        self.writer.flush()

    def close(self) -> None:
        self.flush_pending()
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


@io_registry("tensorboard")
def tensorboard(ctx: RunContext) -> Any:
    """TensorBoard events in ``<run dir>/tb`` through Ignite's ``TensorboardLogger``.

    Scalars: ``train/loss`` every ``logging.log_every`` iterations, ``train/lr``
    per iteration group, ``val/<metric>`` after every evaluation (step = trainer
    iteration), ``train/samples_per_s`` per epoch. Scalars reach TensorBoard's writer
    in batches (:class:`BatchedScalars`); an evaluation's are handed on at once.
    """
    from ignite.handlers.tensorboard_logger import TensorboardLogger

    # purge_step: a resumed run hides the steps the interrupted run logged after its checkpoint.
    tb = TensorboardLogger(log_dir=str(ctx.output_dir / "tb"), purge_step=ctx.trainer.state.iteration or None)
    tb.writer = BatchedScalars(tb.writer)
    every = PeriodicEvents.LOG  # every logging.log_every iterations
    tb.attach_output_handler(ctx.trainer, event_name=every, tag="train", output_transform=lambda out: out)
    tb.attach_opt_params_handler(ctx.trainer, event_name=every, optimizer=ctx.optimizer, param_name="lr")
    tb.attach_output_handler(
        ctx.trainer,
        event_name=Events.EPOCH_COMPLETED,
        tag="train",
        state_attributes=throughput_attributes(ctx),
        global_step_transform=global_step_from_engine(ctx.trainer, Events.ITERATION_COMPLETED),
    )
    if ctx.evaluator is not None:
        tb.attach_output_handler(
            ctx.evaluator,
            event_name=Events.COMPLETED,
            tag="val",
            metric_names="all",
            global_step_transform=global_step_from_engine(ctx.trainer, Events.ITERATION_COMPLETED),
        )
        ctx.evaluator.add_event_handler(Events.COMPLETED, tb.writer.flush_pending)
    return tb
