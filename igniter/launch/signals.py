"""Signals of a run and its launcher. Ctrl-C (SIGINT) in every process: it always stops the run, once, quietly.

* Taken back when inherited as ignored: a shell without job control (a script, ``sh -c``)
  starts background jobs (``igniter ... &``) with SIGINT ignored, and ``exec`` keeps
  that, so ``kill -INT`` would reach a launcher and workers that ignore it.
  :func:`sigint_scope` makes SIGINT raise ``KeyboardInterrupt`` again.
* Ignored once the process is shutting down after a Ctrl-C: a second SIGINT (the
  launcher passing the terminal's on, the user pressing again) landing in the summary's
  aftermath or in interpreter shutdown printed ``Exception ignored in atexit callback
  ... KeyboardInterrupt``. The launcher still ends its workers (SIGKILL after a grace
  period), and SIGTERM/SIGKILL still work.
* Ignite's ``Engine.run`` logs ``Engine run is terminating due to exception: {e}`` at
  ERROR for any exception, an empty message for Ctrl-C: :func:`quiet_engine_interrupts`
  drops that line while the exception being handled is a ``KeyboardInterrupt`` (other
  exceptions keep it).

Scheduler signals (SIGUSR2 ahead of a SLURM time limit, SIGTERM on preemption) are
only noted here (:func:`note_signals`); what to do about them (save, requeue, stop) is
:mod:`igniter.launch.slurm_job`'s decision, taken at an iteration boundary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from typing import Any, Iterator

__all__ = [
    "interrupt_once",
    "sigint_scope",
    "ignore_sigint",
    "quiet_engine_interrupts",
    "raise_interrupt",
    "stop_children",
    "NotedSignals",
    "note_signals",
    "default_action",
]

_ENGINE_LOGGERS = "ignite.engine.engine."  # Engine.logger: logging.getLogger(module + "." + class name)
_ENGINE_MESSAGE = "Engine run is terminating due to exception"


class _DropInterruptLine(logging.Filter):
    """Drops Ignite's ``Engine run is terminating due to exception`` record when the
    exception being handled (the record is made inside Ignite's ``except``) is a
    ``KeyboardInterrupt``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_ENGINE_MESSAGE):
            return True
        return not isinstance(sys.exc_info()[1], KeyboardInterrupt)


_FILTER = _DropInterruptLine()


def quiet_engine_interrupts() -> None:
    """Add the filter to every Ignite engine logger that exists now (each engine class
    has its own logger, made when its first engine is). Called from SIGINT handlers,
    i.e. just before the ``KeyboardInterrupt`` reaches the engines; idempotent."""
    for name, log in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(_ENGINE_LOGGERS) and isinstance(log, logging.Logger) and _FILTER not in log.filters:
            log.addFilter(_FILTER)


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGINT handler: Python's default (raise ``KeyboardInterrupt``), with Ignite's empty
    error line for it silenced."""
    quiet_engine_interrupts()
    raise KeyboardInterrupt


def ignore_sigint() -> None:
    """Ignore SIGINT from now on in this process (it is shutting down after a Ctrl-C).
    Main thread only (Python sets handlers there); elsewhere nothing happens."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_scope() -> Iterator[None]:
    """Run a launcher's or a process's share of the run with SIGINT raising
    ``KeyboardInterrupt`` (:func:`raise_interrupt`), also where it was inherited as
    ignored. A handler of the caller's own is left in place.

    On ``KeyboardInterrupt`` SIGINT stays ignored (:func:`ignore_sigint`): the process
    is expected to exit (the CLI exits 130). A library caller that goes on can take it
    back with ``signal.signal(signal.SIGINT, signal.default_int_handler)``. Otherwise
    the previous handler is restored on exit. Outside the main thread: does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)  # None: a handler not set from Python, left alone
    if previous in (signal.SIG_IGN, signal.default_int_handler):
        signal.signal(signal.SIGINT, raise_interrupt)
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        ignore_sigint()
        raise
    finally:
        if not interrupted and previous is not None:
            signal.signal(signal.SIGINT, previous)


def stop_children(stop_s: float = 30.0) -> None:
    """After Ctrl-C in the launching process, pass SIGINT on to the processes it spawned
    (a terminal signals the whole process group, and then each of them takes the two as
    one Ctrl-C, see :func:`igniter.run.interrupt_once`; a SIGINT sent to the launcher
    alone reaches them only this way). They get ``stop_s`` seconds (wall clock) to write
    their summaries, then SIGKILL: the launcher never waits on a process that trains on,
    and checkpoints are written atomically, so a kill loses no file."""
    import multiprocessing
    import os
    import time

    children = multiprocessing.active_children()
    for p in children:
        try:
            os.kill(p.pid, signal.SIGINT)
        except ProcessLookupError:  # it has just exited
            pass
    deadline = time.monotonic() + stop_s
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            logging.getLogger("igniter").warning(
                "spawned process %d still running %.0f s after Ctrl-C: killing it", p.pid, stop_s
            )
            p.kill()
            p.join()


@contextlib.contextmanager
def interrupt_once(window_s: float = 1.0) -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual, but a second SIGINT within
    ``window_s`` seconds of the first is ignored: under ``runner=spawn`` a terminal's
    Ctrl-C reaches every process directly and once more through the launcher, and the
    echo must not cut short the summary the first one started. A deliberate second
    Ctrl-C later still interrupts. Ignite's empty ``Engine run is terminating due to
    exception:`` error line for the ``KeyboardInterrupt`` is dropped. Once the run has
    left this context by Ctrl-C, its process ignores SIGINT while it shuts down (see
    :mod:`igniter.launch.signals`). Only the main thread can set signal handlers:
    elsewhere (training in a thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    last = {"t": -math.inf}

    def on_sigint(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now - last["t"] >= window_s:
            last["t"] = now
            quiet_engine_interrupts()  # the engines exist by now; Ignite logs in its except clause
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class NotedSignals:
    """Handlers that only record which of ``signums`` arrived last (a handler runs between
    bytecodes, anywhere in training: acting there could tear a checkpoint). Made by
    :func:`note_signals`.

    Args:
        signums: the signals to note.
    """

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.signums = signums
        self.received = 0  # the last noted signal's number, 0 before any
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def install(self) -> NotedSignals:
        """Replace the handlers of :attr:`signums` (submitit's, which would requeue without
        saving, among them), keeping the previous ones for :meth:`restore`.

        Raises:
            ValueError: called outside the main thread (Python sets handlers there only).
        """
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced (main thread only)."""
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, left alone
                signal.signal(signum, previous)
        self._previous.clear()


def note_signals(*signums: int) -> NotedSignals:
    """Note ``signums`` from now on instead of acting on them; read ``.received``.

    Raises:
        ValueError: called outside the main thread.
    """
    return NotedSignals(tuple(signums)).install()


def default_action(signum: int) -> None:
    """Give ``signum`` its default action again (SIGTERM: the process ends), e.g. once a
    noted signal has been handled and the scheduler may kill the process."""
    signal.signal(signum, signal.SIG_DFL)
