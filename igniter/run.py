"""One process's share of a run, in phases: build, wire, resume, run, record.

:func:`train` is what a runner executes in every process. The process group, if
any, already exists (the runner made it), so ``idist`` reports this process's rank
and world size. Each phase lives in its own module: building in
:mod:`igniter.assemble`, the handlers in :mod:`igniter.handlers`, resuming in
:mod:`igniter.checkpoint.resume`, the record in :mod:`igniter.record`; this module wires them
in order.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from omegaconf import DictConfig

from igniter.assemble import build_training
from igniter.build import call_with
from igniter.checkpoint.attach import attach_checkpoints, flush_checkpoints, save_now
from igniter.checkpoint.resume import continue_record, resume_hint, resume_run
from igniter.console import close_bars, setup_logging
from igniter.context import RunContext
from igniter.errors import Interrupted, TrainingDiverged
from igniter.events import PeriodicEvents, fire_periodic_events, parse_event
from igniter.handlers import attach_nan_guard, attach_progress, attach_throughput
from igniter.launch.runners import make_runner
from igniter.launch.signals import interrupt_once
from igniter.loading import worker_died
from igniter.parallel.strategy import evaluation_scope
from igniter.preflight import StepFailed
from igniter.profiling import attach_torch_profiler
from igniter.record import MetricsRecord, run_summary, train_loss
from igniter.registry import event_handler_registry, io_registry
from igniter.summary import (
    attach_handler_profiler,
    draw_curves,
    handler_profile,
    record_first_iteration,
    summary_table,
    time_split,
)
from igniter.supervision.progress import attach_reports, checkpoint_phase
from igniter.supervision.stragglers import StragglerLog, attach_step_split
from igniter.telemetry import gpu_telemetry

__all__ = ["RunContext", "train", "setup_logging", "TrainingDiverged", "Interrupted"]

logger = logging.getLogger("igniter")
# Ignite warns that a sampler with an epoch cannot be reproduced when trainer.epoch_length differs
# from the loader's length; igniter sets the sampler's pass itself (_wire's _set_epoch), so it is.
warnings.filterwarnings("ignore", message="When defined engine's epoch length is different", category=UserWarning)


def train(cfg: DictConfig, output_dir: str | Path, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate in this process; rank 0 writes ``metrics.json``, prints the
    summary table and draws ``curves.png``.

    Args:
        cfg: the resolved config.
        output_dir: the run directory (rank 0's is used by every rank).
        job: Hydra's job id/number/overrides, copied into ``metrics.json``.

    Returns:
        The ``metrics.json`` content (rank 0) or the run's summary (other ranks).

    Raises:
        ConfigError: a component cannot be built or no valid checkpoint to resume (exit 2).
        TrainingDiverged: the loss became NaN/inf (exit 3).
        Interrupted: Ctrl-C (exit 130), after the summary.
        SampleFailed: a sample raised while loading (exit 2, :mod:`igniter.loading`).
        LoaderWorkerDied: a DataLoader worker process died, e.g. out of memory (exit 1).
        Exception: whatever stopped the run early (``ctx.status.stopped_by``, e.g. a SLURM preemption).
    """
    with interrupt_once():
        try:
            return _train(cfg, output_dir, job)
        except Exception as e:  # a DataLoader worker died: torch's SIGCHLD handler raises wherever the run is
            died = worker_died(e, cfg.data.loader.num_workers)
            if died is None:
                raise
            logger.error("a DataLoader worker process died:", exc_info=e, extra={"console": False})
            raise died from None


def _train(cfg: DictConfig, output_dir: str | Path, job: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`train`'s phases in order: build, wire, resume, run, record."""
    if idist.get_world_size() > 1:  # every process writes under rank 0's run directory
        output_dir = idist.broadcast(str(output_dir), src=0, safe_mode=True)
    output_dir = Path(output_dir)
    rank = idist.get_rank()
    setup_logging(output_dir, rank, cfg.logging.level)
    start = time.perf_counter()
    # build
    ctx = build_training(cfg, output_dir)
    profiler = attach_handler_profiler(ctx.trainer) if cfg.logging.profile else None
    if rank == 0:
        logger.info(
            "run dir %s | world size %d, backend %s, device %s | global batch %d, per-process batch %d",
            output_dir,
            ctx.world_size,
            idist.backend() or "none",
            ctx.device,
            cfg.data.loader.batch_size,
            ctx.per_process_batch_size,
        )
    record = MetricsRecord.for_run(ctx, job, idist.backend()) if rank == 0 else None
    # wire
    to_load = _wire(ctx, record)
    _attach_user_handlers(ctx)
    # resume
    if resume_run(ctx, to_load) is not None and record is not None:
        continue_record(record, ctx.trainer.state.iteration)
    checkpointer = to_load.get("checkpointer")
    make_runner(cfg.runner).attach(ctx.trainer, save_now(checkpointer) if checkpointer is not None else None)
    loggers, telemetry, stragglers = _observe(ctx, record)
    # run
    interrupted = False
    try:
        try:
            _run_engine(ctx)
        except StepFailed as e:  # one paragraph on the console (by the CLI), the traceback in rank{N}.log only
            logger.error("the first step failed:", exc_info=e.__cause__, extra={"console": False})
            raise
        except KeyboardInterrupt:  # Ctrl-C: keep what is on disk, write the summary, then exit 130
            interrupted = True
        finally:
            close_bars()
            if checkpointer is not None:
                with checkpoint_phase(ctx.checkpoints.root):
                    flush_checkpoints(checkpointer)
        # record
        summary = _record(ctx, record, interrupted, time.perf_counter() - start, profiler, telemetry, stragglers)
    finally:  # after the record (a tracker's close() uploads the final metrics.json and curves.png), also
        for lg in loggers:  # when the run failed (e.g. CheckpointWriteFailed of the last write)
            lg.close()
    return _finish(ctx, record, summary, interrupted, job)


def _wire(ctx: RunContext, record: MetricsRecord | None) -> dict[str, Any]:
    """Attach the standard handlers. Order matters: sampler epoch, scheduler,
    throughput, evaluation, then checkpoints and loggers that read their results."""
    cfg, trainer, evaluator = ctx.cfg, ctx.trainer, ctx.evaluator
    attach_reports(trainer, evaluator)  # first: a user handler that blocks then shows as the rank behind
    attach_step_split(ctx)  # the time of the handlers attached after it counts as this rank's computing
    samplers = [ctx.train_loader.sampler]
    batches_per_pass = len(ctx.train_loader)

    # The sampler's epoch is the pass over the data, iteration // batches per pass: the trainer's
    # epoch only when trainer.epoch_length is the loader's length. Ignite makes a new data iterator
    # at the first epoch after a resume (skipping the batches already trained on) and when one
    # is exhausted (DATALOADER_STOP_ITERATION): both see the pass an uninterrupted run is in.
    @trainer.on(Events.EPOCH_STARTED | Events.DATALOADER_STOP_ITERATION)
    def _set_epoch(engine: Engine) -> None:
        for s in samplers:
            if hasattr(s, "set_epoch"):
                s.set_epoch(engine.state.iteration // batches_per_pass)

    if ctx.scheduler is not None:
        event = Events.ITERATION_COMPLETED if cfg.solver.scheduler.step_on == "iteration" else Events.EPOCH_COMPLETED
        trainer.add_event_handler(event, lambda _: ctx.scheduler.step())

    attach_nan_guard(ctx)
    fire_periodic_events(trainer, cfg.logging.log_every)
    attach_throughput(ctx)
    if evaluator is not None:
        last_eval = {"epoch": 0}

        def _evaluate(engine: Engine) -> None:
            if last_eval["epoch"] == engine.state.epoch:
                return
            last_eval["epoch"] = engine.state.epoch
            with evaluation_scope(ctx.model):  # a sharded model gathered one unit at a time
                evaluator.run(ctx.val_loader)
            metrics = {k: v for k, v in evaluator.state.metrics.items()}
            logger.info("epoch %d validation: %s", engine.state.epoch, _fmt_metrics(metrics))
            if record is not None:
                record.add_epoch(engine.state.epoch, engine.state.iteration, metrics)
                record.update(iterations=engine.state.iteration)
                record.write()

        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=cfg.evaluation.every), _evaluate)
        trainer.add_event_handler(Events.COMPLETED, _evaluate)
        if cfg.evaluation.patience is not None:
            factory = event_handler_registry.get("early_stopping")
            evaluator.add_event_handler(Events.COMPLETED, factory(ctx, patience=cfg.evaluation.patience))
    to_load = attach_checkpoints(ctx)
    if ctx.rank == 0:
        attach_progress(ctx)
    return to_load


def _attach_user_handlers(ctx: RunContext) -> None:
    for i, spec in enumerate(ctx.cfg.handlers):
        factory = event_handler_registry.get(spec.name, f"handlers[{i}].name")
        handler = call_with(factory, {"ctx": ctx}, dict(spec.params))
        if handler is None:  # the factory decided there is nothing to do (e.g. no GPU)
            continue
        engine = ctx.trainer if spec.engine == "trainer" else ctx.evaluator
        if engine is None:
            raise RuntimeError(f"handlers[{i}]: engine 'evaluator' needs data.val")
        engine.add_event_handler(parse_event(spec.event, ctx.custom_events), handler)


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.4f}" for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)))


def _observe(ctx: RunContext, record: MetricsRecord | None) -> tuple[list[Any], Any, StragglerLog | None]:
    """Loggers (rank 0), the training-loss history, slow ranks named (rank 0), GPU telemetry and
    ``logging.torch_profiler``.

    Returns ``(loggers and the torch profiler: what is closed when the run ends, telemetry or None,
    the straggler log or None)``.
    """
    cfg, trainer = ctx.cfg, ctx.trainer
    loggers, stragglers = [], None
    if ctx.rank == 0:
        loggers = [
            call_with(io_registry.get(n, f"logging.loggers[{i}]"), {"ctx": ctx})
            for i, n in enumerate(cfg.logging.loggers)
        ]
    if record is not None:
        record_first_iteration(ctx.step_timer, record)
        factor = cfg.runner.get("straggler_factor")
        if ctx.world_size > 1 and factor is not None:
            writer = next((lg.writer for lg in loggers if hasattr(lg, "writer")), None)
            stragglers = StragglerLog(factor, ctx.world_size, writer)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, stragglers.drain)

        @trainer.on(PeriodicEvents.LOG)
        def _loss_history(engine: Engine) -> None:
            loss = train_loss(engine.state.output)
            if loss is not None:
                record.add_train_loss(engine.state.iteration, loss)

    telemetry = None
    if cfg.logging.gpu_telemetry_every:
        telemetry = gpu_telemetry(ctx)
        if telemetry is not None:
            telemetry.writer = next((lg.writer for lg in loggers if hasattr(lg, "writer")), None)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.logging.gpu_telemetry_every), telemetry)
    if cfg.logging.torch_profiler is not None:  # off: no handler
        profiler = attach_torch_profiler(ctx)
        if profiler is not None:
            loggers.append(profiler)
    return loggers, telemetry, stragglers


def _run_engine(ctx: RunContext) -> None:
    """``trainer.run`` unless the resumed checkpoint is already the end of training
    (Ignite would start a finished engine over)."""
    cfg, trainer = ctx.cfg, ctx.trainer
    state = trainer.state  # a finished engine's state (Ignite's own test is private: Engine._is_done)
    done = bool(state.epoch_length and state.max_epochs) and state.iteration >= state.epoch_length * state.max_epochs
    if done and state.max_epochs >= cfg.trainer.max_epochs:
        logger.info("the checkpoint is the end of training (epoch %d): nothing left to run", trainer.state.epoch)
        return
    run_start = time.perf_counter()
    trainer.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs, epoch_length=cfg.trainer.epoch_length)
    ctx.status.run_time_s = time.perf_counter() - run_start


def _record(
    ctx: RunContext,
    record: MetricsRecord | None,
    interrupted: bool,
    wall_time_s: float,
    profiler: Any,
    telemetry: Any,
    stragglers: StragglerLog | None = None,
) -> dict[str, Any]:
    """The end-of-run summary; rank 0 writes it to ``metrics.json``, logs the table and draws
    ``curves.png``. ``wall_time_s``: seconds since the run started building."""
    summary = run_summary(ctx, interrupted, wall_time_s)
    if stragglers is not None:
        stragglers.drain()
        if stragglers.found:  # nothing in a healthy run
            summary["stragglers"] = stragglers.found
    if ctx.status.run_time_s:
        summary["time_split"] = time_split(ctx.step_timer, profiler, ctx.status.run_time_s)
        if profiler is not None and ctx.rank == 0:
            logger.info("time per handler (logging.profile=true):%s", handler_profile(profiler))
    if telemetry is not None and ctx.rank == 0:
        summary["gpu"] = telemetry.summary()
    if record is not None:
        record.update(**summary)
        record.write()
        logger.info("summary:\n%s", summary_table(record.data))
        if draw_curves(record.data, ctx.output_dir / "curves.png"):
            logger.info("learning curves: %s", ctx.output_dir / "curves.png")
    return summary


def _finish(
    ctx: RunContext,
    record: MetricsRecord | None,
    summary: dict[str, Any],
    interrupted: bool,
    job: dict[str, Any] | None,
) -> dict[str, Any]:
    """Return the run's result, or raise what ended it (see :func:`train`)."""
    state, status = ctx.trainer.state, ctx.status
    if interrupted:  # no collective from here: a peer may have left already
        hint = resume_hint(ctx, job)
        if ctx.rank == 0:
            logger.warning("%s", hint)
        raise Interrupted(hint)
    if ctx.world_size > 1:
        # No rank leaves before rank 0 has written the summary and every rank is done with its
        # collectives: a rank leaving early was seen to abort a peer's gloo thread at exit, and
        # under torchrun a rank exiting non-zero (divergence, preemption) makes the agent kill
        # the others, rank 0 in the middle of its summary. Safe when the run stopped early:
        # the NaN guard and the preemption handler decide on every rank at the same iteration.
        idist.barrier()
    if status.stopped_by is not None:
        raise status.stopped_by
    if status.diverged:
        iteration, loss = status.diverged
        raise TrainingDiverged(
            f"the loss is {loss} at iteration {iteration} (epoch {state.epoch}): training stopped; "
            "checkpoints stopped there, so the newest one on disk holds the last finite state"
        )
    return record.data if record is not None else summary
