"""One process's share of a run: build every component, wire the handlers, train.

:func:`build_run` builds (also used by ``igniter check``); :func:`train` is what
a runner executes in every process. The process group, if any, already exists
(the runner made it), so ``idist`` reports this process's rank and world size.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.utils import manual_seed
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from igniter.build import (
    StepArgs,
    build_dataset,
    build_metrics,
    build_model,
    build_optimizer,
    build_scheduler,
    call_with,
    import_modules,
    import_object,
    plain,
)
from igniter.console import close_bars, setup_logging
from igniter.distributed import make_runner
from igniter.distributed.signals import interrupt_once
from igniter.distributed.sampler import ShardedSampler
from igniter.events import PeriodicEvents, fire_periodic_events, parse_event
from igniter.errors import ConfigError, Interrupted, Problem, TrainingDiverged
from igniter.handlers import (
    MetricsRecord,
    loss_of,
    attach_checkpoints,
    attach_nan_guard,
    attach_progress,
    attach_throughput,
    flush_checkpoints,
    save_now,
)
from igniter.preflight import StepFailed, guard_first_step
from igniter.resume import CheckpointInvalid, check_checkpoint, checkpoint_files, select_checkpoint
from igniter.summary import StepTimer, attach_handler_profiler, draw_curves, handler_profile, record_first_iteration, summary_table, time_split
from igniter.telemetry import gpu_telemetry
from igniter.registry import engine_registry, event_handler_registry, function_registry, io_registry

__all__ = ["RunContext", "build_run", "train", "setup_logging", "TrainingDiverged", "Interrupted"]

logger = logging.getLogger("igniter")


@dataclass
class RunContext:
    """Everything a run built, handed to handler and logger factories as ``ctx``."""

    cfg: DictConfig
    output_dir: Path
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Any
    train_set: Dataset
    val_set: Dataset | None
    train_loader: DataLoader
    val_loader: DataLoader | None
    trainer: Engine
    evaluator: Engine | None
    custom_events: list = field(default_factory=list)
    step_timer: StepTimer = field(default_factory=StepTimer)  # data / step time of the trainer

    @property
    def per_process_batch_size(self) -> int:
        return self.cfg.data.loader.batch_size // self.world_size


def make_loader(dataset: Dataset, batch_size: int, cfg: DictConfig, train: bool, seed: int) -> DataLoader:
    """A loader of ``batch_size / world_size`` samples per process over a :class:`ShardedSampler`.

    Training drops the last partial global batch (``drop_last``) or pads it
    like ``DistributedSampler``; evaluation shards without padding so every
    sample counts exactly once.
    """
    world_size, rank = idist.get_world_size(), idist.get_rank()
    tail = ("drop" if cfg.drop_last else "pad") if train else "none"
    sampler = ShardedSampler(dataset, world_size, rank, batch_size, shuffle=cfg.shuffle and train, seed=seed, tail=tail)
    collate = function_registry.get(cfg.collate_fn, "data.loader.collate_fn") if cfg.collate_fn else None
    kwargs: dict[str, Any] = {"collate_fn": collate} if collate else {}
    return idist.auto_dataloader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        drop_last=False,
        persistent_workers=cfg.num_workers > 0,
        **kwargs,
    )


def build_run(cfg: DictConfig, output_dir: Path) -> RunContext:
    """Build model, data, solver and engines for this process (no handlers, no training).

    Raises:
        ConfigError: a component cannot be built (the message names its config key).
        RegistryError: a name is not registered.
    """
    import_modules(cfg.imports)
    manual_seed(cfg.trainer.seed)  # same initial weights on every rank
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = idist.device()
    ddp: dict[str, Any] = {}
    if idist.get_world_size() > 1:  # DistributedDataParallel options (auto_model passes them on)
        ddp["gradient_as_bucket_view"] = cfg.runner.gradient_as_bucket_view
        if cfg.runner.bucket_cap_mb is not None:
            ddp["bucket_cap_mb"] = cfg.runner.bucket_cap_mb
    model = idist.auto_model(build_model(cfg.model), sync_bn=False, **ddp)
    optimizer = idist.auto_optim(build_optimizer(cfg.solver, model))
    scheduler = build_scheduler(cfg.solver.scheduler, optimizer)
    loss_fn = function_registry.get(cfg.trainer.loss, "trainer.loss")
    loader_cfg = cfg.data.loader

    train_set = build_dataset(cfg.data.train, "data.train")
    train_loader = make_loader(train_set, loader_cfg.batch_size, loader_cfg, True, cfg.trainer.seed)
    val_set = build_dataset(cfg.data.val, "data.val") if cfg.data.val is not None else None
    val_loader = None
    if val_set is not None:
        val_batch = loader_cfg.val_batch_size or loader_cfg.batch_size
        val_loader = make_loader(val_set, val_batch, loader_cfg, False, cfg.trainer.seed)

    # What step/engine/metric factories may ask for by name: one definition (validate reserves the same names).
    available = StepArgs(
        model=model, optimizer=optimizer, loss_fn=loss_fn, device=device, grad_clip_norm=cfg.trainer.grad_clip_norm
    ).as_dict()
    step = call_with(function_registry.get(cfg.trainer.step, "trainer.step"), available, plain(cfg.trainer.step_params))
    step_timer = StepTimer()
    trainer = call_with(engine_registry.get(cfg.trainer.engine, "trainer.engine"), {**available, "process_function": step_timer.wrap(guard_first_step(step, cfg, "training"))})
    step_timer.attach(trainer)
    trainer.register_events(*PeriodicEvents, event_to_attr={e: "iteration" for e in PeriodicEvents})
    user_events = [import_object(path) for path in cfg.trainer.custom_events]
    for enum in user_events:
        trainer.register_events(*enum)
    evaluator = None
    if val_loader is not None:
        # Evaluate the unwrapped module: DDP's forward may sync buffers, and shards can differ by one batch.
        eval_available = {**available, "model": getattr(model, "module", model)}
        eval_step = call_with(function_registry.get(cfg.evaluation.step, "evaluation.step"), eval_available)
        evaluator = call_with(
            engine_registry.get(cfg.evaluation.engine, "evaluation.engine"), {"process_function": guard_first_step(eval_step, cfg, "evaluation")}
        )
        for name, metric in build_metrics(cfg.evaluation.metrics, available).items():
            metric.attach(evaluator, name)
    return RunContext(
        cfg=cfg,
        output_dir=output_dir,
        rank=idist.get_rank(),
        world_size=idist.get_world_size(),
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        train_set=train_set,
        val_set=val_set,
        train_loader=train_loader,
        val_loader=val_loader,
        trainer=trainer,
        evaluator=evaluator,
        custom_events=[PeriodicEvents, *user_events],
        step_timer=step_timer,
    )


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


def _wire(ctx: RunContext, record: MetricsRecord | None) -> dict[str, Any]:
    """Attach the standard handlers. Order matters: sampler epoch, scheduler,
    throughput, evaluation, then checkpoints and loggers that read their results."""
    cfg, trainer, evaluator = ctx.cfg, ctx.trainer, ctx.evaluator
    samplers = [ctx.train_loader.sampler]

    @trainer.on(Events.EPOCH_STARTED)
    def _set_epoch(engine: Engine) -> None:
        for s in samplers:
            if hasattr(s, "set_epoch"):
                s.set_epoch(engine.state.epoch - 1)

    if ctx.scheduler is not None:
        event = Events.ITERATION_COMPLETED if cfg.solver.scheduler.step_on == "iteration" else Events.EPOCH_COMPLETED
        trainer.add_event_handler(event, lambda _: ctx.scheduler.step())

    attach_nan_guard(trainer)
    fire_periodic_events(trainer, cfg.logging.log_every)
    attach_throughput(trainer, cfg.data.loader.batch_size)
    if evaluator is not None:
        last_eval = {"epoch": 0}

        def _evaluate(engine: Engine) -> None:
            if last_eval["epoch"] == engine.state.epoch:
                return
            last_eval["epoch"] = engine.state.epoch
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


def _resume(ctx: RunContext, to_load: dict[str, Any]) -> Path | None:
    """Load the checkpoint chosen by ``cfg.resume`` into ``to_load`` on every rank.

    Rank 0 chooses (newest valid file) and broadcasts its choice, or its error, so
    that no rank waits on a collective another rank never reaches.

    Raises:
        ConfigError: no valid checkpoint where one was expected (exit status 2).
    """
    if not to_load:
        return None
    required = tuple(k for k in to_load if k != "checkpointer") + ("checkpointer",)
    directory = ctx.output_dir / "checkpoints"
    choice, ckpt = "", None
    if ctx.rank == 0:
        try:
            path, ckpt = select_checkpoint(ctx.cfg.resume, directory, ctx.model, required)
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
    if ckpt is None:  # ranks > 0 read the file rank 0 chose
        try:
            ckpt = check_checkpoint(Path(choice), ctx.model, required)
        except CheckpointInvalid as e:
            raise ConfigError([Problem("resume", f"{choice} {e}")], "cannot resume") from None
    from ignite.handlers import Checkpoint

    Checkpoint.load_objects({k: v for k, v in to_load.items() if k in ckpt}, ckpt)
    logger.info("resumed from %s (epoch %d, iteration %d)", choice, ctx.trainer.state.epoch, ctx.trainer.state.iteration)
    return Path(choice)


def _train_loss(output: Any) -> float | None:
    """The last step's loss (rank 0's share), as a float, if the step reported one."""
    loss = loss_of(output)
    return float(loss) if isinstance(loss, (torch.Tensor, float, int)) else None


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.4f}" for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)))


def _resume_hint(ctx: RunContext, job: dict[str, Any] | None) -> str:
    """Where an interrupted run stopped, its newest checkpoint, and the command that resumes it."""
    state = ctx.trainer.state
    newest = checkpoint_files(ctx.output_dir / "checkpoints")[:1] if ctx.cfg.checkpoint.enabled else []
    overrides = [o for o in (job or {}).get("overrides", []) if not o.startswith("output_dir=")]
    where = f"interrupted at epoch {state.epoch}, iteration {state.iteration}"
    if not newest:
        return f"{where}; no checkpoint was written: a new run starts over"
    command = shlex.join(["igniter", *overrides, f"output_dir={ctx.output_dir}"])
    return f"{where}; newest checkpoint {newest[0]}; to resume from it: {command}"


def _run_engine(ctx: RunContext) -> None:
    """``trainer.run`` unless the resumed checkpoint is already the end of training
    (Ignite would start a finished engine over)."""
    cfg, trainer = ctx.cfg, ctx.trainer
    done = trainer.state.epoch_length is not None and trainer._is_done(trainer.state)
    if done and trainer.state.max_epochs >= cfg.trainer.max_epochs:
        logger.info("the checkpoint is the end of training (epoch %d): nothing left to run", trainer.state.epoch)
        return
    run_start = time.perf_counter()
    trainer.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs, epoch_length=cfg.trainer.epoch_length)
    trainer.state.run_time_s = time.perf_counter() - run_start


def _observe(ctx: RunContext, record: MetricsRecord | None) -> tuple[list[Any], Any]:
    """Loggers (rank 0), the training-loss history and GPU telemetry.

    Returns ``(loggers, telemetry or None)``.
    """
    cfg, trainer = ctx.cfg, ctx.trainer
    loggers = []
    if ctx.rank == 0:
        loggers = [call_with(io_registry.get(n, f"logging.loggers[{i}]"), {"ctx": ctx}) for i, n in enumerate(cfg.logging.loggers)]
    if record is not None:
        record_first_iteration(ctx.step_timer, record)

        @trainer.on(PeriodicEvents.LOG)
        def _loss_history(engine: Engine) -> None:
            loss = _train_loss(engine.state.output)
            if loss is not None:
                record.data["train_loss_history"].append([engine.state.iteration, loss])

    telemetry = None
    if cfg.logging.gpu_telemetry_every:
        telemetry = gpu_telemetry(ctx)
        if telemetry is not None:
            telemetry.writer = next((lg.writer for lg in loggers if hasattr(lg, "writer")), None)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.logging.gpu_telemetry_every), telemetry)
    return loggers, telemetry


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
        Exception: whatever stopped the run early (``trainer.state.stopped_by``, e.g. a SLURM preemption).
    """
    with interrupt_once():
        return _train(cfg, output_dir, job)


def _train(cfg: DictConfig, output_dir: str | Path, job: dict[str, Any] | None) -> dict[str, Any]:
    if idist.get_world_size() > 1:  # every process writes under rank 0's run directory
        output_dir = idist.broadcast(str(output_dir), src=0, safe_mode=True)
    output_dir = Path(output_dir)
    rank = idist.get_rank()
    setup_logging(output_dir, rank, cfg.logging.level)
    start = time.perf_counter()
    ctx = build_run(cfg, output_dir)
    profiler = attach_handler_profiler(ctx.trainer) if cfg.logging.profile else None
    if rank == 0:
        logger.info(
            "run dir %s | world size %d, backend %s, device %s | global batch %d, per-process batch %d",
            output_dir, ctx.world_size, idist.backend() or "none", ctx.device, cfg.data.loader.batch_size, ctx.per_process_batch_size,
        )
    static = {
        "job": job or {},
        "world_size": ctx.world_size,
        "backend": idist.backend(),
        "global_batch_size": cfg.data.loader.batch_size,
        "per_process_batch_size": ctx.per_process_batch_size,
        "train_loss_history": [],
    }
    record = MetricsRecord(output_dir / "metrics.json", cfg.evaluation.monitor, cfg.evaluation.mode, static) if rank == 0 else None
    to_load = _wire(ctx, record)
    _attach_user_handlers(ctx)
    if _resume(ctx, to_load) is not None and record is not None:
        record.resume(ctx.trainer.state.iteration)
    ctx.trainer.state.stopped_by = None
    checkpointer = to_load.get("checkpointer")
    make_runner(cfg.runner).attach(ctx.trainer, save_now(checkpointer) if checkpointer is not None else None)
    loggers, telemetry = _observe(ctx, record)
    interrupted = False
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
            flush_checkpoints(checkpointer)
        for lg in loggers:
            lg.close()
    state = ctx.trainer.state
    status = "interrupted" if interrupted else "diverged" if state.diverged else "stopped" if state.stopped_by else "completed"
    summary = {
        "status": status,
        "epochs_completed": state.epoch,
        "iterations": state.iteration,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": state.train_time_s,
        "run_time_s": getattr(state, "run_time_s", 0.0),
        "samples_per_s": state.samples / state.train_time_s if state.train_time_s > 0 else None,
        "train_loss": _train_loss(state.output),
    }
    if getattr(state, "run_time_s", 0.0):
        summary["time_split"] = time_split(ctx.step_timer, profiler, state.run_time_s)
        if profiler is not None and rank == 0:
            logger.info("time per handler (logging.profile=true):%s", handler_profile(profiler))
    if telemetry is not None and rank == 0:
        summary["gpu"] = telemetry.summary()
    if record is not None:
        record.update(**summary)
        record.write()
        logger.info("summary:\n%s", summary_table(record.data))
        if draw_curves(record.data, output_dir / "curves.png"):
            logger.info("learning curves: %s", output_dir / "curves.png")
    if interrupted:  # no collective from here: a peer may have left already
        hint = _resume_hint(ctx, job)
        if rank == 0:
            logger.warning("%s", hint)
        raise Interrupted(hint)
    if ctx.world_size > 1:
        # No rank leaves before rank 0 has written the summary and every rank is done with its
        # collectives: a rank leaving early was seen to abort a peer's gloo thread at exit, and
        # under torchrun a rank exiting non-zero (divergence, preemption) makes the agent kill
        # the others, rank 0 in the middle of its summary. Safe when the run stopped early:
        # the NaN guard and the preemption handler decide on every rank at the same iteration.
        idist.barrier()
    if state.stopped_by is not None:
        raise state.stopped_by
    if state.diverged:
        iteration, loss = state.diverged
        raise TrainingDiverged(
            f"the loss is {loss} at iteration {iteration} (epoch {state.epoch}): training stopped; "
            "checkpoints stopped there, so the newest one on disk holds the last finite state"
        )
    return record.data if record is not None else summary
