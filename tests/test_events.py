import pytest
from ignite.engine import Engine, Events, EventsList

from igniter.events import EventSpecError, parse_event


def fire_count(spec, max_epochs=3, epoch_length=10):
    engine = Engine(lambda e, b: None)
    calls = []
    engine.add_event_handler(parse_event(spec), lambda e: calls.append((e.state.epoch, e.state.iteration)))
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return calls


def test_plain_event():
    assert parse_event("EPOCH_COMPLETED") is Events.EPOCH_COMPLETED


def test_every_filter_fires_expected_times():
    assert len(fire_count("ITERATION_COMPLETED(every=4)")) == 7  # 30 iterations -> 4, 8, ..., 28


def test_or_combination():
    spec = parse_event("ITERATION_COMPLETED(every=10) | EPOCH_COMPLETED(once=2) | COMPLETED")
    assert isinstance(spec, EventsList)
    calls = fire_count("ITERATION_COMPLETED(every=10) | EPOCH_COMPLETED(once=2) | COMPLETED")
    # iterations 10, 20, 30 + epoch 2 once + completed once
    assert len(calls) == 5


def test_once_list_and_before_after():
    assert [c[1] for c in fire_count("ITERATION_COMPLETED(once=[3, 7])")] == [3, 7]
    assert len(fire_count("ITERATION_COMPLETED(after=25)")) == 5


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("EPOCH_COMPLETD", "Did you mean 'EPOCH_COMPLETED'"),
        ("ITERATION_COMPLETED(evry=2)", "Did you mean 'every'"),
        ("ITERATION_COMPLETED(every=0)", "positive integer"),
        ("ITERATION_COMPLETED(every='x')", "positive integer"),
        ("ITERATION_COMPLETED(2)", "must be named"),
        ("ITERATION_COMPLETED(every=2", "cannot parse"),
    ],
)
def test_bad_specs(spec, needle):
    with pytest.raises(EventSpecError, match=None) as info:
        parse_event(spec)
    assert needle in str(info.value)
