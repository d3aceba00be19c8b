"""Event handlers: the event-handler registry's built-ins and the standard run handlers.

A registered event handler is a factory ``factory(**params) -> handler`` that
may also ask for ``ctx`` (the :class:`igniter.context.RunContext`: model,
optimizer, engines, output dir, rank...). The returned ``handler(engine)`` is
attached to the event named in ``handlers[i].event``. Example config::

    handlers:
      - name: log_state
        event: "ITERATION_COMPLETED(every=100) | EPOCH_COMPLETED(once=2)"

The standard handlers every run gets (progress, throughput, NaN guard) are wired by the
``attach_*`` functions below; checkpoints by :mod:`igniter.checkpoint.attach`. All are Ignite handlers.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, TerminateOnNan

from igniter.compile import compile_options, compile_time_s
from igniter.events import CHECK_LOSS_EVERY, PeriodicEvents
from igniter.flops import achieved_tflops, mfu, run_peak
from igniter.record import MetricsRecord, loss_of, scalar  # MetricsRecord, loss_of: importable from here too
from igniter.registry import event_handler_registry
from igniter.telemetry import peak_memory_bytes
from igniter.timing import data_wait_fraction
from igniter.token_shards import tokens_per_sample

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = [
    "log_state",
    "terminate_on_nan",
    "early_stopping",
    "MetricsRecord",
    "attach_progress",
    "attach_throughput",
    "attach_nan_guard",
    "loss_of",
    "any_rank",
    "epoch_end",
    "nonfinite_loss",
]

logger = logging.getLogger("igniter")


def _fmt(values: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


@event_handler_registry("log_state")
def log_state(message: str = "") -> Callable[[Engine], None]:
    """Log ``message``, the epoch, iteration, the step output and metrics of the engine (INFO)."""

    def handler(engine: Engine) -> None:
        out = engine.state.output
        parts = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        if isinstance(out, dict):
            parts.update({k: scalar(v) for k, v in out.items()})
        parts.update({k: scalar(v) for k, v in engine.state.metrics.items()})
        logger.info("%s%s", f"{message} " if message else "", _fmt(parts))

    return handler


@event_handler_registry("terminate_on_nan")
def terminate_on_nan() -> Callable[[Engine], None]:
    """Stop training when the step output holds NaN or infinity (``ignite.handlers.TerminateOnNan``)."""
    return TerminateOnNan()


@event_handler_registry("early_stopping")
def early_stopping(ctx: RunContext, patience: int, min_delta: float = 0.0) -> Callable[[Engine], None]:
    """Stop the trainer after ``patience`` evaluations without improving ``evaluation.monitor``
    (``ignite.handlers.EarlyStopping``). Attach it to the evaluator's ``COMPLETED``."""
    sign = 1.0 if ctx.cfg.evaluation.mode == "max" else -1.0
    metric = ctx.cfg.evaluation.monitor
    return EarlyStopping(patience, lambda e: sign * float(e.state.metrics[metric]), ctx.trainer, min_delta=min_delta)


def _throttled(seconds: float) -> Callable[[Engine, int], bool]:
    """Event filter: at most once per ``seconds``."""
    last = {"t": 0.0}

    def event_filter(engine: Engine, iteration: int) -> bool:
        now = time.monotonic()
        if now - last["t"] >= seconds:
            last["t"] = now
            return True
        return False

    return event_filter


def epoch_end(engine: Engine) -> bool:
    """Whether the iteration just completed ends an epoch. Iteration-based checkpoints
    (:mod:`igniter.checkpoint.attach`) skip it: the epoch's checkpoint comes at EPOCH_COMPLETED, after its validation. Taken here, before
    the validation, a kill in between resumed at the next epoch without that epoch's row in
    metrics.json (and without its best-checkpoint and early-stopping decisions)."""
    length = engine.state.epoch_length
    return bool(length) and engine.state.iteration % length == 0


def attach_progress(ctx: RunContext) -> None:
    """Rank 0 progress: Ignite's tqdm ``ProgressBar`` on a terminal, else a log line
    every ``logging.log_every`` iterations and at the last iteration of every epoch (as
    under SLURM, where stdout is a file).

    The bar is Ignite's default, one bar for the current epoch that is cleared at the
    epoch's end (the epoch's validation line stays), redrawn at most 4 times a second
    (each redraw costs more than a small model's step: ``bench/overhead.py``).

    Lines printed while it is drawn (the validation line: its handler runs before the bar's
    close) go through ``tqdm.write`` (:mod:`igniter.console`), above the bar. A run stopped
    early (NaN guard, early stopping, preemption) never ends its epoch: the bar is closed
    at ``TERMINATE`` too, before the final validation and summary lines.
    """
    trainer, cfg = ctx.trainer, ctx.cfg
    show_bar = cfg.logging.progress_bar
    if show_bar is None:
        show_bar = sys.stdout.isatty()
    if show_bar:
        bar = ProgressBar(persist=False)
        bar.attach(
            trainer,
            output_transform=lambda out: {"loss": out["loss"]} if isinstance(out, dict) else out,
            event_name=Events.ITERATION_COMPLETED(event_filter=_throttled(0.25)),
        )
        trainer.add_event_handler(Events.TERMINATE, bar._close)  # Ignite's own close; a no-op once closed
        return

    log_every = cfg.logging.log_every

    def _unlogged_epoch_end(engine: Engine, iteration: int) -> bool:  # LOG did not fire on it
        return epoch_end(engine) and iteration % log_every != 0

    # every epoch's last iteration too: at log_every 50 and 44 iterations per epoch, some epochs had no line
    @trainer.on(PeriodicEvents.LOG)
    @trainer.on(Events.ITERATION_COMPLETED(event_filter=_unlogged_epoch_end))
    def _log_line(engine: Engine) -> None:
        out = engine.state.output
        loss = scalar(loss_of(out))
        length = engine.state.epoch_length or 0
        in_epoch = (engine.state.iteration - 1) % length + 1 if length else engine.state.iteration
        logger.info(
            "epoch %d/%d iteration %d/%d loss %s",
            engine.state.epoch,
            engine.state.max_epochs,
            in_epoch,
            length,
            f"{loss:.4f}" if isinstance(loss, (float, int)) else "-",
        )


def attach_throughput(ctx: RunContext) -> None:
    """Set at every epoch end, for that epoch: ``ctx.status.samples_per_s`` (global samples / epoch
    time, s), ``tokens_per_s`` for token datasets (:func:`igniter.token_shards.tokens_per_sample`),
    ``model_tflops_per_s`` and ``mfu`` (:mod:`igniter.flops`), this rank's ``data_wait_fraction``
    (:func:`igniter.timing.data_wait_fraction`) and ``peak_memory_bytes`` so far
    (:func:`igniter.telemetry.peak_memory_bytes`); accumulate ``train_time_s`` (s) / ``samples`` over
    the run (:class:`~igniter.context.RunStatus`). This process's first step is left out of
    these figures (its seconds and samples; :attr:`igniter.timing.StepTimer.first_step_s`), unless
    it is its epoch's only step: it is the step the FLOPs are counted in and pays one-time costs,
    which would understate the rate of a short run. With ``trainer.compile``, the seconds
    ``torch.compile`` spends in an epoch go to ``compile_s`` instead of ``train_time_s``."""
    trainer, status, global_batch_size = ctx.trainer, ctx.status, ctx.cfg.data.loader.batch_size
    timer = ctx.step_timer
    per_sample = tokens_per_sample(ctx.train_set)
    compiling = compile_options(ctx.cfg.trainer.compile) is not None
    peak = run_peak(str(ctx.cfg.trainer.precision), ctx.device, ctx.cfg.logging.peak_tflops)
    epoch_start = {"t": 0.0, "it": 0, "compile": 0.0, "data_s": 0.0, "step_s": 0.0}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Engine) -> None:
        epoch_start["compile"] = (compile_time_s() or 0.0) if compiling else 0.0
        epoch_start["t"], epoch_start["it"] = time.perf_counter(), engine.state.iteration
        epoch_start["data_s"], epoch_start["step_s"] = timer.data_s, timer.step_s

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end(engine: Engine) -> None:
        seconds = time.perf_counter() - epoch_start["t"]
        steps = engine.state.iteration - epoch_start["it"]
        compile_s = 0.0
        if compiling:
            compile_s = max(0.0, (compile_time_s() or 0.0) - epoch_start["compile"])
            status.compile_s += compile_s
            seconds -= compile_s
        # no step timed before this epoch: the process's first step is in it
        if timer.first_step_s is not None and epoch_start["step_s"] == 0.0 and steps > 1:
            # the first step's compile seconds are out already (an under-count when it recompiles later)
            first_s = max(0.0, timer.first_step_s - compile_s)
            status.first_step_s = first_s
            seconds, steps = max(0.0, seconds - first_s), steps - 1
        samples = steps * global_batch_size
        status.train_time_s += seconds
        status.samples += samples
        status.samples_per_s = samples / seconds if seconds > 0 else math.nan
        if per_sample:
            status.tokens_per_s = status.samples_per_s * per_sample
        flops = timer.model_flops
        tflops = achieved_tflops(flops * ctx.world_size, steps, seconds) if flops else None
        status.model_tflops_per_s = tflops if tflops is not None else math.nan
        status.mfu = mfu(tflops, peak.tflops, ctx.world_size) if tflops and peak.tflops else math.nan
        wait = data_wait_fraction(timer.data_s - epoch_start["data_s"], timer.step_s - epoch_start["step_s"])
        status.data_wait_fraction = wait if wait is not None else math.nan
        status.peak_memory_bytes = float(peak_memory_bytes(ctx.device))


def any_rank(flag: bool | torch.Tensor) -> bool:
    """``flag`` on any rank (an ``all_reduce``: every rank must call it at the same point)."""
    if idist.get_world_size() == 1:
        return bool(flag)
    value = flag.to(torch.int64) if isinstance(flag, torch.Tensor) else torch.tensor(int(flag))
    return bool(idist.all_reduce(value.to(idist.device()), op="MAX"))


def nonfinite_loss(output: Any) -> torch.Tensor | bool:
    """Whether the step's loss is NaN/inf: a bool, or a 0-d bool tensor on the loss's GPU (no sync)."""
    loss = loss_of(output)
    if isinstance(loss, torch.Tensor):
        return ~torch.isfinite(loss.detach()).all() if loss.is_cuda else not math.isfinite(float(loss))
    return loss is not None and not math.isfinite(float(loss))


def attach_nan_guard(ctx: RunContext) -> None:
    """Stop training when the loss is NaN or infinite, as Ignite's ``TerminateOnNan``
    does, at a fraction of its cost: it reads the loss only, and only on
    ``PeriodicEvents.CHECK_LOSS`` (every ``CHECK_LOSS_EVERY`` = 10 iterations: one host
    sync, and with several processes one ``all_reduce`` so that every rank stops at the
    same iteration; nothing on the other iterations). A non-finite loss makes the weights
    non-finite from that step on, so the next check sees it: the run stops at most 9
    iterations late; checkpoints check the current loss themselves and are skipped when
    it is not finite. Records ``ctx.status.diverged = (iteration, loss)``; the run exits 3.
    """
    status = ctx.status

    @ctx.trainer.on(PeriodicEvents.CHECK_LOSS)
    def _check(engine: Engine) -> None:
        if status.diverged is None and any_rank(nonfinite_loss(engine.state.output)):
            loss = scalar(loss_of(engine.state.output))
            status.diverged = (engine.state.iteration, loss)
            logger.error(
                "loss is %s at iteration %d (checked every %d iterations): stopping",
                loss,
                engine.state.iteration,
                CHECK_LOSS_EVERY,
            )
            engine.terminate()
