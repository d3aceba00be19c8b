"""Build components from config sections through the registries.

The registries only store and find; this module turns a config section into
an object. Each ``build_*`` takes the section and the dotted key it came from
(for error messages) and raises :class:`~igniter.errors.ConfigError` naming
that key when the input is bad (e.g. a dataset file that is missing).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from igniter.errors import ConfigError, Problem
from igniter.registry import (
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
    "plain",
    "import_modules",
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

def plain(node: Any) -> Any:
    """A config node as plain Python containers (``DictConfig`` -> ``dict``), resolved."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def import_modules(names: Iterable[str], key: str = "imports") -> None:
    """Import user modules so their ``@registry`` decorators run.

    Raises:
        ConfigError: one problem per module that fails to import, naming ``imports[i]``.
    """
    problems = []
    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure in user code is a config-time error
            problems.append(Problem(f"{key}[{i}]", f"cannot import: {type(e).__name__}: {e}", name))
    if problems:
        raise ConfigError(problems)


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


def dataset_kwargs(cfg: DictConfig, factory: Callable) -> dict[str, Any]:
    """Keyword arguments for a dataset factory besides ``transform``: ``params``,
    ``split`` (if the factory takes it) and ``root`` (if set)."""
    names, var_kw, _ = accepted_params(factory)
    kwargs = plain(cfg.params)
    if "split" in names or var_kw:
        kwargs["split"] = cfg.split
    if cfg.root is not None:
        kwargs["root"] = cfg.root
    return kwargs


def build_dataset(cfg: DictConfig, key: str) -> Dataset:
    """The dataset ``dataset_registry[cfg.name](split, root, transform, **params)``,
    reduced to a seeded random subset of ``cfg.subset`` samples when set.

    Raises:
        ConfigError: the factory fails (e.g. missing files), naming ``key``.
    """
    factory = dataset_registry.get(cfg.name, f"{key}.name")
    transform = build_transform(cfg.transforms, f"{key}.transforms")
    try:
        kwargs = dataset_kwargs(cfg, factory)
        if transform is not None:
            kwargs["transform"] = transform
        dataset = factory(**kwargs)
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
    """``factory(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.params)``."""
    factory = optimizer_factory(cfg.name)
    try:
        return factory(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **plain(cfg.params))
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
