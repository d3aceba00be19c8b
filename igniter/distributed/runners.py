"""Runner-registry entries: how the processes of a run are started and joined.

Every runner funnels into one call, ``idist.Parallel(...).run(fn, *args)``;
the launch mode only changes the arguments that form the process group.
Inside ``fn`` the code is the same for every mode (``idist.auto_model``,
``idist.auto_dataloader``, ``idist.auto_optim`` in :mod:`igniter.run`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import ignite.distributed as idist
import torch
from omegaconf import DictConfig

from igniter.errors import Problem
from igniter.registry import runner_registry

__all__ = ["Runner", "SingleRunner", "make_runner", "default_backend"]


# Ignite's idist helpers log through ``ignite.utils.setup_logger``, which leaves a
# logger alone if it already exists. Creating them here makes their INFO lines go
# to the root logger (igniter's rank{N}.log) instead of straight to stderr.
for _name in ("Parallel", "auto_dataloader", "auto_model", "auto_optim"):
    prefix = "ignite.distributed.launcher." if _name == "Parallel" else "ignite.distributed.auto."
    logging.getLogger(prefix + _name)
logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)  # logs before rank logs exist


def default_backend() -> str:
    """``nccl`` when CUDA is available, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _call(local_rank: int, fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


class Runner:
    """Base runner. Subclasses set how the process group is formed.

    Args:
        cfg: the ``runner`` config section (:class:`igniter.config.RunnerConfig`).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @property
    def world_size(self) -> int:
        """Total number of processes the run will have."""
        return 1

    def validate(self) -> list[Problem]:
        """Problems with ``runner.*`` settings, found without starting anything."""
        problems = []
        backend = self.cfg.backend
        if backend is not None and backend not in ("gloo", "nccl"):
            problems.append(Problem("runner.backend", "expected 'gloo', 'nccl' or null (auto)", backend))
        if backend == "nccl" and not torch.cuda.is_available():
            problems.append(Problem("runner.backend", "nccl needs CUDA GPUs and none is available; use gloo", backend))
        if self.cfg.timeout_s <= 0:
            problems.append(Problem("runner.timeout_s", "expected a positive number of seconds", self.cfg.timeout_s))
        return problems

    def parallel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``idist.Parallel`` for this launch mode."""
        return {"backend": None}

    def launch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in every process of the run."""
        with idist.Parallel(**self.parallel_kwargs()) as parallel:
            parallel.run(_call, fn, *args)


@runner_registry("single")
class SingleRunner(Runner):
    """One process, no process group: the CPU, or the first GPU when CUDA is available."""

    def validate(self) -> list[Problem]:
        problems = super().validate()
        for key in ("nproc_per_node", "nnodes"):
            if self.cfg[key] != 1:
                problems.append(
                    Problem(f"runner.{key}", "the single runner runs one process; choose runner=spawn or torchrun", self.cfg[key])
                )
        return problems


def make_runner(cfg: DictConfig) -> Runner:
    """The runner named by ``cfg.name``. Raises ``RegistryError`` if unknown."""
    return runner_registry.get(cfg.name, "runner.name")(cfg)
