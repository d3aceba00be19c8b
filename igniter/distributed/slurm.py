"""The ``slurm`` runner: every process is a SLURM task (srun, or submitit through
Hydra's submitit launcher), and a warning signal saves a checkpoint and requeues.

Process group: ``ignite.distributed`` forms it from ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST`` (master address = its
first host) and the master port ``15000 + last 4 digits of SLURM_JOB_ID`` (so
jobs sharing a node differ), see ``ignite/distributed/comp_models/native.py``.
``runner.master_port`` overrides the port. Under submitit's *local* executor
(no SLURM), submitit's ``TorchDistributedEnvironment`` supplies the same values.

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
import os
import signal
import subprocess
import time
from typing import Any, Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from igniter.distributed.runners import JoinRunner
from igniter.distributed.threads import ThreadPlan
from igniter.errors import Problem
from igniter.registry import runner_registry

__all__ = ["SlurmRunner", "Preempted", "attach_preemption", "wait_for_requeue", "slurm_job_id", "in_slurm_task"]

logger = logging.getLogger("igniter")

#: What ignite's SLURM mode requires (it raises naming the first one missing).
SLURM_TASK_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES")


class Preempted(Exception):
    """Training stopped on a SLURM signal after saving a checkpoint; ``requeued`` tells
    whether igniter asked SLURM to requeue the job."""

    def __init__(self, signum: int, iteration: int, requeued: bool) -> None:
        self.signum, self.iteration, self.requeued = signum, iteration, requeued
        super().__init__(f"stopped on {signal.Signals(signum).name} at iteration {iteration} (checkpoint saved)")


def slurm_job_id() -> str | None:
    """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for array jobs."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def in_slurm_task() -> bool:
    """True inside a task started by srun (not merely inside an sbatch allocation)."""
    return all(v in os.environ for v in SLURM_TASK_VARS) and "SLURM_STEP_ID" in os.environ


@runner_registry("slurm")
class SlurmRunner(JoinRunner):
    """One process per SLURM task; ``runner.nproc_per_node`` tasks per node on
    ``runner.nnodes`` nodes (Hydra's SLURM launcher derives ``tasks_per_node`` and
    ``nodes`` from them)."""

    @property
    def world_size(self) -> int:
        env = os.environ.get("SLURM_NTASKS")
        return int(env) if env and in_slurm_task() else self.cfg.nproc_per_node * self.cfg.nnodes

    @property
    def is_primary(self) -> bool:
        return os.environ.get("SLURM_PROCID", "0") == "0"

    def validate(self, here: bool = True) -> list[Problem]:
        problems = super().validate(here)
        for key in ("nproc_per_node", "nnodes"):
            if self.cfg[key] < 1:
                problems.append(Problem(f"runner.{key}", "expected at least 1", self.cfg[key]))
        if here and not in_slurm_task():
            where = (
                "inside an sbatch allocation but not in an srun task (it would hang): run `srun igniter ...`"
                if "SLURM_JOB_ID" in os.environ
                else "outside SLURM: submit with `igniter -m hydra/launcher=slurm runner=slurm ...`, or run `srun igniter ...` (slurm/sbatch_template.sh)"
            )
            problems.append(Problem("runner.name", f"runner=slurm runs one process per SLURM task, but this is {where}", "slurm"))
        return problems

    def thread_plan(self) -> ThreadPlan:
        """Each task owns ``--cpus-per-task`` CPUs when SLURM sets ``SLURM_CPUS_PER_TASK``."""
        return ThreadPlan(configured=self.cfg.get("threads_per_process"), cpus_per_process_var="SLURM_CPUS_PER_TASK")

    def join_environment(self) -> None:
        if "SUBMITIT_LOCAL_JOB_ID" in os.environ and "SLURM_JOB_ID" not in os.environ:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
            return
        if not in_slurm_task():
            missing = [v for v in (*SLURM_TASK_VARS, "SLURM_STEP_ID") if v not in os.environ]
            raise RuntimeError(
                f"runner=slurm must run inside srun-started SLURM tasks, but {', '.join(missing)} is not set "
                "(an sbatch script must call `srun igniter ...`, see slurm/sbatch_template.sh)"
            )
        if self.cfg.master_port is not None:
            # ignite uses MASTER_PORT only when all of the torch variables are set.
            hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True)
            os.environ.update(
                RANK=os.environ["SLURM_PROCID"],
                LOCAL_RANK=os.environ["SLURM_LOCALID"],
                WORLD_SIZE=os.environ["SLURM_NTASKS"],
                MASTER_ADDR=(hosts.stdout.split() or [os.environ["SLURM_JOB_NODELIST"]])[0],
                MASTER_PORT=str(self.cfg.master_port),
            )


def attach_preemption(trainer: Engine, save_checkpoint: Callable[[Engine], None] | None) -> None:
    """Inside a SLURM job: save and requeue on SIGUSR2 (time limit), save and stop on
    SIGTERM (preemption). Replaces submitit's handlers, which would requeue without
    saving. Sets ``trainer.state.stopped_by`` to a :class:`Preempted`."""
    received: dict[str, int] = {"signum": 0}

    def note(signum: int, frame: Any) -> None:
        received["signum"] = signum

    signal.signal(signal.SIGUSR2, note)
    signal.signal(signal.SIGTERM, note)
    check_every = 10 if idist.get_world_size() > 1 else 1

    @trainer.on(Events.ITERATION_COMPLETED(every=check_every))
    def _maybe_stop(engine: Engine) -> None:
        signum = received["signum"]
        if idist.get_world_size() > 1:
            signum = int(idist.all_reduce(torch.tensor(signum), op="MAX").item())
        if not signum:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from now on SLURM may kill us
        if save_checkpoint is not None:
            save_checkpoint(engine)
        requeued = False
        if signum == signal.SIGUSR2 and idist.get_rank() == 0:
            job = slurm_job_id() or "?"
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = r.returncode == 0
            logger.warning(
                "SLURM signal %s at iteration %d: checkpoint saved, %s",
                signal.Signals(signum).name,
                engine.state.iteration,
                f"job {job} requeued" if requeued else f"requeue of {job} failed: {r.stderr.strip()}",
            )
        if idist.get_world_size() > 1:
            requeued = bool(idist.broadcast(torch.tensor(int(requeued)), src=0).item())
        engine.state.stopped_by = Preempted(signum, engine.state.iteration, requeued)
        engine.terminate()


def wait_for_requeue(stop: Preempted, limit_s: float = 300) -> None:
    """After a requeue (or on preemption) SLURM ends this attempt and starts the next;
    returning would let submitit record a finished job, so wait to be killed."""
    if stop.requeued or stop.signum == signal.SIGTERM:
        logger.warning("%s; waiting for SLURM to end this attempt", stop)
        time.sleep(limit_s)
