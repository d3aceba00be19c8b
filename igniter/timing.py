"""Timing primitives: the step timer every run has, and how old this process is.

:class:`StepTimer` splits a trainer's wall time into data loading and the step function;
:func:`process_age_s` and :func:`interpreter_age_s` give the start-up time the summary reports.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from ignite.engine import Engine, Events

__all__ = ["StepTimer", "data_wait_fraction", "interpreter_age_s", "process_age_s"]


class StepTimer:
    """Seconds spent fetching batches and in the step function, cheap enough to be always on.

    The step is timed by :meth:`wrap` around the process function; a batch fetch from
    Ignite's ``GET_BATCH_STARTED`` to the start of the step that uses it (one handler;
    what runs between the two counts as data time: Ignite's dispatch of
    ``GET_BATCH_COMPLETED`` and ``ITERATION_STARTED``, microseconds, and the handlers of
    those events, none by default). Each per-iteration handler costs ~5-10x its
    isolated time on a small model (measured with ``bench/overhead.py``), so the timer
    has one. ``on_first_step`` is called once, when the first step returns. ``first_step_s``:
    the seconds of this process's first step (``None`` before it returns), which the
    throughput figures leave out: it runs under the FLOP counter and pays one-time costs
    (allocator growth, kernel selection, CUDA context). ``model_flops``:
    the FLOPs of one optimizer step in this process, when something counted them
    (:class:`igniter.flops.FirstStepFlops`), else ``None``.
    ``logging.profile=true`` adds Ignite's ``HandlersTimeProfiler`` for the time of
    every handler."""

    def __init__(self) -> None:
        self.data_s = self.step_s = 0.0
        self._fetch_started: float | None = None
        self.on_first_step: Callable[[], None] | None = None
        self.first_step_s: float | None = None
        self.model_flops: int | None = None

    def wrap(self, step: Callable[[Engine, Any], Any]) -> Callable[[Engine, Any], Any]:
        """``step`` (an Ignite process function) with its time added to ``step_s`` and
        the fetch of its batch to ``data_s``."""

        def timed_step(engine: Engine, batch: Any) -> Any:
            start = time.perf_counter()
            if self._fetch_started is not None:  # None: run without a data loader, or the timer not attached
                self.data_s += start - self._fetch_started
                self._fetch_started = None
            output = step(engine, batch)
            seconds = time.perf_counter() - start
            self.step_s += seconds
            if self.first_step_s is None:
                self.first_step_s = seconds
            if self.on_first_step is not None:
                callback, self.on_first_step = self.on_first_step, None
                callback()
            return output

        timed_step.__wrapped__ = step  # type: ignore[attr-defined]  (inspect.unwrap finds the step)
        return timed_step

    def attach(self, trainer: Engine) -> None:
        """Time the batch fetches of ``trainer``."""
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)

    def _batch_started(self) -> None:
        self._fetch_started = time.perf_counter()


def data_wait_fraction(data_s: float, step_s: float) -> float | None:
    """The share of the training loop's time spent waiting for batches: ``data_s / (data_s +
    step_s)`` (seconds from :class:`StepTimer`: fetching the batch, and the step function that
    trains on it; handlers not counted), in [0, 1]; ``None`` before any time was measured."""
    total = data_s + step_s
    return data_s / total if total > 0 else None


def process_age_s() -> float | None:
    """Seconds since this process was created (its fork; Linux ``/proc``, 10 ms resolution), else ``None``.

    An ``exec`` keeps the process and its creation time: for ``sh -c 'pip install ...; exec
    igniter'`` this counts the shell's time too; :func:`interpreter_age_s` does not."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def interpreter_age_s() -> float | None:
    """Seconds since this Python interpreter started, else ``None``.

    Taken from ``igniter._T0 = (time.monotonic(), time.process_time())``, stamped by the
    first statement of ``igniter/__init__.py``: the seconds since that stamp plus the
    interpreter's CPU seconds before it (its start-up, ~0.05 s, is CPU-bound). Neither the
    fork-to-exec time of the process nor a shell's wait for ``pip`` or ``sleep`` before it
    ``exec``'d the interpreter counts; a shell's own CPU time before the ``exec`` does (the
    kernel keeps it), usually milliseconds. Without the stamp: :func:`process_age_s`."""
    stamp = getattr(sys.modules.get("igniter"), "_T0", None)
    if not (isinstance(stamp, tuple) and len(stamp) == 2 and all(isinstance(t, float) for t in stamp)):
        return process_age_s()
    stamped_at, cpu_before = stamp
    return time.monotonic() - stamped_at + cpu_before
