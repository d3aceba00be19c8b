"""Check a composed config before anything is built, spawned or submitted.

Hydra already rejects unknown keys and wrong types while composing (the schema
is typed); :func:`validate` checks values: ranges, registry names and the
parameters their factories accept, event specifications, dataset roots, and
the batch size against the runner's world size. It builds nothing expensive
(no dataset is loaded), so a typo fails in about a second on a login node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from igniter.build import (
    DATASET_ARGS,
    HANDLER_ARGS,
    OPTIMIZER_ARGS,
    SCHEDULER_ARGS,
    STEP_ARGS,
    accepted_params,
    dataset_args,
    import_modules,
    import_object,
    optimizer_args,
    optimizer_factory,
    plain,
    registered_nothing,
    scheduler_factory,
)
from igniter.checkpoint.location import config_problems as checkpoint_config_problems
from igniter.checkpoint.remote import is_url, storage_problems, url_problems
from igniter.compile import compile_problems
from igniter.errors import NO_VALUE, ConfigError, Problem
from igniter.events import EventSpecError, PeriodicEvents, parse_event
from igniter.launch.runners import make_runner
from igniter.loading import loader_problems
from igniter.parallel.strategy import strategy_problems
from igniter.precision import accumulation_problems, precision_problems
from igniter.profiling import profiler_problems
from igniter.registry import (
    Registry,
    RegistryError,
    dataset_registry,
    engine_registry,
    event_handler_registry,
    function_registry,
    io_registry,
    model_registry,
    suggest,
    transforms_registry,
)
from igniter.supervision.stragglers import straggler_problems

__all__ = ["validate"]

# The arguments igniter passes to factories itself (not for params) are defined once, in
# igniter.build (STEP_ARGS, DATASET_ARGS, OPTIMIZER_ARGS, ...), and used by the builders too.


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.unregistered = False  # a registry name the config asks for is missing

    def add(self, key: str, expected: str, value: Any = NO_VALUE) -> None:
        self.problems.append(Problem(key, expected, value))

    def positive(self, key: str, value: Any, allow_none: bool = False, strict: bool = True) -> None:
        if value is None and allow_none:
            return
        bad = value is None or (value <= 0 if strict else value < 0)
        if bad:
            self.add(key, f"expected a {'positive' if strict else 'non-negative'} number", value)

    def choice(self, key: str, value: Any, choices: Iterable[str]) -> None:
        choices = list(choices)
        if value not in choices:
            self.add(key, f"expected one of {', '.join(choices)}.{suggest(str(value), choices)}", value)

    def name(self, registry: Registry, key: str, value: Any) -> Callable | None:
        if value in registry:
            return registry.get(value)
        self.unregistered = True
        self.add(
            key,
            f"no such {registry.name} (registered: {', '.join(registry.names()) or 'none'}).{suggest(str(value), registry.names())}",
            value,
        )
        return None

    def params(
        self,
        fn: Callable | None,
        params: dict,
        key: str,
        reserved: Iterable[str] = (),
        top: str = "",
        provided: Iterable[str] = (),
        label: str = "",
    ) -> None:
        """Check ``params`` (config key ``key``) against ``fn``'s signature: unknown
        names, names igniter sets itself (``reserved``), and required names that
        neither ``params`` nor igniter (``provided``) supply (reported under
        ``top.<name>`` when ``top`` is given, e.g. a dataset's ``root``; ``label``: the
        registered name to show, default ``fn``'s own)."""
        if fn is None:
            return
        reserved = set(reserved)
        names, var_kw, required = accepted_params(fn)
        names -= reserved
        for p in sorted(required - reserved - set(provided) - set(params)):
            if top and p == "root":  # a dataset that reads files: say which key gives the directory
                name = label or str(getattr(fn, "__name__", fn))
                self.add(
                    f"{top}.root",
                    f"dataset '{name}' requires 'root', the directory it reads: set data.root=/dir/containing/"
                    f"{name.upper()} (every split) or {top}.root=... (this split only)",
                )
                continue
            self.add(f"{key}.{p}", f"{getattr(fn, '__name__', fn)} requires '{p}'")
        for p in params:
            if p in reserved:
                self.add(f"{key}.{p}", "is set by igniter; do not pass it in params", params[p])
            elif not var_kw and p not in names:
                accepted = sorted(names)
                self.add(
                    f"{key}.{p}",
                    f"{getattr(fn, '__name__', fn)} has no parameter '{p}' "
                    f"(accepted: {', '.join(accepted) or 'none'}).{suggest(p, accepted)}",
                    params[p],
                )


def _check_dataset(c: _Checker, cfg: DictConfig, key: str) -> None:
    factory = c.name(dataset_registry, f"{key}.name", cfg.name)
    refused: list[str] = []
    if factory is not None:
        what = f"dataset '{cfg.name}' ({getattr(factory, '__name__', factory)})"
        params = plain(cfg.params)
        passed, refused = dataset_args(cfg, factory, True if cfg.transforms else None)
        for p in refused:  # set in the config, but the factory cannot take it
            if p == "transform":
                c.add(f"{key}.transforms", f"{what} takes no 'transform' argument", plain(cfg.transforms))
            elif p == "root":
                c.add(
                    f"{key}.root",
                    f"{what} takes no 'root' argument; pass the directory in {key}.params under the name it takes",
                    cfg.root,
                )
            elif p == "download":
                c.add(f"{key}.download", f"{what} takes no 'download' argument: it cannot fetch its files", True)
        for p in sorted(set(params) & set(DATASET_ARGS)):
            if p == "transform":
                c.add(
                    f"{key}.params.transform",
                    f"is set by igniter from {key}.transforms; do not pass it in params",
                    params[p],
                )
            elif p in passed:
                c.add(
                    f"{key}.params.{p}",
                    f"given twice: igniter already passes {key}.{p} = {passed[p]!r}; remove one",
                    params[p],
                )
        c.params(factory, params, f"{key}.params", {"transform"}, top=key, provided=passed, label=cfg.name)
    if cfg.root is not None and is_url(cfg.root):  # a dataset that reads URLs (token_shards) opens it when built
        c.problems += url_problems(f"{key}.root", cfg.root)
    # a root the dataset takes must exist (a download creates it); one it does not take is reported above
    elif cfg.root is not None and "root" not in refused and not os.path.isdir(cfg.root) and not cfg.get("download"):
        c.add(f"{key}.root", "directory does not exist", cfg.root)
    c.positive(f"{key}.subset", cfg.subset, allow_none=True)
    for i, t in enumerate(cfg.transforms):
        fn = c.name(transforms_registry, f"{key}.transforms[{i}].name", t.name)
        c.params(fn, plain(t.params), f"{key}.transforms[{i}].params")


def _check_solver(c: _Checker, cfg: DictConfig) -> None:
    try:
        factory = optimizer_factory(cfg.name)
    except RegistryError as e:
        c.add("solver.name", str(e), cfg.name)
    else:
        c.params(factory, plain(cfg.params), "solver.params", OPTIMIZER_ARGS)
        for p in optimizer_args(cfg, factory)[1]:
            c.add(
                f"solver.{p}",
                f"optimizer '{cfg.name}' takes no '{p}' argument; leave solver.{p} at its default",
                cfg[p],
            )
    c.positive("solver.lr", cfg.lr)
    c.positive("solver.weight_decay", cfg.weight_decay, strict=False)
    sched = cfg.scheduler
    if sched.name is not None:
        try:
            c.params(scheduler_factory(sched.name), plain(sched.params), "solver.scheduler.params", SCHEDULER_ARGS)
        except RegistryError as e:
            c.add("solver.scheduler.name", str(e), sched.name)
    c.choice("solver.scheduler.step_on", sched.step_on, ["epoch", "iteration"])


def _custom_events(c: _Checker, paths: Iterable[str]) -> list:
    from ignite.engine import EventEnum

    enums = []
    for i, path in enumerate(paths):
        try:
            obj = import_object(path)
        except Exception as e:
            c.add(f"trainer.custom_events[{i}]", f"cannot import: {e}", path)
            continue
        if isinstance(obj, type) and issubclass(obj, EventEnum):
            enums.append(obj)
        else:
            c.add(f"trainer.custom_events[{i}]", "expected an ignite.engine.EventEnum subclass", path)
    return enums


def _check_run(c: _Checker, cfg: DictConfig) -> None:
    t = cfg.trainer
    c.name(engine_registry, "trainer.engine", t.engine)
    step = c.name(function_registry, "trainer.step", t.step)
    c.params(step, plain(t.step_params), "trainer.step_params", STEP_ARGS)
    c.name(function_registry, "trainer.loss", t.loss)
    c.positive("trainer.max_epochs", t.max_epochs)
    c.positive("trainer.epoch_length", t.epoch_length, allow_none=True)
    c.positive("trainer.grad_clip_norm", t.grad_clip_norm, allow_none=True)
    custom = [PeriodicEvents, *_custom_events(c, t.custom_events)]

    e = cfg.evaluation
    c.name(engine_registry, "evaluation.engine", e.engine)
    c.name(function_registry, "evaluation.step", e.step)
    c.positive("evaluation.every", e.every)
    c.positive("evaluation.patience", e.patience, allow_none=True)
    for i, m in enumerate(e.metrics):
        c.name(function_registry, f"evaluation.metrics[{i}]", m)
    if e.monitor is not None:
        c.choice("evaluation.monitor", e.monitor, list(e.metrics))
    c.choice("evaluation.mode", e.mode, ["max", "min"])
    if e.patience is not None and e.monitor is None:
        c.add("evaluation.patience", "early stopping needs evaluation.monitor", e.patience)

    for i, h in enumerate(cfg.handlers):
        fn = c.name(event_handler_registry, f"handlers[{i}].name", h.name)
        c.params(fn, plain(h.params), f"handlers[{i}].params", HANDLER_ARGS)
        c.choice(f"handlers[{i}].engine", h.engine, ["trainer", "evaluator"])
        try:
            parse_event(h.event, custom)
        except EventSpecError as err:
            c.add(f"handlers[{i}].event", str(err), h.event)

    k = cfg.checkpoint
    c.name(io_registry, "checkpoint.saver", k.saver)
    c.positive("checkpoint.every_epochs", k.every_epochs)
    c.positive("checkpoint.min_interval_seconds", k.min_interval_seconds, strict=False)
    c.positive("checkpoint.every_iterations", k.every_iterations, allow_none=True)
    c.positive("checkpoint.n_saved", k.n_saved)
    c.positive("checkpoint.n_best", k.n_best, strict=False)

    lg = cfg.logging
    c.choice("logging.level", lg.level, ["DEBUG", "INFO", "WARNING", "ERROR"])
    c.positive("logging.log_every", lg.log_every)
    c.positive("logging.gpu_telemetry_every", lg.gpu_telemetry_every, allow_none=True)
    c.positive("checkpoint.every_seconds", k.every_seconds, allow_none=True)
    for i, name in enumerate(lg.loggers):
        c.name(io_registry, f"logging.loggers[{i}]", name)
        if name in ("mlflow", "wandb"):  # optional extras: a missing package is a config problem, found before building
            from igniter.trackers.mlflow_tracker import package_problem as mlflow_problem
            from igniter.trackers.wandb_tracker import package_problem as wandb_problem

            problem = (mlflow_problem if name == "mlflow" else wandb_problem)(f"logging.loggers[{i}]", import_it=False)
            if problem is not None:
                c.add(problem.key, problem.expected, problem.value)


def _check_figures(c: _Checker, lg: DictConfig, world_size: int) -> None:
    """``logging.peak_tflops`` and ``logging.torch_profiler``."""
    c.positive("logging.peak_tflops", lg.peak_tflops, allow_none=True)
    c.problems += profiler_problems(lg.torch_profiler, world_size)


def _strings(node: Any) -> Iterable[str]:
    """Every string leaf of a plain nested container."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _check_unused_data_keys(c: _Checker, cfg: DictConfig) -> None:
    """``data.root`` and ``data.download`` act only through the dataset configs that refer to
    them (``${data.root}``, as ``data=mnist`` does): set while no dataset uses them (the digits
    default reads no files), they would be ignored in silence."""
    data = cfg.data
    splits = [(k, data[k]) for k in ("train", "val") if data.get(k) is not None]
    who = " and ".join(f"data.{k} ('{d.name}')" for k, d in splits)
    if data.get("root") is not None:
        tree = OmegaConf.to_container(cfg, resolve=True)
        tree["data"].pop("root", None)
        tree.pop("hydra", None)
        if not any(str(data.root) in s for s in _strings(tree)):
            c.add(
                "data.root",
                f"no dataset reads it: {who} take no directory from data.root (a dataset config refers to it as "
                "${data.root}, as data=mnist does); remove it, or choose a dataset that reads files (experiment=mnist)",
                data.root,
            )
    if data.get("download") and not any(d.get("download") for _, d in splits):
        c.add(
            "data.download",
            f"no dataset downloads: {who} take no download from data.download (a dataset config refers to it as "
            "${data.download}, as data=mnist does)",
            True,
        )


def _check_data(c: _Checker, cfg: DictConfig, world_size: int) -> None:
    _check_unused_data_keys(c, cfg)
    _check_dataset(c, cfg.data.train, "data.train")
    if cfg.data.val is not None:
        _check_dataset(c, cfg.data.val, "data.val")
    ld = cfg.data.loader
    for key in ("batch_size", "val_batch_size"):
        value = ld[key]
        c.positive(f"data.loader.{key}", value, allow_none=key == "val_batch_size")
        if isinstance(value, int) and value > 0 and value % world_size:
            c.add(
                f"data.loader.{key}",
                f"the global batch size must be divisible by the world size {world_size} "
                f"(runner.nproc_per_node x runner.nnodes); try {max(world_size, value // world_size * world_size)}",
                value,
            )
    c.positive("data.loader.num_workers", ld.num_workers, strict=False)
    c.problems += loader_problems(ld)
    if ld.collate_fn is not None:
        c.name(function_registry, "data.loader.collate_fn", ld.collate_fn)


def _check_output_dir(c: _Checker, output_dir: str) -> None:
    """The run directory exists as a directory, or can be created: its nearest existing
    ancestor is a directory this user may write to."""
    path = Path(output_dir).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        c.add("output_dir", f"cannot be the run directory: {existing} is a file", output_dir)
    elif not os.access(existing, os.W_OK | os.X_OK):
        c.add("output_dir", f"cannot be written: no write permission on {existing}", output_dir)


def validate(cfg: DictConfig, here: bool = True) -> list[Problem]:
    """Every problem in ``cfg``, each naming its dotted key, value and what is expected.

    Imports ``cfg.imports`` first so user-registered names are known. ``here``:
    the run starts on this machine (``False`` when submitting to a cluster, see
    :meth:`igniter.launch.runners.Runner.validate`).
    """
    c = _Checker()
    for key in sorted(OmegaConf.missing_keys(cfg)):
        c.add(key, f"required value is missing (???); set it on the command line, e.g. {key}=...")
    if c.problems:
        return c.problems
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        return [
            Problem(str(getattr(e, "full_key", "") or "?"), f"cannot resolve interpolation: {getattr(e, 'msg', e)}")
        ]
    try:
        import_modules(cfg.imports)
    except ConfigError as e:
        return e.problems
    model = c.name(model_registry, "model.name", cfg.model.name)
    c.params(model, plain(cfg.model.params), "model.params")
    runner = None
    try:
        runner = make_runner(cfg.runner)
        c.problems.extend(runner.validate(here))
    except RegistryError as e:
        c.add("runner.name", str(e), cfg.runner.name)
    world_size = max(1, runner.world_size) if runner else 1
    _check_data(c, cfg, world_size)
    # 16-mixed and inductor's C++ compiler depend on the machine: checked here only when the run starts here.
    cuda_here = torch.cuda.is_available() if here else None
    c.problems += precision_problems(cfg.trainer.precision, cuda_here)
    c.problems += accumulation_problems(cfg.trainer.accumulate_grad_batches, cfg.data.loader.batch_size, world_size)
    c.problems += compile_problems(cfg.trainer.compile, cuda_here)
    c.problems += strategy_problems(cfg, world_size, cuda_here)
    c.problems += straggler_problems(cfg.runner)
    c.problems += checkpoint_config_problems(cfg)
    c.problems += storage_problems(cfg)
    if here:  # a cluster job's directory may live on a file system this machine does not see
        _check_output_dir(c, cfg.output_dir)
    _check_solver(c, cfg.solver)
    _check_run(c, cfg)
    _check_figures(c, cfg.logging, world_size)
    if c.unregistered:  # say when an imported module registered nothing (its __init__ imports no registrations)
        c.problems += registered_nothing(cfg.imports)
    return c.problems
