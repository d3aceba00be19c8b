"""``igniter check [overrides]``: is this run going to start?

Validates the config like a real run, builds every component on CPU, pushes one
training batch (forward and backward) and one evaluation batch of the
per-process size through the model, and prints the plan: world size, global and
per-process batch size, the model FLOPs of one optimizer step (counted on the batch it
tried: :mod:`igniter.flops`) and the peak its MFU will be measured against, iterations, the
bytes of parameters, gradients and optimizer state each process will hold and their sum
(:func:`memory_plan`), the activations one step saves for its backward pass with and without
``trainer.activation_checkpointing`` (measured on that batch: :mod:`igniter.activation_memory`),
and every handler the run will have.
Nothing is written, and no process is started: with ``runner.strategy=fsdp`` the model is
built whole and the share of each rank is computed.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from igniter.activation_memory import ActivationMeter
from igniter.assemble import build_training
from igniter.build import import_modules
from igniter.compose import config_problems, plain_config
from igniter.compose import hydra_args as _hydra_args
from igniter.context import RunContext
from igniter.errors import ConfigError, Problem
from igniter.errors import report_problems as _report
from igniter.flops import compute_dtype
from igniter.launch.runners import make_runner
from igniter.parallel.strategy import checkpointed_modules, replica_groups, unwrap_model
from igniter.preflight import first_batch
from igniter.profiling import profiler_options
from igniter.registry import RegistryError, function_registry
from igniter.summary import format_bytes

__all__ = ["main", "memory_plan", "format_bytes"]


def _builtin_handlers(cfg: DictConfig) -> list[str]:
    """The handlers every run gets from config keys (not from ``handlers:``), as ``check`` lists them."""
    k, lg = cfg.checkpoint, cfg.logging
    names = ["nan guard (every 10 iterations)", "metrics.json"]
    if k.enabled:
        when = f"every {k.every_epochs} epoch(s)" + (
            f" (at most once every {k.min_interval_seconds:g} s)" if k.min_interval_seconds else ""
        )
        when += f", {k.every_iterations} iterations" if k.every_iterations else ""
        names.append(f"checkpoint ({when}; keep {k.n_saved} + {k.n_best} best)")
    names.append(
        {True: "progress bar", False: "log line per epoch", None: "progress bar on a terminal"}[lg.progress_bar]
    )
    names += [f"{name} (every {lg.log_every} iterations)" for name in lg.loggers]
    if lg.gpu_telemetry_every:
        names.append("gpu telemetry (when NVML finds a GPU)")
    p = profiler_options(lg.torch_profiler)
    if p is not None:
        names.append(
            f"torch profiler (ranks {p.ranks}: wait {p.wait}, warmup {p.warmup}, active {p.active}, repeat {p.repeat})"
        )
    if cfg.data.val is not None and cfg.evaluation.patience is not None:
        names.append(f"early stopping (patience {cfg.evaluation.patience})")
    return names


def memory_plan(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str, world_size: int
) -> dict[str, tuple[int, int]]:
    """Bytes of parameters, gradients and optimizer state one rank holds, and all ranks together.

    ``ddp``: every rank holds everything. ``fsdp``: FSDP2 shards every parameter on dim 0 in
    ``ceil(dim0 / world_size)`` rows per rank (rank 0's share, the largest, is the one given;
    the padding FSDP2 adds is counted), and with it the parameter's gradient and every
    optimizer-state tensor of the parameter's shape (Adam's moments, SGD's momentum); other
    state (Adam's scalar ``step``) and 0-dim parameters are whole on every rank. Gradients are
    one per trainable parameter, of its dtype. Optimizer state is measured: what
    ``optimizer.state`` holds after a step.

    Returns:
        ``{"parameters" | "gradients" | "optimizer state": (per rank, the whole model's)}``.
    """

    def share(t: torch.Tensor, like: torch.Tensor) -> tuple[int, int]:
        whole = t.numel() * t.element_size()
        if strategy != "fsdp" or t.dim() == 0 or t.shape != like.shape or t.shape[0] == 0:
            return whole, whole
        return -(-t.shape[0] // world_size) * (whole // t.shape[0]), whole

    def add(pairs: list[tuple[int, int]]) -> tuple[int, int]:
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    params = list(model.parameters())
    state = [share(v, p) for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": add([share(p, p) for p in params]),
        "gradients": add([share(p, p) for p in params if p.requires_grad]),
        "optimizer state": add(state),
    }


def _memory_line(ctx: RunContext, strategy: str, world: int) -> str:
    shards = world // replica_groups(ctx.cfg.runner.fsdp, world, ctx.cfg.runner.nnodes) if strategy == "fsdp" else world
    plan = memory_plan(ctx.model, ctx.optimizer, strategy, shards)
    rank = ", ".join(f"{format_bytes(r)} {name}" for name, (r, _) in plan.items())
    total = "/".join(format_bytes(t) for _, t in plan.values())
    how = "sharded: about total / W per rank" if strategy == "fsdp" else "every rank holds it all"
    in_all = format_bytes(sum(r for r, _ in plan.values()))
    if shards != world:
        how = f"HSDP: sharded over the {shards} processes of each of {world // shards} replica groups"
    return (
        f"strategy {strategy} over {world} process{'es' if world > 1 else ''}: per rank {rank} "
        f"({in_all} per rank before activations; total {total}; {how})"
    )


def _mfu_line(cfg: DictConfig) -> str:
    """What MFU will be measured against: ``logging.peak_tflops``, or the GPU's table peak for the
    run's compute dtype (the GPU is the one the job gets, not this machine's)."""
    if cfg.logging.peak_tflops is not None:
        return f"against logging.peak_tflops = {cfg.logging.peak_tflops:g} TFLOP/s per process"
    dtype = compute_dtype(str(cfg.trainer.precision))
    return (
        f"against the dense {dtype} peak of the run's GPU (igniter.flops.PEAK_TFLOPS, by its NVML name); "
        "none on CPU: set logging.peak_tflops"
    )


def _activation_line(meter: ActivationMeter, names: list[str], modules: list[torch.nn.Module], batch: int) -> str:
    what = "saved for the backward pass per process"
    how = (
        f"measured on one forward pass of {batch // meter.micro_batches} samples"
        f"{' (a micro-batch)' if meter.micro_batches > 1 else ''}: saved tensors, parameters excluded"
    )
    if not names:
        return (
            f"{format_bytes(meter.without)} {what} ({how}; trainer.activation_checkpointing recomputes modules instead)"
        )
    return (
        f"{format_bytes(meter.without)} {what} without activation checkpointing, about "
        f"{format_bytes(meter.with_checkpointing)} with it ({len(modules)} x {', '.join(names)} recomputed; {how}; "
        "with: saved outside them + their inputs + the largest one's)"
    )


def _try_one_batch(ctx: RunContext, world_size: int, checkpointed: list[torch.nn.Module]) -> ActivationMeter:
    """One training step and one evaluation batch on real data of the per-process size
    (the global batch sizes divided by the run's ``world_size``), then the same training step
    again, eager, inside an :class:`ActivationMeter` (``checkpointed``: its modules).

    Raises:
        StepFailed: the model cannot take the data (see :mod:`igniter.preflight`).
    """
    logging.getLogger("ignite").addHandler(logging.NullHandler())  # the error is reported once, below
    loader = ctx.cfg.data.loader
    collate = function_registry.get(loader.collate_fn) if loader.collate_fn else None
    batch = first_batch(ctx.train_set, loader.batch_size // world_size, collate)
    ctx.trainer.run([batch], max_epochs=1)
    meter = ActivationMeter(ctx.model, checkpointed)
    meter.micro_batches = ctx.cfg.trainer.accumulate_grad_batches
    with torch.compiler.set_stance("force_eager"), meter:  # the hooks see every saved tensor in eager mode
        ctx.trainer.run([batch], max_epochs=1)
    if ctx.evaluator is not None:
        val_batch = (loader.val_batch_size or loader.batch_size) // world_size
        ctx.evaluator.run([first_batch(ctx.val_set, val_batch, collate)])
    return meter


def main(argv: list[str]) -> int:
    """``igniter check [overrides]``: validate, build every component on CPU, push one
    training batch (forward and backward) and one evaluation batch through the model,
    print the plan. Returns the exit status (2 on any problem)."""
    args = _hydra_args(argv)
    cfg, problems = config_problems(args.overrides, args.config_name or "config", args.config_dir)
    if problems or cfg is None:
        return _report(problems)
    cfg = plain_config(cfg)
    world = make_runner(cfg.runner).world_size
    per_process = cfg.data.loader.batch_size // world
    try:
        import_modules(cfg.imports)
        built = copy.deepcopy(cfg)
        if cfg.runner.strategy == "fsdp":  # no process group here: built whole, each rank's share computed
            built.runner.strategy = "ddp"
        # built without checkpoint wrappers: the meter sees inside the modules they would recompute
        built.trainer.activation_checkpointing = []
        ctx = build_training(built, Path("."))
        names = list(cfg.trainer.activation_checkpointing)
        checkpointed = checkpointed_modules(unwrap_model(ctx.model), names) if names else []
        meter = _try_one_batch(ctx, world, checkpointed)
        if not ctx.optimizer.state:  # no step yet (gradient accumulation): one, for the state it creates
            ctx.optimizer.step()
    except (ConfigError, RegistryError) as e:
        header = getattr(e, "header", "cannot build the run")
        return _report(getattr(e, "problems", [Problem("?", str(e))]), header)
    loader = cfg.data.loader
    per_epoch = len(ctx.train_loader) if cfg.trainer.epoch_length is None else cfg.trainer.epoch_length
    n_params = sum(p.numel() for p in ctx.model.parameters())
    lines = [
        "igniter check: configuration is valid, every component builds, and one training step and one evaluation batch ran.",
        f"  model      {cfg.model.name} ({type(ctx.model).__name__}): {n_params:,} parameters",
        f"  data       train {cfg.data.train.name}: {len(ctx.train_set):,} samples"
        + (f" | val {cfg.data.val.name}: {len(ctx.val_set):,} samples" if ctx.val_set is not None else ""),
        f"  runner     {cfg.runner.name}: world size {world}, backend {cfg.runner.backend or 'auto'}",
        f"  memory     {_memory_line(ctx, cfg.runner.strategy, world)}",
        f"  activations {_activation_line(meter, names, checkpointed, per_process)}",
        f"  batch      global {loader.batch_size}, per process {per_process}",
        *(
            [
                f"  FLOPs      {flops:,} per optimizer step and process, {flops * world:,} for all {world} "
                "(forward and backward, counted on this batch with FlopCounterMode)"
            ]
            if (flops := ctx.step_timer.model_flops)
            else []
        ),
        f"  MFU        {_mfu_line(cfg)}",
        f"  schedule   {per_epoch} iterations/epoch x {cfg.trainer.max_epochs} epochs = {per_epoch * cfg.trainer.max_epochs} iterations",
        f"  optimizer  {cfg.solver.name} lr={cfg.solver.lr}"
        + (f", scheduler {cfg.solver.scheduler.name}" if cfg.solver.scheduler.name else ""),
        f"  handlers   built-in: {', '.join(_builtin_handlers(cfg))}",
        f"             from config: {', '.join(f'{h.name}@{h.event}' for h in cfg.handlers) or 'none'}",
    ]
    print("\n".join(lines))
    return 0
