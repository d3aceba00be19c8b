"""Data loading whose randomness belongs to the sample, not to the process that loads it.

A random augmentation drawn inside a ``DataLoader`` worker process draws from that
worker's own random state: no checkpoint holds it, and which worker loads which sample
depends on ``data.loader.num_workers``, so neither an exact resume nor the same training
with another worker count is possible. Here every sample draws from torch's, numpy's and
Python's global generators seeded with :func:`sample_seed` ``(trainer.seed, epoch, sample
index)`` just before ``dataset[index]`` runs (its loading and its transforms): the same
numbers in whichever process loads it, with any number of workers, at any rank and world
size, before and after a resume.

The epoch travels with the index: the sampler (:class:`~igniter.parallel.sampler.ShardedSampler`
with ``with_epoch=True``) yields ``(epoch, index)`` pairs in the training process, so
persistent worker processes need no other channel. In the training process itself
(``num_workers=0``) the generators' states are saved before a batch and put back after it:
the training process's own random stream (dropout) is the same whatever ``num_workers``.

A sample that raises is returned to the training process as a :class:`SampleFailure` (a
worker's exception would reach it as traceback text) and :class:`Loader` raises
:class:`SampleFailed` for it there (exit status 2). A worker process that died (the
system's out-of-memory killer) becomes :class:`LoaderWorkerDied` (exit status 1): one
paragraph instead of the DataLoader's traceback.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine.deterministic import ReproducibleBatchSampler
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info
from torch.utils.data.dataloader import default_collate

from igniter.errors import EXIT_FAILED, ConfigError, IgniterError, Problem

__all__ = [
    "sample_seed",
    "seed_sample",
    "SeededSamples",
    "SampleFailure",
    "SampleFailed",
    "LoaderWorkerDied",
    "Loader",
    "LazyReproducibleBatchSampler",
    "worker_died",
    "workers_per_process",
    "start_method",
    "loader_problems",
    "START_METHODS",
]

logger = logging.getLogger("igniter")

_M64 = (1 << 64) - 1

#: The ``data.loader.multiprocessing_context`` values this machine offers (``fork``, ``spawn``, ``forkserver``).
START_METHODS = tuple(multiprocessing.get_all_start_methods())


def _mix(x: int) -> int:
    """SplitMix64's step: ``x`` plus the golden-ratio increment through its finalizer (64-bit)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """The part of :func:`sample_seed` shared by an epoch's samples."""
    return _mix(_mix(seed & _M64) ^ (epoch & _M64))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` in ``epoch`` of a run seeded with ``seed``.

    A hash (SplitMix64 steps), so that neighbouring indices, epochs and seeds give
    unrelated streams.
    """
    return _mix(epoch_seed(seed, epoch) ^ (index & _M64))


def seed_sample(seed: int) -> None:
    """Seed this process's global generators with the 64-bit ``seed``: torch's CPU
    generator (``torch.default_generator``; CUDA generators are left alone), numpy's
    legacy global ``RandomState`` (its upper 32 bits) and Python's ``random`` (through
    ``random.seed``, which also drops the cached second value of ``random.gauss``).
    About 7 us on this VM, most of it Python's and numpy's Mersenne Twister
    initialisations (``bench/seeding.py``)."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed >> 32)
    random.seed(seed)


def _rng_state() -> tuple[Any, Any, Any]:
    return torch.default_generator.get_state(), np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple[Any, Any, Any]) -> None:
    torch.default_generator.set_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


@dataclass(frozen=True)
class SampleFailure:
    """What a sample that raised while loading leaves in its batch's place (picklable:
    it crosses from a worker process to the training process).

    ``index``: the sample's index in the loader's dataset; ``source_index``: the index in
    the dataset under a ``subset`` (``None`` without one); ``error``: ``Type: message``;
    ``details``: the traceback text; ``where``: the process that loaded it.
    """

    key: str
    name: str
    index: int
    source_index: int | None
    error: str
    details: str
    where: str


class SampleFailed(ConfigError):
    """A sample of ``data.train`` or ``data.val`` raised while loading (a damaged file, a
    transform that fails): exit status 2. ``problems[0]`` names the dataset's key, the
    dataset, the sample index and the error; the traceback is in the rank log.
    The run directory and its checkpoints are kept."""


class LazyReproducibleBatchSampler(ReproducibleBatchSampler):
    """Ignite's ``ReproducibleBatchSampler`` (what ``DeterministicEngine`` sets
    ``start_iteration`` on to resume inside a pass) without its list of every batch of the
    pass: batches are drawn as the loader asks for them, the first ``start_iteration`` of a
    resumed pass drawn and skipped. Ignite's builds the list when a pass starts: about 50
    bytes and a microsecond per sample, 27 GB for a pass over every offset of 1 GB of
    ``uint16`` tokens.

    Args:
        batch_sampler: the batch sampler of the loader (a ``BatchSampler``).
    """

    def __iter__(self) -> Iterator[list[Any]]:
        # a generator: start_iteration is read at the first batch, as Ignite's does (a DataLoader
        # with workers calls iter() twice when it makes its iterator and draws from the second)
        start, self.start_iteration = self.start_iteration or 0, None
        yield from islice(iter(self.batch_sampler), start, None)


class LoaderWorkerDied(IgniterError):
    """A ``DataLoader`` worker process ended without a word: killed by a signal (usually
    the system's out-of-memory killer: SIGKILL) or exited. Exit status 1 (a process of the
    run died); the message names ``data.loader.num_workers``."""

    exit_status = EXIT_FAILED


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` pairs: each sample's loading and transforms
    draw from the global generators seeded with :func:`sample_seed` ``(seed, epoch, index)``.

    Args:
        dataset: a map-style dataset of ``N`` samples.
        seed: the run's seed (``trainer.seed``).
        key: its config key (``data.train``, ``data.val``), for error messages.
        name: its registered name, for error messages.

    ``__getitems__`` (what the DataLoader calls for a batch) returns ``[SampleFailure]`` for
    a batch one of whose samples raised an ``Exception``. In the training process
    (no worker) the generators' states are restored after the batch.
    """

    def __init__(self, dataset: Dataset, seed: int, key: str, name: str) -> None:
        self.dataset, self.seed, self.key, self.name = dataset, int(seed), key, name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        """Sample ``index`` of ``(epoch, index)``; a plain ``index`` is read as epoch 0."""
        return self.__getitems__([item if isinstance(item, tuple) else (0, item)])[0]

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> list[Any]:
        saved = _rng_state() if get_worker_info() is None else None
        try:
            samples = []
            bases: dict[int, int] = {}
            for epoch, index in items:
                base = bases.get(epoch)
                if base is None:
                    base = bases[epoch] = epoch_seed(self.seed, epoch)
                seed_sample(_mix(base ^ (index & _M64)))
                try:
                    samples.append(self.dataset[index])
                except Exception as e:
                    return [self._failure(index, e)]
            return samples
        finally:
            if saved is not None:
                _set_rng_state(saved)

    def _failure(self, index: int, error: Exception) -> SampleFailure:
        source = self.dataset.indices[index] if isinstance(self.dataset, Subset) else None
        info = get_worker_info()
        where = f"DataLoader worker {info.id} (pid {os.getpid()})" if info is not None else "the training process"
        message = " ".join(str(error).split())
        return SampleFailure(
            key=self.key,
            name=self.name,
            index=int(index),
            source_index=None if source is None else int(source),
            error=f"{type(error).__name__}: {message}" if message else type(error).__name__,
            details=traceback.format_exc(),
            where=where,
        )


class _PassFailures:
    """A collate function that hands a batch's :class:`SampleFailure` on as the batch."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 1 and isinstance(samples[0], SampleFailure):
            return samples[0]
        return self.collate(samples)


_WORKER_DIED = re.compile(r"DataLoader worker \(pid")


def _died(what: str, num_workers: int) -> LoaderWorkerDied:
    return LoaderWorkerDied(
        f"a data loading worker process ended: {what}. "
        + (
            "The system kills a process with SIGKILL when memory runs out; "
            if "Killed" in what or "SIGKILL" in what
            else "A worker that dies without raising was usually killed by the system (out of memory); "
        )
        + f"each of the data.loader.num_workers = {num_workers} worker processes (per node) holds its own copy of "
        "what the dataset keeps in memory: lower data.loader.num_workers (0 loads in the training process), "
        "data.loader.prefetch_factor or the batch size, or give the job more memory. The checkpoints written so "
        "far are kept: the same command resumes the run"
    )


def worker_died(error: BaseException, num_workers: int) -> LoaderWorkerDied | None:
    """``error`` as :class:`LoaderWorkerDied` when it is, or was raised while handling, the
    DataLoader's report of a worker process that died (the ``RuntimeError`` "DataLoader
    worker (pid ...) is killed by signal" / "exited unexpectedly", which torch's SIGCHLD
    handler raises wherever the training process is), else ``None``.
    ``num_workers``: the configured ``data.loader.num_workers``."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, LoaderWorkerDied):
            return e
        if isinstance(e, RuntimeError) and _WORKER_DIED.search(str(e)):
            return _died(" ".join(str(e).split()).split(". ")[0].rstrip("."), num_workers)
        e = e.__cause__ or e.__context__
    return None


def _dead_workers(batches: Any, error: BaseException) -> str | None:
    """A description of the worker processes of the DataLoader iterator ``batches`` that
    ended with a non-zero exit code (``None``: all alive). A lost connection or a truncated
    message (``error`` an ``OSError`` or ``EOFError``) is how a killed worker first shows:
    its exit is then awaited for up to a second."""
    workers = getattr(batches, "_workers", None) or []  # torch's private list of multiprocessing.Process
    deadline = time.monotonic() + (1.0 if isinstance(error, (OSError, EOFError)) else 0.0)
    while True:
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not dead:
        return None

    def how(code: int) -> str:
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    return ", ".join(f"DataLoader worker (pid {w.pid}) {how(w.exitcode)}" for w in dead)


class _Checked:
    """A DataLoader iterator whose batches are checked for :class:`SampleFailure` and whose
    dead-worker errors become :class:`LoaderWorkerDied`."""

    def __init__(self, batches: Any, num_workers: int) -> None:
        self.batches, self.num_workers = batches, num_workers

    def __iter__(self) -> _Checked:
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __next__(self) -> Any:
        try:
            batch = next(self.batches)
        except StopIteration:
            raise
        except Exception as e:
            what = _dead_workers(self.batches, e)  # its exit code says more than torch's message
            died = _died(what, self.num_workers) if what else worker_died(e, self.num_workers)
            if died is None:
                raise
            shutdown = getattr(self.batches, "_shutdown_workers", None)
            if shutdown is not None:  # the others stop now: torch's SIGCHLD handler has no worker left to report
                shutdown()
            raise died from e
        if isinstance(batch, SampleFailure):
            raise _sample_failed(batch)
        return batch


def _sample_failed(f: SampleFailure) -> SampleFailed:
    rank = idist.get_rank()
    logger.error(
        "%s (dataset '%s'): sample %d failed to load in %s:\n%s",
        f.key, f.name, f.index, f.where, f.details.rstrip(), extra={"console": False},
    )  # fmt: skip
    source = f" (index {f.source_index} of the dataset before {f.key}.subset)" if f.source_index is not None else ""
    text = (
        f"dataset '{f.name}' cannot load sample {f.index}{source}: {f.error}. The run stopped there; the "
        f"checkpoints written so far are kept. Fix the sample's file or the transform that fails on it and run the "
        f"same command to resume (the traceback is in rank{rank}.log)"
    )
    return SampleFailed([Problem(f.key, text)], header="a sample could not be loaded")


class Loader(DataLoader):
    """A ``DataLoader`` that reports a sample that failed to load (:class:`SampleFailed`) and
    a worker process that died (:class:`LoaderWorkerDied`) as one paragraph each.

    Its dataset is a :class:`SeededSamples`; the collate function passes a
    :class:`SampleFailure` on (:func:`make_collate`). ``sampler`` is the batch sampler's
    sampler (a ``ShardedSampler``: ``loader.sampler.set_epoch`` works as with a plain
    loader). Everything else is ``DataLoader``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = getattr(self.batch_sampler, "sampler", None)
        if inner is not None:  # given a batch_sampler, torch shows a placeholder: show the one the batches come from
            object.__setattr__(self, "sampler", inner)  # DataLoader refuses to set it after __init__

    def __iter__(self) -> Any:
        try:
            return _Checked(super().__iter__(), self.num_workers)
        except RuntimeError as e:  # a persistent worker that died between epochs
            died = worker_died(e, self.num_workers)
            if died is None:
                raise
            raise died from e


def make_collate(collate: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
    """``collate`` (``None``: torch's ``default_collate``) that passes a :class:`SampleFailure` on."""
    return _PassFailures(collate)


def workers_per_process(num_workers: int, nproc_per_node: int) -> int:
    """Worker processes of each training process for ``data.loader.num_workers``: the count
    is per node (as ``ignite.distributed.auto_dataloader`` has it): ``ceil(num_workers /
    nproc_per_node)`` when ``num_workers >= nproc_per_node``, else ``num_workers``."""
    if nproc_per_node > 1 and num_workers >= nproc_per_node:
        return -(-num_workers // nproc_per_node)
    return num_workers


def start_method(configured: str | None) -> str | None:
    """The worker processes' start method for ``data.loader.multiprocessing_context``:
    ``configured`` when set; else ``fork`` on Linux (the default of a process started from
    a shell, which a process that ``runner=spawn`` started does not have: its workers would
    be spawned, each importing torch again, seconds per loader), else ``None`` (the platform's)."""
    if configured is not None:
        return configured
    return "fork" if sys.platform.startswith("linux") and "fork" in START_METHODS else None


def loader_problems(ld: DictConfig) -> list[Problem]:
    """Problems with the worker-process keys of ``data.loader``: ``prefetch_factor``
    (positive), ``persistent_workers`` and ``multiprocessing_context`` (one of
    :data:`START_METHODS`), each of which needs ``num_workers > 0`` when set."""
    problems = []
    workers = ld.num_workers
    if ld.prefetch_factor is not None and ld.prefetch_factor < 1:
        problems.append(
            Problem(
                "data.loader.prefetch_factor",
                "expected a positive number of batches per worker (or null: 2)",
                ld.prefetch_factor,
            )
        )
    context = ld.multiprocessing_context
    if context is not None and context not in START_METHODS:
        problems.append(
            Problem(
                "data.loader.multiprocessing_context",
                f"expected one of {', '.join(START_METHODS)} (or null: the platform's default)",
                context,
            )
        )
    if isinstance(workers, int) and workers == 0:
        for key, value, off in (
            ("prefetch_factor", ld.prefetch_factor, None),
            ("persistent_workers", ld.persistent_workers, False),
            ("multiprocessing_context", context, None),
        ):
            if value is not None and value != off:
                problems.append(
                    Problem(
                        f"data.loader.{key}",
                        "applies to worker processes and data.loader.num_workers is 0 (samples are loaded in the "
                        "training process): set data.loader.num_workers > 0 or leave this key null",
                        value,
                    )
                )
    return problems
