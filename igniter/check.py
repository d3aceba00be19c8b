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

Before the step of the per-process size, a step of 2 samples per micro-batch measures the
activations per sample, and the step's activations are estimated from it, linear in the batch
size (an estimate: it leaves out temporaries never saved for the backward pass). When that is
more than this process may still allocate (:func:`~igniter.activation_memory.memory_headroom`:
``MemAvailable``, a cgroup limit, ``RLIMIT_AS``; the free memory on a GPU), the step is not run:
the plan so far goes to stdout, one paragraph naming ``data.loader.batch_size`` to stderr, exit
status 2, where the step could have been killed by the kernel's out-of-memory killer without a
word. A step that runs out of memory all the same (an allocation that fails) is reported alike.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from ignite.engine import Engine
from omegaconf import DictConfig

from igniter.activation_memory import ActivationMeter, memory_headroom
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
from igniter.preflight import MEMORY_LEVERS, StepOutOfMemory, batch_size_key, first_batch, memory_message, out_of_memory
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


def _memory_line(ctx: RunContext, strategy: str, world: int) -> tuple[str, int]:
    """The plan's memory line, and the bytes of parameters, gradients and optimizer state one rank holds."""
    shards = world // replica_groups(ctx.cfg.runner.fsdp, world, ctx.cfg.runner.nnodes) if strategy == "fsdp" else world
    plan = memory_plan(ctx.model, ctx.optimizer, strategy, shards)
    rank = ", ".join(f"{format_bytes(r)} {name}" for name, (r, _) in plan.items())
    total = "/".join(format_bytes(t) for _, t in plan.values())
    how = "sharded: about total / W per rank" if strategy == "fsdp" else "every rank holds it all"
    per_rank = sum(r for r, _ in plan.values())
    if shards != world:
        how = f"HSDP: sharded over the {shards} processes of each of {world // shards} replica groups"
    return (
        f"strategy {strategy} over {world} process{'es' if world > 1 else ''}: per rank {rank} "
        f"({format_bytes(per_rank)} per rank before activations; total {total}; {how})"
    ), per_rank


def _model_line(cfg: DictConfig, ctx: RunContext) -> str:
    return (
        f"{cfg.model.name} ({type(ctx.model).__name__}): {sum(p.numel() for p in ctx.model.parameters()):,} parameters"
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


@dataclass(frozen=True)
class _Estimate:
    """The activations of the step of the per-process size, estimated before it runs.

    ``per_sample``: bytes one sample saves for the backward pass (with activation checkpointing
    when it is set), measured on a step of ``probe`` samples; ``samples``: the samples of one
    forward pass of the real step (the per-process batch, or one micro-batch of it:
    ``micro``); ``headroom``: ``(bytes, bound)`` this process may still allocate, ``None`` when
    unknown."""

    per_sample: int
    samples: int
    probe: int
    micro: bool
    headroom: tuple[int, str] | None

    @property
    def activations(self) -> int:
        """Bytes the real step saves for its backward pass (linear in the batch size)."""
        return self.per_sample * self.samples

    @property
    def fits(self) -> bool:
        return self.headroom is None or self.activations <= self.headroom[0]

    def describe(self) -> str:
        return (
            f"about {format_bytes(self.activations)} saved for the backward pass per process, estimated before the "
            f"step ({format_bytes(self.per_sample)} per sample, measured on a step of {self.probe} "
            f"sample{'s' if self.probe > 1 else ''}, x {self.samples}{' (a micro-batch)' if self.micro else ''}: "
            "linear in the batch size)"
        )

    def room(self) -> str:
        if self.headroom is None:
            return "how much more this process may allocate is not known here"
        return f"this process may allocate {format_bytes(self.headroom[0])} more ({self.headroom[1]})"


def _probe(ctx: RunContext, world_size: int, checkpointed: list[torch.nn.Module], names: list[str]) -> _Estimate | None:
    """One training step of 2 samples per micro-batch (1 where the per-process batch is smaller)
    inside an :class:`ActivationMeter`, eager, with the step function itself in a plain Engine:
    the first-step guard and the FLOPs count stay for the real batch. Then the estimate for the
    per-process batch (linear in the batch size) and this process's headroom (measured after
    the step: the parameters, gradients and optimizer state are allocated by then).

    Returns ``None`` when the small step raised (other than for memory): the real step then
    reports the problem with its own batch.

    Raises:
        _OutOfMemory: the small step ran out of memory (:func:`out_of_memory`).
    """
    cfg = ctx.cfg
    k = cfg.trainer.accumulate_grad_batches
    per_process = min(cfg.data.loader.batch_size // world_size, len(ctx.train_set))  # type: ignore[arg-type]
    m = 2 if per_process >= 2 * k else 1  # 2: a BatchNorm in training mode refuses a batch of 1
    collate = function_registry.get(cfg.data.loader.collate_fn) if cfg.data.loader.collate_fn else None
    batch = first_batch(ctx.train_set, k * m, collate)
    meter = ActivationMeter(ctx.model, checkpointed)
    meter.micro_batches = k
    try:
        with _out_of_memory_as("training step", k * m), torch.compiler.set_stance("force_eager"), meter:
            Engine(inspect.unwrap(ctx.trainer._process_function)).run([batch], max_epochs=1)
    except _OutOfMemory:
        raise
    except Exception:
        return None
    per_micro_batch = meter.with_checkpointing if names else meter.without  # of m samples
    return _Estimate(per_micro_batch // m, -(-per_process // k), k * m, k > 1, memory_headroom(ctx.device))


class _OutOfMemory(Exception):
    """An allocation failed in ``phase`` (``"training step"``, ``"evaluation batch"``) of ``samples``
    samples per process; ``message``: the allocator's, shortened."""

    def __init__(self, phase: str, samples: int, error: BaseException) -> None:
        if isinstance(error, StepOutOfMemory) and error.__cause__ is not None:  # the first step's guard
            error = error.__cause__
        self.phase, self.samples, self.message = phase, samples, memory_message(error)
        super().__init__(f"{phase}: {self.message}")


@contextlib.contextmanager
def _out_of_memory_as(phase: str, samples: int) -> Iterator[None]:
    """Inside: an allocation that fails (:func:`out_of_memory`, or the first-step guard's
    :class:`StepOutOfMemory`) raises :class:`_OutOfMemory` ``(phase, samples)``; other errors pass."""
    try:
        yield
    except Exception as e:
        if isinstance(e, StepOutOfMemory) or out_of_memory(e):
            raise _OutOfMemory(phase, samples, e) from e
        raise


def _does_not_fit(
    cfg: DictConfig, world: int, held: int, estimate: _Estimate | None, oom: _OutOfMemory | None = None
) -> ConfigError:
    """The paragraph for a step too large for this process's memory: refused before it ran
    (``oom`` ``None``: ``estimate`` does not fit; ``held``: bytes of parameters, gradients and
    optimizer state per rank) or out of memory when it ran (``oom``)."""
    key, batch = batch_size_key(
        cfg, "evaluation" if oom is not None and oom.phase.startswith("evaluation") else "training"
    )
    per_process = batch // world
    if oom is not None:
        plural = "s" if oom.samples > 1 else ""
        what = f"the {oom.phase} of {oom.samples} sample{plural} per process ran out of memory ({oom.message})"
        if estimate is not None and oom.phase.startswith("training"):
            what += f"; its activations were estimated at {format_bytes(estimate.activations)}, and {estimate.room()}"
    else:
        assert estimate is not None and estimate.headroom is not None
        fit = estimate.headroom[0] // max(1, estimate.per_sample) * cfg.trainer.accumulate_grad_batches * world
        fits = f"About {key}={fit} fits here" if fit else "Not one sample per process fits here"
        what = (
            f"one training step of {per_process} samples per process would save about "
            f"{format_bytes(estimate.activations)} of activations for its backward pass (estimated from a step of "
            f"{estimate.probe} sample{'s' if estimate.probe > 1 else ''}: {format_bytes(estimate.per_sample)} per "
            f"sample, linear in the batch size) besides {format_bytes(held)} of parameters, gradients and optimizer "
            f"state per rank, but {estimate.room()}, so the step was not run (the kernel's out-of-memory killer "
            f"could have ended the process without a message). {fits}"
        )
    text = (
        f"{what}. Lower {key}, or use less memory per sample: {MEMORY_LEVERS}. `igniter check` runs the step on "
        f"this machine: to check a job for a larger one, give it a smaller {key} (the activations scale with it)"
    )
    return ConfigError([Problem(key, text, batch)], header="the step does not fit in this process's memory")


def _try_one_batch(ctx: RunContext, world_size: int, checkpointed: list[torch.nn.Module]) -> ActivationMeter:
    """One training step and one evaluation batch on real data of the per-process size
    (the global batch sizes divided by the run's ``world_size``), then the same training step
    again, eager, inside an :class:`ActivationMeter` (``checkpointed``: its modules).

    Raises:
        StepFailed: the model cannot take the data (see :mod:`igniter.preflight`).
        _OutOfMemory: an allocation failed (:func:`~igniter.preflight.out_of_memory`).
    """
    loader = ctx.cfg.data.loader
    collate = function_registry.get(loader.collate_fn) if loader.collate_fn else None
    with _out_of_memory_as("training step", loader.batch_size // world_size):
        batch = first_batch(ctx.train_set, loader.batch_size // world_size, collate)
        ctx.trainer.run([batch], max_epochs=1)
        meter = ActivationMeter(ctx.model, checkpointed)
        meter.micro_batches = ctx.cfg.trainer.accumulate_grad_batches
        with torch.compiler.set_stance("force_eager"), meter:  # the hooks see every saved tensor in eager mode
            ctx.trainer.run([batch], max_epochs=1)
    if ctx.evaluator is not None:
        val_batch = batch_size_key(ctx.cfg, "evaluation")[1] // world_size
        with _out_of_memory_as("evaluation batch", val_batch):
            ctx.evaluator.run([first_batch(ctx.val_set, val_batch, collate)])
    return meter


def main(argv: list[str]) -> int:
    """``igniter check [overrides]``: validate, build every component on CPU, estimate the
    training step's activations from a 2-sample step and refuse the step when they exceed
    what this process may allocate, else push one training batch (forward and backward) and
    one evaluation batch through the model, print the plan. Returns the exit status (2 on any
    problem, the step's memory included)."""
    args = _hydra_args(argv)
    cfg, problems = config_problems(args.overrides, args.config_name or "config", args.config_dir)
    if problems or cfg is None:
        return _report(problems)
    cfg = plain_config(cfg)
    world = make_runner(cfg.runner).world_size
    per_process = cfg.data.loader.batch_size // world
    logging.getLogger("ignite").addHandler(logging.NullHandler())  # an error is reported once, below
    estimate: _Estimate | None = None
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
        try:
            estimate = _probe(ctx, world, checkpointed, names)
            if estimate is not None and not estimate.fits:
                memory, held = _memory_line(ctx, cfg.runner.strategy, world)
                print("igniter check: the training step was not run: its activations would not fit in memory here.")
                print(f"  model      {_model_line(cfg, ctx)}\n  memory     {memory}")
                print(f"  activations {estimate.describe()}; {estimate.room()}")
                raise _does_not_fit(cfg, world, held, estimate)
            meter = _try_one_batch(ctx, world, checkpointed)
        except _OutOfMemory as e:
            raise _does_not_fit(cfg, world, 0, estimate, e) from e
        if not ctx.optimizer.state:  # no step yet (gradient accumulation): one, for the state it creates
            ctx.optimizer.step()
    except (ConfigError, RegistryError) as e:
        header = getattr(e, "header", "cannot build the run")
        return _report(getattr(e, "problems", [Problem("?", str(e))]), header)
    loader = cfg.data.loader
    per_epoch = len(ctx.train_loader) if cfg.trainer.epoch_length is None else cfg.trainer.epoch_length
    lines = [
        "igniter check: configuration is valid, every component builds, and one training step and one evaluation batch ran.",
        f"  model      {_model_line(cfg, ctx)}",
        f"  data       train {cfg.data.train.name}: {len(ctx.train_set):,} samples"
        + (f" | val {cfg.data.val.name}: {len(ctx.val_set):,} samples" if ctx.val_set is not None else ""),
        f"  runner     {cfg.runner.name}: world size {world}, backend {cfg.runner.backend or 'auto'}",
        f"  memory     {_memory_line(ctx, cfg.runner.strategy, world)[0]}",
        f"  activations {_activation_line(meter, names, checkpointed, per_process)}",
        *([f"  headroom   {estimate.describe()}; {estimate.room()}"] if estimate is not None else []),
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
