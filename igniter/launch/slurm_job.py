"""What igniter decides inside a SLURM job, under any runner: a warning signal saves a
checkpoint and requeues. (The ``slurm`` runner itself is in
:mod:`igniter.launch.slurm_runner`; the job's variables are read by
:class:`igniter.launch.environment.Slurm`; the signal handlers are installed by
:mod:`igniter.launch.signals`.)

Preemption and time limits: SLURM sends ``SIGUSR2`` ahead of the time limit
(submitit asks for it ``signal_delay_s`` seconds before; ``scancel
--signal=USR2`` sends it by hand) and ``SIGTERM`` on preemption. igniter notes
the signal; at the next iteration boundary all ranks agree (an ``all_reduce``
every 10 iterations), save a checkpoint atomically, and on ``SIGUSR2`` rank 0
runs ``scontrol requeue``. The requeued job runs the same command in the same
run directory and ``resume: auto`` continues from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from igniter.errors import EXIT_FAILED, IgniterError
from igniter.launch.environment import Slurm
from igniter.launch.signals import default_action, note_signals

__all__ = ["Preempted", "attach_preemption", "requeue_job", "wait_for_requeue", "slurm_job_id"]

logger = logging.getLogger("igniter")


class Preempted(IgniterError):
    """Training stopped on a SLURM signal after saving a checkpoint; ``requeued`` tells
    whether igniter asked SLURM to requeue the job. Exit status 1: the attempt did not
    finish (the requeued job continues it).

    Args:
        signum: the signal (``SIGUSR2``: time limit, ``SIGTERM``: preemption).
        iteration: the iteration at which training stopped (its checkpoint is saved).
        requeued: whether ``scontrol requeue`` succeeded.
    """

    exit_status = EXIT_FAILED

    def __init__(self, signum: int, iteration: int, requeued: bool) -> None:
        self.signum, self.iteration, self.requeued = signum, iteration, requeued
        super().__init__(f"stopped on {signal.Signals(signum).name} at iteration {iteration} (checkpoint saved)")


def slurm_job_id() -> str | None:
    """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for array jobs."""
    return Slurm().job_id


def attach_preemption(trainer: Engine, save_checkpoint: Callable[[Engine], None] | None) -> None:
    """Inside a SLURM job: save and requeue on SIGUSR2 (time limit), save and stop on
    SIGTERM (preemption). Replaces submitit's handlers, which would requeue without
    saving. Sets ``trainer.state.stopped_by`` to a :class:`Preempted`."""
    noted = note_signals(signal.SIGUSR2, signal.SIGTERM)
    check_every = 10 if idist.get_world_size() > 1 else 1

    @trainer.on(Events.ITERATION_COMPLETED(every=check_every))
    def _maybe_stop(engine: Engine) -> None:
        signum = noted.received
        if idist.get_world_size() > 1:
            signum = int(idist.all_reduce(torch.tensor(signum), op="MAX").item())
        if not signum:
            return
        default_action(signal.SIGTERM)  # from now on SLURM may kill us
        if save_checkpoint is not None:
            save_checkpoint(engine)
        requeued = False
        if signum == signal.SIGUSR2 and idist.get_rank() == 0:
            requeued = requeue_job(
                f"SLURM signal {signal.Signals(signum).name} at iteration {engine.state.iteration}: checkpoint saved"
            )
        if idist.get_world_size() > 1:
            requeued = bool(idist.broadcast(torch.tensor(int(requeued)), src=0).item())
        engine.state.stopped_by = Preempted(signum, engine.state.iteration, requeued)
        engine.terminate()


def requeue_job(reason: str) -> bool:
    """``scontrol requeue`` this SLURM job; logs ``reason`` and the outcome (a warning).

    Returns:
        Whether the requeue succeeded (``False`` outside a job or when ``scontrol`` fails).
    """
    job = slurm_job_id() or "?"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        requeued, error = r.returncode == 0, r.stderr.strip()
    except OSError as e:  # no scontrol on this host
        requeued, error = False, str(e)
    logger.warning("%s, %s", reason, f"job {job} requeued" if requeued else f"requeue of {job} failed: {error}")
    return requeued


def wait_for_requeue(stop: Preempted, limit_s: float = 300) -> None:
    """After a requeue (or on preemption) SLURM ends this attempt and starts the next;
    returning would let submitit record a finished job, so wait to be killed."""
    if stop.requeued or stop.signum == signal.SIGTERM:
        logger.warning("%s; waiting for SLURM to end this attempt", stop)
        time.sleep(limit_s)
