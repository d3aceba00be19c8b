"""Built-in entries of the engine registry: trainer and evaluator factories.

An engine factory is called with ``process_function`` (from a step factory)
and returns an ``ignite.engine.Engine``.
"""

from __future__ import annotations

from typing import Any, Callable

from ignite.engine import DeterministicEngine, Engine

from igniter.registry import engine_registry

__all__ = ["supervised_trainer", "supervised_evaluator"]


@engine_registry("supervised_trainer")
def supervised_trainer(process_function: Callable[[Engine, Any], Any]) -> Engine:
    """The trainer: an ``ignite.engine.DeterministicEngine``, so that a run resumed in
    the middle of an epoch sees the same batches and random streams as an
    uninterrupted one (Ignite's "dataflow synchronization")."""
    return DeterministicEngine(process_function)


@engine_registry("supervised_evaluator")
def supervised_evaluator(process_function: Callable[[Engine, Any], Any]) -> Engine:
    """The evaluator: a plain ``Engine`` running the eval step once over the validation set."""
    return Engine(process_function)
