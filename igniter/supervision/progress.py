"""Every rank's progress, published for the hang watchdog (:mod:`igniter.supervision.watchdog`).

The training loop only *marks* progress (:func:`mark`: an attribute assignment, no I/O); a
daemon thread of each process, the :class:`Reporter`, publishes it every ``beat_s`` seconds
to the job's c10d ``TCPStore`` (the process group's store, or the spawn launcher's own) as
``igniter/watch/rank/<rank>``: rank, host, pid, iteration, phase, a counter inside the phase,
the process's CPU seconds, the bytes under the checkpoint directory being written, and
``beat``, the thread's own counter. ``beat`` keeps going while the main thread is blocked
(a sleep, a collective, a stuck read): a rank whose ``beat`` stops is not running at all
(stopped with SIGSTOP, frozen), and its stack cannot be read.

Phases, in the order they follow each other within an iteration (:data:`PHASES`): ``setup``
(building, before the first iteration: CPU time counts as progress), ``train`` (the
iteration's step started), ``trained`` (its step returned), ``eval`` (one more evaluation
batch per report), ``checkpoint`` (bytes written count as progress), ``done``. While
``torch.compile`` compiles (TorchDynamo's compile callbacks) the reporter's beat counts as progress.

When the watchdog has declared a hang it writes ``igniter/watch/verdict``; every reporter
that is still running then writes all its threads' stacks to its ``rank{N}.log``
(``faulthandler.dump_traceback``), publishes the main thread's innermost frames
(``igniter/watch/stack/<rank>``) and, when the launcher does not end the processes itself
(torchrun, SLURM), leaves with exit status 4 (:data:`igniter.errors.EXIT_HUNG`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.distributed as dist

__all__ = [
    "PHASES",
    "Progress",
    "PROGRESS",
    "mark",
    "checkpoint_phase",
    "attach_reports",
    "watch_compiles",
    "Reporter",
    "TimedStore",
    "connect",
    "innermost_frames",
    "rank_key",
    "read_records",
    "position",
    "describe_position",
    "never_reported",
    "VERDICT",
    "STACK",
    "DUMPED",
    "PREFIX",
]

logger = logging.getLogger("igniter")

PREFIX = "igniter/watch/"
VERDICT = PREFIX + "verdict"
STACK = PREFIX + "stack/"
DUMPED = PREFIX + "dumped/"
PHASES = ("setup", "train", "trained", "eval", "checkpoint", "done")


def rank_key(rank: int) -> str:
    """The store key of ``rank``'s progress record."""
    return f"{PREFIX}rank/{rank}"


@dataclass
class Progress:
    """What the main thread last did: ``iteration`` (the trainer's, -1 before the first),
    ``phase`` (one of :data:`PHASES`), ``count`` (evaluation batches in ``eval``),
    ``watch_dir`` (its bytes count as progress while in ``checkpoint``), ``compiling``
    (TorchDynamo compiles in flight), ``windows`` (the medians of the last few straggler windows,
    :mod:`igniter.supervision.stragglers`)."""

    iteration: int = -1
    phase: str = "setup"
    count: int = 0
    watch_dir: str | None = None
    compiling: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)


#: This process's progress: written by the main thread, read by the :class:`Reporter`.
PROGRESS = Progress()


def mark(phase: str, iteration: int | None = None, count: int = 0) -> None:
    """Record that the main thread reached ``phase`` (of :data:`PHASES`) of ``iteration``."""
    if iteration is not None:
        PROGRESS.iteration = iteration
    PROGRESS.phase, PROGRESS.count = phase, count


@contextlib.contextmanager
def checkpoint_phase(directory: str | Path) -> Iterator[None]:
    """Inside: a checkpoint is being written under ``directory``; bytes appearing there count
    as progress (a slow file system is alive, a stuck one is not)."""
    previous = (PROGRESS.phase, PROGRESS.count)
    PROGRESS.watch_dir, PROGRESS.phase = str(directory), "checkpoint"
    try:
        yield
    finally:
        PROGRESS.watch_dir = None
        PROGRESS.phase, PROGRESS.count = previous


def attach_reports(trainer: Any, evaluator: Any | None) -> None:
    """Mark progress at the trainer's iteration start and end, at every evaluation batch and
    at the end of training. Attach before user handlers: a user handler that blocks after
    ``trainer``'s ITERATION_COMPLETED then shows as a rank behind the others."""
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: mark("train", e.state.iteration))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: mark("trained", e.state.iteration))
    trainer.add_event_handler(Events.COMPLETED, lambda e: mark("done", e.state.iteration))
    if evaluator is not None:
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: mark("eval", None, e.state.iteration))


def watch_compiles() -> None:
    """Count TorchDynamo compiles in flight from now on (while one runs, the rank counts as alive). Called
    where a model is compiled: importing TorchDynamo costs seconds, not paid without compile."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # a torch without compile callbacks: compiles count as setup only
        return

    def start(_: Any) -> None:
        PROGRESS.compiling += 1

    def end(_: Any) -> None:
        PROGRESS.compiling = max(0, PROGRESS.compiling - 1)

    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)


def _bytes_under(directory: str | None) -> int:
    """Total size of the files under ``directory`` (two levels: ``.dcp`` directories), 0 if none."""
    if directory is None:
        return 0
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    total += sum(e.stat().st_size for e in os.scandir(entry.path) if e.is_file(follow_symlinks=False))
                else:
                    total += entry.stat().st_size
    return total


def innermost_frames(limit: int = 4) -> str:
    """The main thread's ``limit`` innermost Python frames, formatted as in a traceback."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    return "".join(traceback.format_stack(frame)[-limit:]) if frame is not None else ""


def _rank_log_stream() -> Any | None:
    """The open stream of this rank's ``rank{N}.log`` handler (:func:`igniter.console.setup_logging`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "stream", None) is not None:
            return handler
    return None


def dump_stacks(reason: str) -> None:
    """Log ``reason`` and write every thread's Python stack to this rank's log (stderr when
    there is none yet), with ``faulthandler``, which also reads threads blocked in C code."""
    logger.error("%s; the stacks of every thread of this process follow", reason, extra={"console": False})
    handler = _rank_log_stream()
    if handler is None:
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        return
    handler.acquire()
    try:
        handler.flush()
        faulthandler.dump_traceback(handler.stream, all_threads=True)
        handler.stream.flush()
    finally:
        handler.release()


class TimedStore:
    """A store client whose every call returns within ``timeout_s`` or raises ``TimeoutError``:
    a ``TCPStore`` client's ``check``/``get`` wait forever on a host that is stopped (SIGSTOP)
    whatever its timeout. Each call runs in a daemon thread (a stuck one never holds up the
    interpreter's exit); once one hangs, the later ones time out behind the client's lock.

    Args:
        store: the client.
        timeout_s: seconds a call may take.
    """

    def __init__(self, store: dist.Store, timeout_s: float) -> None:
        self.store, self.timeout_s = store, timeout_s

    def _call(self, name: str, *args: Any) -> Any:
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["value"] = getattr(self.store, name)(*args)
            except BaseException as e:  # handed to the caller's thread
                outcome["error"] = e

        thread = threading.Thread(target=call, name="igniter-store", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"the store did not answer {name} within {self.timeout_s:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._call("multi_get", keys)


def connect(host: str, port: int, timeout_s: float) -> TimedStore:
    """A client of the store at ``host:port`` with its own connection, every call bounded by
    ``timeout_s`` (:class:`TimedStore`; the process group's client waits ``runner.timeout_s``)."""
    client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return TimedStore(client, timeout_s)


class Reporter(threading.Thread):
    """The daemon thread that publishes this rank's progress every ``beat_s`` seconds and
    obeys a verdict (see the module docstring).

    Args:
        store: a store client of this thread's own (:func:`connect`).
        rank: this process's global rank.
        beat_s: seconds between reports.
        watch: called after every report with the store (the in-process watchdog of rank 0
            and of the other ranks, :mod:`igniter.supervision.watchdog`).

    ``also``: called after every report with the store too (rank 0's straggler detector); an
    error in it is logged (debug) and the reports go on.
    """

    def __init__(
        self, store: dist.Store, rank: int, beat_s: float, watch: Callable[[dist.Store], None] | None = None
    ) -> None:
        super().__init__(name="igniter-progress", daemon=True)
        self.store, self.rank, self.beat_s, self.watch = store, rank, beat_s, watch
        self.beat = 0
        self.also: Callable[[dist.Store], None] | None = None
        self.final = False  # the process is leaving (its function returned or raised): not a hang
        self.stopped = threading.Event()
        self.host, self.pid = socket.gethostname(), os.getpid()

    def record(self) -> dict[str, Any]:
        """This rank's progress record as published."""
        p = PROGRESS
        return {
            "rank": self.rank,
            "host": self.host,
            "pid": self.pid,
            "iteration": p.iteration,
            "phase": p.phase,
            "count": p.count,
            "compiling": p.compiling,
            "cpu_s": round(time.process_time(), 1),
            "bytes": _bytes_under(p.watch_dir) if p.phase == "checkpoint" else 0,
            "beat": self.beat,
            "time": round(time.time(), 1),
            "beat_s": self.beat_s,
            "windows": p.windows,
            "final": self.final,
        }

    def publish(self) -> None:
        """Write this rank's record (the caller's thread; :meth:`start` does it once first,
        so every rank has a record before its first iteration)."""
        self.beat += 1
        self.store.set(rank_key(self.rank), json.dumps(self.record()))

    def start(self) -> None:
        self.publish()
        super().start()

    def run(self) -> None:
        while not self.stopped.wait(self.beat_s):
            try:
                self.publish()
                if self.store.check([VERDICT]):
                    self.obey(json.loads(self.store.get(VERDICT)))
                    return
                if self.watch is not None:
                    self.watch(self.store)
                if self.also is not None:
                    try:
                        self.also(self.store)
                    except Exception as e:  # never stop the reports (the hang watchdog reads them)
                        logger.debug("straggler detection failed: %s", e)
            except (RuntimeError, dist.DistError, OSError) as e:  # the store's host is gone or stopped
                if self.watch is not None:
                    self.watch(None)
                logger.debug("progress report failed: %s", e)
        if self.stopped.is_set():  # stopped by its process, which is leaving: its last record says so
            self.final = True
            with contextlib.suppress(RuntimeError, dist.DistError, OSError):
                self.publish()

    def obey(self, verdict: dict[str, Any]) -> None:
        """Dump this process's stacks and publish its innermost frames (the watcher ends the
        process; without a watching launcher a subclass leaves by itself,
        :mod:`igniter.supervision.watchdog`)."""
        dump_stacks(f"watchdog: {verdict.get('summary', 'a rank made no progress')}")
        with contextlib.suppress(RuntimeError, dist.DistError, OSError):
            self.store.set(f"{STACK}{self.rank}", innermost_frames())
            self.store.set(f"{DUMPED}{self.rank}", "1")


def leave_hung() -> None:
    """Flush the logs and end this process with exit status 4 (no cleanup: the main
    thread is blocked; checkpoints are written atomically, so none is torn)."""
    from igniter.errors import EXIT_HUNG

    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_HUNG)


def never_reported(rank: int) -> dict[str, Any]:
    """The record shown for a rank that never reported (its process or reporter did not start)."""
    return {
        "rank": rank,
        "host": "?",
        "pid": "?",
        "iteration": -1,
        "phase": "setup",
        "count": 0,
        "cpu_s": 0.0,
        "bytes": 0,
        "beat": 0,
    }


def position(record: dict[str, Any]) -> tuple[int, int, int]:
    """Where ``record``'s rank is, comparable between ranks: (iteration, phase order, count)."""
    return (record["iteration"], PHASES.index(record["phase"]) if record["phase"] in PHASES else 0, record["count"])


def describe_position(record: dict[str, Any]) -> str:
    """``record``'s position in words, e.g. "in the training step of iteration 12"."""
    phase = {
        "setup": "before its first iteration",
        "train": "in the training step of",
        "trained": "after the training step of",
        "eval": "in the evaluation after",
        "checkpoint": "writing a checkpoint at",
        "done": "after the last iteration,",
    }
    text = phase.get(record["phase"], record["phase"])
    return text if record["phase"] == "setup" else f"{text} iteration {record['iteration']}"


def read_records(store: dist.Store, ranks: list[int]) -> dict[int, dict[str, Any] | None]:
    """Every rank's record in ``store`` (``None`` for a rank that has not published yet)."""
    present = [r for r in ranks if store.check([rank_key(r)])]
    values = store.multi_get([rank_key(r) for r in present]) if present else []
    records: dict[int, dict[str, Any] | None] = dict.fromkeys(ranks)
    records.update({r: json.loads(v) for r, v in zip(present, values)})
    return records
