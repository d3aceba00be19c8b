"""The end-of-run summary: a short table and ``curves.png``; also ``igniter summary <run dir>``.

The table: epochs, iterations, best and final validation metrics, wall time
split into data loading / forward-backward (the step function) / handlers
(:class:`StepTimer`, or Ignite's ``HandlersTimeProfiler`` with ``logging.profile``), samples/s and
world size. ``curves.png``: training loss per logged iteration and the
validation metrics per epoch, drawn with matplotlib (``pip install
'igniter[plot]'``); without matplotlib the picture is skipped with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ignite.engine import Engine, Events
from ignite.handlers import HandlersTimeProfiler

__all__ = ["StepTimer", "record_first_iteration", "process_age_s", "attach_handler_profiler", "time_split", "handler_profile", "summary_table", "draw_curves", "main"]

logger = logging.getLogger("igniter")


class StepTimer:
    """Seconds spent fetching batches and in the step function, cheap enough to be always on.

    The step is timed by :meth:`wrap` around the process function; a batch fetch from
    Ignite's ``GET_BATCH_STARTED`` to the start of the step that uses it (one handler;
    what runs between the two counts as data time: Ignite's dispatch of
    ``GET_BATCH_COMPLETED`` and ``ITERATION_STARTED``, microseconds, and the handlers of
    those events, none by default). Each per-iteration handler costs ~5-10x its
    isolated time on a small model (measured with ``bench/overhead.py``), so the timer
    has one. ``on_first_step`` is called once, when the first step returns.
    ``logging.profile=true`` adds Ignite's ``HandlersTimeProfiler`` for the time of
    every handler."""

    def __init__(self) -> None:
        self.data_s = self.step_s = 0.0
        self._fetch_started: float | None = None
        self.on_first_step: Callable[[], None] | None = None

    def wrap(self, step: Callable[[Engine, Any], Any]) -> Callable[[Engine, Any], Any]:
        """``step`` (an Ignite process function) with its time added to ``step_s`` and
        the fetch of its batch to ``data_s``."""

        def timed_step(engine: Engine, batch: Any) -> Any:
            start = time.perf_counter()
            if self._fetch_started is not None:  # None: run without a data loader, or the timer not attached
                self.data_s += start - self._fetch_started
                self._fetch_started = None
            output = step(engine, batch)
            self.step_s += time.perf_counter() - start
            if self.on_first_step is not None:
                callback, self.on_first_step = self.on_first_step, None
                callback()
            return output

        return timed_step

    def attach(self, trainer: Engine) -> None:
        """Time the batch fetches of ``trainer``."""
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)

    def _batch_started(self) -> None:
        self._fetch_started = time.perf_counter()


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; 10 ms resolution), else ``None``."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def record_first_iteration(timer: StepTimer, record: Any) -> None:
    """Record ``first_iteration_s`` in ``metrics.json``: seconds from the start of this
    (rank 0) process to the end of this run's first training step: the start-up
    cost a user waits through (imports, config, data, model, process group)."""

    def _record() -> None:
        age = process_age_s()
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
        return {"data_s": timer.data_s, "step_s": timer.step_s, "handlers_s": max(0.0, run_time_s - timer.data_s - timer.step_s)}
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
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "iteration") and isinstance(v, (int, float)))


def summary_table(m: dict[str, Any]) -> str:
    """A few aligned lines from a ``metrics.json`` dict."""
    split = m.get("time_split")
    rows = [
        ("status", m.get("status", "?")),
        ("epochs", f"{m.get('epochs_completed', '?')} ({m.get('iterations', '?')} iterations)"),
        ("final", _metrics_text(m.get("final", {})) or "-"),
        ("best", (_metrics_text(m.get("best", {})) + f" (epoch {m['best'].get('epoch')})") if m.get("best") else "-"),
        ("wall time", f"{m.get('wall_time_s', 0):.1f} s"
            + (f" = start-up and evaluation + data {split['data_s']:.1f} s + step {split['step_s']:.1f} s + handlers {split['handlers_s']:.1f} s" if split else "")),
        ("throughput", f"{m['samples_per_s']:.0f} samples/s" if m.get("samples_per_s") else "-"),
        ("start-up", f"first iteration done {m['first_iteration_s']:.2f} s after the process started" if m.get("first_iteration_s") else "-"),
        ("processes", f"world size {m.get('world_size', '?')}, global batch {m.get('global_batch_size', '?')}, per process {m.get('per_process_batch_size', '?')}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def draw_curves(m: dict[str, Any], path: Path) -> bool:
    """Training loss per logged iteration (left) and validation metrics per epoch (right).

    Returns ``False`` (and logs why) when matplotlib is missing or there is nothing to draw.
    """
    losses = m.get("train_loss_history", [])
    epochs = m.get("epochs", [])
    if not losses and not epochs:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        logger.info("curves.png skipped: matplotlib is not installed (pip install 'igniter[plot]')")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    if losses:
        left.plot([p[0] for p in losses], [p[1] for p in losses], lw=1.2)
    left.set(title="training loss", xlabel="iteration", ylabel="loss")
    left.grid(alpha=0.3)
    names = sorted({k for row in epochs for k, v in row.items() if k not in ("epoch", "iteration") and isinstance(v, (int, float))})
    for name in names:
        right.plot([r["epoch"] for r in epochs if name in r], [r[name] for r in epochs if name in r], marker="o", ms=3, label=name)
    right.set(title="validation", xlabel="epoch")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    if names:
        right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    """``igniter summary <run dir>``: print the table and (re)draw ``curves.png``."""
    if not argv:
        print("usage: igniter summary <run dir>")
        return 2
    run = Path(argv[0])
    path = run / "metrics.json"
    if not path.is_file():
        print(f"igniter summary: no metrics.json in {run}")
        return 2
    m = json.loads(path.read_text())
    print(f"run {run}\n{summary_table(m)}")
    if draw_curves(m, run / "curves.png"):
        print(f"  curves     {run / 'curves.png'}")
    return 0
