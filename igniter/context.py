"""What a run built and how it is going: :class:`RunContext` and its :class:`RunStatus`.

:class:`EvalContext` is what ``igniter eval`` builds (model, validation data,
evaluator); :class:`RunContext` adds the training side (optimizer, training data,
trainer) and is handed to handler and logger factories as ``ctx``.

:class:`RunStatus` declares the run's outcome fields that handlers fill while the
trainer runs (divergence, training time, samples, what stopped the run). It is the
one place they live: ``ctx.status.<field>``, and ``trainer.state.<field>`` is the
same value (a property of the trainer's state reads and writes ``ctx.status``), so
Ignite handlers that name a state attribute (TensorBoard's ``state_attributes``) and
code that writes one (SLURM preemption sets ``trainer.state.stopped_by``) go through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, State
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from igniter.timing import StepTimer

__all__ = ["RunStatus", "RunState", "bind_status", "EvalContext", "RunContext"]


@dataclass
class RunStatus:
    """How the trainer's run is going; filled by the standard handlers, read by the summary.

    Attributes:
        diverged: ``(iteration, loss)`` where the NaN guard found a non-finite loss, else ``None``.
        train_time_s: seconds inside training epochs, end-of-epoch handlers and this process's
            first step excluded (``first_step_s``).
        samples: global samples trained on in those seconds.
        first_step_s: seconds of this process's first step, left out of ``train_time_s`` and
            the throughput figures (it counts the FLOPs and pays one-time costs); NaN before it.
        samples_per_s: global samples per second of the last epoch (NaN before the first ends).
        tokens_per_s: global target tokens per second of the last epoch, for token datasets
            (``samples_per_s`` x tokens per sample; NaN otherwise).
        model_tflops_per_s: model TFLOP/s of all processes in the last epoch (:mod:`igniter.flops`;
            NaN when the FLOPs were not counted).
        mfu: model FLOPs utilisation of the last epoch (:func:`igniter.flops.mfu`; NaN without a peak).
        data_wait_fraction: this rank's share of the last epoch's batch fetch + step time spent
            waiting for batches (:func:`igniter.timing.data_wait_fraction`).
        peak_memory_bytes: this rank's peak memory so far (:func:`igniter.telemetry.peak_memory_bytes`).
        stopped_by: the exception a handler stopped the run with (e.g. a SLURM preemption),
            raised by :func:`igniter.run.train` once the engine returns; ``None``.
        run_time_s: seconds of ``trainer.run``, handlers included (0.0 until it returns).
        compile_s: seconds ``torch.compile`` spent inside training epochs (``trainer.compile``),
            left out of ``train_time_s`` so that throughput is the compiled model's.
    """

    diverged: tuple[int, Any] | None = None
    train_time_s: float = 0.0
    samples: int = 0
    first_step_s: float = math.nan
    samples_per_s: float = math.nan
    tokens_per_s: float = math.nan
    model_tflops_per_s: float = math.nan
    mfu: float = math.nan
    data_wait_fraction: float = math.nan
    peak_memory_bytes: float = math.nan
    stopped_by: BaseException | None = None
    run_time_s: float = 0.0
    compile_s: float = 0.0


class RunState(State):
    """Ignite's engine state whose :class:`RunStatus` fields are views of ``run_status``."""

    run_status: RunStatus


def _view(name: str) -> property:
    def get(state: RunState) -> Any:
        return getattr(state.run_status, name)

    def put(state: RunState, value: Any) -> None:
        setattr(state.run_status, name, value)

    return property(get, put, doc=f"``RunStatus.{name}`` of this run")


for _field in fields(RunStatus):
    setattr(RunState, _field.name, _view(_field.name))


def bind_status(trainer: Engine) -> RunStatus:
    """A fresh :class:`RunStatus` behind ``trainer.state``'s fields of the same names.

    The state object stays the same (Ignite and handlers hold it): only its class becomes
    :class:`RunState` (mixed into a custom engine's own ``State`` subclass), which adds the
    properties. Returns the status.
    """
    status = RunStatus()
    state = trainer.state
    for name in (f.name for f in fields(RunStatus)):
        state.__dict__.pop(name, None)  # an attribute set before would hide the property
    kind = type(state)
    if not isinstance(state, RunState):
        state.__class__ = RunState if kind is State else type(f"Run{kind.__name__}", (RunState, kind), {})
    state.__dict__["run_status"] = status
    return status


@dataclass
class EvalContext:
    """What an evaluation built for this process (``igniter eval``: no optimizer, no trainer)."""

    cfg: DictConfig
    output_dir: Path
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    loss_fn: Any
    val_set: Dataset | None
    val_loader: DataLoader | None
    evaluator: Engine | None


@dataclass
class RunContext(EvalContext):
    """Everything a run built, handed to handler and logger factories as ``ctx``.

    ``status`` (:class:`RunStatus`) is created here and bound to ``trainer.state``.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Dataset
    train_loader: DataLoader
    trainer: Engine
    custom_events: list = field(default_factory=list)
    step_timer: StepTimer = field(default_factory=StepTimer)  # data / step time of the trainer
    scaler: torch.amp.GradScaler | None = None  # the loss scaler (enabled with trainer.precision=16-mixed)
    #: Where the checkpoints live and their format, resolved once at start: an
    #: :class:`igniter.checkpoint.location.CheckpointLocation` (``root``, ``format``).
    checkpoints: Any = None
    status: RunStatus = field(init=False)

    def __post_init__(self) -> None:
        self.status = bind_status(self.trainer)

    @property
    def per_process_batch_size(self) -> int:
        """``data.loader.batch_size`` (global) divided by the world size."""
        return self.cfg.data.loader.batch_size // self.world_size
