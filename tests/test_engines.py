"""igniter's engines dispatch events exactly as Ignite's do, without Ignite's per-event debug message."""

import logging

import pytest
from ignite.engine import Engine, EventEnum, Events
from ignite.metrics import Average

from igniter.engines import Evaluator, Trainer

FORMATTED = []


class Probe(EventEnum):
    """A custom event that records when something formats it into a string."""

    PING = "ping"

    def __format__(self, spec: str) -> str:
        FORMATTED.append(self)
        return super().__format__(spec)


def record_run(cls: type) -> list[tuple]:
    """Every handler call of a 2-epoch run and of a run whose step raises, with what each
    handler received; ``FORMATTED`` holds the formatting of ``Probe`` during the runs."""
    calls: list[tuple] = []
    engine = cls(lambda e, b: float(b))
    engine.register_events(*Probe)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: calls.append(("epoch_started", e.state.epoch)))
    engine.add_event_handler(
        Events.ITERATION_COMPLETED(every=2), lambda e, tag: calls.append((tag, e.state.iteration)), "every2"
    )
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: e.fire_event(Probe.PING) if e.state.iteration == 3 else None
    )
    engine.add_event_handler(Probe.PING, lambda e: calls.append(("ping", e.state.iteration, e.last_event_name)))
    engine.add_event_handler(Events.COMPLETED, lambda: calls.append(("completed, no engine argument",)))
    engine.add_event_handler(
        Events.TERMINATE_SINGLE_EPOCH, lambda e, iter_counter: calls.append(("terminate epoch", iter_counter))
    )
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda e: e.terminate_epoch())
    Average(output_transform=lambda out: out).attach(engine, "mean")  # a metric: handlers registered without the engine
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: calls.append(("mean", e.state.metrics["mean"])))
    failing = cls(lambda e, b: 1 / 0)
    failing.add_event_handler(Events.EXCEPTION_RAISED, lambda e, err: calls.append(("exception", type(err).__name__)))
    FORMATTED.clear()  # adding a handler formats its event once (Ignite's debug message): not per event fired
    engine.run([1, 2, 3, 4, 5, 6], max_epochs=2)
    failing.run([1], max_epochs=1)  # the handler takes the exception: not raised
    return calls


@pytest.mark.parametrize("cls", [Trainer, Evaluator])
def test_handlers_are_called_as_ignite_calls_them(cls):
    ignite_calls = record_run(Engine)
    assert ("terminate epoch", 5) in ignite_calls and (
        "exception",
        "ZeroDivisionError",
    ) in ignite_calls  # the runs cover them
    assert record_run(cls) == ignite_calls


@pytest.mark.parametrize("cls", [Trainer, Evaluator])
def test_no_debug_message_is_built_unless_debug_is_logged(cls, caplog):
    record_run(Engine)
    assert FORMATTED, "Ignite's Engine formats the event for its debug message (what this test guards against)"
    record_run(cls)
    assert FORMATTED == []
    with caplog.at_level(logging.DEBUG, logger=f"ignite.engine.engine.{cls.__name__}"):
        record_run(cls)
    assert FORMATTED and "Firing handlers for event Probe.PING" in caplog.text


def test_the_private_ignite_methods_igniter_overrides_still_have_their_signatures():
    """igniter overrides ``Engine._fire_event`` (LeanDispatch) and ``DeterministicEngine._setup_seed``
    (Trainer): a new Ignite that renames or re-shapes them must fail here, not in a run."""
    import inspect

    from ignite.engine import DeterministicEngine, Engine

    fire = inspect.signature(Engine._fire_event)
    assert list(fire.parameters) == ["self", "event_name", "event_args", "event_kwargs"]
    assert fire.parameters["event_args"].kind is inspect.Parameter.VAR_POSITIONAL
    assert fire.parameters["event_kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    seed = inspect.signature(DeterministicEngine._setup_seed)
    assert list(seed.parameters) == ["self", "_", "iter_counter", "iteration"]
    assert hasattr(Engine, "_event_handlers") or "_event_handlers" in Engine(lambda e, b: None).__dict__
