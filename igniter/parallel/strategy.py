"""How the model is wrapped for the run's processes: activation checkpointing, compile, DDP or FSDP; and back.

The one place that knows the wrapping order and how to see through it:

* :func:`checkpoint_activations` (``trainer.activation_checkpointing``): the named modules'
  activations recomputed in the backward pass (PyTorch's non-reentrant checkpoint), applied
  first, before FSDP and compile (torchtitan's order).
* :func:`wrap_model`: ``torch.compile`` first (``trainer.compile``), then
  ``idist.auto_model`` (device placement and, with several processes,
  ``DistributedDataParallel``), the order of PyTorch's DDP + ``torch.compile`` notes:
  the compiled module is what DDP's hooks see.
* :func:`unwrap_model`: the original ``nn.Module`` under DDP's ``.module`` and
  ``torch.compile``'s ``_orig_mod``: what checkpoints save and load, so their keys never
  carry ``module.`` or ``_orig_mod.`` prefixes (nor ``_checkpoint_wrapped_module.``: PyTorch's
  ``CheckpointWrapper`` removes its own prefix in ``state_dict()`` and adds it back in
  ``load_state_dict()``, and ``get_model_state_dict`` does the same for DCP).
* :func:`gradient_sync`: DDP's ``no_sync()`` for the micro-batches of an accumulation
  that are not the last (one gradient all-reduce per optimizer step).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, ContextManager, Iterator, Sequence

import ignite.distributed as idist
import torch
from torch.nn.parallel import DistributedDataParallel

from igniter.errors import ConfigError, Problem
from igniter.precision import PRECISIONS
from igniter.supervision.progress import watch_compiles

__all__ = [
    "wrap_model",
    "matching_modules",
    "checkpointed_modules",
    "checkpoint_activations",
    "shard_units",
    "replica_groups",
    "shard_model",
    "unwrap_model",
    "unwrap_compiled",
    "is_sharded",
    "evaluation_scope",
    "gradient_sync",
    "strategy_problems",
]

logger = logging.getLogger("igniter")


def wrap_model(
    model: torch.nn.Module,
    compile_options: dict[str, Any] | None,
    runner: Any,
    precision: str = "32",
    activation_checkpointing: Sequence[str] = (),
) -> torch.nn.Module:
    """``model`` with its activations checkpointed (:func:`checkpoint_activations`, when
    ``activation_checkpointing`` names modules), compiled (when ``compile_options`` is not
    ``None``), on this process's device, and wrapped for ``runner.strategy``.

    * ``ddp``: compiled first, then ``idist.auto_model`` (``DistributedDataParallel`` with
      several processes, options ``runner.bucket_cap_mb``, ``runner.gradient_as_bucket_view``).
    * ``fsdp``: FSDP2's ``fully_shard`` on a 1-D ``DeviceMesh`` of every process
      (:func:`shard_model`), then compiled (the compiled graph sees the sharded module's hooks).

    Args:
        model: the built model (on the CPU).
        compile_options: keyword arguments of ``torch.compile`` (:func:`igniter.compile.compile_options`).
        runner: the ``runner`` config section.
        precision: ``trainer.precision``: with ``fsdp`` its ``MixedPrecisionPolicy``.
        activation_checkpointing: ``trainer.activation_checkpointing``.

    Raises:
        ConfigError: ``activation_checkpointing`` names no module of ``model``;
            ``runner.fsdp.cpu_offload`` on a process without a GPU.
    """
    if activation_checkpointing:
        checkpoint_activations(model, activation_checkpointing)
    if compile_options is not None:
        watch_compiles()  # compile time counts as progress for the hang watchdog
    if getattr(runner, "strategy", "ddp") == "fsdp":
        if runner.fsdp.cpu_offload and idist.device().type == "cpu":  # a cluster job validated without its nodes
            raise ConfigError(
                [
                    Problem(
                        "runner.fsdp.cpu_offload",
                        "needs a GPU: this process has none (its parameters are in host memory already)",
                        True,
                    )
                ],
                header="cannot build the run",
            )
        model = shard_model(model.to(idist.device()) if not runner.fsdp.cpu_offload else model, runner.fsdp, precision)
        return torch.compile(model, **compile_options) if compile_options is not None else model  # type: ignore[return-value]
    if compile_options is not None:
        model = torch.compile(model, **compile_options)  # type: ignore[assignment]
    ddp: dict[str, Any] = {"gradient_as_bucket_view": runner.gradient_as_bucket_view}
    if runner.bucket_cap_mb is not None:
        ddp["bucket_cap_mb"] = runner.bucket_cap_mb
    return idist.auto_model(model, sync_bn=False, **(ddp if idist.get_world_size() > 1 else {}))


def matching_modules(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    """The submodules of ``model`` (not ``model`` itself) whose class is named in ``names``:
    by class name (``GPT2Block``) or dotted path (``transformers.models.gpt2.modeling_gpt2.GPT2Block``),
    in ``model.modules()`` order."""
    wanted = set(names)
    return [
        m for m in model.modules()
        if m is not model and (type(m).__name__ in wanted or f"{type(m).__module__}.{type(m).__qualname__}" in wanted)
    ]  # fmt: skip


def checkpointed_modules(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    """The modules :func:`checkpoint_activations` wraps: the matches of ``names`` not inside
    another match (a nested match would be recomputed twice).

    Raises:
        ConfigError: a name matches no module (naming ``trainer.activation_checkpointing`` and
            some of the model's class names).
    """
    unmatched = [n for n in names if not matching_modules(model, [n])]
    if unmatched:
        classes = sorted({type(m).__name__ for m in model.modules() if m is not model})
        shown = ", ".join(classes[:12]) + (f" and {len(classes) - 12} more" if len(classes) > 12 else "")
        raise ConfigError(
            [
                Problem(
                    "trainer.activation_checkpointing",
                    f"{', '.join(unmatched)} {'matches' if len(unmatched) == 1 else 'match'} no module of the model "
                    f"{type(model).__name__}; expected class names or dotted paths of its submodules, e.g. the "
                    f"transformer blocks (its classes: {shown})",
                    list(names),
                )
            ],
            header="cannot build the run",
        )
    matches = matching_modules(model, names)
    inside = {id(sub) for m in matches for sub in m.modules() if sub is not m}
    return [m for m in matches if id(m) not in inside]


def checkpoint_activations(model: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """Recompute the activations of the modules named in ``names`` in the backward pass instead
    of keeping them (full activation checkpointing, as torchtitan's ``apply_ac``): each match
    (:func:`checkpointed_modules`) is replaced in its parent by PyTorch's ``CheckpointWrapper``
    (``checkpoint_impl=NO_REENTRANT``: ``torch.utils.checkpoint`` with ``use_reentrant=False``,
    RNG state preserved, so dropout draws the same masks in the recomputation).

    Shapes and results are unchanged (the module computes the same; its forward runs twice
    per step); ``state_dict()`` keys are the plain module's.

    Args:
        model: the built model (before FSDP and compile), changed in place.
        names: class names or dotted paths (``trainer.activation_checkpointing``).

    Returns:
        ``model``.

    Raises:
        ConfigError: a name matches no module.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    modules = checkpointed_modules(model, names)
    chosen = {id(m) for m in modules}
    logger.info(
        "activation checkpointing: %d modules (%s) recomputed in the backward pass",
        len(modules),
        ", ".join(sorted({type(m).__name__ for m in modules})),
    )
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in chosen,
    )
    return model


def shard_units(model: torch.nn.Module, names: list[str], min_params: int) -> list[torch.nn.Module]:
    """The submodules sharded as units (the root is sharded after them, holding the rest).

    Args:
        model: the root module.
        names: class names (``Linear``) or dotted paths (``my_project.Block``) of the
            submodules to shard; empty: every child of the root with at least ``min_params``
            parameters (torchtitan shards each transformer block the same way).
        min_params: see ``names``.
    """
    if not names:
        return [child for child in model.children() if sum(p.numel() for p in child.parameters()) >= min_params]
    return matching_modules(model, names)


def _configured_replicate(fsdp: Any) -> int | None:
    """``runner.fsdp.replicate`` as set (``None``: unset), from a config section or a dataclass."""
    return fsdp.get("replicate") if hasattr(fsdp, "get") else getattr(fsdp, "replicate", None)


def replica_groups(fsdp: Any, world_size: int, nnodes: int) -> int:
    """The replica groups of ``runner.fsdp.replicate`` (``None``: ``nnodes``, shard within a node)."""
    replicate = _configured_replicate(fsdp)
    if replicate is None:
        replicate = nnodes if nnodes > 1 and world_size % nnodes == 0 else 1
    return int(replicate)


def shard_model(model: torch.nn.Module, fsdp: Any, precision: str) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over every process of the run.

    With ``R = runner.fsdp.replicate`` above 1 (HSDP), the mesh is 2-D, ``R`` replica groups x
    ``W / R`` shards (dimension names ``replicate``, ``shard``): each parameter is sharded over the
    processes of a group and whole in every group; gradients are reduce-scattered within a group
    and all-reduced across groups.

    Args:
        model: the model on this process's device (on the CPU with ``fsdp.cpu_offload``).
        fsdp: the ``runner.fsdp`` section (:class:`igniter.config.FsdpConfig`).
        precision: ``bf16-mixed``/``16-mixed`` compute in bfloat16/float16 and reduce gradients in
            float32 (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``); ``32`` in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    world = idist.get_world_size()
    replicate = replica_groups(fsdp, world, idist.get_nnodes())
    if replicate > 1:
        mesh = init_device_mesh(
            idist.device().type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard")
        )
        if idist.get_rank() == 0:
            why = (
                "runner.fsdp.replicate; parameters sharded within a group"
                if _configured_replicate(fsdp) is not None
                else f"the default on {replicate} nodes: sharded within a node, replicated across nodes;"
                " runner.fsdp.replicate=1 shards over every process"
            )
            logger.info("HSDP: %d replica groups x %d shards (%s)", replicate, world // replicate, why)
    else:
        mesh = init_device_mesh(idist.device().type, (world,))
    dtype = PRECISIONS.get(str(precision))  # the autocast dtype of trainer.precision (None: float32)
    options: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": fsdp.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None),
        "offload_policy": CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy(),
    }
    for unit in shard_units(model, list(fsdp.shard_modules), fsdp.min_params):
        fully_shard(unit, **options)
        unit._igniter_reshard_after_forward = fsdp.reshard_after_forward  # for evaluation_scope to restore
    # The root keeps its parameters gathered after the forward pass (FSDP2's default for the
    # root: the backward pass needs them at once).
    model = fully_shard(model, **{**options, "reshard_after_forward": False})
    model._igniter_reshard_after_forward = False
    return model


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in unwrap_compiled(model).modules() if isinstance(m, FSDPModule)]


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without ``torch.compile``'s wrapper (``._orig_mod``)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module ``torch.compile`` wraps) is sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap_compiled(model), FSDPModule)


@contextlib.contextmanager
def evaluation_scope(model: torch.nn.Module) -> Iterator[None]:
    """Around an evaluation of a sharded model: every FSDP unit, the root included, frees
    its gathered parameters after its forward pass (``set_reshard_after_forward(True)``), so
    a rank holds its shards and the parameters of the unit that runs (not the whole model,
    as the root and ``runner.fsdp.reshard_after_forward=false`` units would keep them with
    no backward pass to free them); set back after, every unit resharded.

    Each forward pass gathers parameters (collectives), so every rank must run the same
    number of them: the evaluation loader of a sharded model pads the shorter shards
    (:func:`igniter.assemble.make_loader`'s ``equal_batches``). Nothing happens for an
    unsharded model."""
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(True, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, "_igniter_reshard_after_forward", True), recurse=False)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under any ``DistributedDataParallel``/``DataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif unwrap_compiled(model) is not model:  # torch._dynamo's OptimizedModule
            model = unwrap_compiled(model)
        else:
            return model


def gradient_sync(model: torch.nn.Module, sync: bool) -> ContextManager[Any]:
    """The context a micro-batch's forward and backward run in: ``model.no_sync()`` when
    ``model`` is DDP and ``sync`` is false (gradients accumulate locally, no all-reduce),
    else nothing. The backward of the micro-batch run with ``sync=True`` all-reduces the
    accumulated gradients (PyTorch's ``DistributedDataParallel.no_sync`` documentation)."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _no_gradient_sync(unwrap_compiled(model))
    return contextlib.nullcontext()


@contextlib.contextmanager
def _no_gradient_sync(model: Any) -> Iterator[None]:
    """FSDP2's ``set_requires_gradient_sync(False)``: gradients accumulate unsharded, no reduce-scatter."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def strategy_problems(cfg: Any, world_size: int, cuda_here: bool | None = None) -> list[Problem]:
    """Problems with ``runner.strategy`` and ``runner.fsdp`` (``checkpoint.format``: :mod:`igniter.checkpoint.location`).

    Args:
        cfg: the whole config.
        world_size: the processes the runner will start.
        cuda_here: whether the processes will have CUDA (``None``: unknown, a cluster job).
    """
    runner, problems = cfg.runner, []
    if runner.strategy not in ("ddp", "fsdp"):
        problems.append(
            Problem(
                "runner.strategy",
                "expected ddp (a full copy of the model per process) or fsdp (sharded, FSDP2)",
                runner.strategy,
            )
        )
    if runner.strategy == "fsdp":
        if world_size < 2:
            problems.append(
                Problem(
                    "runner.strategy",
                    f"fsdp shards over the processes of the run and this run has {world_size}; use runner=spawn/torchrun/slurm with 2 or more, or runner.strategy=ddp",
                    "fsdp",
                )
            )
        if runner.fsdp.cpu_offload and cuda_here is False:
            problems.append(
                Problem(
                    "runner.fsdp.cpu_offload",
                    "moves sharded parameters, gradients and optimizer state from the GPU to host memory; this run has no GPU (they are in host memory already): set it false",
                    True,
                )
            )
    replicate = runner.fsdp.get("replicate")
    if replicate is not None and replicate < 1:
        problems.append(Problem("runner.fsdp.replicate", "expected a number of replica groups, 1 or more", replicate))
    elif replicate is not None and runner.strategy == "fsdp" and world_size % replicate:
        problems.append(
            Problem(
                "runner.fsdp.replicate",
                f"the {world_size} processes do not split into {replicate} replica groups of equal size",
                replicate,
            )
        )
    if runner.fsdp.min_params < 0:  # checked whatever the strategy: a wrong value waits for the day fsdp is chosen
        problems.append(
            Problem("runner.fsdp.min_params", "expected a non-negative number of parameters", runner.fsdp.min_params)
        )
    return problems
