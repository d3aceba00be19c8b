"""Assemble a run from its built components: model, data loaders, solver and engines.

:func:`build_training` builds everything a training run needs (``igniter`` and
``igniter check``); :func:`build_evaluation` only the evaluation side (``igniter
eval``): no optimizer, no scheduler, no training set, no trainer. Each component
comes from :mod:`igniter.build`; this module decides which, for which process,
and how they are connected. Nothing here attaches handlers or trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics.metric import MetricUsage
from ignite.utils import manual_seed
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, Dataset

from igniter.build import (
    StepArgs,
    build_dataset,
    build_metrics,
    build_model,
    build_optimizer,
    build_scheduler,
    call_with,
    import_modules,
    import_object,
    plain,
)
from igniter.checkpoint.files import CheckpointInvalid, check_model_state, load_checkpoint
from igniter.checkpoint.location import resolve_location
from igniter.checkpoint.remote import local_file
from igniter.compile import compile_options
from igniter.context import EvalContext, RunContext
from igniter.errors import ConfigError, Problem
from igniter.events import PeriodicEvents
from igniter.flops import FirstStepFlops
from igniter.loading import (
    LazyReproducibleBatchSampler,
    Loader,
    SeededSamples,
    make_collate,
    start_method,
    workers_per_process,
)
from igniter.parallel.sampler import ShardedSampler
from igniter.parallel.strategy import is_sharded, wrap_model
from igniter.precision import Autocast, make_autocast, make_scaler, precision_problems
from igniter.preflight import guard_first_step
from igniter.registry import engine_registry, function_registry
from igniter.steps import without_padding
from igniter.timing import StepTimer

__all__ = ["make_loader", "build_training", "build_evaluation"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    cfg: DictConfig,
    train: bool,
    seed: int,
    key: str = "data.train",
    name: str = "",
    equal_batches: bool = False,
) -> DataLoader:
    """A loader of ``batch_size / world_size`` samples per process over a :class:`ShardedSampler`.

    Training drops the last partial global batch (``drop_last``) or pads it
    like ``DistributedSampler``; evaluation shards without padding so every
    sample counts exactly once, or, with ``equal_batches`` (a sharded model), pads the
    shorter shards by one sample so every rank runs the same number of batches (the
    evaluation step drops the padding from its output: :func:`igniter.steps.without_padding`). Every sample's randomness (its loading and transforms)
    is seeded from ``(seed, epoch, index)`` (:class:`igniter.loading.SeededSamples`),
    whichever process loads it; a sample that raises stops the run with
    :class:`~igniter.loading.SampleFailed` naming ``key``, ``name`` and its index.

    The training loader's batch sampler is already an Ignite ``ReproducibleBatchSampler``
    (:class:`~igniter.loading.LazyReproducibleBatchSampler`, which keeps no list of the
    pass's batches), so ``DeterministicEngine`` uses the loader as built (it would rebuild
    it otherwise, dropping ``multiprocessing_context``).

    Args:
        dataset: the samples.
        batch_size: the global batch size (all processes together).
        cfg: the ``data.loader`` section.
        train: shuffle (if configured) and drop or pad the tail.
        seed: the sampler's shuffling seed (with the epoch) and the samples' seed.
        key: the dataset's config key, for error messages.
        name: the dataset's registered name, for error messages.
        equal_batches: evaluation only: the same number of batches on every rank.

    Raises:
        ConfigError: training with ``drop_last`` on fewer samples than one global batch.
        RegistryError: ``data.loader.collate_fn`` is not registered.
    """
    world_size, rank = idist.get_world_size(), idist.get_rank()
    tail = ("drop" if cfg.drop_last else "pad") if train else ("pad" if equal_batches else "none")
    shuffle = cfg.shuffle and train
    try:
        sampler = ShardedSampler(dataset, world_size, rank, batch_size, shuffle, seed, tail, with_epoch=True)
    except ValueError as e:  # fewer samples than one global batch
        raise ConfigError(
            [Problem("data.loader.batch_size", f"{key} ({name}): {e}", batch_size)], "cannot build the run"
        ) from None
    batches = BatchSampler(sampler, batch_size // world_size, drop_last=False)
    collate = function_registry.get(cfg.collate_fn, "data.loader.collate_fn") if cfg.collate_fn else None
    workers = workers_per_process(cfg.num_workers, idist.get_nproc_per_node())
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {
            "persistent_workers": True if cfg.persistent_workers is None else cfg.persistent_workers,
            "prefetch_factor": cfg.prefetch_factor,
            "multiprocessing_context": start_method(cfg.multiprocessing_context),
        }
    return Loader(
        SeededSamples(dataset, seed, key, name),
        batch_sampler=LazyReproducibleBatchSampler(batches) if train else batches,
        num_workers=workers,
        collate_fn=make_collate(collate),
        pin_memory=idist.device().type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
        generator=torch.Generator().manual_seed(seed),  # the loader's own draws leave the global stream alone
        **kwargs,
    )


def _model(cfg: DictConfig) -> torch.nn.Module:
    """User modules imported, seeds set, and the model on this process's device, wrapped for
    ``runner.strategy`` (:func:`igniter.parallel.strategy.wrap_model`)."""
    import_modules(cfg.imports)
    manual_seed(cfg.trainer.seed)  # same initial weights on every rank
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(cfg.model)
    if cfg.model.get("weights"):
        load_weights(model, str(cfg.model.weights), cfg.model.get("weights_sha256"))
    return wrap_model(
        model,
        compile_options(cfg.trainer.compile),
        cfg.runner,
        cfg.trainer.precision,
        list(cfg.trainer.get("activation_checkpointing") or []),
    )


def load_weights(model: torch.nn.Module, source: str, sha256: str | None = None) -> None:
    """Load ``model.weights`` into ``model`` (strict: every key and shape).

    Args:
        model: the freshly built model (before wrapping or sharding).
        source: a local file or a URL (downloaded once into the cache, its SHA-256 checked:
            :func:`igniter.checkpoint.object_store.fetch`), holding a model state dict or an igniter
            checkpoint (its ``model`` entry). Read with ``weights_only=True``.
        sha256: the expected hex digest of a download, or ``None``.

    Raises:
        ConfigError: the file cannot be read or downloaded, or does not fit the model.
    """
    local = local_file(source, "model.weights", sha256)
    try:
        state = load_checkpoint(local)
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and "trainer" in state:
            state = state["model"]  # an igniter checkpoint: its model
        check_model_state(state, model)
    except CheckpointInvalid as e:
        raise ConfigError(
            [Problem("model.weights", f"{source} {e}", source)], "cannot load the initial weights"
        ) from None
    model.load_state_dict(state)


def _precision(cfg: DictConfig, device: torch.device) -> tuple[Autocast, torch.amp.GradScaler]:
    """``(autocast, scaler)`` for ``trainer.precision`` on ``device``.

    Raises:
        ConfigError: ``16-mixed`` on a process without CUDA (validation catches it first
            when the run starts on this machine; a cluster job is checked here).
    """
    problems = precision_problems(cfg.trainer.precision, device.type == "cuda")
    if problems:
        raise ConfigError(problems, header="cannot build the run")
    return make_autocast(cfg.trainer.precision, device), make_scaler(cfg.trainer.precision, device)


def _val_data(cfg: DictConfig, model: torch.nn.Module) -> tuple[Dataset | None, DataLoader | None]:
    """``(val_set, val_loader)``, both ``None`` without ``data.val``; for a sharded ``model``
    every rank gets the same number of batches (the shorter shards padded)."""
    if cfg.data.val is None:
        return None, None
    val_set = build_dataset(cfg.data.val, "data.val")
    loader_cfg = cfg.data.loader
    batch_size = loader_cfg.val_batch_size or loader_cfg.batch_size
    loader = make_loader(
        val_set, batch_size, loader_cfg, False, cfg.trainer.seed, "data.val", cfg.data.val.name, is_sharded(model)
    )
    return val_set, loader


# Metrics skip the iterations whose output is None (a batch of padding only: steps.without_padding).
_REAL_BATCHES = MetricUsage(
    Events.EPOCH_STARTED,
    Events.EPOCH_COMPLETED,
    Events.ITERATION_COMPLETED(event_filter=lambda engine, _: engine.state.output is not None),
)


def _evaluator(cfg: DictConfig, available: dict[str, Any], loader: DataLoader) -> Engine:
    """The evaluation engine over ``loader`` with its metrics attached.

    ``available``: what the step, engine and metric factories may ask for by name.
    """
    # Evaluate the unwrapped module: DDP's forward may sync buffers, and unsharded shards can differ by a batch.
    model = available["model"]
    eval_step = call_with(
        function_registry.get(cfg.evaluation.step, "evaluation.step"),
        {**available, "model": getattr(model, "module", model)},
    )
    batches = loader.batch_sampler
    if batches.sampler.real_samples < len(batches.sampler):  # a sharded model's padded shard
        eval_step = without_padding(eval_step, batches.sampler.real_samples, batches.batch_size)
    evaluator = call_with(
        engine_registry.get(cfg.evaluation.engine, "evaluation.engine"),
        {"process_function": guard_first_step(eval_step, cfg, "evaluation")},
    )
    for name, metric in build_metrics(cfg.evaluation.metrics, available).items():
        metric.attach(evaluator, name, usage=_REAL_BATCHES)
    return evaluator


def build_evaluation(cfg: DictConfig, output_dir: Path) -> EvalContext:
    """Build the model, the validation data and the evaluator for this process.

    The evaluation factories get what training gives them but the optimizer, scaler and
    accumulation (none is built): ``model``, ``loss_fn``, ``device``, ``grad_clip_norm``,
    ``autocast``.

    Raises:
        ConfigError: a component cannot be built (the message names its config key).
        RegistryError: a name is not registered.
    """
    model = _model(cfg)
    loss_fn = function_registry.get(cfg.trainer.loss, "trainer.loss")
    autocast, _ = _precision(cfg, idist.device())
    available = {
        "model": model,
        "loss_fn": loss_fn,
        "device": idist.device(),
        "grad_clip_norm": cfg.trainer.grad_clip_norm,
        "autocast": autocast,
    }
    val_set, val_loader = _val_data(cfg, model)
    evaluator = _evaluator(cfg, available, val_loader) if val_loader is not None else None
    return EvalContext(
        cfg=cfg, output_dir=output_dir, rank=idist.get_rank(), world_size=idist.get_world_size(), device=idist.device(),
        model=model, loss_fn=loss_fn, val_set=val_set, val_loader=val_loader, evaluator=evaluator,
    )  # fmt: skip


def build_training(cfg: DictConfig, output_dir: Path) -> RunContext:
    """Build model, data, solver and engines for this process (no handlers, no training).

    Args:
        cfg: the resolved config.
        output_dir: the run directory (nothing is written here).

    Raises:
        ConfigError: a component cannot be built (the message names its config key).
        RegistryError: a name is not registered.
    """
    model = _model(cfg)
    device = idist.device()
    optimizer = idist.auto_optim(build_optimizer(cfg.solver, model))
    scheduler = build_scheduler(cfg.solver.scheduler, optimizer)
    loss_fn = function_registry.get(cfg.trainer.loss, "trainer.loss")
    loader_cfg = cfg.data.loader
    train_set = build_dataset(cfg.data.train, "data.train")
    train_loader = make_loader(
        train_set, loader_cfg.batch_size, loader_cfg, True, cfg.trainer.seed, "data.train", cfg.data.train.name
    )
    val_set, val_loader = _val_data(cfg, model)
    # What step/engine/metric factories may ask for by name: one definition (validate reserves the same names).
    autocast, scaler = _precision(cfg, device)
    available = StepArgs(
        model=model, optimizer=optimizer, loss_fn=loss_fn, device=device, grad_clip_norm=cfg.trainer.grad_clip_norm,
        autocast=autocast, scaler=scaler, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
    ).as_dict()  # fmt: skip
    step = call_with(function_registry.get(cfg.trainer.step, "trainer.step"), available, plain(cfg.trainer.step_params))
    step_timer = StepTimer()
    # The first step's FLOPs, counted on its real batch (not under torch.compile: dynamo would trace the counter).
    flops = FirstStepFlops(
        compile_options(cfg.trainer.compile) is None, lambda n: setattr(step_timer, "model_flops", n)
    )
    trainer = call_with(
        engine_registry.get(cfg.trainer.engine, "trainer.engine"),
        {**available, "process_function": step_timer.wrap(flops.wrap(guard_first_step(step, cfg, "training")))},
    )
    step_timer.attach(trainer)
    trainer.register_events(*PeriodicEvents, event_to_attr={e: "iteration" for e in PeriodicEvents})
    user_events = [import_object(path) for path in cfg.trainer.custom_events]
    for enum in user_events:
        trainer.register_events(*enum)
    evaluator = _evaluator(cfg, available, val_loader) if val_loader is not None else None
    return RunContext(
        cfg=cfg, output_dir=output_dir, rank=idist.get_rank(), world_size=idist.get_world_size(), device=device,
        model=model, loss_fn=loss_fn, val_set=val_set, val_loader=val_loader, evaluator=evaluator,
        optimizer=optimizer, scheduler=scheduler, train_set=train_set, train_loader=train_loader, trainer=trainer,
        custom_events=[PeriodicEvents, *user_events], step_timer=step_timer, scaler=scaler,
        checkpoints=resolve_location(cfg, output_dir),
    )  # fmt: skip
