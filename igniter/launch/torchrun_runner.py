"""The ``torchrun`` runner: join a process group whose processes torchrun started.

Launch knowledge of torchrun (its variables, its agent-hosted store) stays here and in
:mod:`igniter.launch.environment` / :mod:`igniter.launch.elastic`.
"""

from __future__ import annotations

from datetime import timedelta

import ignite.distributed as idist
import torch
import torch.distributed as dist

from igniter.errors import Problem
from igniter.launch.elastic import generation_store
from igniter.launch.environment import Torchrun
from igniter.launch.runners import JoinRunner
from igniter.registry import runner_registry

__all__ = ["TorchrunRunner"]


@runner_registry("torchrun")
class TorchrunRunner(JoinRunner):
    """Join a process group whose processes were started by torchrun (``torchrun
    --nproc-per-node N -m igniter runner=torchrun ...``), or by any launcher that
    sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    """

    @property
    def world_size(self) -> int:
        torchrun = Torchrun()
        return torchrun.world_size if torchrun.present else self.cfg.nproc_per_node * self.cfg.nnodes

    @property
    def is_primary(self) -> bool:
        return Torchrun().rank == 0

    def init_process_group(self) -> None:
        """Under torchrun's agent-hosted store, form the group on a store of this generation's own
        (:mod:`igniter.launch.elastic`: restarted workers would otherwise read dead workers' addresses)."""
        torchrun = Torchrun()
        if not torchrun.uses_agent_store:
            return super().init_process_group()
        timeout = timedelta(seconds=self.cfg.timeout_s)
        rank, world_size = torchrun.rank, torchrun.world_size
        if torch.cuda.is_available():  # as idist.initialize does
            torch.cuda.set_device(torchrun.local_rank)
        store = generation_store(rank, world_size, timeout)
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        idist.sync()  # ignite adopts the group

    def validate(self, here: bool = True) -> list[Problem]:
        problems = super().validate(here)
        missing = Torchrun().missing()
        if missing and here:
            problems.append(
                Problem(
                    "runner.name",
                    f"runner 'torchrun' expects to be started by torchrun, but {', '.join(missing)} "
                    "is not set: run `torchrun --nproc-per-node N -m igniter runner=torchrun ...`, "
                    "or use runner=spawn to let igniter start the processes",
                    "torchrun",
                )
            )
        return problems
