"""The launch environment: who started this process, and what it says about the run.

One small class per launcher is the only code in igniter that reads that launcher's
variables (as Lightning's ``plugins/environments``); runners, the one-launcher rule,
threads, torchrun restarts, SLURM preemption and ``igniter doctor`` ask it. Each class
takes the variables as a mapping (``None``: ``os.environ``, read at each question):

* :class:`NoLauncher`: ``igniter`` started by hand (``runner=single`` or ``spawn``);
* :class:`Torchrun`: torchrun's workers (or any launcher that sets ``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
* :class:`Slurm`: a SLURM job, the sbatch script itself or a task of an srun step;
* :class:`SubmititLocal`: a task of submitit's local executor (no SLURM).

:func:`detect` picks the one this process belongs to.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from typing import Mapping

from igniter.launch.hostlist import expand_nodelist, tasks_per_node

__all__ = ["Environment", "NoLauncher", "Torchrun", "Slurm", "SubmititLocal", "detect", "expand_nodelist"]


def _var(name: str, default: int | None) -> property:
    """A property: variable ``name`` as an integer, ``default`` when unset, empty or not an integer."""

    def get(self: Environment) -> int | None:
        value = self._int(name)
        return default if value is None else value

    return property(get, doc=f"``{name}`` (default {default})")


class Environment:
    """Base of the launch environments: answers for a process that no launcher started.

    Args:
        env: the environment variables (``None``: ``os.environ``, read at each call).
    """

    #: Short name shown by ``igniter doctor``.
    name = "none"
    #: The variables this environment reads (reported by :meth:`variables`).
    VARIABLES: tuple[str, ...] = ()

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env

    def _int(self, var: str) -> int | None:
        """``var`` as an integer; ``None`` when it is unset, empty or not an integer."""
        try:
            return int(self._env[var])
        except (KeyError, ValueError):
            return None

    def _has(self, *names: str) -> bool:
        return all(v in self._env for v in names)

    @property
    def present(self) -> bool:
        """Whether this launcher started the process."""
        return True

    @property
    def rank(self) -> int:
        """Global rank of this process (0 without a launcher)."""
        return 0

    @property
    def local_rank(self) -> int:
        """Rank of this process among the run's processes on its node."""
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes of the run."""
        return 1

    @property
    def local_world_size(self) -> int | None:
        """Number of processes of the run on this node (``None``: the launcher does not say)."""
        return 1

    @property
    def node_rank(self) -> int:
        """Index of this node among the run's nodes."""
        return 0

    @property
    def master_addr(self) -> str | None:
        """Host of the rendezvous (rank 0's store), ``None`` where there is none."""
        return None

    @property
    def master_port(self) -> int | None:
        """TCP port of the rendezvous, ``None`` where there is none."""
        return None

    @property
    def job_id(self) -> str | None:
        """The launcher's id of this job, ``None`` where there is none."""
        return None

    @property
    def in_step(self) -> bool:
        """Whether this process is a task of an srun step (SLURM only)."""
        return False

    def variables(self) -> dict[str, str]:
        """The variables of :attr:`VARIABLES` that are set, with their values."""
        return {k: self._env[k] for k in self.VARIABLES if k in self._env}


class Torchrun(Environment):
    """A worker started by torchrun (``torch.distributed.run``) or a launcher like it."""

    name = "torchrun"
    #: What a worker needs to join the process group (``env://``).
    REQUIRED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    VARIABLES = (*REQUIRED, "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")

    @property
    def present(self) -> bool:
        """``RANK`` and ``WORLD_SIZE`` are set."""
        return self._has("RANK", "WORLD_SIZE")

    @property
    def is_worker(self) -> bool:
        """``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` are all set (one of the launcher's copies)."""
        return self._has("RANK", "LOCAL_RANK", "WORLD_SIZE")

    def missing(self) -> list[str]:
        """The variables of :attr:`REQUIRED` that are not set."""
        return [v for v in self.REQUIRED if v not in self._env]

    rank = _var("RANK", 0)
    local_rank = _var("LOCAL_RANK", 0)
    world_size = _var("WORLD_SIZE", 1)
    local_world_size = _var("LOCAL_WORLD_SIZE", None)
    node_rank = _var("GROUP_RANK", 0)  # torchrun's rank of this node's agent

    @property
    def master_addr(self) -> str | None:
        return self._env.get("MASTER_ADDR") or None

    master_port = _var("MASTER_PORT", None)

    @property
    def run_id(self) -> str | None:
        """torchrun's ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``); set only by torchrun itself."""
        return self._env.get("TORCHELASTIC_RUN_ID")

    restart_count = _var("TORCHELASTIC_RESTART_COUNT", 0)

    @property
    def uses_agent_store(self) -> bool:
        """The agent hosts the store at ``MASTER_ADDR:MASTER_PORT`` for every generation of
        workers (torch >= 2.4 default), see :mod:`igniter.launch.elastic`."""
        return self._env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


class Slurm(Environment):
    """A SLURM job: the sbatch script itself (the batch step) or a task of an srun step.

    ``ignite.distributed`` forms the process group from the same variables (``ignite/
    distributed/comp_models/native.py``), and :attr:`master_addr`/:attr:`master_port`
    follow its rule.
    """

    name = "slurm"
    #: What ignite's SLURM mode requires (it raises naming the first one missing).
    TASK_VARS = (
        "SLURM_JOB_ID",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NTASKS",
        "SLURM_JOB_NODELIST",
        "SLURM_JOB_NUM_NODES",
    )
    #: ``--cpus-per-task``: the CPUs each task owns (read by :mod:`igniter.launch.cpu_threads`).
    CPUS_PER_TASK_VAR = "SLURM_CPUS_PER_TASK"
    VARIABLES = (
        *TASK_VARS,
        "SLURM_NODEID",
        "SLURM_STEP_ID",
        "SLURM_JOB_PARTITION",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        CPUS_PER_TASK_VAR,
        "SLURM_TASKS_PER_NODE",
        "SLURM_STEP_TASKS_PER_NODE",
    )

    @property
    def present(self) -> bool:
        """``SLURM_JOB_ID`` and ``SLURM_PROCID`` are set: the batch step or an srun task (no ``salloc`` shell)."""
        return self._has("SLURM_JOB_ID", "SLURM_PROCID")

    @property
    def in_job(self) -> bool:
        """Inside a SLURM job at all (``SLURM_JOB_ID``), under any launcher: its scheduler's signals reach us."""
        return "SLURM_JOB_ID" in self._env

    @property
    def in_step(self) -> bool:
        """A task of an srun step (``SLURM_STEP_ID``, ``SLURM_PROCID``); the batch step
        (the sbatch script itself) has no ``SLURM_STEP_ID``."""
        return self._has("SLURM_STEP_ID", "SLURM_PROCID")

    def missing_task_vars(self) -> list[str]:
        """What an srun task needs for ignite's SLURM mode and is not set (empty: :attr:`is_task`)."""
        return [v for v in (*self.TASK_VARS, "SLURM_STEP_ID") if v not in self._env]

    @property
    def is_task(self) -> bool:
        """Inside a task started by srun with everything ignite needs (not merely in an sbatch allocation)."""
        return not self.missing_task_vars()

    rank = _var("SLURM_PROCID", 0)
    local_rank = _var("SLURM_LOCALID", 0)
    world_size = _var("SLURM_NTASKS", 1)

    @property
    def local_world_size(self) -> int | None:
        # the step's distribution over nodes, else the job's: "2(x3),1"
        spec = self._env.get("SLURM_STEP_TASKS_PER_NODE") or self._env.get("SLURM_TASKS_PER_NODE") or ""
        counts = tasks_per_node(spec)
        return counts[self.node_rank] if self.node_rank < len(counts) else None

    node_rank = _var("SLURM_NODEID", 0)
    num_nodes = _var("SLURM_JOB_NUM_NODES", 1)

    @property
    def nodelist(self) -> str:
        """The job's compressed node list (``SLURM_JOB_NODELIST``), ``""`` if unset."""
        return self._env.get("SLURM_JOB_NODELIST", "")

    def hosts(self) -> list[str]:
        """The job's hosts, in order: ``scontrol show hostnames`` where it answers, else
        :func:`expand_nodelist` (``[]`` for an unset or malformed list)."""
        if not self.nodelist:
            return []
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", self.nodelist], capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.SubprocessError):  # no scontrol here
            pass
        try:
            return expand_nodelist(self.nodelist)
        except ValueError:
            return []

    def first_host(self) -> str | None:
        """The job's first host: where ignite puts the rendezvous."""
        hosts = self.hosts()
        return hosts[0] if hosts else None

    def _torch_vars_override(self) -> bool:
        # ignite takes MASTER_ADDR/MASTER_PORT from the environment only when all of
        # torch's variables are set (e.g. by SlurmRunner for runner.master_port).
        return self._has(*Torchrun.REQUIRED)

    @property
    def master_addr(self) -> str | None:
        return self._env["MASTER_ADDR"] if self._torch_vars_override() else self.first_host()

    @property
    def master_port(self) -> int | None:
        if self._torch_vars_override():
            return self._int("MASTER_PORT")
        last4 = self._env.get("SLURM_JOB_ID", "")[-4:]
        # ignite's convention: 15000 + the job id's last 4 digits, so jobs sharing a node differ
        return 15000 + int(last4) if last4.isdigit() else None

    @property
    def job_id(self) -> str | None:
        """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for array jobs."""
        array, task = self._env.get("SLURM_ARRAY_JOB_ID"), self._env.get("SLURM_ARRAY_TASK_ID")
        if array and task:
            return f"{array}_{task}"
        return self._env.get("SLURM_JOB_ID")

    def torch_variables(self, master_port: int) -> dict[str, str]:
        """torch's ``env://`` variables for this task with the rendezvous on ``master_port``
        (ignite reads ``MASTER_PORT`` only when all of them are set). The caller exports them."""
        env = self._env
        return {
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "MASTER_ADDR": self.first_host() or self.nodelist,
            "MASTER_PORT": str(master_port),
        }


class SubmititLocal(Environment):
    """A task of submitit's local executor (no SLURM): submitit's ``LocalJobEnvironment``
    variables; its ``TorchDistributedEnvironment`` turns them into torch's."""

    name = "submitit-local"
    VARIABLES = (
        "SUBMITIT_LOCAL_JOB_ID",
        "SUBMITIT_LOCAL_GLOBALID",
        "SUBMITIT_LOCAL_LOCALID",
        "SUBMITIT_LOCAL_NTASKS",
        "SUBMITIT_LOCAL_NODEID",
        "SUBMITIT_LOCAL_JOB_NUM_NODES",
        "SUBMITIT_EXECUTOR",
    )

    @property
    def present(self) -> bool:
        """``SUBMITIT_LOCAL_JOB_ID`` is set and ``SLURM_JOB_ID`` is not."""
        return "SUBMITIT_LOCAL_JOB_ID" in self._env and "SLURM_JOB_ID" not in self._env

    rank = _var("SUBMITIT_LOCAL_GLOBALID", 0)
    local_rank = _var("SUBMITIT_LOCAL_LOCALID", 0)
    world_size = _var("SUBMITIT_LOCAL_NTASKS", 1)

    @property
    def local_world_size(self) -> int | None:
        return self.world_size // max(1, self._int("SUBMITIT_LOCAL_JOB_NUM_NODES") or 1)

    node_rank = _var("SUBMITIT_LOCAL_NODEID", 0)

    @property
    def master_addr(self) -> str | None:
        return socket.gethostname()  # submitit: JobEnvironment.hostnames[0], this host

    @property
    def master_port(self) -> int | None:
        # submitit's TorchDistributedEnvironment: MASTER_PORT, else drawn from the job id
        port = self._int("MASTER_PORT")
        return port if port is not None else random.Random(self.job_id).randint(20000, 60000)

    @property
    def job_id(self) -> str | None:
        return self._env.get("SUBMITIT_LOCAL_JOB_ID")

    @staticmethod
    def export_torch_variables() -> None:
        """Set torch's ``env://`` variables in ``os.environ`` through submitit (which also narrows
        ``CUDA_VISIBLE_DEVICES`` to this task's GPU).

        Raises:
            ImportError: submitit is not installed.
        """
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)


class NoLauncher(Environment):
    """No launcher: the variables of the others that happen to be set are still reported."""

    def variables(self) -> dict[str, str]:
        return {k: v for cls in (Torchrun, Slurm) for k, v in cls(self._env).variables().items()}


def detect(env: Mapping[str, str] | None = None) -> Environment:
    """The environment this process was started in: a SLURM job (batch step or srun
    task), else a submitit local task, else torchrun, else :class:`NoLauncher`.

    Args:
        env: the environment variables (``None``: ``os.environ``).
    """
    for cls in (Slurm, SubmititLocal, Torchrun):
        found = cls(env)
        if found.present:
            return found
    return NoLauncher(env)
