"""Built-in entries of the engine registry: trainer and evaluator factories.

An engine factory is called with ``process_function`` (from a step factory)
and returns an ``ignite.engine.Engine``.
"""

from __future__ import annotations

import logging
import random
import weakref
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import DeterministicEngine, Engine

from igniter.registry import engine_registry

__all__ = ["LeanDispatch", "Evaluator", "Trainer", "seed_everything", "supervised_trainer", "supervised_evaluator"]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU, and every CUDA device when CUDA is
    available): the generators ``ignite.utils.manual_seed`` seeds, for ~10 us instead of
    ~400 us (``torch.manual_seed`` queues lazy seeds for devices that are not initialized,
    formatting a stack for each: 5% of a small model's training on CPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class LeanDispatch:
    """Mixin for an Ignite ``Engine``: its event dispatch without building a debug
    message for every event that nobody logs.

    Ignite's ``Engine._fire_event`` (a private method: tests/test_engines.py pins its
    signature, pyproject caps pytorch-ignite below 0.6) formats a debug message for every
    event, four per iteration, before ``logger.debug`` drops it: 2-3% of a small model's
    iteration (``bench/overhead.py --variants ignite ignite_lean``). Handlers are called
    exactly as Ignite calls them; at DEBUG Ignite's own method runs, message included.
    """

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):  # type: ignore[attr-defined]
            return super()._fire_event(event_name, *event_args, **event_kwargs)  # type: ignore[misc]
        self.last_event_name = event_name
        for func, args, kwargs in self._event_handlers[event_name]:  # type: ignore[attr-defined]
            kwargs.update(event_kwargs)
            if args and isinstance(args[0], weakref.ref):  # Ignite passes the engine as a weak reference
                engine = args[0]()
                if engine is None:
                    raise RuntimeError("Engine reference not resolved. Cannot execute event handler.")
                first, others = (engine,), args[1:]
            else:  # handlers registered without the engine (e.g. metrics)
                first, others = (), args
            func(*first, *(event_args + others), **kwargs)


class Evaluator(LeanDispatch, Engine):
    """Ignite's ``Engine`` with :class:`LeanDispatch`."""


class Trainer(LeanDispatch, DeterministicEngine):
    """Ignite's ``DeterministicEngine`` with the same reseeding at every epoch start
    (seed + epoch index, ``ignite/engine/deterministic.py``) through :func:`seed_everything`,
    and :class:`LeanDispatch`. ``_setup_seed`` overrides a private method of Ignite's
    (signature pinned by tests/test_engines.py)."""

    def _setup_seed(self, _: Any = None, iter_counter: int | None = None, iteration: int | None = None) -> None:
        if iter_counter is None:
            length = self._dataloader_len if self._dataloader_len is not None else 1
        elif not iter_counter > 0:
            raise ValueError("iter_counter should be positive value")
        else:
            length = iter_counter
        if iteration is None:
            iteration = self.state.iteration
        seed_everything(self.state.seed + iteration // length)


@engine_registry("supervised_trainer")
def supervised_trainer(process_function: Callable[[Engine, Any], Any]) -> Engine:
    """The trainer: an ``ignite.engine.DeterministicEngine``, so that a run resumed in
    the middle of an epoch sees the same batches and random streams as an
    uninterrupted one (Ignite's "dataflow synchronization")."""
    return Trainer(process_function)


@engine_registry("supervised_evaluator")
def supervised_evaluator(process_function: Callable[[Engine, Any], Any]) -> Engine:
    """The evaluator: Ignite's ``Engine`` (:class:`Evaluator`) running the eval step once over the validation set."""
    return Evaluator(process_function)
