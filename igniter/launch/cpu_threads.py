"""How many intra-op threads each process of a run computes with.

PyTorch gives every process as many intra-op threads as it sees cores, so N processes
on one node run N times that many threads on the same cores: ``runner=spawn`` with 2
processes on 2 cores ran 3x slower than one process. Every process of a run therefore
sets ``torch.set_num_threads`` before it builds anything, by the first of:

1. ``runner.threads_per_process``, when set;
2. ``OMP_NUM_THREADS`` from the user's environment: PyTorch has already read it, igniter
   leaves it alone. torchrun sets ``OMP_NUM_THREADS=1`` itself (with a warning) when the
   user did not and starts more than one process per node; igniter recognises that case
   (the variable is absent from the torchrun process's initial environment,
   ``/proc/<parent>/environ``) and applies rule 3 instead. Where that cannot be read the
   value counts as the user's. ``launchers/torchrun.sh`` sets the same 1 itself, with
   ``IGNITER_OMP_PLACEHOLDER=1``, so that torchrun does not print its banner about it: not the user's either;
3. ``max(1, usable cores // processes on this node)``, never more than PyTorch's own
   default for the process (so one process keeps PyTorch's choice). Usable cores are
   the CPUs this process may run on (``os.sched_getaffinity``: ``taskset``, cgroups,
   SLURM's binding), not ``os.cpu_count()``. Under ``runner=slurm`` with
   ``--cpus-per-task`` each task owns its CPUs: ``min(usable, SLURM_CPUS_PER_TASK)``.

The choice is recorded here (:func:`chosen`); the run logs it once, from rank 0, when its
log files exist (:meth:`igniter.launch.runners.Runner.attach`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from igniter.launch.environment import Torchrun

__all__ = [
    "ThreadPlan",
    "ThreadChoice",
    "usable_cores",
    "omp_set_by_torchrun",
    "choose_threads",
    "apply_threads",
    "chosen",
]


@dataclass(frozen=True)
class ThreadPlan:
    """What the launcher knows about threads, handed to every process of the run.

    Args:
        configured: ``runner.threads_per_process`` (``None``: the rule).
        cpus_per_process_var: an environment variable that gives each process its own
            CPU count (``SLURM_CPUS_PER_TASK`` for SLURM tasks), or ``None``.
    """

    configured: int | None = None
    cpus_per_process_var: str | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count one process uses and why (``source``: ``rule``,
    ``runner.threads_per_process`` or ``OMP_NUM_THREADS``)."""

    threads: int
    source: str
    usable_cores: int
    local_processes: int
    cpus_per_process: str | None = None  # e.g. "SLURM_CPUS_PER_TASK=4", when that decided
    capped: bool = False  # the rule's value was above PyTorch's default, which was kept

    def describe(self) -> str:
        """One line for the run log."""
        change = "set runner.threads_per_process or OMP_NUM_THREADS to change"
        if self.source == "runner.threads_per_process":
            return f"threads: {self.threads} per process (runner.threads_per_process)"
        if self.source == "OMP_NUM_THREADS":
            return f"threads: {self.threads} per process (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); unset it or set runner.threads_per_process to change"
        if self.cpus_per_process:
            why = f"{self.cpus_per_process}, {self.usable_cores} usable cores"
        else:
            plural = "es" if self.local_processes != 1 else ""
            why = f"{self.usable_cores} usable cores / {self.local_processes} local process{plural}"
        if self.capped:
            why += ", capped at PyTorch's default"
        return f"threads: {self.threads} per process ({why}); {change}"


_chosen: ThreadChoice | None = None


def usable_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _initial_environ(pid: int) -> dict[str, str] | None:
    """The environment ``pid`` was started with (Linux ``/proc``), or ``None`` if unreadable."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return None
    entries = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in entries}


def omp_set_by_torchrun() -> bool:
    """Whether ``OMP_NUM_THREADS`` was set by torchrun (or for it, by ``launchers/torchrun.sh``)
    rather than by the user.

    torchrun (``torch/distributed/run.py``) sets ``OMP_NUM_THREADS=1`` in its own
    environment when it is not set and starts more than one process per node; its
    workers are its children. The variable in the torchrun process's *initial*
    environment is the user's; absent there, torchrun added it.
    """
    if Torchrun().run_id is None or os.environ.get("OMP_NUM_THREADS") != "1":
        return False
    if os.environ.get("IGNITER_OMP_PLACEHOLDER") == "1":  # launchers/torchrun.sh's placeholder for torchrun's 1
        return True
    parent = _initial_environ(os.getppid())
    return parent is not None and Torchrun(parent).run_id is None and "OMP_NUM_THREADS" not in parent


def choose_threads(plan: ThreadPlan, local_processes: int) -> ThreadChoice:
    """The thread count for this process (see the module docstring); sets nothing.

    Args:
        plan: the launcher's :class:`ThreadPlan`.
        local_processes: processes of the run on this node (``idist.get_nproc_per_node()``).
    """
    cores = usable_cores()
    if plan.configured is not None:
        return ThreadChoice(plan.configured, "runner.threads_per_process", cores, local_processes)
    omp_by_user = "OMP_NUM_THREADS" in os.environ and not omp_set_by_torchrun()
    if omp_by_user:
        return ThreadChoice(torch.get_num_threads(), "OMP_NUM_THREADS", cores, local_processes)
    per_process = os.environ.get(plan.cpus_per_process_var or "", "")
    if per_process.isdigit() and int(per_process) > 0:
        threads, note = min(cores, int(per_process)), f"{plan.cpus_per_process_var}={per_process}"
    else:
        threads, note = max(1, cores // max(1, local_processes)), None
    capped = False
    if "OMP_NUM_THREADS" not in os.environ:  # torch.get_num_threads() is PyTorch's own default
        default = torch.get_num_threads()
        capped, threads = threads > default, min(threads, default)
    return ThreadChoice(threads, "rule", cores, local_processes, note, capped)


def apply_threads(plan: ThreadPlan, local_processes: int) -> ThreadChoice:
    """Choose this process's thread count, set it (``torch.set_num_threads``) and record it."""
    global _chosen
    choice = choose_threads(plan, local_processes)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    _chosen = choice
    return choice


def chosen() -> ThreadChoice | None:
    """The choice :func:`apply_threads` made in this process, if it ran."""
    return _chosen
