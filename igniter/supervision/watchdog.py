"""The hang watchdog: a rank that makes no progress for ``runner.hang_timeout_s`` ends the job, named.

Every rank publishes its progress (:mod:`igniter.supervision.progress`). The job is hung when *no*
rank progressed for ``hang_timeout_s`` s (waiting for a slow but progressing peer is not a hang).
The culprit is then, in this order:

1. a rank whose reporter thread stopped beating (not running: SIGSTOP, frozen; no stack to read);
2. else the rank(s) furthest behind (iteration, phase, count): the others wait for them;
3. else every rank (all at the same point: a collective that not every rank called).

Who watches (:class:`LauncherWatchdog`, :func:`in_process_watch`):

* ``runner=spawn`` on one node: the launcher, which hosts a ``TCPStore`` of its own; on a hang it
  writes the verdict, waits for the live ranks' stacks, kills every worker, raises ``RankHung`` (4).
* ``torchrun``, ``slurm`` and multi-node spawn (no igniter launcher that sees every rank):
  rank 0's reporter thread reads every rank; the others read rank 0's record only, so that a
  hung rank 0 (or its store not answering) is noticed too. The deciding rank prints the
  message, requeues the SLURM job if asked, kills a stopped culprit on its host, then writes
  :data:`DECIDED`. The others dump their stacks and wait for it before they leave (exit
  status 4): one leaving first would have ``srun --kill-on-bad-exit`` or torchrun's agent end
  the deciding rank before its message and requeue. The deciding rank (the store) leaves last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from igniter.supervision.progress import (
    DUMPED,
    PREFIX,
    STACK,
    VERDICT,
    Reporter,
    connect,
    describe_position,
    dump_stacks,
    innermost_frames,
    leave_hung,
    never_reported,
    position,
    rank_key,
    read_records,
)
from igniter.supervision.stragglers import StragglerDetector, report

__all__ = [
    "WatchPlan",
    "HangDetector",
    "Verdict",
    "LauncherWatchdog",
    "in_process_watch",
    "start_reporting",
    "DUMP_WAIT_S",
]

logger = logging.getLogger("igniter")

#: Seconds the watchdog waits for the live ranks to write their stacks before ending them.
DUMP_WAIT_S = 15.0
#: Written by the deciding rank once its message is out (and the job requeued): the others may leave.
DECIDED = PREFIX + "decided"
#: ``LEAVING + str(rank)``: that rank saw :data:`DECIDED` and leaves (the store's host may go).
LEAVING = PREFIX + "leaving/"


@dataclass(frozen=True)
class WatchPlan:
    """What every process needs to report and watch (picklable, passed to spawned workers).

    ``hang_timeout_s``: seconds without progress (``None``: no watchdog, reports only).
    ``store``: ``"host:port"`` of the launcher's store when the launcher watches (spawn on
    one node), ``None``: the process group's store, rank 0 watches.
    ``requeue``: with ``runner.requeue_on_hang`` inside a SLURM job, the function that requeues
    it (called with the reason) instead of ending it; ``None``: end the job.
    ``collective_timeout_s``: ``runner.timeout_s``.
    ``straggler_factor``: ``runner.straggler_factor`` (rank 0 names slow ranks,
    :mod:`igniter.supervision.stragglers`; ``None``: off).
    """

    hang_timeout_s: float | None = 120.0
    store: str | None = None
    requeue: Callable[[str], Any] | None = None
    collective_timeout_s: float = 600.0
    straggler_factor: float | None = None

    @property
    def beat_s(self) -> float:
        """Seconds between two reports of a rank: a tenth of the hang timeout (of the collective
        timeout without a watchdog, so a timed-out collective finds the silent ranks), within 0.5-5 s."""
        return min(5.0, max(0.5, (self.hang_timeout_s or self.collective_timeout_s) / 10))


@dataclass
class _Seen:
    """What a watcher last saw of one rank, with its own monotonic clock."""

    record: dict[str, Any] | None = None
    signature: tuple | None = None
    changed_at: float = 0.0
    beat_at: float = 0.0


def _signature(record: dict[str, Any]) -> tuple:
    """What must change for the rank to count as progressing: its position, plus CPU seconds
    while it sets up or records the run's end, plus bytes while it writes a checkpoint. While
    TorchDynamo compiles every beat counts: inductor compiles in worker processes, whose CPU
    time is not this process's, and a compile reports nothing until it ends."""
    compiling = record["beat"] if record.get("compiling", 0) > 0 else None
    cpu = record["cpu_s"] if record["phase"] in ("setup", "done") else None  # building; the summary and curves
    return (record["iteration"], record["phase"], record["count"], cpu, record["bytes"], compiling)


@dataclass
class Verdict:
    """A declared hang: the ``culprits`` (records), whether they are ``not_responding``
    (their reporter stopped), how long the job made no progress (``stalled_s``) and
    every rank's last record (``records``)."""

    culprits: list[dict[str, Any]]
    not_responding: bool
    stalled_s: float
    timeout_s: float
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    stacks: dict[int, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One sentence: which rank, host, pid, where, for how long."""
        who = ", ".join(f"rank {c['rank']} (host {c['host']}, pid {c['pid']})" for c in self.culprits)
        where = ", ".join(sorted({describe_position(c) for c in self.culprits}))
        if self.not_responding:  # a stopped rank's record is its last report, up to a beat older than the stop
            where = f"(its last report, before it stopped: {where})"
        verb = "make" if len(self.culprits) > 1 else "made"
        return (
            f"{who} {verb} no progress for {self.stalled_s:.0f} s (runner.hang_timeout_s = {self.timeout_s:g}) {where}"
        )

    def message(self, requeue: bool = False) -> str:
        """The console paragraph, then the culprits' innermost frames when they could be read
        (``requeue``: the SLURM job is being requeued, ``runner.requeue_on_hang``)."""
        text = f"{self.summary}."
        if self.not_responding:
            text += " It is not running (stopped, e.g. by SIGSTOP, or frozen): its stack cannot be read."
        elif len(self.culprits) == len(self.records) > 1:
            text += " Every rank stopped at the same point: a collective that not every rank called, or a hang in every rank."
        others = [r for r in sorted(self.records) if r not in {c["rank"] for c in self.culprits}]
        if others:
            text += (
                " Waiting for it: " + ", ".join(f"rank {r} {describe_position(self.records[r])}" for r in others) + "."
            )
        ending = (
            "The job is requeued (runner.requeue_on_hang) and resumes from the newest checkpoint"
            if requeue
            else "The checkpoints on disk are complete: the same command resumes from the newest"
        )
        text += (
            " Every process of the job was ended (exit status 4); the stacks of the live ranks are in their"
            f" rank{{N}}.log. {ending}."
        )
        for c in self.culprits:
            stack = self.stacks.get(c["rank"], "").rstrip()
            if stack:
                text += f"\n  rank {c['rank']}'s innermost frames:\n" + "\n".join(
                    "    " + line for line in stack.splitlines()
                )
        return text


class HangDetector:
    """Decides from successive observations of the ranks' records whether the job is hung.

    Args:
        ranks: the global ranks to watch.
        timeout_s: ``runner.hang_timeout_s``.
        beat_s: the reporters' period (a reporter silent for ``max(3 beats, timeout/2)`` is not responding).
        now: the watcher's start (monotonic seconds): a rank that never reports counts from here.
    """

    def __init__(self, ranks: list[int], timeout_s: float, beat_s: float, now: float) -> None:
        self.timeout_s, self.silent_s = timeout_s, max(3 * beat_s, timeout_s / 2)
        self.seen = {r: _Seen(changed_at=now, beat_at=now) for r in ranks}

    def observe(self, records: dict[int, dict[str, Any] | None], now: float) -> Verdict | None:
        """Take in the latest records (``None``: not published yet, or unreadable); return a
        :class:`Verdict` once no watched rank has progressed for ``timeout_s`` seconds."""
        for rank, record in records.items():
            seen = self.seen.setdefault(rank, _Seen(changed_at=now, beat_at=now))
            if record is None:
                continue
            if seen.record is None or record["beat"] != seen.record["beat"]:
                seen.beat_at = now
            signature = _signature(record)
            if signature != seen.signature:
                seen.signature, seen.changed_at = signature, now
            seen.record = record
        stalled_s = now - max(s.changed_at for s in self.seen.values())
        if stalled_s < self.timeout_s:
            return None
        known = {r: s.record for r, s in self.seen.items() if s.record is not None}
        if not known:  # nobody has reported yet: the process group is still forming
            return None
        if len(known) == len(self.seen) and all(r.get("final") for r in known.values()):
            return None  # every process is leaving (a slow exit is not a hang)
        silent = [
            s.record or never_reported(r)
            for r, s in self.seen.items()
            if now - s.beat_at >= self.silent_s and not (s.record or {}).get("final")
        ]
        if silent:
            culprits = silent
        else:
            lowest = min(position(r) for r in known.values())
            culprits = [r for r in known.values() if position(r) == lowest]
        return Verdict(sorted(culprits, key=lambda r: r["rank"]), bool(silent), stalled_s, self.timeout_s, known)


def _collect_stacks(store: dist.Store, verdict: Verdict) -> None:
    """Wait (at most :data:`DUMP_WAIT_S`) for the responding ranks' stacks; keep the culprits' innermost frames."""
    silent = {c["rank"] for c in verdict.culprits} if verdict.not_responding else set()
    waiting = [r for r in verdict.records if r not in silent]
    deadline = time.monotonic() + DUMP_WAIT_S
    while waiting and time.monotonic() < deadline:
        waiting = [r for r in waiting if not store.check([f"{DUMPED}{r}"])]
        time.sleep(0.2)
    for c in verdict.culprits:
        if c["rank"] not in silent and store.check([f"{STACK}{c['rank']}"]):
            verdict.stacks[c["rank"]] = store.get(f"{STACK}{c['rank']}").decode()


def _kill_local(records: list[dict[str, Any]]) -> None:
    """SIGKILL the processes of ``records`` that run on this host (a stopped process keeps a
    SIGTERM pending until it is continued, so torchrun's agent would wait its grace period)."""
    host = socket.gethostname()
    for record in records:
        if record["host"] == host and record["pid"] != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGKILL)


class LauncherWatchdog(threading.Thread):
    """The spawn launcher's watchdog thread: hosts the store the workers report to, and ends
    them all when the job hangs (``verdict`` is then set; the launcher raises ``RankHung``).

    Args:
        world_size: number of ranks.
        timeout_s: ``runner.hang_timeout_s``.
        host: the address the workers reach the store at.
    """

    def __init__(self, world_size: int, timeout_s: float, host: str = "127.0.0.1") -> None:
        super().__init__(name="igniter-watchdog", daemon=True)
        self.world_size, self.timeout_s = world_size, timeout_s
        self.server = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.host, self.port = host, self.server.port
        self.verdict: Verdict | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        ranks = list(range(self.world_size))
        plan = WatchPlan(self.timeout_s)
        detector = HangDetector(ranks, self.timeout_s, plan.beat_s, time.monotonic())
        store = connect(self.host, self.port, timeout_s=10)
        while not self.stopped.wait(plan.beat_s):
            verdict = detector.observe(read_records(store, ranks), time.monotonic())
            if verdict is None:
                continue
            store.set(VERDICT, json.dumps({"summary": verdict.summary}))
            _collect_stacks(store, verdict)
            self.verdict = verdict
            for child in multiprocessing.active_children():
                child.kill()
            return

    def stop(self) -> None:  # the launch is over
        self.stopped.set()
        self.join(timeout=10)


def in_process_watch(rank: int, world_size: int, plan: WatchPlan) -> Any:
    """The ``watch`` callback of a rank's :class:`~igniter.supervision.progress.Reporter`
    when no launcher watches: rank 0 watches every rank, the others rank 0 only."""
    assert plan.hang_timeout_s is not None
    ranks = list(range(world_size)) if rank == 0 else sorted({0, rank})
    detector = HangDetector(ranks, plan.hang_timeout_s, plan.beat_s, time.monotonic())
    unreachable_since: list[float] = []

    def watch(store: dist.Store | None) -> None:
        now = time.monotonic()
        if store is None:  # the store's host (rank 0) does not answer
            unreachable_since[:] = unreachable_since or [now]
            last = detector.seen[0].record or never_reported(0)  # stopped before this rank first read it
            if rank != 0 and not last.get("final") and now - unreachable_since[0] >= plan.hang_timeout_s:
                verdict = Verdict([last], True, now - detector.seen[0].changed_at, plan.hang_timeout_s, {0: last})
                _decide(None, verdict, rank, plan)
            return
        unreachable_since.clear()
        verdict = detector.observe(read_records(store, ranks), now)
        if verdict is None:
            return
        if rank != 0 and not verdict.not_responding:
            return  # rank 0 is alive and watches every rank: its decision
        _decide(store, verdict, rank, plan)

    return watch


def _decide(store: dist.Store | None, verdict: Verdict, rank: int, plan: WatchPlan) -> None:
    """End the job (or requeue it) on ``verdict``, from a rank's reporter thread."""
    if store is not None:
        store.set(VERDICT, json.dumps({"summary": verdict.summary}))
        store.set(f"{STACK}{rank}", innermost_frames())
        store.set(f"{DUMPED}{rank}", "1")
        _collect_stacks(store, verdict)
    dump_stacks(f"watchdog: {verdict.summary}")
    logger.error("%s", verdict.message(plan.requeue is not None))
    if rank != 0:  # rank 0 (the console's rank) is the hung one: say it on this rank's stderr too
        print(f"igniter (rank {rank}): {verdict.message()}", file=sys.stderr, flush=True)
    if plan.requeue is not None:
        plan.requeue(f"watchdog: {verdict.summary}")
    silent = {c["rank"] for c in verdict.culprits} if verdict.not_responding else set()
    _kill_local([c for c in verdict.culprits if c["rank"] in silent])
    if store is not None:  # the others leave now; this rank hosts the store (rank 0): it leaves last
        store.set(DECIDED, "1")
        waiting = [r for r in verdict.records if r != rank and r not in silent]
        deadline = time.monotonic() + 5.0
        while waiting and time.monotonic() < deadline:
            waiting = [r for r in waiting if not store.check([f"{LEAVING}{r}"])]
            time.sleep(0.01)
        _kill_local([c for c in verdict.culprits if c["rank"] in waiting])  # a culprit that did not leave itself
    leave_hung()


class _LeaveAfterDecision(Reporter):
    """A rank's reporter when no launcher watches: on a verdict it dumps its stacks, waits
    (at most ``DUMP_WAIT_S`` + 30 s) for :data:`DECIDED`, notes :data:`LEAVING`, leaves (4)."""

    def obey(self, verdict: dict[str, Any]) -> None:
        super().obey(verdict)
        deadline = time.monotonic() + DUMP_WAIT_S + 30.0
        try:
            while not self.store.check([DECIDED]) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.store.set(f"{LEAVING}{self.rank}", "1")
        except (RuntimeError, dist.DistError, OSError):  # the deciding rank (the store's host) is gone
            pass
        leave_hung()


def _group_store_address() -> tuple[str, int] | None:
    """``(host, port)`` of the TCPStore under the default process group's store, if it is one."""
    store: Any = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return (store.host, store.port) if isinstance(store, dist.TCPStore) else None


def straggler_watch(factor: float, world_size: int) -> Callable[[dist.Store], None]:
    """Rank 0's reporter callback: read every rank's record, hand the slow ranks of each newly
    complete window to the main thread (:func:`igniter.supervision.stragglers.report`)."""
    ranks = list(range(world_size))
    detector = StragglerDetector(factor, ranks)

    def watch(store: dist.Store) -> None:
        found = detector.observe(read_records(store, ranks))
        if found:
            report(found)

    return watch


def start_reporting(plan: WatchPlan) -> Reporter | None:
    """Start this process's :class:`~igniter.supervision.progress.Reporter` (and, without a
    watching launcher, its in-process watchdog). ``None`` outside a process group of 2 or more."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if plan.store is not None:  # the launcher watches and ends the workers itself
        host, port = plan.store.rsplit(":", 1)
        reporter = Reporter(connect(host, int(port), 10), rank, plan.beat_s)
    else:
        address = _group_store_address()
        if address is None:
            return None
        watch = in_process_watch(rank, world_size, plan) if plan.hang_timeout_s is not None else None
        reporter = _LeaveAfterDecision(
            connect(*address, timeout_s=min(10.0, plan.beat_s * 2)), rank, plan.beat_s, watch
        )
    if rank == 0 and plan.straggler_factor is not None:
        reporter.also = straggler_watch(plan.straggler_factor, world_size)
    reporter.start()
    if plan.store is None and watch is not None and rank != 0:  # know rank 0's host and pid before training
        with contextlib.suppress(RuntimeError, dist.DistError, OSError):
            reporter.store.get(rank_key(0))  # waits (a bounded time) for rank 0's first record
            watch(reporter.store)
    return reporter
