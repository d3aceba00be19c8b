"""Runner-registry entries: how the processes of a run are started and joined.

Every runner funnels into one call, ``idist.Parallel(...).run(fn, *args)``;
the launch mode only changes the arguments that form the process group.
Inside ``fn`` the code is the same for every mode (``idist.auto_model``,
``idist.auto_dataloader``, ``idist.auto_optim`` in :mod:`igniter.run`).

==========  ==================================================================
``single``  one process, no process group (CPU or one GPU)
``spawn``   ``nproc_per_node`` processes started by igniter on this node; with
            ``nnodes > 1`` run the same command on every node with its
            ``node_rank`` and the same ``master_addr``/``master_port``
``torchrun`` the processes were started by torchrun (or any launcher that sets
            ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
==========  ==================================================================

Examples:
    .. code-block:: bash

        igniter                                          # single
        igniter runner=spawn runner.nproc_per_node=2     # 2 local processes, free port picked
        torchrun --nproc-per-node 2 -m igniter runner=torchrun
        # two nodes, one command each:
        igniter runner=spawn runner.nnodes=2 runner.node_rank=0 runner.master_addr=10.0.0.1 runner.master_port=29500
        igniter runner=spawn runner.nnodes=2 runner.node_rank=1 runner.master_addr=10.0.0.1 runner.master_port=29500
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any, Callable

import ignite.distributed as idist
import torch
from omegaconf import DictConfig

from igniter.errors import EXIT_FAILED, IgniterError, Problem, RankHung
from igniter.launch.cpu_heap import keep_freed_memory
from igniter.launch.cpu_threads import ThreadPlan, apply_threads, chosen
from igniter.launch.environment import Slurm, Torchrun
from igniter.launch.nested_launch import outer_launcher_problem
from igniter.launch.signals import ignore_sigint, sigint_scope, stop_children
from igniter.launch.slurm_job import attach_preemption, requeue_job
from igniter.launch.worker_errors import RecordWorkerErrors, first_worker_error, recorded_worker_errors
from igniter.registry import runner_registry
from igniter.supervision.collective_timeout import CollectiveTimeout, describe_stragglers, is_collective_timeout
from igniter.supervision.watchdog import LauncherWatchdog, WatchPlan, start_reporting

__all__ = [
    "Runner",
    "SingleRunner",
    "SpawnRunner",
    "JoinRunner",
    "RankFailed",
    "make_runner",
    "default_backend",
    "free_port",
    "ENV_VARS",
]

logger = logging.getLogger("igniter")

# Ignite's idist helpers log through ``ignite.utils.setup_logger``, which leaves a
# logger alone if it already exists. Creating them here makes their INFO lines go
# to the root logger (igniter's rank{N}.log) instead of straight to stderr.
for _name in ("Parallel", "auto_dataloader", "auto_model", "auto_optim"):
    prefix = "ignite.distributed.launcher." if _name == "Parallel" else "ignite.distributed.auto."
    logging.getLogger(prefix + _name)
logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)  # logs before rank logs exist

#: Variables torchrun sets in every worker (and that the torchrun runner needs).
ENV_VARS = Torchrun.REQUIRED


class RankFailed(IgniterError):
    """A process of the run raised or died (exit status 1); ``rank``: its global rank, ``details``: its traceback."""

    exit_status = EXIT_FAILED

    def __init__(self, rank: int, details: str) -> None:
        self.rank, self.details = rank, details
        super().__init__(f"rank {rank} failed:\n{details}")


def default_backend() -> str:
    """``nccl`` when CUDA is available, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read, close).

    Another process can still take it before the rendezvous binds it; the OS
    hands out ephemeral ports in sequence or at random, so two jobs started
    together get different ports in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _call(
    local_rank: int,
    plan: ThreadPlan,
    trim_threshold_mb: float | None,
    watch: WatchPlan,
    fn: Callable[..., Any],
    *args: Any,
) -> None:
    """Every process's entry, under every runner: its thread count
    (:mod:`igniter.launch.cpu_threads`), the freed memory it keeps
    (:mod:`igniter.launch.cpu_heap`), its progress reports and hang watchdog
    (:mod:`igniter.supervision.watchdog`), Ctrl-C handling
    (:mod:`igniter.launch.signals`), then ``fn(*args)``."""
    apply_threads(plan, idist.get_nproc_per_node())
    keep_freed_memory(trim_threshold_mb)
    reporter = start_reporting(watch)
    try:
        with sigint_scope():
            fn(*args)
    except Exception as e:
        if reporter is None or not is_collective_timeout(e):
            raise
        raise CollectiveTimeout(e, describe_stragglers(reporter.store, idist.get_world_size(), idist.get_rank())) from e
    finally:
        if reporter is not None:  # no store call in flight at exit (C++ teardown under a live call aborted a rank)
            reporter.stopped.set()
            reporter.join(timeout=2 * reporter.beat_s + 10)


class Runner:
    """Base runner: one process, no process group.

    Args:
        cfg: the ``runner`` config section (:class:`igniter.config.RunnerConfig`).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @property
    def world_size(self) -> int:
        """Total number of processes the run will have."""
        return 1

    @property
    def is_primary(self) -> bool:
        """Whether this launcher owns the run directory (Hydra's output dir); other
        launchers of the same job (node_rank > 0, torchrun ranks > 0) adopt rank 0's."""
        return True

    @property
    def backend(self) -> str:
        return self.cfg.backend or default_backend()

    def validate(self, here: bool = True) -> list[Problem]:
        """Problems with ``runner.*`` settings, found without starting anything.

        Args:
            here: the processes will start on this machine. ``False`` when the job
                is submitted to a cluster: checks of this machine's GPUs and of the
                launcher's environment are skipped.
        """
        problems = []
        backend = self.cfg.backend
        if backend is not None and backend not in ("gloo", "nccl"):
            problems.append(Problem("runner.backend", "expected 'gloo', 'nccl' or null (auto)", backend))
        if backend == "nccl" and here and not torch.cuda.is_available():
            problems.append(Problem("runner.backend", "nccl needs CUDA GPUs and none is available; use gloo", backend))
        if self.cfg.timeout_s <= 0:
            problems.append(Problem("runner.timeout_s", "expected a positive number of seconds", self.cfg.timeout_s))
        if self.cfg.bucket_cap_mb is not None and self.cfg.bucket_cap_mb <= 0:
            problems.append(
                Problem(
                    "runner.bucket_cap_mb",
                    "expected a positive size in MB (or null: PyTorch's default)",
                    self.cfg.bucket_cap_mb,
                )
            )
        port = self.cfg.master_port
        if port is not None and not 1024 <= port <= 65535:
            problems.append(
                Problem("runner.master_port", "expected a port in 1024-65535 (or null: pick a free one)", port)
            )
        hang = self.cfg.get("hang_timeout_s")
        if hang is not None and hang <= 0:
            problems.append(
                Problem(
                    "runner.hang_timeout_s", "expected a positive number of seconds (or null: no hang watchdog)", hang
                )
            )
        threads = self.cfg.get("threads_per_process")
        if threads is not None and threads < 1:
            problems.append(
                Problem(
                    "runner.threads_per_process",
                    "expected a positive number of threads (or null: cores / local processes)",
                    threads,
                )
            )
        trim = self.cfg.get("malloc_trim_threshold_mb")
        if trim is not None and not 0 < trim < 2048:
            problems.append(
                Problem(
                    "runner.malloc_trim_threshold_mb",
                    "expected a size in MiB above 0 and below 2048 (or null: glibc's adaptive threshold)",
                    trim,
                )
            )
        return problems

    def thread_plan(self) -> ThreadPlan:
        """What every process needs to choose its thread count (:mod:`igniter.launch.cpu_threads`)."""
        return ThreadPlan(configured=self.cfg.get("threads_per_process"))

    def watch_plan(self, launcher_store: str | None = None) -> WatchPlan:
        """What every process needs for its progress reports and the hang watchdog."""
        return WatchPlan(
            self.cfg.get("hang_timeout_s"),
            launcher_store,
            requeue_job if self.cfg.get("requeue_on_hang") else None,
            self.cfg.timeout_s,
            self.cfg.get("straggler_factor"),
        )

    def parallel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``idist.Parallel`` for this launch mode."""
        return {"backend": None}

    def attach(self, trainer: Any, save_checkpoint: Callable[[Any], None] | None) -> None:
        """Hook called in every process once the trainer is wired, to react to the
        scheduler: inside a SLURM job (any launch mode) its time-limit and preemption
        signals save a checkpoint (and requeue), see :mod:`igniter.launch.slurm_job`.
        A handler that stops the run sets ``trainer.state.stopped_by`` to the exception
        :func:`igniter.run.train` raises after the engine returns. Every process logs the
        thread count it chose into its rank log, which exists by now (only rank 0's
        reaches the console)."""
        choice = chosen()
        if choice is not None:
            logger.info("%s", choice.describe())
        if Slurm().in_job:
            attach_preemption(trainer, save_checkpoint)

    def launch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in every process of the run.

        Raises:
            RankFailed: a process raised or exited non-zero (the others are stopped).
        """
        self._run(idist.Parallel(**self.parallel_kwargs()), self.watch_plan(), fn, *args)

    def _run(self, parallel: idist.Parallel, watch: WatchPlan, fn: Callable[..., Any], *args: Any) -> None:
        with parallel:
            parallel.run(_call, self.thread_plan(), self.cfg.get("malloc_trim_threshold_mb"), watch, fn, *args)


@runner_registry("single")
class SingleRunner(Runner):
    """One process, no process group: the CPU, or the first GPU when CUDA is available."""

    def validate(self, here: bool = True) -> list[Problem]:
        problems = super().validate(here)
        for key in ("nproc_per_node", "nnodes"):
            if self.cfg[key] != 1:
                problems.append(
                    Problem(
                        f"runner.{key}",
                        "the single runner runs one process; choose runner=spawn or torchrun",
                        self.cfg[key],
                    )
                )
        nested = outer_launcher_problem("single") if here else None
        return problems + ([nested] if nested else [])


@runner_registry("spawn")
class SpawnRunner(Runner):
    """``nproc_per_node`` processes per node started with ``idist.Parallel`` (torch multiprocessing, spawn).

    On one node the master port is picked free unless given. Across nodes run the
    same command on each node with its ``node_rank``; ``master_addr`` is node 0's
    address and ``master_port`` must be given. ``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME`` select the network interface as usual.
    """

    @property
    def world_size(self) -> int:
        return self.cfg.nproc_per_node * self.cfg.nnodes

    @property
    def is_primary(self) -> bool:
        return self.cfg.node_rank == 0

    def validate(self, here: bool = True) -> list[Problem]:
        problems = super().validate(here)
        cfg = self.cfg
        for key in ("nproc_per_node", "nnodes"):
            if cfg[key] < 1:
                problems.append(Problem(f"runner.{key}", "expected at least 1", cfg[key]))
        if cfg.nnodes >= 1 and not 0 <= cfg.node_rank < cfg.nnodes:
            problems.append(
                Problem("runner.node_rank", f"expected 0 <= node_rank < nnodes ({cfg.nnodes})", cfg.node_rank)
            )
        if cfg.nnodes > 1 and cfg.master_port is None:
            problems.append(
                Problem("runner.master_port", "multi-node runs need an explicit port, the same on every node")
            )
        if (
            here
            and self.backend == "nccl"
            and torch.cuda.is_available()
            and cfg.nproc_per_node > torch.cuda.device_count()
        ):
            problems.append(
                Problem(
                    "runner.nproc_per_node",
                    f"more processes than the {torch.cuda.device_count()} GPUs of this node",
                    cfg.nproc_per_node,
                )
            )
        nested = outer_launcher_problem("spawn") if here else None
        return problems + ([nested] if nested else [])

    def parallel_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        port = cfg.master_port if cfg.master_port is not None else free_port(cfg.master_addr)
        return {
            "backend": self.backend,
            "nproc_per_node": cfg.nproc_per_node,
            "nnodes": cfg.nnodes,
            "node_rank": cfg.node_rank,
            "master_addr": cfg.master_addr,
            "master_port": port,
            "timeout": timedelta(seconds=cfg.timeout_s),
        }

    def launch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Spawn the processes and wait for them. Ctrl-C here is passed on to them
        (:func:`igniter.launch.signals.stop_children`); from then on this process
        ignores SIGINT (:mod:`igniter.launch.signals`).

        On one node the launcher also runs the hang watchdog (``runner.hang_timeout_s``,
        :class:`~igniter.supervision.watchdog.LauncherWatchdog`).

        Raises:
            RankFailed: a process raised or exited non-zero (the others are stopped).
            RankHung: no rank made progress for ``runner.hang_timeout_s`` (all were ended).
            IgniterError: what a worker raised of igniter's own errors (bad input, divergence, a failed checkpoint write).
            KeyboardInterrupt: after Ctrl-C, once the processes have stopped.
        """
        from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

        watchdog = None
        if self.cfg.nnodes == 1 and self.cfg.get("hang_timeout_s") is not None:  # one launcher sees every rank
            watchdog = LauncherWatchdog(self.world_size, self.cfg.hang_timeout_s)
        watch = self.watch_plan(f"{watchdog.host}:{watchdog.port}" if watchdog is not None else None)
        with recorded_worker_errors() as errors:
            try:
                if watchdog is not None:
                    watchdog.start()
                with sigint_scope():  # before spawning: workers inherit an ignored SIGINT through exec
                    self._run(idist.Parallel(**self.parallel_kwargs()), watch, RecordWorkerErrors(errors, fn), *args)
            except KeyboardInterrupt:
                ignore_sigint()
                stop_children()
                raise
            except (ProcessRaisedException, ProcessExitedException) as e:
                if watchdog is not None and watchdog.verdict is not None:
                    raise RankHung(watchdog.verdict.message()) from None
                known = first_worker_error(
                    errors
                )  # a worker's IgniterError (ConfigError 2, TrainingDiverged 3, CheckpointWriteFailed 5)
                if known is not None:
                    raise known from None
                raise RankFailed(self.cfg.node_rank * self.cfg.nproc_per_node + e.error_index, str(e)) from None
            finally:
                if watchdog is not None:
                    watchdog.stop()


class JoinRunner(Runner):
    """Base of the runners whose processes were started by someone else (torchrun,
    srun): each process joins the process group through ``ignite.distributed``."""

    def join_environment(self) -> None:
        """Set whatever ``idist.initialize`` reads from the environment (nothing here)."""

    def init_process_group(self) -> None:
        """Form the process group from the environment (``env://``), with ``runner.timeout_s``."""
        idist.initialize(self.backend, timeout=timedelta(seconds=self.cfg.timeout_s))

    def launch(self, fn: Callable[..., Any], *args: Any) -> None:
        self.join_environment()
        # Parallel(backend=...) would initialize without our timeout: initialize here, then run.
        self.init_process_group()
        try:
            self._run(idist.Parallel(backend=None), self.watch_plan(), fn, *args)
        finally:
            idist.finalize()


def make_runner(cfg: DictConfig) -> Runner:
    """The runner named by ``cfg.name``. Raises ``RegistryError`` if unknown."""
    return runner_registry.get(cfg.name, "runner.name")(cfg)
