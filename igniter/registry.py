"""Registries: named tables of the components a config can ask for.

A registry only stores and finds (building objects from config lives in
:mod:`igniter.build`). The nine registries follow the original Igniter:

========================  ====================================================
``engine_registry``       trainer / evaluator engine factories
``model_registry``        ``torch.nn.Module`` factories
``dataset_registry``      ``torch.utils.data.Dataset`` factories
``solver_registry``       optimizer and LR-scheduler factories (beside torch's)
``io_registry``           checkpoint savers and loggers
``function_registry``     step functions, losses, collate functions, metrics
``transforms_registry``   per-sample data transforms
``event_handler_registry``  handlers attached to engine events from config
``runner_registry``       launch modes (``single``, ``spawn``, ``torchrun``...)
========================  ====================================================

Examples:
    .. code-block:: python

        from igniter.registry import model_registry

        @model_registry("tiny")
        class Tiny(torch.nn.Module): ...

        @model_registry            # registered under its own name, "Wide"
        class Wide(torch.nn.Module): ...

A name registered by user code replaces igniter's built-in of that name (one
INFO line on the ``igniter`` logger says so), so a project written for the
original Igniter can register its own ``mnist`` dataset. Two registrations of
one name that are both user code, or both built-in, are an error.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar, overload

__all__ = [
    "Entry",
    "Registry",
    "RegistryError",
    "is_builtin",
    "engine_registry",
    "model_registry",
    "dataset_registry",
    "solver_registry",
    "io_registry",
    "function_registry",
    "transforms_registry",
    "event_handler_registry",
    "runner_registry",
    "REGISTRIES",
]

T = TypeVar("T")

logger = logging.getLogger("igniter")


def is_builtin(module: str) -> bool:
    """Whether ``module`` (a dotted module name) is part of the ``igniter`` package."""
    return module == "igniter" or module.startswith("igniter.")


class RegistryError(KeyError):
    """A name is missing from a registry, or registered twice.

    ``str(error)`` is the full one-paragraph message (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from (module and source file)."""

    name: str
    obj: Any
    module: str
    file: str | None


def suggest(name: str, choices: list[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest of ``choices`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[str(name).lower()]] if str(name).lower() in lowered else []
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry:
    """A name -> object table filled by decorators.

    Args:
        name: what the registry holds, used in error messages (e.g. ``"model"``).

    Raises:
        RegistryError: from :meth:`register` on a duplicate name (unless
            ``override=True`` or a user entry replaces a built-in) and from
            :meth:`get` on a missing one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Entry] = {}

    # -- registration -----------------------------------------------------
    @overload
    def __call__(self, name_or_obj: T) -> T: ...
    @overload
    def __call__(self, name_or_obj: str | None = None, *, override: bool = False) -> Callable[[T], T]: ...

    def __call__(self, name_or_obj: Any = None, *, override: bool = False) -> Any:
        """Decorator: ``@registry``, ``@registry("name")`` or ``@registry("name", override=True)``."""
        if name_or_obj is not None and not isinstance(name_or_obj, str):
            return self.register(name_or_obj)

        def decorator(obj: T) -> T:
            return self.register(obj, name=name_or_obj, override=override)

        return decorator

    def register(self, obj: T, name: str | None = None, override: bool = False) -> T:
        """Add ``obj`` under ``name`` (default: ``obj.__name__``) and return it unchanged.

        A user registration (``obj`` defined outside the ``igniter`` package)
        replaces a built-in of the same name, whichever is registered first; the
        user's entry stays and one INFO line on the ``igniter`` logger names the
        registry, the name and both modules.

        Raises:
            RegistryError: no name can be inferred, or ``name`` is taken and neither
                ``override`` is set nor exactly one of the two entries is built-in.
        """
        key = name or getattr(obj, "__name__", None)
        if not key:
            raise RegistryError(f"{self.name} registry: cannot infer a name for {obj!r}; pass one explicitly.")
        module = getattr(obj, "__module__", None) or "?"
        old = self._entries.get(key)
        if old is not None and not override:
            if is_builtin(old.module) and not is_builtin(module):
                logger.info(
                    "%s registry: '%s' from %s replaces igniter's built-in from %s", self.name, key, module, old.module
                )
            elif is_builtin(module) and not is_builtin(old.module):
                logger.info(
                    "%s registry: '%s' from %s replaces igniter's built-in from %s", self.name, key, old.module, module
                )
                return obj  # the user's entry, registered first, stays
            else:
                raise RegistryError(
                    f"{self.name} registry: '{key}' is already registered (from {old.module}, {old.file}); "
                    f"{module} registers it again. Pick another name or register with override=True."
                )
        try:
            file = inspect.getsourcefile(obj)  # type: ignore[arg-type]
        except TypeError:
            file = None
        self._entries[key] = Entry(key, obj, module, file)
        return obj

    # -- lookup -------------------------------------------------------------
    def get(self, name: str, config_key: str | None = None) -> Any:
        """Return the object registered as ``name``.

        Args:
            name: registered name.
            config_key: dotted config key that asked for it, quoted in the error.

        Raises:
            RegistryError: ``name`` is not registered; the message names this
                registry, the key, the closest names and every registered name.
        """
        try:
            return self._entries[name].obj
        except (KeyError, TypeError):
            raise RegistryError(self.missing_message(name, config_key)) from None

    def missing_message(self, name: Any, config_key: str | None = None) -> str:
        where = f" (asked for by '{config_key}')" if config_key else ""
        return (
            f"{self.name} registry has no '{name}'{where}.{suggest(str(name), self.names())} "
            f"Registered: {', '.join(self.names()) or '(none)'}."
        )

    def entry(self, name: str) -> Entry:
        """Return the :class:`Entry` (object, module, file) for ``name``."""
        if name not in self._entries:
            raise RegistryError(self.missing_message(name))
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests and interactive sessions re-registering)."""
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {self.names()})"


engine_registry = Registry("engine")
model_registry = Registry("model")
dataset_registry = Registry("dataset")
solver_registry = Registry("solver")
io_registry = Registry("io")
function_registry = Registry("function")
transforms_registry = Registry("transforms")
event_handler_registry = Registry("event handler")
runner_registry = Registry("runner")

REGISTRIES: dict[str, Registry] = {
    r.name: r
    for r in (
        engine_registry,
        model_registry,
        dataset_registry,
        solver_registry,
        io_registry,
        function_registry,
        transforms_registry,
        event_handler_registry,
        runner_registry,
    )
}
