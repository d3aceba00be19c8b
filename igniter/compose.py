"""Composing and validating configs, as ``igniter`` does before it runs anything.

:func:`compose_config` composes a job's config from the packaged configs
(``igniter.configs``) and overrides; :func:`config_problems` composes and
validates it, reporting every bad override at once (with a did-you-mean where one
exists); :func:`sweep_points` expands a multirun's sweep. Used by the ``igniter``
command (:mod:`igniter.cli`), ``igniter check``, ``igniter eval`` and the benchmarks:
here rather than in the CLI so that the subcommands, which the CLI imports, do not
import it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import itertools
import os
import typing
from pathlib import Path
from typing import Any, List, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from igniter.cluster.hydra_launchers import is_cluster_launcher, launcher_problems
from igniter.config import CONFIG_MODULE, IgniterConfig, register_schema
from igniter.errors import NO_VALUE, Problem
from igniter.registry import suggest

__all__ = [
    "config_groups",
    "config_dir_problems",
    "compose_config",
    "sweep_points",
    "config_problems",
    "plain_config",
    "unknown_keys",
    "hydra_args",
]


def config_groups() -> set[str]:
    """The config groups igniter ships (``model``, ``data``, ``runner``, ...): the
    folders of the packaged config module."""
    root = importlib.resources.files(CONFIG_MODULE)
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}


def _with_config_dir(overrides: Sequence[str], config_dir: str | None) -> list[str]:
    """``overrides`` plus Hydra's search path entry for a user config directory (``-cd``)."""
    overrides = list(overrides)
    if config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    return overrides


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | None = None, with_hydra: bool = False
) -> DictConfig:
    """Compose the config as ``igniter`` would, without creating a run directory
    (``with_hydra``: keep the ``hydra`` node, e.g. to read the launcher settings).

    Raises:
        hydra.errors.ConfigCompositionException / omegaconf errors: unknown key,
            wrong type, unknown config-group option (see :func:`config_problems`).
    """
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(
            config_name=config_name, overrides=_with_config_dir(overrides, config_dir), return_hydra_config=with_hydra
        )


def _parse(overrides: Sequence[str]) -> list[Any]:
    """Hydra's parsed overrides.

    Raises:
        hydra.errors.OverrideParseException: an override is not valid syntax.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """Expand ``a=1,2 b=x,y`` into the override lists of every multirun job (cartesian product).

    Raises:
        hydra.errors.OverrideParseException: an override is not valid syntax.
    """
    choices = []
    for o in _parse(overrides):
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # e.g. glob sweeps: validated by Hydra itself later
                values = []
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in values] or [o.input_line])
        else:
            choices.append([o.input_line])
    return [list(p) for p in itertools.product(*choices)]


def _omegaconf_cause(exc: BaseException) -> Any:
    """The first OmegaConf error with a ``full_key`` in ``exc``'s chain (Hydra wraps them), else ``None``."""
    from omegaconf.errors import OmegaConfBaseException

    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _full_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain nested dict (lists not walked)."""
    keys = []
    for k, v in node.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, dict):
            keys += _full_keys(v, f"{prefix}{k}.")
    return keys


def _shared_components(a: str, b: str) -> int:
    """How many leading dotted components ``a`` and ``b`` share."""
    return len(os.path.commonprefix([a.split("."), b.split(".")]))


def _sibling_suggestion(base: DictConfig | None, full_key: str) -> str:
    """A did-you-mean for an unknown ``full_key``: a close match among its siblings, else
    the same name elsewhere in the config (``solver.params.lr`` -> ``solver.lr``), then
    the keys its parent has."""
    if base is None:
        return ""
    parent, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return ""
    keys = [str(k) for k in node.keys()]
    hint = suggest(leaf, keys)
    if not hint:
        tree = OmegaConf.to_container(base, resolve=False)
        elsewhere = [k for k in _full_keys(tree) if k.rpartition(".")[2] == leaf and not k.startswith("hydra.")]
        if elsewhere:  # the nearest: most leading components shared with full_key
            hint = f" Did you mean '{max(elsewhere, key=lambda k: _shared_components(k, full_key))}'?"
    listing = f"Keys of '{parent or '<root>'}': {', '.join(keys)}." if keys else f"'{parent}' is empty."
    return f"{hint} {listing}"


def _torch_optim_hint(value: str) -> str:
    """``solver=adamw``: torch.optim's class of that name (any case) is one ``solver.name`` away."""
    import inspect

    import torch.optim

    found = [n for n in dir(torch.optim) if n.lower() == value.lower() and inspect.isclass(getattr(torch.optim, n))]
    if not found:
        return ""
    return (
        f" torch.optim has {found[0]}, and any torch.optim class works through solver.name: "
        f"write solver.name={found[0]} (the solver group's other settings, lr and weight_decay, stay)"
    )


def _composition_problem(override: Any, exc: BaseException, base: DictConfig | None) -> Problem:
    """The problem ``exc`` (raised composing with ``override``) stands for, in igniter's
    words: an unknown group option lists the options, an unknown key its siblings
    (``base``: the config without the bad overrides, for the did-you-mean)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = override.key_or_group if override is not None else "command line"
    value = override.value() if override is not None else None
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        options = list(exc.options)
        hint = (_torch_optim_hint(str(value)) if key == "solver" else "") or suggest(str(value), options)
        return Problem(key, f"no such option in config group '{key}' (available: {', '.join(options)}).{hint}", value)
    cause = _omegaconf_cause(exc)
    if cause is not None:
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        hint = ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            hint = _sibling_suggestion(base, cause.full_key)
            if "Did you mean" not in hint and override is not None and not override.input_line.startswith("+"):
                hint += f" To add a new key, write +{override.input_line}"
        return Problem(str(cause.full_key), f"{msg}.{hint}".replace("..", "."), value)
    return Problem(key, " ".join(str(exc).split()), value)


def config_dir_problems(config_dir: str | None) -> list[Problem]:
    """A ``--config-dir`` that is not a directory (Hydra would warn, then miss every group in it)."""
    if not config_dir or Path(config_dir).expanduser().is_dir():
        return []
    where = Path(config_dir).expanduser().absolute()
    what = "is a file, not a directory" if where.exists() else "does not exist"
    return [
        Problem(
            "--config-dir",
            f"{where} {what}: give the directory that holds your config groups (e.g. my_configs/model/*.yaml), "
            "relative to the working directory or absolute",
            config_dir,
        )
    ]


def config_problems(
    overrides: Sequence[str], config_name: str = "config", config_dir: str | None = None, keep_hydra: bool = False
) -> tuple[DictConfig | None, list[Problem]]:
    """Compose and validate one job's config (``keep_hydra``: return it with its ``hydra`` node).

    Args:
        overrides: Hydra overrides of one job (no sweeps: see :func:`sweep_points`).
        config_name: the primary config (``-cn``).
        config_dir: a user config directory added to the search path (``-cd``).

    Returns:
        ``(cfg, problems)``; ``cfg`` is ``None`` when composition itself failed. A
        failing composition is retried one override at a time so every bad
        override is reported, not just the first.
    """
    from hydra.errors import OverrideParseException

    from igniter.validate import validate

    problems = config_dir_problems(config_dir)
    if problems:
        return None, problems
    try:
        parsed = _parse(overrides)
    except OverrideParseException as e:
        return None, [Problem("command line", " ".join(str(e).split()))]
    try:
        cfg = compose_config(overrides, config_name, config_dir, with_hydra=True)
    except Exception as first:
        groups = config_groups()
        # hydra/... choices (hydra/sweeper=optuna, hydra/launcher=slurm) too: their keys (hydra.sweeper.*) need them
        choices = [
            o
            for o in parsed
            if o.key_or_group.split("@")[0].lstrip("~+") in groups or o.key_or_group.startswith("hydra/")
        ]
        problems, good = [], []
        for o in choices:  # each group choice alone: a bad one is not blamed on the other overrides
            try:
                compose_config([o.input_line], config_name, config_dir)
                good.append(o.input_line)
            except Exception as e:
                problems.append(_composition_problem(o, e, None))
        try:
            base = compose_config(good, config_name, config_dir)
        except Exception:
            base = None
        good_choices = list(good)
        for o in parsed:
            if o in choices:
                continue
            try:  # the other overrides on top of the good group choices
                compose_config(good_choices + [o.input_line], config_name, config_dir)
                good.append(o.input_line)
            except Exception as e:
                problems.append(_composition_problem(o, e, base))
        if not problems:
            return None, [_composition_problem(None, first, base)]
        try:  # report the value problems of the overrides that did compose, too
            problems += validate(compose_config(good, config_name, config_dir))
        except Exception:
            pass
        return None, problems
    try:
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    except Exception as e:
        return None, [Problem("hydra.launcher", " ".join(str(e).split()))]
    hydra_node = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    # a submitted job runs elsewhere: this machine's GPUs and paths are not checked
    here = not is_cluster_launcher(launcher)
    problems = schema_problems(cfg) or validate(cfg, here=here) + launcher_problems(launcher, cfg)
    if keep_hydra:
        with read_write(cfg), open_dict(cfg):
            cfg.hydra = hydra_node
    return cfg, problems


def schema_problems(cfg: DictConfig) -> list[Problem]:
    """Keys added with ``+`` that the schema does not declare (Hydra accepts them and
    nothing would read them): one problem each, with a did-you-mean."""
    problems = []
    for key, declared in unknown_keys(cfg):
        parent, _, leaf = key.rpartition(".")
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:
            value = NO_VALUE
        close = (
            difflib.get_close_matches(leaf, declared, n=1, cutoff=0.6)
            or [d for d in declared if d.startswith(leaf)][:1]
        )
        hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        problems.append(
            Problem(
                key,
                f"no such key in the config schema ('+' adds keys only inside free-form dicts such as model.params).{hint} "
                f"Keys of '{parent or '<root>'}': {', '.join(declared)}.",
                value if not OmegaConf.is_config(value) else OmegaConf.to_container(value),
            )
        )
    return problems


def plain_config(cfg: DictConfig) -> DictConfig:
    """The resolved config as a plain (struct) ``DictConfig``: no Hydra resolvers needed,
    safe to pickle into spawned processes."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(out, True)
    return out


def hydra_args(argv: Sequence[str]) -> Any:
    """Parse ``argv`` as Hydra's command line (overrides, ``-cn``, ``-cd``, ``-m``, flags).

    Raises:
        SystemExit: an unknown flag (argparse prints the usage).
    """
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


def _schema_type(hint: Any) -> Any:
    """``Optional[X]`` -> ``X``; other hints unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def unknown_keys(node: Any, schema: type = IgniterConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of a composed config that the schema does not declare.

    Hydra's ``+key=value`` adds keys even to a typed (structured) config, so a
    misspelt ``+trainer.max_epoch=3`` would be accepted and ignored; this walk
    finds such keys. Free-form dictionaries (``Dict[str, Any]`` fields such as
    ``model.params``, ``trainer.step_params``, ``*.params``) accept any key and
    are not walked.

    Args:
        node: the composed config (a ``DictConfig`` or plain ``dict``), without
            its ``hydra`` node.
        schema: the dataclass ``node`` should follow.
        prefix: the dotted key of ``node`` (for the returned names).

    Returns:
        ``[(dotted key, the keys its parent declares)]``, in config order.
    """
    hints = typing.get_type_hints(schema)
    declared = [f.name for f in dataclasses.fields(schema)]
    found: list[tuple[str, list[str]]] = []
    for key in node.keys():
        value = node[key]
        if key not in hints:
            found.append((f"{prefix}{key}", declared))
            continue
        hint = _schema_type(hints[key])
        if dataclasses.is_dataclass(hint) and hasattr(value, "keys"):
            found += unknown_keys(value, hint, f"{prefix}{key}.")
        elif typing.get_origin(hint) in (list, List) and value is not None:
            (item,) = typing.get_args(hint) or (Any,)
            if dataclasses.is_dataclass(item):
                for i, element in enumerate(value):
                    if hasattr(element, "keys"):
                        found += unknown_keys(element, item, f"{prefix}{key}[{i}].")
    return found
