"""Build components from config sections through the registries.

The registries only store and find; this module turns a config section into
an object. Each ``build_*`` takes the section and the dotted key it came from
(for error messages) and raises :class:`~igniter.errors.ConfigError` naming
that key when the input is bad (e.g. a dataset file that is missing).

This module is also the one definition of what igniter passes to factories
itself (:data:`STEP_ARGS`, :data:`DATASET_ARGS`, :data:`OPTIMIZER_ARGS`...):
:mod:`igniter.validate` reserves exactly these names and ``igniter.assemble.build_training``
provides exactly these values, so a new injected argument is one edit here.

The rule (:func:`injected`): a factory gets an argument igniter supplies when
it names that parameter and the config has a value (not null), or when it takes
``**kwargs`` and the config *set* the value (differs from the schema default).
A ``def mnist_dataset(**kwargs)`` that forwards to torchvision's
``MNIST(root, train, transform, download)`` thus gets ``root`` when
``data.train.root`` is set, but ``split`` only when the config sets a split
other than the schema's ``train``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from igniter.config import DatasetConfig, SolverConfig
from igniter.errors import ConfigError, Problem
from igniter.registry import (
    REGISTRIES,
    Registry,
    RegistryError,
    dataset_registry,
    function_registry,
    model_registry,
    solver_registry,
    suggest,
    transforms_registry,
)

__all__ = [
    "StepArgs",
    "STEP_ARGS",
    "DATASET_ARGS",
    "OPTIMIZER_ARGS",
    "SCHEDULER_ARGS",
    "HANDLER_ARGS",
    "injected",
    "dataset_args",
    "optimizer_args",
    "plain",
    "import_modules",
    "registered_nothing",
    "import_object",
    "call_with",
    "accepted_params",
    "build_model",
    "build_transform",
    "build_dataset",
    "optimizer_factory",
    "scheduler_factory",
    "build_optimizer",
    "build_scheduler",
    "build_metrics",
]


@dataclass(frozen=True)
class StepArgs:
    """What step, engine and metric factories may ask for by parameter name.

    ``igniter.assemble.build_training`` fills one and passes :meth:`as_dict` to :func:`call_with`;
    :mod:`igniter.validate` rejects these names in ``trainer.step_params``. A new
    injected argument is a new field here.

    ``autocast``, ``scaler`` and ``accumulate_grad_batches`` come from
    ``trainer.precision`` and ``trainer.accumulate_grad_batches`` (:mod:`igniter.precision`):
    a custom step gets mixed precision and accumulation without re-implementing them.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    device: torch.device
    grad_clip_norm: float | None
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler
    accumulate_grad_batches: int

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (shallow: the objects themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Names a step / engine / metric factory may take from igniter (the fields of :class:`StepArgs`).
STEP_ARGS: tuple[str, ...] = tuple(f.name for f in fields(StepArgs))
#: Dataset factory arguments from ``data.<split>.split``, ``.root``, ``.download`` and ``.transforms``.
DATASET_ARGS: tuple[str, ...] = ("split", "root", "download", "transform")
#: Optimizer arguments: the model's parameters (first, positionally), ``solver.lr``, ``solver.weight_decay``.
OPTIMIZER_ARGS: tuple[str, ...] = ("params", "lr", "weight_decay")
#: Scheduler arguments: the optimizer (first, positionally).
SCHEDULER_ARGS: tuple[str, ...] = ("optimizer",)
#: Event-handler and logger factory arguments: the run context.
HANDLER_ARGS: tuple[str, ...] = ("ctx",)

# Schema defaults: a **kwargs dataset factory gets a value only when the config changed it from
# these; a factory that cannot take a value is an error only when the config changed it.
_DATASET_DEFAULTS = {"split": DatasetConfig.split, "root": None, "download": False, "transform": None}
_SOLVER_DEFAULTS = {"lr": SolverConfig.lr, "weight_decay": SolverConfig.weight_decay}


def plain(node: Any) -> Any:
    """A config node as plain Python containers (``DictConfig`` -> ``dict``), resolved."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def import_modules(names: Iterable[str], key: str = "imports") -> None:
    """Import user modules so their ``@registry`` decorators run.

    The working directory is put on ``sys.path`` first (as ``python -m`` does), so a
    package in the directory a user runs ``igniter`` from imports without installing it.

    Raises:
        ConfigError: one problem per module that fails to import, naming ``imports[i]``;
            for a module that is not found, where igniter looked and how to make it findable.
    """
    names = list(names)
    cwd = os.getcwd()
    if names and cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    problems = []
    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # a module the user's code imports is missing
                problems.append(Problem(f"{key}[{i}]", f"cannot import: {type(e).__name__}: {e}", name))
                continue
            problems.append(
                Problem(
                    f"{key}[{i}]",
                    f"no module named '{e.name}' in the working directory {cwd} or on the Python path "
                    "(installed packages and PYTHONPATH): install your package (`pip install -e .` in its "
                    "directory) or add the directory that contains it to PYTHONPATH",
                    name,
                )
            )
        except Exception as e:  # any failure in user code is a config-time error
            problems.append(Problem(f"{key}[{i}]", f"cannot import: {type(e).__name__}: {e}", name))
    if problems:
        raise ConfigError(problems)


def _registers(module_name: str) -> bool:
    """Whether any registry holds an object defined in ``module_name`` or one of its submodules."""
    prefix = module_name + "."
    return any(
        r.entry(n).module == module_name or r.entry(n).module.startswith(prefix)
        for r in REGISTRIES.values()
        for n in r.names()
    )


def _registering_submodules(module_name: str) -> list[str]:
    """Submodules of the package ``module_name`` (not imported) whose source uses a registry
    decorator: where a user's registrations are when the package's ``__init__`` imports none."""
    module = sys.modules.get(module_name)
    found = []
    for info in pkgutil.walk_packages(getattr(module, "__path__", None) or [], prefix=module_name + "."):
        spec = importlib.util.find_spec(info.name) if info.name not in sys.modules else sys.modules[info.name].__spec__
        origin = getattr(spec, "origin", None)
        try:
            source = Path(origin).read_text(errors="replace") if origin and origin.endswith(".py") else ""
        except OSError:
            continue
        if re.search(r"^\s*@\s*\w*registry\b", source, flags=re.M):
            found.append(info.name)
    return found


def registered_nothing(names: Iterable[str], key: str = "imports") -> list[Problem]:
    """One problem per imported module (already imported by :func:`import_modules`) that
    registered nothing, naming the submodules whose source would register
    ("your registrations are in `my_project.components`?"). For :mod:`igniter.validate`
    to add when the config names something no registry holds."""
    problems = []
    for i, name in enumerate(names):
        if name not in sys.modules or _registers(name):
            continue
        subs = _registering_submodules(name)
        hint = (
            f"; your registrations are in {' or '.join(f'`{s}`' for s in subs)}? Import "
            f"{'them' if len(subs) > 1 else 'it'} in {name.replace('.', '/')}/__init__.py, or list "
            f"{'them' if len(subs) > 1 else 'it'} in {key}"
            if subs
            else " (no @..._registry decorator ran while importing it)"
        )
        problems.append(Problem(f"{key}[{i}]", f"imported `{name}`, which registered nothing{hint}", name))
    return problems


def import_object(dotted: str) -> Any:
    """``"package.module.Name"`` -> the object. Raises ``ImportError``/``AttributeError``."""
    module, _, attr = dotted.rpartition(".")
    if not module:
        raise ImportError(f"'{dotted}' is not a dotted path 'module.Name'")
    return getattr(importlib.import_module(module), attr)


def accepted_params(fn: Callable) -> tuple[set[str], bool, set[str]]:
    """Names ``fn`` accepts as keywords, whether it takes ``**kwargs``, and the
    names it requires (no default)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True, set()
    named = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return {p.name for p in named}, var_kw, {p.name for p in named if p.default is p.empty}


def injected(
    fn: Callable, values: Mapping[str, Any], defaults: Mapping[str, Any], kwargs_always: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Apply the injection rule to the config ``values`` igniter may pass ``fn``.

    Args:
        fn: the factory.
        values: name -> value from the config (``None``: not set).
        defaults: name -> the schema default. A value is *set* when it is not
            ``None`` and differs from this.
        kwargs_always: names a ``**kwargs`` factory gets even at their default
            (an optimizer's ``lr``: the schema's value is the one igniter reports).

    Returns:
        ``(kwargs to pass, names set in the config that fn cannot take)``: a
        name is passed when ``fn`` names it and the value is not ``None``, or
        ``fn`` takes ``**kwargs`` and the value is set (or in ``kwargs_always``).
        The second list is for :mod:`igniter.validate` to report.
    """
    names, var_kw, _ = accepted_params(fn)
    always = set(kwargs_always)
    kwargs: dict[str, Any] = {}
    refused: list[str] = []
    for name, value in values.items():
        is_set = value is not None and value != defaults.get(name)
        if value is not None and (name in names or (var_kw and (is_set or name in always))):
            kwargs[name] = value
        elif is_set:
            refused.append(name)
    return kwargs, refused


def dataset_args(cfg: DictConfig, factory: Callable, transform: Any = None) -> tuple[dict[str, Any], list[str]]:
    """:func:`injected` for a dataset: ``split``, ``root``, ``download`` and ``transform``.

    ``transform`` is the composed transform (``build_dataset``) or, when only
    checking (``validate``), any stand-in that is not ``None`` when
    ``cfg.transforms`` lists some.
    """
    # download only when true: a factory's own ``download`` default (or params.download) is left alone otherwise
    download = True if cfg.get("download", False) else None
    values = {"split": cfg.split, "root": cfg.root, "download": download, "transform": transform}
    assert set(values) == set(DATASET_ARGS)
    return injected(factory, values, _DATASET_DEFAULTS)


def optimizer_args(cfg: DictConfig, factory: Callable) -> tuple[dict[str, Any], list[str]]:
    """:func:`injected` for an optimizer: ``lr`` and ``weight_decay`` (``params`` is positional);
    a ``**kwargs`` factory always gets both."""
    return injected(factory, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}, _SOLVER_DEFAULTS, ("lr", "weight_decay"))


def call_with(fn: Callable, available: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> Any:
    """Call ``fn(**params, **{the entries of available that fn names})``.

    Lets a factory ask only for what it needs (``model``, ``device``, ``ctx``...).
    """
    names, _, _ = accepted_params(fn)
    kwargs = {k: v for k, v in available.items() if k in names}
    kwargs.update(params or {})
    return fn(**kwargs)


def _build_error(key: str, error: Exception, value: Any = None) -> ConfigError:
    return ConfigError([Problem(key, f"{type(error).__name__}: {error}", value)], header="cannot build the run")


def build_model(cfg: DictConfig, key: str = "model") -> torch.nn.Module:
    """``model_registry[cfg.name](**cfg.params)``."""
    factory = model_registry.get(cfg.name, f"{key}.name")
    try:
        return factory(**plain(cfg.params))
    except Exception as e:
        raise _build_error(f"{key}.params", e, plain(cfg.params)) from e


def build_transform(specs: Sequence[DictConfig], key: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Compose the listed transforms in order; ``None`` for an empty list."""
    fns = []
    for i, spec in enumerate(specs):
        factory = transforms_registry.get(spec.name, f"{key}[{i}].name")
        try:
            fns.append(factory(**plain(spec.params)))
        except Exception as e:
            raise _build_error(f"{key}[{i}].params", e, plain(spec.params)) from e
    if not fns:
        return None

    def compose(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return compose


def build_dataset(cfg: DictConfig, key: str) -> Dataset:
    """The dataset ``dataset_registry[cfg.name](**params, split=, root=, transform=)``
    (the last three by :func:`dataset_args`), reduced to a seeded random subset
    of ``cfg.subset`` samples when set.

    Raises:
        ConfigError: the factory fails (e.g. missing files), naming ``key``.
    """
    factory = dataset_registry.get(cfg.name, f"{key}.name")
    transform = build_transform(cfg.transforms, f"{key}.transforms")
    try:
        kwargs = {**plain(cfg.params), **dataset_args(cfg, factory, transform)[0]}
        dataset = factory(**kwargs)
    except ConfigError:  # the factory's own one-paragraph error (e.g. a refused download)
        raise
    except Exception as e:
        raise _build_error(key, e, cfg.name) from e
    if cfg.subset is not None and cfg.subset < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, order[: cfg.subset].tolist())
    return dataset


def _lookup(name: str, registry: Registry, module: Any, key: str) -> Callable:
    if name in registry:
        return registry.get(name)
    obj = getattr(module, name, None)
    if inspect.isclass(obj):
        return obj
    in_torch = sorted(n for n in dir(module) if inspect.isclass(getattr(module, n)) and not n.startswith("_"))
    raise RegistryError(
        f"{registry.name} registry has no '{name}' (asked for by '{key}') and {module.__name__} has no class of "
        f"that name.{suggest(name, registry.names() + in_torch)} Registered: {', '.join(registry.names()) or '(none)'}; "
        f"{module.__name__}: {', '.join(in_torch)}."
    )


def optimizer_factory(name: str, key: str = "solver.name") -> Callable:
    """A solver-registry optimizer, else ``torch.optim.<name>``. Raises ``RegistryError``."""
    return _lookup(name, solver_registry, torch.optim, key)


def scheduler_factory(name: str, key: str = "solver.scheduler.name") -> Callable:
    """A solver-registry scheduler, else ``torch.optim.lr_scheduler.<name>``. Raises ``RegistryError``."""
    return _lookup(name, solver_registry, torch.optim.lr_scheduler, key)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``factory(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.params)``,
    ``lr``/``weight_decay`` only as :func:`optimizer_args` allows (``LBFGS`` has no weight decay).

    Raises:
        ConfigError: the factory fails, naming ``solver``.
    """
    factory = optimizer_factory(cfg.name)
    try:
        return factory(model.parameters(), **optimizer_args(cfg, factory)[0], **plain(cfg.params))
    except Exception as e:
        raise _build_error("solver", e, cfg.name) from e


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> Any:
    """``factory(optimizer, **cfg.params)`` or ``None`` when no scheduler is named."""
    if cfg.name is None:
        return None
    factory = scheduler_factory(cfg.name)
    try:
        return factory(optimizer, **plain(cfg.params))
    except Exception as e:
        raise _build_error("solver.scheduler", e, cfg.name) from e


def build_metrics(names: Sequence[str], available: Mapping[str, Any], key: str = "evaluation.metrics") -> dict:
    """``{name: function_registry[name](...)}`` with ``loss_fn``/``device`` from ``available``."""
    return {name: call_with(function_registry.get(name, f"{key}[{i}]"), available) for i, name in enumerate(names)}
