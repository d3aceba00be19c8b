"""Event specifications in config: Ignite's event names, filters and ``|``.

Grammar (whitespace ignored)::

    spec   := term ("|" term)*
    term   := NAME | NAME "(" kwarg ("," kwarg)* ")"
    kwarg  := ("every" | "once" | "before" | "after") "=" int   (once may be a list of ints)

``NAME`` is a member of ``ignite.engine.Events`` (e.g. ``ITERATION_COMPLETED``)
or of a custom ``EventEnum`` registered on the engine. The result is what
``Engine.add_event_handler`` accepts: an event, a filtered event, or an
``EventsList`` (Ignite's ``|``), as in Ignite and Ignite.jl.

Examples:
    ``"EPOCH_COMPLETED"``, ``"ITERATION_COMPLETED(every=10)"``,
    ``"ITERATION_COMPLETED(every=10) | EPOCH_COMPLETED(once=2)"``.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable, Type

from ignite.engine import Engine, EventEnum, Events

from igniter.registry import suggest

__all__ = ["parse_event", "event_names", "EventSpecError", "PeriodicEvents", "CHECK_LOSS_EVERY", "fire_periodic_events"]

_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)
_FILTERS = ("every", "once", "before", "after")


class PeriodicEvents(EventEnum):
    """Trainer events fired every N iterations by :func:`fire_periodic_events`, after
    ``ITERATION_COMPLETED``'s earlier handlers, with ``state.iteration`` as their counter.

    ``LOG`` every ``logging.log_every`` iterations: TensorBoard scalars, log lines and the
    loss history hang on it; handlers in config may use ``event: LOG``. ``CHECK_LOSS``
    every :data:`CHECK_LOSS_EVERY` iterations: the NaN guard.

    Why not ``ITERATION_COMPLETED(every=N)``: each handler on a filtered event costs
    ~5-10 us per iteration (Ignite calls its filter and looks the event up in
    ``State.event_to_attr`` on every iteration), one handler that fires them all ~1-2 us.
    """

    LOG = "log"
    CHECK_LOSS = "check_loss"


CHECK_LOSS_EVERY = 10


def fire_periodic_events(trainer: Engine, log_every: int) -> None:
    """Fire :class:`PeriodicEvents` on ``trainer``: ``CHECK_LOSS`` every
    :data:`CHECK_LOSS_EVERY` iterations, then ``LOG`` every ``log_every`` iterations, from
    one ``ITERATION_COMPLETED`` handler (the events are registered by
    :func:`igniter.run.build_run`)."""
    periods = ((PeriodicEvents.CHECK_LOSS, CHECK_LOSS_EVERY), (PeriodicEvents.LOG, log_every))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tick(engine: Engine) -> None:
        iteration = engine.state.iteration
        for event, every in periods:
            if iteration % every == 0:
                engine.fire_event(event)


class EventSpecError(ValueError):
    """An event specification does not parse or names an unknown event/filter."""


def event_names(custom: Iterable[Type[EventEnum]] = ()) -> dict[str, Any]:
    """Map of accepted event names to event objects (Ignite's plus ``custom`` enums)."""
    names: dict[str, Any] = {e.name: e for e in Events}
    for enum in custom:
        names.update({e.name: e for e in enum})
    return names


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise EventSpecError(f"cannot parse filter arguments '({text})' in '{spec}'") from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise EventSpecError(f"filter arguments must be named ({', '.join(_FILTERS)}=...) in '{spec}'")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg not in _FILTERS:
            raise EventSpecError(
                f"unknown event filter '{kw.arg}' in '{spec}'.{suggest(str(kw.arg), list(_FILTERS))} "
                f"Filters: {', '.join(_FILTERS)}."
            )
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            raise EventSpecError(f"filter '{kw.arg}' needs an integer in '{spec}'") from None
        values = value if kw.arg == "once" and isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise EventSpecError(f"filter '{kw.arg}' needs a positive integer, got {value!r} in '{spec}'")
        kwargs[kw.arg] = value
    return kwargs


def parse_event(spec: str, custom: Iterable[Type[EventEnum]] = ()) -> Any:
    """Turn ``spec`` into an Ignite event, filtered event or ``EventsList``.

    Args:
        spec: the event specification (grammar in the module docstring).
        custom: custom ``EventEnum`` classes whose members are accepted by name.

    Raises:
        EventSpecError: unknown event name (with a did-you-mean), unknown filter,
            a non-positive or non-integer filter value, or a syntax error.
    """
    names = event_names(custom)
    result: Any = None
    for term in str(spec).split("|"):
        match = _TERM.match(term)
        if not match:
            raise EventSpecError(f"cannot parse event '{term.strip()}' in '{spec}'")
        name, args = match.group(1), match.group(2)
        if name not in names:
            raise EventSpecError(
                f"unknown event '{name}'.{suggest(name, list(names))} Events: {', '.join(sorted(names))}."
            )
        event = names[name]
        if args is not None and args.strip():
            kwargs = _parse_kwargs(args, spec)
            try:
                event = event(**kwargs)
            except (ValueError, TypeError) as e:
                raise EventSpecError(f"invalid filter for '{name}' in '{spec}': {e}") from None
        result = event if result is None else result | event
    return result
