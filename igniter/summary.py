"""The end-of-run summary: a short table and ``curves.png``; also ``igniter summary <run dir>``.

The table: epochs, iterations, best and final validation metrics, wall time
split into data loading / forward-backward (the step function) / handlers
(:class:`~igniter.timing.StepTimer`, or Ignite's ``HandlersTimeProfiler`` with ``logging.profile``), samples/s
(tokens/s, model FLOPs), MFU, the data wait, peak memory per rank, start-up time and world size. ``curves.png``: one panel per kind of metric (training and
validation losses together, every other validation metric on its own y-axis), drawn
with matplotlib (``pip install 'igniter[plot]'``); without matplotlib the picture is
skipped with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite.engine import Engine
from ignite.handlers import HandlersTimeProfiler

from igniter.record import METRICS_FILE, read_record
from igniter.timing import StepTimer, interpreter_age_s

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from igniter.record import MetricsRecord

__all__ = [
    "record_first_iteration",
    "attach_handler_profiler",
    "time_split",
    "handler_profile",
    "summary_table",
    "format_bytes",
    "Series",
    "Panel",
    "curve_panels",
    "curves_figure",
    "draw_curves",
    "main",
]

logger = logging.getLogger("igniter")


def record_first_iteration(timer: StepTimer, record: MetricsRecord) -> None:
    """Record ``first_iteration_s`` in ``metrics.json``: seconds from the start of this
    (rank 0) process's interpreter (:func:`interpreter_age_s`) to the end of this run's
    first training step: the start-up cost a user waits through (imports, config, data,
    model, process group)."""

    def _record() -> None:
        age = interpreter_age_s()
        if age is not None:
            record.update(first_iteration_s=round(age, 2))

    timer.on_first_step = _record


def attach_handler_profiler(trainer: Engine) -> HandlersTimeProfiler:
    """Ignite's ``HandlersTimeProfiler`` on ``trainer`` (``logging.profile=true``): the time
    of every handler on every event, see :func:`handler_profile`."""
    profiler = HandlersTimeProfiler()
    profiler.attach(trainer)
    return profiler


def time_split(timer: StepTimer, profiler: HandlersTimeProfiler | None, run_time_s: float) -> dict[str, float]:
    """Seconds spent fetching batches, in the step function, and in event handlers: from
    ``profiler`` when there is one, else from ``timer`` (handlers: the rest of
    ``run_time_s``, evaluation included)."""
    if profiler is None:
        return {
            "data_s": timer.data_s,
            "step_s": timer.step_s,
            "handlers_s": max(0.0, run_time_s - timer.data_s - timer.step_s),
        }
    rows = {row[0]: row[2] for row in profiler.get_results()}  # [handler, event, total s, ...]

    def seconds(name: str) -> float:
        return float(rows[name]) if isinstance(rows.get(name), (int, float)) else 0.0  # "not triggered"

    return {"data_s": seconds("Dataflow"), "step_s": seconds("Processing"), "handlers_s": seconds("Total")}


def handler_profile(profiler: HandlersTimeProfiler) -> str:
    """Ignite's table of every handler's total/min/max/mean time (s) and the step and data
    totals. A handler that fires other events (igniter's periodic-event tick) includes
    the time of their handlers."""
    with contextlib.redirect_stdout(io.StringIO()) as text:
        HandlersTimeProfiler.print_results(profiler.get_results())  # it prints
    return text.getvalue()


def _metrics_text(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "iteration") and isinstance(v, (int, float))
    )


def _micro_batches(m: dict[str, Any]) -> str:
    k, per_process = m.get("accumulate_grad_batches", 1), m.get("per_process_batch_size")
    return f" = {k} micro-batches of {per_process // k}" if k > 1 and isinstance(per_process, int) else ""


def _processes(m: dict[str, Any]) -> str:
    """World size and strategy, batch sizes, and the precision with where it comes from."""
    world = m.get("world_size", "?")
    strategy = m.get("strategy")
    how = (
        f" ({strategy}, backend {m.get('backend') or '?'})"
        if strategy and world != 1
        else " (one process: no strategy)"
        if world == 1
        else ""
    )
    precision = str(m.get("precision", "32"))
    if precision == "32":
        source = "float32"
    elif strategy == "fsdp" and world != 1:
        source = "torch.autocast and FSDP's MixedPrecisionPolicy"
    else:
        source = "torch.autocast" + (" and GradScaler" if precision == "16-mixed" else "")
    return (
        f"world size {world}{how}, global batch {m.get('global_batch_size', '?')}, "
        f"per process {m.get('per_process_batch_size', '?')}{_micro_batches(m)}, "
        f"precision {precision} (trainer.precision: {source})"
    )


def _epochs(m: dict[str, Any]) -> str:
    """``20 (880 iterations)``; a run that stopped inside an epoch: ``22 complete + 12 of 44
    iterations (980 iterations)`` (the trainer's epoch counts the epoch it was in)."""
    iterations, length = m.get("iterations"), m.get("epoch_length")
    if isinstance(iterations, int) and isinstance(length, int) and length > 0 and iterations % length:
        return (
            f"{iterations // length} complete + {iterations % length} of {length} iterations ({iterations} iterations)"
        )
    return f"{m.get('epochs_completed', '?')} ({iterations if iterations is not None else '?'} iterations)"


def _throughput(m: dict[str, Any]) -> str:
    if not m.get("samples_per_s"):
        return "-"
    rate = m["samples_per_s"]
    text = f"{rate:.0f} samples/s" if rate >= 10 else f"{rate:.2g} samples/s"  # a large model on CPU: 0.2, not 0
    if m.get("tokens_per_s"):
        text += f", {m['tokens_per_s']:,.0f} tokens/s"
    if m.get("model_flops_per_step"):
        text += f"; model {m['model_flops_per_step'] / 1e9:.3g} GFLOP/step"
        if m.get("model_tflops_per_s"):
            text += f", {m['model_tflops_per_s']:.3g} TFLOP/s"
    return text


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``512 B``, ``34.9 kB``, ``1.2 MB``, ``3.40 GB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def _mfu(m: dict[str, Any]) -> str:
    if m.get("mfu") is not None:
        world = m.get("world_size", 1)
        return (
            f"{m['mfu']:.1%} of {f'{world} x ' if world != 1 else ''}{m['peak_tflops']:.4g} TFLOP/s peak "
            f"({m.get('peak_tflops_source', '?')})"
        )
    if m.get("model_flops_per_step") and m.get("peak_tflops_source"):
        return f"- ({m['peak_tflops_source']})"
    return "-"


def _memory(m: dict[str, Any]) -> str:
    peaks = {r: v for r, v in (m.get("peak_memory_bytes") or {}).items() if isinstance(v, (int, float))}
    if not peaks:
        return "-"
    if len(peaks) <= 4:
        text = ", ".join(f"{format_bytes(v)} (rank {r})" for r, v in peaks.items())
    else:
        top, low = max(peaks, key=peaks.__getitem__), min(peaks, key=peaks.__getitem__)
        text = f"{format_bytes(peaks[top])} (rank {top}) to {format_bytes(peaks[low])} (rank {low}) over {len(peaks)} ranks"
    return f"peak {text}"


def summary_table(m: dict[str, Any]) -> str:
    """A few aligned lines from a ``metrics.json`` dict."""
    split = m.get("time_split")
    rows = [
        ("status", m.get("status", "?")),
        ("epochs", _epochs(m)),
        ("final", _metrics_text(m.get("final", {})) or "-"),
        ("best", (_metrics_text(m.get("best", {})) + f" (epoch {m['best'].get('epoch')})") if m.get("best") else "-"),
        (
            "wall time",
            f"{m.get('wall_time_s', 0):.1f} s"
            + (
                f" = start-up and evaluation + data {split['data_s']:.1f} s + step {split['step_s']:.1f} s + handlers {split['handlers_s']:.1f} s"
                if split
                else ""
            ),
        ),
        ("throughput", _throughput(m)),
        ("MFU", _mfu(m)),
        (
            "data wait",
            f"{m['data_wait_fraction']:.1%} of batch fetch + step time (the largest of the ranks)"
            if m.get("data_wait_fraction") is not None
            else "-",
        ),
        ("memory", _memory(m)),
        (
            "start-up",
            f"first iteration done {m['first_iteration_s']:.2f} s after the interpreter started"
            if m.get("first_iteration_s")
            else "-",
        ),
        ("processes", _processes(m)),
    ]
    if m.get("compile"):
        seconds = m.get("compile_s")
        rows.append(
            (
                "compile",
                f"{seconds:.1f} s in torch.compile, not counted in the throughput" if seconds is not None else "on",
            )
        )
    if m.get("stragglers"):
        rows.append(("stragglers", _stragglers(m["stragglers"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _stragglers(found: list[dict[str, Any]]) -> str:
    """Each slow rank once: host, cause, its windows and its worst own time per step against the median."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for s in found:
        by_rank.setdefault(s["rank"], []).append(s)
    parts = []
    for rank, windows in sorted(by_rank.items()):
        worst = max(windows, key=lambda w: w["step_s"] / w["median_s"])
        causes = " and ".join(sorted({w["cause"] for w in windows}))
        parts.append(
            f"rank {rank} (host {worst['host']}) {causes} in {len(windows)} window(s) from iteration "
            f"{min(w['first'] for w in windows)}, up to {worst['step_s']:.3f} s per step against the median {worst['median_s']:.3f} s"
        )
    return "; ".join(parts)


_LOSS_WORDS = ("loss", "nll", "mse", "mae", "rmse")  # lower is better, on a loss scale: drawn with the training loss


@dataclass
class Series:
    """One line of a panel: ``x`` (iterations or epochs) against ``y``; ``points``: markers at the values."""

    label: str
    x: list[float]
    y: list[float]
    points: bool = False


@dataclass
class Panel:
    """One axis of ``curves.png``. ``fraction``: every value lies in [0, 1] (an accuracy-like
    metric), so the y-limits stay inside [0, 1]."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    fraction: bool = False


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_panels(m: dict[str, Any]) -> list[Panel]:
    """The panels of ``curves.png`` for a ``metrics.json`` dict, only those with data.

    One "loss" panel against iterations: the training loss (``train_loss_history``) and
    every loss-like validation metric (name containing loss, nll, mse, mae, rmse) at the
    iteration its epoch ended; then one panel per other validation metric against epochs,
    each with its own y-axis so that 0.976 -> 0.989 is not flattened by a loss of 1.7.
    A run stopped before its first validation has no validation panel at all."""
    losses = [p for p in m.get("train_loss_history", []) if len(p) == 2 and _number(p[0]) and _number(p[1])]
    epochs = [r for r in m.get("epochs", []) if isinstance(r, dict) and _number(r.get("epoch"))]
    names = sorted({k for r in epochs for k, v in r.items() if k not in ("epoch", "iteration") and _number(v)})
    loss_names = [n for n in names if any(w in n.lower() for w in _LOSS_WORDS)]
    # Validation losses join the training loss only when every epoch says where it ended.
    on_iterations = all(_number(r.get("iteration")) for r in epochs)

    def per_epoch(name: str, x: str, label: str) -> Series:
        rows = [r for r in epochs if _number(r.get(name))]
        return Series(label, [r[x] for r in rows], [r[name] for r in rows], points=True)

    panels = []
    loss = Panel("loss", "iteration", "loss")
    if losses:
        loss.series.append(Series("training", [p[0] for p in losses], [p[1] for p in losses]))
    if on_iterations:
        loss.series += [per_epoch(n, "iteration", f"validation {n}") for n in loss_names]
    panels.append(loss)
    if not on_iterations:
        panels.append(Panel("validation loss", "epoch", "loss", [per_epoch(n, "epoch", n) for n in loss_names]))
    for name in names:
        if name not in loss_names:
            series = per_epoch(name, "epoch", name)
            finite = [v for v in series.y if math.isfinite(v)]
            panels.append(
                Panel(
                    f"validation {name}",
                    "epoch",
                    name,
                    [series],
                    fraction=bool(finite) and all(0 <= v <= 1 for v in finite),
                )
            )
    return [p for p in panels if any(s.x for s in p.series)]


def _title(m: dict[str, Any]) -> str:
    status = m.get("status", "?")
    if _number(m.get("epochs_completed")) and _number(m.get("iterations")):
        done = f"{m['epochs_completed']} epochs, {m['iterations']} iterations"
    else:  # no summary yet: the run is in progress, or was killed before writing one
        done = f"{len(m.get('epochs', []))} validated epochs"
    return f"run {status}: {done}" if status == "completed" else f"run {status.upper()} after {done}: partial curves"


def _fraction_limits(values: list[float]) -> tuple[float, float]:
    """y-limits around ``values`` in [0, 1]: 10% of their spread on each side (0.01 for one value), within [0, 1]."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 if hi > lo else 0.01
    return max(0.0, lo - pad), min(1.0, hi + pad)


def curves_figure(m: dict[str, Any]) -> Figure | None:
    """The ``curves.png`` figure of a ``metrics.json`` dict: one axis per :func:`curve_panels`
    panel (at most three a row), the run's status in the title. ``None`` when there is
    nothing to draw.

    Raises:
        ImportError: matplotlib is not installed.
    """
    panels = curve_panels(m)
    if not panels:
        return None
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch in the caller's session

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(
        figsize=(max(6.4, 4.3 * cols), 3.3 * rows + 0.4), dpi=100, layout="constrained"
    )  # 6.4: room for the title
    fig.suptitle(_title(m))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s in panel.series:
            # clip_on=False: a marker at accuracy 1.0 sits on the top edge, and is drawn whole
            ax.plot(s.x, s.y, lw=1.2, marker="o" if s.points else None, ms=3, label=s.label, clip_on=not panel.fraction)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        if panel.fraction:
            ax.set_ylim(*_fraction_limits([v for s in panel.series for v in s.y if math.isfinite(v)]))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend()
    return fig


def draw_curves(m: dict[str, Any], path: Path) -> bool:
    """Write ``curves.png`` (see :func:`curves_figure`) of a ``metrics.json`` dict to ``path``.

    Returns ``False`` (and logs why) when matplotlib is missing or there is nothing to draw.

    Raises:
        OSError: ``path`` cannot be written.
    """
    try:
        fig = curves_figure(m)
    except ImportError:
        logger.info("curves.png skipped: matplotlib is not installed (pip install 'igniter[plot]')")
        return False
    if fig is None:
        logger.info("curves.png skipped: no training loss or validation metric recorded yet")
        return False
    fig.savefig(path)
    return True


def main(argv: list[str]) -> int:
    """``igniter summary <run dir>``: print the table of ``<run dir>/metrics.json`` and (re)draw
    ``curves.png`` beside it. Returns the exit status: 0, or 2 for a usage error or a
    directory without ``metrics.json`` (``--help``: the usage, 0)."""
    parser = argparse.ArgumentParser(
        prog="igniter summary",
        description="Print the end-of-run summary of a run directory and (re)draw its curves.png.",
    )
    parser.add_argument("run_dir", type=Path, help="a run's output directory, the one holding metrics.json")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: an exit status, as every subcommand returns one
        return e.code if isinstance(e.code, int) else 2
    run: Path = args.run_dir
    m = read_record(run)
    if m is None:
        print(f"igniter summary: no {METRICS_FILE} in {run}", file=sys.stderr)
        return 2
    print(f"run {run}\n{summary_table(m)}")
    if draw_curves(m, run / "curves.png"):
        print(f"  curves     {run / 'curves.png'}")
    return 0
