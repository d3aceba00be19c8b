"""The ``slurm`` runner: every process is a SLURM task (srun, or submitit through
Hydra's submitit launcher).

Process group: ``ignite.distributed`` forms it from ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST`` (master address = its
first host) and the master port ``15000 + last 4 digits of SLURM_JOB_ID`` (so
jobs sharing a node differ), see ``ignite/distributed/comp_models/native.py``.
``runner.master_port`` overrides the port. Under submitit's *local* executor
(no SLURM), submitit's ``TorchDistributedEnvironment`` supplies the same values.
The variables are read by :mod:`igniter.launch.environment`.

Time limits and preemption (under any runner inside a SLURM job) are handled by
:mod:`igniter.launch.slurm_job`, from :meth:`igniter.launch.runners.Runner.attach`.
"""

from __future__ import annotations

import os

from igniter.errors import Problem
from igniter.launch.cpu_threads import ThreadPlan
from igniter.launch.environment import Slurm, SubmititLocal
from igniter.launch.runners import JoinRunner
from igniter.registry import runner_registry

__all__ = ["SlurmRunner"]


@runner_registry("slurm")
class SlurmRunner(JoinRunner):
    """One process per SLURM task; ``runner.nproc_per_node`` tasks per node on
    ``runner.nnodes`` nodes (Hydra's SLURM launcher derives ``tasks_per_node`` and
    ``nodes`` from them)."""

    @property
    def world_size(self) -> int:
        slurm = Slurm()
        return slurm.world_size if slurm.is_task else self.cfg.nproc_per_node * self.cfg.nnodes

    @property
    def is_primary(self) -> bool:
        return Slurm().rank == 0

    def validate(self, here: bool = True) -> list[Problem]:
        problems = super().validate(here)
        for key in ("nproc_per_node", "nnodes"):
            if self.cfg[key] < 1:
                problems.append(Problem(f"runner.{key}", "expected at least 1", self.cfg[key]))
        slurm = Slurm()
        if here and not slurm.is_task:
            where = (
                "inside an sbatch allocation but not in an srun task (it would hang): run `srun igniter ...`"
                if slurm.in_job
                else "outside SLURM: submit with `igniter -m hydra/launcher=slurm runner=slurm ...`, or run `srun igniter ...` (slurm/sbatch_template.sh)"
            )
            problems.append(
                Problem("runner.name", f"runner=slurm runs one process per SLURM task, but this is {where}", "slurm")
            )
        return problems

    def thread_plan(self) -> ThreadPlan:
        """Each task owns ``--cpus-per-task`` CPUs when SLURM sets ``SLURM_CPUS_PER_TASK``."""
        return ThreadPlan(configured=self.cfg.get("threads_per_process"), cpus_per_process_var=Slurm.CPUS_PER_TASK_VAR)

    def join_environment(self) -> None:
        """Set what ``idist.initialize`` reads: torch's variables from submitit's under its
        local executor; with ``runner.master_port``, torch's variables from SLURM's.

        Raises:
            RuntimeError: not inside an srun-started SLURM task (it names what is missing).
        """
        if SubmititLocal().present:
            SubmititLocal.export_torch_variables()
            return
        slurm = Slurm()
        if not slurm.is_task:
            raise RuntimeError(
                f"runner=slurm must run inside srun-started SLURM tasks, but {', '.join(slurm.missing_task_vars())} is not set "
                "(an sbatch script must call `srun igniter ...`, see slurm/sbatch_template.sh)"
            )
        if self.cfg.master_port is not None:
            # ignite uses MASTER_PORT only when all of the torch variables are set.
            os.environ.update(slurm.torch_variables(self.cfg.master_port))
