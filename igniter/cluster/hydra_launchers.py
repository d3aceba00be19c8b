"""What igniter knows about Hydra's launchers, next to the runners they start.

A Hydra launcher decides *where* a job runs (this process, or a job submitted
through Hydra's submitit plugin: ``hydra/launcher=slurm`` or ``submitit_local``);
the runner (:mod:`igniter.launch.runners`) decides how that job's processes
are started. This module checks that the two agree and tells the CLI how to set
up Hydra for a launcher that is not the job's primary one.
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig

from igniter.errors import Problem

__all__ = ["is_cluster_launcher", "launcher_problems", "secondary_launcher_settings", "one_job_sweep"]


def is_cluster_launcher(launcher_cfg: Mapping[str, Any] | DictConfig) -> bool:
    """Whether ``launcher_cfg`` (the ``hydra.launcher`` node) is one of Hydra's submitit
    launchers: the job then runs as submitted processes (one per SLURM task), not in
    this process, so this machine's GPUs and paths say nothing about it.

    Args:
        launcher_cfg: ``hydra.launcher`` as a dict or ``DictConfig``.
    """
    # hydra-submitit-launcher's targets are hydra_plugins.hydra_submitit_launcher.
    # submitit_launcher.{SlurmLauncher,LocalLauncher}: match the plugin, not one class;
    # igniter's hydra_plugins.igniter_submitit.SlurmLauncher (hydra/launcher=slurm) is one of them.
    return "submitit" in str(launcher_cfg.get("_target_", "") or "")


def launcher_problems(launcher: Mapping[str, Any], cfg: DictConfig) -> list[Problem]:
    """Launcher settings that would make a submitted job hang or run the wrong scale.

    For Hydra's submitit launchers (``hydra/launcher=slurm`` or ``submitit_local``): their
    packages installed (the ``slurm`` extra), one task per process, so ``tasks_per_node`` and ``nodes`` must equal the
    runner's ``nproc_per_node`` and ``nnodes``, a multi-task job needs
    ``runner=slurm``, and GPU jobs need one GPU per task. Other launchers: none.

    Args:
        launcher: ``hydra.launcher``, resolved to a plain dict.
        cfg: the job's config (its ``runner`` node is read).

    Returns:
        One :class:`~igniter.errors.Problem` per mismatch (empty when they agree).
    """
    if not is_cluster_launcher(launcher):
        return []
    try:  # the slurm extra; without it Hydra fails with "Unknown plugin class" and a traceback
        import submitit  # noqa: F401

        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return [
            Problem(
                "hydra.launcher",
                "the SLURM and submitit launchers need submitit and hydra-submitit-launcher: pip install 'igniter[slurm]'",
                str(launcher.get("_target_")),
            )
        ]
    problems = []
    tasks, nodes = int(launcher.get("tasks_per_node") or 1), int(launcher.get("nodes") or 1)
    runner = cfg.runner
    if runner.name != "slurm":
        if tasks * nodes > 1:
            problems.append(
                Problem(
                    "runner.name",
                    f"a job of {tasks * nodes} SLURM tasks needs runner=slurm (one process per task)",
                    runner.name,
                )
            )
    else:
        if tasks != runner.nproc_per_node:
            problems.append(
                Problem(
                    "hydra.launcher.tasks_per_node",
                    f"must equal runner.nproc_per_node ({runner.nproc_per_node}): set the scale with runner.nproc_per_node only",
                    tasks,
                )
            )
        if nodes != runner.nnodes:
            problems.append(
                Problem(
                    "hydra.launcher.nodes", f"must equal runner.nnodes ({runner.nnodes}): set runner.nnodes only", nodes
                )
            )
    gpus = launcher.get("gpus_per_node")
    if gpus is not None and gpus != tasks:
        problems.append(
            Problem(
                "hydra.launcher.gpus_per_node",
                f"one GPU per task: set it to tasks_per_node ({tasks}) or null on CPU",
                gpus,
            )
        )
    if runner.backend == "nccl" and not gpus:
        problems.append(
            Problem(
                "hydra.launcher.gpus_per_node", f"backend nccl needs GPUs: set hydra.launcher.gpus_per_node={tasks}"
            )
        )
    return problems


def secondary_launcher_settings(cfg: DictConfig) -> dict[str, Any]:
    """Hydra overrides for a launcher that is not the job's primary one (node_rank > 0,
    torchrun rank > 0): a throw-away run directory, removed at exit, since its
    processes adopt rank 0's run directory once the process group exists.

    Args:
        cfg: the job's config with its ``runner`` node.

    Returns:
        ``{dotted key: value}`` to set on the composed config (with its ``hydra``
        node); empty for the primary launcher.
    """
    import atexit
    import shutil
    import tempfile

    from igniter.launch.runners import make_runner

    if make_runner(cfg.runner).is_primary:
        return {}
    scratch = tempfile.mkdtemp(prefix="igniter-secondary-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return {"hydra.run.dir": scratch, "hydra.output_subdir": None}


def one_job_sweep(cfg: DictConfig, argv: list[str]) -> list[str] | None:
    """Hydra's arguments that submit a single run (no ``-m``) through a submitit launcher
    (``igniter hydra/launcher=slurm ...``): a one-job sweep whose sweep directory, and job
    directory, is the run's ``output_dir`` (Hydra runs a single run in this process, hydra#851).

    Args:
        cfg: the run's composed config, with its ``hydra`` node.
        argv: the command line's arguments.

    Returns:
        The arguments for Hydra's multirun; ``None`` for a launcher that runs here.
    """
    if cfg is None or not is_cluster_launcher(cfg.hydra.launcher):
        return None
    from pathlib import Path

    from igniter.cluster.submissions import hydra_value

    output_dir = hydra_value(
        Path(str(cfg.output_dir)).absolute()
    )  # pinned: ${now:...} would differ when composed again
    return [
        "-m",
        *(a for a in argv if not a.startswith("output_dir=")),
        f"output_dir={output_dir}",
        "hydra.sweep.dir=${output_dir}",
        "hydra.sweep.subdir=.",
    ]
