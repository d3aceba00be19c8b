"""A run started inside another launcher's processes: ``torchrun ... -m igniter runner=single``.

torchrun (and srun) start N copies of the command. With a runner that starts its own
processes or none (``single``, ``spawn``) every copy is a whole run of its own: N
independent runs training into one directory, exit status 0. The launcher's processes
are recognised from their environment, before anything is started:

* torchrun and launchers like it set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
  ``WORLD_SIZE`` > 1 means several copies (``WORLD_SIZE=1`` stays allowed);
* an srun task of a step with more than one task has ``SLURM_PROCID``, ``SLURM_STEP_ID``
  and ``SLURM_NTASKS`` > 1. An sbatch script itself (the batch step: no ``SLURM_STEP_ID``)
  and one-task steps stay allowed.

igniter's own processes never meet this check: it runs in the launching process, before
``runner=spawn`` spawns its workers (which carry ``RANK``/``WORLD_SIZE`` from then on),
and the tasks of ``runner=slurm`` or of Hydra's SLURM launcher run the job without
validating it again.
"""

from __future__ import annotations

from igniter.errors import Problem
from igniter.launch.environment import Slurm, Torchrun

__all__ = ["outer_launcher_problem"]


def outer_launcher_problem(runner: str) -> Problem | None:
    """A :class:`Problem` (key ``runner.name``) when this process is one of several that
    torchrun or an srun step started, and runner ``runner`` would make each a run of its own.

    Args:
        runner: the runner's name (``single`` or ``spawn``), shown in the message.

    Returns:
        The problem, or ``None`` where the runner may run here.
    """
    torchrun = Torchrun()
    world = torchrun.world_size
    if torchrun.is_worker and world > 1:
        return Problem(
            "runner.name",
            f"this process is rank {torchrun.rank} of {world} started by torchrun (or a launcher like it: "
            f"RANK, LOCAL_RANK, WORLD_SIZE are set), and runner={runner} would make each of them a run of its own, "
            f"{world} copies training into one run directory; make them one run with "
            "`torchrun --nproc-per-node N -m igniter runner=torchrun ...` (igniter eval: runner.name=torchrun), "
            f"or run `igniter runner={runner} ...` without torchrun",
            runner,
        )
    slurm = Slurm()
    tasks = slurm.world_size
    if slurm.in_step and tasks > 1:
        return Problem(
            "runner.name",
            f"this process is task {slurm.rank} of a {tasks}-task SLURM step (srun), and "
            f"runner={runner} would make each task a run of its own, {tasks} copies training into one run directory; "
            "make them one run with `srun igniter runner=slurm ...` (igniter eval: runner.name=slurm), "
            f"or start one task (`srun -n1`, or igniter straight from the sbatch script) for runner={runner}",
            runner,
        )
    return None
