"""Slow ranks named: each rank's step split into waiting for data, computing and waiting in collectives.

A rank that is slower than the others (a throttled GPU, a slow disk, a noisy neighbour) makes
every step slower: the others wait for it in their collectives. Their step times are then all
the same, so what is compared is each rank's *own* time per step, the step less its wait for
the others.

Measured in every process (:class:`StepSplit`, the trainer's main thread, a few
``time.perf_counter()`` calls per iteration), for each iteration:

* ``data_s``: from asking the loader for the batch to the start of the step (Ignite's
  ``GET_BATCH_STARTED`` to the process function, :class:`igniter.timing.StepTimer`);
* ``wait_s``: waiting in collectives: from the moment the rank's last gradient was computed
  (``register_post_accumulate_grad_hook`` on the trainable parameters) to the end of the step:
  DDP's outstanding gradient all-reduces (and the optimizer step, the same on every rank);
* ``compute_s``: the rest of the iteration (``ITERATION_COMPLETED`` to ``ITERATION_COMPLETED``):
  forward and backward passes, the optimizer, every handler.

``step_s = data_s + compute_s`` is the rank's own time. Every ``runner.straggler_window``
iterations each rank publishes the medians of its window (in its progress record,
:mod:`igniter.supervision.progress`); rank 0's reporter thread compares the ranks
(:class:`StragglerDetector`): a rank whose median ``step_s`` is above ``runner.straggler_factor``
x the median of the ranks is named once for that window, as *waiting for data* when its data time
exceeds the ranks' median by more than its compute time does, else as *computing*.

Limits: with ``runner.strategy=fsdp`` the gradient hooks see no sharded parameter's gradient
(FSDP2 writes the reduced shard itself) and the all-gathers run inside the forward and backward
passes, so collective waits count as computing and a slow rank is not told apart; a window in
which ranks evaluate or checkpoint counts those iterations too (the median of the window's
iterations keeps one long iteration from deciding).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from igniter.errors import Problem
from igniter.supervision.progress import PROGRESS

__all__ = [
    "WINDOWS_KEPT",
    "Straggler",
    "StragglerDetector",
    "StepSplit",
    "REPORTED",
    "report",
    "take_reported",
    "attach_step_split",
    "StragglerLog",
    "straggler_problems",
]

logger = logging.getLogger("igniter")

#: Windows each rank keeps in its record (the detector reads every few seconds; windows may be shorter).
WINDOWS_KEPT = 8


@dataclass(frozen=True)
class Straggler:
    """A rank named slow over iterations ``first``-``last``: its median own time per step
    (``step_s``, seconds) against the median of the ranks (``median_s``), and ``cause``
    (``waiting for data`` or ``computing``) with its medians ``data_s`` and ``compute_s``."""

    rank: int
    host: str
    first: int
    last: int
    step_s: float
    median_s: float
    cause: str
    data_s: float
    compute_s: float

    def message(self, factor: float, ranks: int) -> str:
        """One sentence for the log."""
        return (
            f"rank {self.rank} (host {self.host}) is slow: {self.step_s:.3f} s of its own per step against the median "
            f"{self.median_s:.3f} s of the {ranks} ranks over iterations {self.first}-{self.last} "
            f"(x{self.step_s / self.median_s:.1f}; runner.straggler_factor = {factor:g}): {self.cause} "
            f"({self.compute_s:.3f} s computing, {self.data_s:.3f} s waiting for data per step; every other rank waits for it)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StragglerDetector:
    """Decides from the ranks' published windows which ranks are slow (pure: no I/O, no clock).

    Args:
        factor: ``runner.straggler_factor``: slow above ``factor`` x the median of the ranks.
        ranks: the global ranks to compare (every rank must have published a window first).
    """

    def __init__(self, factor: float, ranks: list[int]) -> None:
        self.factor, self.ranks = factor, list(ranks)
        self.judged: set[int] = set()  # window ends already decided: each window at most once

    def observe(self, records: dict[int, dict[str, Any] | None]) -> list[Straggler]:
        """The stragglers of every window all ranks have published and that was not judged yet.

        ``records``: rank -> its progress record (``host`` and ``windows``: a list of
        ``{"last", "steps", "step_s", "data_s", "compute_s"}``), ``None`` when not read.
        """
        windows: dict[int, dict[int, dict[str, Any]]] = {}
        for rank in self.ranks:
            record = records.get(rank)
            if record is None:
                return []
            windows[rank] = {w["last"]: w for w in record.get("windows") or []}
        common = set.intersection(*(set(w) for w in windows.values())) - self.judged if windows else set()
        found = []
        for last in sorted(common):
            self.judged.add(last)
            window = {rank: windows[rank][last] for rank in self.ranks}
            found += self.judge(window, {r: str(records[r].get("host", "?")) for r in self.ranks})  # type: ignore[union-attr]
        return found

    def judge(self, window: dict[int, dict[str, Any]], hosts: dict[int, str]) -> list[Straggler]:
        """The slow ranks of one window (``window``: rank -> its medians)."""
        median = statistics.median(w["step_s"] for w in window.values())
        if median <= 0:
            return []
        median_data = statistics.median(w["data_s"] for w in window.values())
        median_compute = statistics.median(w["compute_s"] for w in window.values())
        found = []
        for rank, w in sorted(window.items()):
            if w["step_s"] > self.factor * median:
                cause = (
                    "waiting for data" if w["data_s"] - median_data > w["compute_s"] - median_compute else "computing"
                )
                found.append(
                    Straggler(
                        rank,
                        hosts.get(rank, "?"),
                        w["last"] - w["steps"] + 1,
                        w["last"],
                        w["step_s"],
                        median,
                        cause,
                        w["data_s"],
                        w["compute_s"],
                    )  # fmt: skip
                )
        return found


#: Stragglers found by rank 0's reporter thread, for its main thread to log, chart and record.
REPORTED: deque[Straggler] = deque()
_REPORTED_LOCK = threading.Lock()


def report(found: list[Straggler]) -> None:
    """Hand ``found`` to the main thread (called from the reporter thread)."""
    with _REPORTED_LOCK:
        REPORTED.extend(found)


def take_reported() -> list[Straggler]:
    """Everything reported since the last call (the main thread)."""
    with _REPORTED_LOCK:
        found = list(REPORTED)
        REPORTED.clear()
    return found


class StepSplit:
    """This rank's per-iteration split (see the module docstring), published every ``window`` iterations.

    Args:
        window: ``runner.straggler_window``.
        step_timer: the run's :class:`igniter.timing.StepTimer` (its cumulative ``data_s``).
        model: the trained model (hooks on its trainable parameters' gradients).
        publish: called with the list of the last :data:`WINDOWS_KEPT` windows' medians.
    """

    def __init__(self, window: int, step_timer: Any, model: torch.nn.Module, publish: Any) -> None:
        self.window, self.step_timer, self.publish = window, step_timer, publish
        self.rows: list[tuple[float, float, float]] = []  # (data, wait, period) of each iteration
        self.windows: deque[dict[str, Any]] = deque(maxlen=WINDOWS_KEPT)
        self._last_grad: float | None = None
        self._completed: float | None = None
        self._data_s = 0.0
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, _: torch.Tensor) -> None:
        self._last_grad = time.perf_counter()

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _started(self, _: Any) -> None:
        self._last_grad = None

    def _iteration_completed(self, engine: Any) -> None:
        now = time.perf_counter()
        data = self.step_timer.data_s - self._data_s
        self._data_s = self.step_timer.data_s
        wait = now - self._last_grad if self._last_grad is not None else 0.0
        if self._completed is not None:  # the first iteration has no period (and builds, compiles)
            self.rows.append((data, wait, now - self._completed))
        self._completed = now
        if engine.state.iteration % self.window == 0 and self.rows:
            own = [period - w for _, w, period in self.rows]
            self.windows.append(
                {
                    "last": engine.state.iteration,
                    "steps": len(self.rows),
                    "step_s": round(statistics.median(own), 4),
                    "data_s": round(statistics.median(d for d, _, _ in self.rows), 4),
                    "compute_s": round(statistics.median(o - d for o, (d, _, _) in zip(own, self.rows)), 4),
                    "wait_s": round(statistics.median(w for _, w, _ in self.rows), 4),
                }
            )
            self.rows = []
            self.publish(list(self.windows))


def attach_step_split(ctx: Any) -> StepSplit | None:
    """Every rank of a run of 2 or more processes with ``runner.straggler_factor`` set: measure
    its iterations and publish its windows in its progress record. Attach right after
    :func:`igniter.supervision.progress.attach_reports` (before the user's handlers, whose time
    then counts as computing)."""
    runner = ctx.cfg.runner
    if ctx.world_size < 2 or runner.get("straggler_factor") is None:
        return None
    split = StepSplit(runner.straggler_window, ctx.step_timer, ctx.model, lambda w: setattr(PROGRESS, "windows", w))
    split.attach(ctx.trainer)
    return split


class StragglerLog:
    """Rank 0's main thread: what the reporter thread found, logged (a warning), in TensorBoard
    (text ``stragglers`` and scalar ``stragglers/rank<N>_step_over_median`` at the window's last
    iteration) and kept for ``metrics.json`` (:attr:`found`).

    Args:
        factor: ``runner.straggler_factor``.
        world_size: the ranks compared.
        writer: a TensorBoard ``SummaryWriter``, or ``None``.
    """

    def __init__(self, factor: float, world_size: int, writer: Any = None) -> None:
        self.factor, self.world_size, self.writer = factor, world_size, writer
        self.found: list[dict[str, Any]] = []

    def drain(self, *_: Any) -> None:
        """Report what was found since the last call (an event handler; cheap when nothing was)."""
        for straggler in take_reported():
            text = straggler.message(self.factor, self.world_size)
            logger.warning("%s", text)
            if self.writer is not None:
                self.writer.add_text("stragglers", text, straggler.last)
                ratio = straggler.step_s / straggler.median_s
                self.writer.add_scalar(f"stragglers/rank{straggler.rank}_step_over_median", ratio, straggler.last)
            self.found.append(straggler.as_dict())


def straggler_problems(runner: Any) -> list[Problem]:
    """Problems with ``runner.straggler_factor`` (above 1, or null: off) and ``runner.straggler_window`` (>= 2)."""
    problems = []
    factor = runner.get("straggler_factor")
    if factor is not None and not factor > 1:
        problems.append(
            Problem(
                "runner.straggler_factor",
                "expected a number above 1 (a rank slower than this many times the median is named) or null (off)",
                factor,
            )
        )
    window = runner.get("straggler_window")
    if window is None or window < 2:
        problems.append(Problem("runner.straggler_window", "expected a number of iterations, 2 or more", window))
    return problems
