"""A collective that times out anyway (the watchdog off, or slower than ``runner.timeout_s``)
names the ranks that did not join it, from their progress records
(:mod:`igniter.supervision.progress`), beside gloo's or NCCL's own message, which names none.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from igniter.supervision.progress import describe_position, position, read_records

__all__ = ["is_collective_timeout", "CollectiveTimeout", "describe_stragglers"]


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is gloo's or NCCL's timeout of a collective (their messages say "Timed out")."""
    return isinstance(error, (RuntimeError, dist.DistError)) and "timed out" in str(error).lower()


class CollectiveTimeout(RuntimeError):
    """A collective timed out (``runner.timeout_s``); the message adds the ranks that did not
    join it, as their progress records show, to gloo's/NCCL's own."""

    def __init__(self, error: BaseException, stragglers: str) -> None:
        who = stragglers or "no rank is behind this one in its progress records"
        super().__init__(
            f"a collective timed out (runner.timeout_s); the rank(s) that did not join it: {who}. {type(error).__name__}: {error}"
        )


def describe_stragglers(store: dist.Store, world_size: int, rank: int) -> str:
    """For a collective that timed out: the ranks behind this one (their records), or ''."""
    try:
        records = {r: v for r, v in read_records(store, list(range(world_size))).items() if v is not None}
    except (RuntimeError, dist.DistError, OSError):
        return "the progress records could not be read"
    if rank not in records:
        return ""
    mine, now = position(records[rank]), time.time()
    parts = []
    for r, v in sorted(records.items()):
        silent_s = now - v.get("time", now)
        if silent_s > 3 * v.get("beat_s", 5.0):  # its reporter thread stopped too: the process is not running
            parts.append(
                f"rank {r} (host {v['host']}, pid {v['pid']}) is not responding: its last report, {silent_s:.0f} s ago, was {describe_position(v)}"
            )
        elif position(v) < mine:
            parts.append(f"rank {r} (host {v['host']}, pid {v['pid']}) is behind: {describe_position(v)}")
    parts += [f"rank {r} never reported progress" for r in range(world_size) if r not in records]
    return "; ".join(parts)
