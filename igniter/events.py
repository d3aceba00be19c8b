"""Event specifications in config: Ignite's event names and filters, combined with ``|`` and ``&``.

Grammar (whitespace ignored; ``&`` binds tighter than ``|``)::

    spec     := or_expr
    or_expr  := and_expr ("|" and_expr)*
    and_expr := atom ("&" atom)*
    atom     := term | "(" or_expr ")"
    term     := NAME | NAME "(" [kwarg ("," kwarg)*] ")"
    kwarg    := ("every" | "once" | "before" | "after") "=" int   (once may be a list of ints)

``NAME`` is a member of ``ignite.engine.Events`` (e.g. ``ITERATION_COMPLETED``)
or of a custom ``EventEnum`` registered on the engine. The result is what
``Engine.add_event_handler`` accepts: an event, a filtered event, or an
``EventsList``, as in Ignite and Ignite.jl.

``A | B`` is Ignite's ``EventsList``: the handler is attached to each term, so two
terms of one event that pass together call it twice. ``A & B`` joins filters of ONE
event into a single filtered event (Ignite's ``event_filter=``) that fires when every
filter passes: ``EPOCH_COMPLETED(every=2) & EPOCH_COMPLETED(after=3)`` fires at epochs
4, 6, 8, ...; ``&`` across different events is an :class:`EventSpecError`. A
parenthesised ``|`` group inside ``&`` (``(A | B) & C``) is distributed as a boolean
"or": it must be of that same event and counts as one filter that passes when any of
its terms passes, so the handler is called once (as in Ignite.jl), not once per term.
Parentheses nest at most :data:`MAX_DEPTH` deep.

Examples:
    ``"EPOCH_COMPLETED"``, ``"ITERATION_COMPLETED(every=10)"``,
    ``"ITERATION_COMPLETED(every=10) | EPOCH_COMPLETED(once=2)"``,
    ``"EPOCH_COMPLETED(every=2) & EPOCH_COMPLETED(after=3) | COMPLETED"``.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable, Iterable, List, NoReturn, Optional, Sequence, Tuple, Type

from ignite.engine import Engine, EventEnum, Events

from igniter.registry import suggest

__all__ = [
    "parse_event",
    "event_names",
    "EventSpecError",
    "PeriodicEvents",
    "CHECK_LOSS_EVERY",
    "fire_periodic_events",
    "MAX_DEPTH",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILTERS = ("every", "once", "before", "after")

MAX_DEPTH = 32
"""How deep parentheses may nest in an event specification."""

EventFilter = Callable[[Engine, int], bool]
# One alternative of a spec: the (unfiltered) event and its filter, None when it always passes.
_Alt = Tuple[Any, Optional[EventFilter]]


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
    :func:`igniter.assemble.build_training`)."""
    periods = ((PeriodicEvents.CHECK_LOSS, CHECK_LOSS_EVERY), (PeriodicEvents.LOG, log_every))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tick(engine: Engine) -> None:
        iteration = engine.state.iteration
        for event, every in periods:
            if iteration % every == 0:
                engine.fire_event(event)


class EventSpecError(ValueError):
    """An event specification does not parse, names an unknown event or filter, or
    joins different events with ``&`` (:func:`parse_event` lists every case)."""


def event_names(custom: Iterable[Type[EventEnum]] = ()) -> dict[str, Any]:
    """Map of accepted event names to event objects (Ignite's plus ``custom`` enums)."""
    names: dict[str, Any] = {e.name: e for e in Events}
    for enum in custom:
        names.update({e.name: e for e in enum})
    return names


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
    """The filters of one term, from the text between its parentheses."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise EventSpecError(f"cannot parse filter arguments '({text})' in '{spec}'") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise EventSpecError(f"cannot parse filter arguments '({text})' in '{spec}'")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise EventSpecError(f"filter arguments must be named ({', '.join(_FILTERS)}=...) in '{spec}'")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg not in _FILTERS:
            raise EventSpecError(
                f"unknown event filter '{kw.arg}' in '{spec}'.{suggest(str(kw.arg), list(_FILTERS))} "
                f"Filters: {', '.join(_FILTERS)}."
            )
        if kw.arg in kwargs:
            raise EventSpecError(f"filter '{kw.arg}' given twice in '{spec}'")
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise EventSpecError(f"filter '{kw.arg}' needs a positive integer in '{spec}'") from None
        values = value if kw.arg == "once" and isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise EventSpecError(f"filter '{kw.arg}' needs a positive integer, got {value!r} in '{spec}'")
        kwargs[kw.arg] = value
    return kwargs


def _all_of(filters: Sequence[EventFilter]) -> EventFilter:
    def event_filter(engine: Engine, event: int) -> bool:
        return all(f(engine, event) for f in filters)

    return event_filter


def _any_of(filters: Sequence[EventFilter]) -> EventFilter:
    def event_filter(engine: Engine, event: int) -> bool:
        return any(f(engine, event) for f in filters)

    return event_filter


def _conjoin(operands: List[List[_Alt]], spec: str) -> _Alt:
    """``&`` of ``operands`` (each a list of ``|``-alternatives): one event whose filter
    passes when, for every operand, at least one of its alternatives passes."""
    base = operands[0][0][0]
    filters: list[EventFilter] = []
    for alts in operands:
        for event, _ in alts:
            if event is not base:
                raise EventSpecError(
                    f"'&' joins filters of one event, but '{spec}' joins {base.name} and {event.name} "
                    f"(use '|' to fire on either event)"
                )
        if any(f is None for _, f in alts):  # an alternative that always passes
            continue
        group = [f for _, f in alts if f is not None]
        filters.append(group[0] if len(group) == 1 else _any_of(group))
    if not filters:
        return base, None
    return base, filters[0] if len(filters) == 1 else _all_of(filters)


class _Parser:
    """Recursive-descent parser for the grammar in the module docstring."""

    def __init__(self, spec: str, names: dict[str, Any]) -> None:
        self.spec, self.names, self.pos = spec, names, 0

    def fail(self, what: str) -> NoReturn:
        raise EventSpecError(f"cannot parse event '{self.spec}': {what} at character {self.pos + 1}")

    def peek(self) -> str:
        """The next non-blank character ('' at the end), skipping blanks."""
        while self.pos < len(self.spec) and self.spec[self.pos].isspace():
            self.pos += 1
        return self.spec[self.pos : self.pos + 1]

    def found(self) -> str:
        char = self.peek()
        return f"found {char!r}" if char else "found the end"

    def parse(self) -> List[_Alt]:
        if not self.peek():
            raise EventSpecError("empty event specification; expected an event name such as EPOCH_COMPLETED")
        alts = self.or_expr(0)
        if self.peek():
            self.fail(f"expected '|', '&' or the end, {self.found()}")
        return alts

    def or_expr(self, depth: int) -> List[_Alt]:
        alts = self.and_expr(depth)
        while self.peek() == "|":
            self.pos += 1
            alts = alts + self.and_expr(depth)
        return alts

    def and_expr(self, depth: int) -> List[_Alt]:
        operands = [self.atom(depth)]
        while self.peek() == "&":
            self.pos += 1
            operands.append(self.atom(depth))
        return operands[0] if len(operands) == 1 else [_conjoin(operands, self.spec)]

    def atom(self, depth: int) -> List[_Alt]:
        if self.peek() != "(":
            return [self.term()]
        if depth >= MAX_DEPTH:
            self.fail(f"parentheses nested more than {MAX_DEPTH} deep")
        self.pos += 1
        alts = self.or_expr(depth + 1)
        if self.peek() != ")":
            self.fail(f"expected ')', {self.found()}")
        self.pos += 1
        return alts

    def term(self) -> _Alt:
        self.peek()
        match = _NAME.match(self.spec, self.pos)
        if not match:
            self.fail(f"expected an event name or '(', {self.found()}")
        name, self.pos = match.group(0), match.end()
        if name not in self.names:
            raise EventSpecError(
                f"unknown event '{name}'.{suggest(name, list(self.names))} Events: {', '.join(sorted(self.names))}."
            )
        event = self.names[name]
        if self.peek() != "(":
            return event, None
        args = self.arguments()
        if not args.strip():
            return event, None
        kwargs = _parse_kwargs(args, self.spec)
        try:
            filtered = event(**kwargs)
        except (ValueError, TypeError) as e:
            raise EventSpecError(f"invalid filter for '{name}' in '{self.spec}': {e}") from None
        return event, filtered.filter

    def arguments(self) -> str:
        """The text between the '(' at ``pos`` and its matching ')'; moves past the ')'."""
        depth = 0
        for i in range(self.pos, len(self.spec)):
            depth += {"(": 1, ")": -1}.get(self.spec[i], 0)
            if depth == 0:
                text, self.pos = self.spec[self.pos + 1 : i], i + 1
                return text
        self.fail("this '(' has no matching ')'")


def parse_event(spec: str, custom: Iterable[Type[EventEnum]] = ()) -> Any:
    """Turn ``spec`` into an Ignite event, filtered event or ``EventsList``.

    Args:
        spec: the event specification (grammar and the meaning of ``|``, ``&`` and
            parentheses in the module docstring); a non-string is read as ``str(spec)``.
        custom: custom ``EventEnum`` classes whose members are accepted by name.

    Returns:
        The event itself when no filter applies (e.g. ``Events.EPOCH_COMPLETED``), a
        ``CallableEventWithFilter`` for one filtered term or an ``&`` of terms, or an
        ``EventsList`` when the spec has ``|`` alternatives at the top level.

    Raises:
        EventSpecError: anything the parser cannot read (empty spec, a dangling or doubled
            operator, unbalanced or too deeply nested parentheses, text after a term), an
            unknown event name (with a did-you-mean), an unknown filter, positional,
            non-literal, non-positive or non-integer filter values, filters Ignite refuses
            together (e.g. ``every`` with ``once``), or ``&`` between different events.
    """
    alts = _Parser(str(spec), event_names(custom)).parse()
    events = [event if f is None else event(event_filter=f) for event, f in alts]
    result = events[0]
    for event in events[1:]:
        result = result | event
    return result
