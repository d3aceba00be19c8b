"""``metrics.json``: the one record of a run, written by rank 0, read by ``igniter summary``
and the sweep table.

Layout (one JSON object; times in seconds)::

    status                  "running" until the end, then one of RUN_STATUSES
    job                     Hydra's {"id", "num", "overrides"} of the run
    world_size, backend     processes and their torch.distributed backend (null: none)
    global_batch_size       data.loader.batch_size, all processes together
    per_process_batch_size  global_batch_size / world_size
    strategy                runner.strategy ("ddp", "fsdp"; how a model is wrapped over several processes)
    precision               trainer.precision ("32", "bf16-mixed", "16-mixed")
    accumulate_grad_batches micro-batches per optimizer step (each of per_process_batch_size / it)
    compile                 whether trainer.compile is on
    train_loss_history      [[iteration, loss], ...] every logging.log_every iterations (rank 0's loss)
    epochs                  [{"epoch", "iteration", <metric>: value, ...}] one row per validation
    final, best             the last row, and the best by evaluation.monitor / evaluation.mode
    restarts                how many times the run was resumed (absent: never)
    first_iteration_s       from the interpreter's start to the end of the first step
    --- written at the end of the run (:func:`run_summary`) ---
    epochs_completed, iterations  the trainer's epoch (the one in progress, when interrupted) and iteration
    epoch_length            iterations per epoch (the summary: "22 complete + 12 of 44 iterations")
    wall_time_s             the whole process (start-up, evaluation and summary included)
    run_time_s              trainer.run, handlers included (0.0 when it did not return)
    train_time_s            training epochs without end-of-epoch handlers, without compilation and
                            without this process's first step (the throughput figures' time base)
    first_step_s            that first step (null: none in a completed epoch): FLOPs counted, one-time costs
    compile_s               seconds in torch.compile (training and evaluation), with trainer.compile
    compile_train_s         the part of compile_s inside training epochs
    samples_per_s           global samples / train_time_s (null before an epoch ends)
    tokens_per_s            global target tokens / train_time_s, for token datasets (token_shards)
    model_flops_per_step    FLOPs of one optimizer step, all processes (the first step counted by
                            igniter.flops; forward and backward matmuls/convolutions/attention)
    model_tflops_per_s      model_flops_per_step x steps / train_time_s / 1e12
    peak_tflops             the peak TFLOP/s of one process's device MFU is measured against (null: none known)
    peak_tflops_source      where peak_tflops comes from (logging.peak_tflops, or the GPU's NVML name,
                            dtype and igniter.flops.PEAK_TFLOPS entry), or why there is none
    mfu                     model_tflops_per_s / (world_size x peak_tflops) (igniter.flops.mfu; null
                            without a peak or a FLOPs count)
    data_wait_fraction      data_s / (data_s + step_s) of the training loop, the largest of the ranks
                            (igniter.timing.data_wait_fraction)
    peak_memory_bytes       {rank: bytes}: each rank's peak memory (igniter.telemetry.peak_memory_bytes:
                            the CUDA allocator's peak on a GPU, peak RSS on CPU)
    train_loss              the last step's loss (rank 0's), null when the step reports none
    time_split              {"data_s", "step_s", "handlers_s"} of run_time_s (when it returned)
    gpu                     {rank: {quantity: {"mean", "max"}}} (igniter.telemetry), with a GPU

The file is written atomically after every evaluation and at the end, so a crash
leaves the history so far. How a resumed run continues the history is
:func:`igniter.checkpoint.resume.continue_record`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from igniter.atomic_files import atomic_write
from igniter.compile import compile_options, compile_time_s
from igniter.flops import achieved_tflops, mfu, run_peak
from igniter.telemetry import gather_rows, peak_memory_bytes
from igniter.timing import data_wait_fraction
from igniter.token_shards import tokens_per_sample

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = [
    "METRICS_FILE",
    "RUN_STATUSES",
    "scalar",
    "loss_of",
    "train_loss",
    "MetricsRecord",
    "final_status",
    "run_summary",
    "read_record",
]

#: The record's file name inside the run directory.
METRICS_FILE = "metrics.json"
#: ``status`` at the end of a run: it ended / was stopped by a handler (early stopping's end is
#: "completed"; a preemption's "stopped") / the loss became NaN or inf / Ctrl-C.
RUN_STATUSES = ("completed", "stopped", "diverged", "interrupted")


def scalar(value: Any) -> Any:
    """A one-element tensor as a Python number; anything else unchanged."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def loss_of(output: Any) -> Any:
    """The loss in a step's output: ``output["loss"]`` of a dict (``None`` if absent), else the output itself."""
    return output.get("loss") if isinstance(output, dict) else output


def train_loss(output: Any) -> float | None:
    """The last step's loss (rank 0's share), as a float, if the step reported one."""
    loss = loss_of(output)
    return float(loss) if isinstance(loss, (torch.Tensor, float, int)) else None


class MetricsRecord:
    """The ``metrics.json`` of a run being trained (rank 0): the layout is this module's docstring.

    Args:
        path: the file (``<run dir>/metrics.json``).
        monitor: the metric ``best`` is chosen by (``evaluation.monitor``), or ``None``.
        mode: ``"max"`` or ``"min"``: which way ``monitor`` is better.
        static: the keys known before training (job, world size, batch sizes, an empty
            ``train_loss_history``).
    """

    def __init__(self, path: Path, monitor: str | None, mode: str, static: dict[str, Any]) -> None:
        self.path, self.monitor, self.mode = Path(path), monitor, mode
        self.data: dict[str, Any] = {"status": "running", **static, "epochs": [], "final": {}, "best": {}}

    @classmethod
    def for_run(cls, ctx: RunContext, job: dict[str, Any] | None, backend: str | None) -> MetricsRecord:
        """The record of ``ctx``'s run in ``<run dir>/metrics.json``; ``job``: Hydra's job info,
        ``backend``: the torch.distributed backend (``None``: a single process)."""
        static = {
            "job": job or {},
            "world_size": ctx.world_size,
            "backend": backend,
            "global_batch_size": ctx.cfg.data.loader.batch_size,
            "per_process_batch_size": ctx.per_process_batch_size,
            "strategy": str(ctx.cfg.runner.strategy),
            "precision": str(ctx.cfg.trainer.precision),
            "accumulate_grad_batches": ctx.cfg.trainer.accumulate_grad_batches,
            "compile": compile_options(ctx.cfg.trainer.compile) is not None,
            "train_loss_history": [],
        }
        return cls(ctx.output_dir / METRICS_FILE, ctx.cfg.evaluation.monitor, ctx.cfg.evaluation.mode, static)

    def add_epoch(self, epoch: int, iteration: int, metrics: dict[str, Any]) -> None:
        """Append a validation row; it becomes ``final``, and ``best`` when ``monitor`` improved."""
        row = {"epoch": epoch, "iteration": iteration, **{k: scalar(v) for k, v in metrics.items()}}
        self.data["epochs"].append(row)
        self.data["final"] = dict(row)
        if self.monitor in row:
            best = self.data["best"].get(self.monitor)
            better = best is None or (row[self.monitor] > best if self.mode == "max" else row[self.monitor] < best)
            if better:
                self.data["best"] = dict(row)

    def add_train_loss(self, iteration: int, loss: float) -> None:
        """Append ``[iteration, loss]`` to ``train_loss_history``."""
        self.data["train_loss_history"].append([iteration, loss])

    def update(self, **values: Any) -> None:
        """Set top-level keys (kept in memory until :meth:`write`)."""
        self.data.update(values)

    def write(self) -> None:
        """Replace the file atomically with the record so far. Raises ``OSError``."""
        text = json.dumps(self.data, indent=2, default=float)
        atomic_write(self.path, lambda f: f.write(text), binary=False)


def final_status(ctx: RunContext, interrupted: bool) -> str:
    """The final ``status`` (one of :data:`RUN_STATUSES`) of ``ctx``'s run."""
    status = ctx.status
    return (
        "interrupted"
        if interrupted
        else "diverged"
        if status.diverged
        else "stopped"
        if status.stopped_by
        else "completed"
    )


def run_summary(ctx: RunContext, interrupted: bool, wall_time_s: float) -> dict[str, Any]:
    """The keys written at the end of a run (every rank computes them; rank 0 records them).

    Every rank must call it at the same point unless ``interrupted``: the data wait and peak
    memory of the ranks are gathered (one ``all_gather``; after Ctrl-C only this rank's, a peer
    may have left).

    Args:
        ctx: the run, after ``trainer.run`` returned or was interrupted.
        interrupted: Ctrl-C ended the run.
        wall_time_s: seconds since the process started building the run.
    """
    state, status, timer = ctx.trainer.state, ctx.status, ctx.step_timer
    samples_per_s = status.samples / status.train_time_s if status.train_time_s > 0 else None
    per_sample = tokens_per_sample(ctx.train_set)
    flops = timer.model_flops
    step_flops = flops * ctx.world_size if flops is not None else None  # every rank's step has the same shape
    steps = status.samples / ctx.cfg.data.loader.batch_size
    tflops = achieved_tflops(step_flops, steps, status.train_time_s) if step_flops else None
    peak = run_peak(str(ctx.cfg.trainer.precision), ctx.device, ctx.cfg.logging.peak_tflops)
    mine = [timer.data_s, timer.step_s, float(peak_memory_bytes(ctx.device))]
    together = ctx.world_size > 1 and not interrupted
    rows = dict(enumerate(gather_rows(mine))) if together else {ctx.rank: mine}
    waits = [w for w in (data_wait_fraction(d, s) for d, s, _ in rows.values()) if w is not None]
    return {
        "status": final_status(ctx, interrupted),
        "epochs_completed": state.epoch,
        "iterations": state.iteration,
        "epoch_length": state.epoch_length,
        "wall_time_s": wall_time_s,
        "train_time_s": status.train_time_s,
        "first_step_s": None if math.isnan(status.first_step_s) else status.first_step_s,
        "run_time_s": status.run_time_s,
        "samples_per_s": samples_per_s,
        **({"tokens_per_s": samples_per_s * per_sample if samples_per_s else None} if per_sample else {}),
        "model_flops_per_step": step_flops,
        "model_tflops_per_s": tflops,
        "peak_tflops": peak.tflops,
        "peak_tflops_source": peak.source,
        "mfu": mfu(tflops, peak.tflops, ctx.world_size) if tflops and peak.tflops else None,
        "data_wait_fraction": max(waits) if waits else None,
        "peak_memory_bytes": {str(rank): int(row[2]) for rank, row in rows.items()},
        "train_loss": train_loss(state.output),
        **(
            {"compile_s": compile_time_s(), "compile_train_s": status.compile_s}
            if compile_options(ctx.cfg.trainer.compile) is not None
            else {}
        ),
    }


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """``<run_dir>/metrics.json`` as a dict, ``None`` when the file does not exist.

    Raises:
        json.JSONDecodeError: the file is not JSON (e.g. written by something else).
    """
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
