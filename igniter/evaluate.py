"""``igniter eval`` and ``igniter export``: use a finished run's weights.

    igniter eval <run dir | checkpoint> [key=value ...]     # e.g. data.val.subset=1000 runner=spawn
    igniter export <checkpoint> --format safetensors [--output model.safetensors]

``eval`` reads the checkpoint safely (``torch.load(weights_only=True)``, a ``.dcp``
directory consolidated in one process after its ``.metadata`` is checked), rebuilds
the run's ``config.yaml`` with the overrides applied as in training (config-group
choices such as ``runner=spawn`` or ``experiment=mnist`` replace their node with the
group's file, then dotted keys are merged) and validates it; a run trained with
``runner.strategy=fsdp`` is evaluated unsharded (``ddp``) when one process is asked
for, sharded otherwise. It checks the weights fit the model, runs the evaluator on
the validation set with the configured runner, prints the metrics and writes
``<run dir>/eval_metrics.json``. A run directory means its newest ``last_checkpoint_*``.

``export`` writes the model weights alone with ``safetensors`` (one consolidated file,
also from a ``.dcp`` directory), atomically, with the permissions of any file the
user creates (``0o666`` minus the umask).

Bad input (an unreadable or incomplete checkpoint, a missing run config, a bad
override, weights that do not fit the model) is reported in one paragraph naming
the file, exit status 2, nothing written.
"""

from __future__ import annotations

import gc
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Mapping

import ignite.distributed as idist
import torch
from omegaconf import DictConfig, OmegaConf

from igniter.checkpoint.formats import read_weights
from igniter.checkpoint.location import checkpoint_path
from igniter.checkpoint.weights import model_state
from igniter.errors import EXIT_CONFIG, ConfigError, Problem
from igniter.parallel.strategy import evaluation_scope, is_sharded, unwrap_compiled, unwrap_model

__all__ = ["model_state", "read_weights", "evaluate", "eval_main", "export_main"]


def _checkpoint_error(path: Path | str, error: Exception, header: str) -> ConfigError:
    return ConfigError([Problem("checkpoint", f"{path} {error}")], header)


def _locate(target: Path, header: str = "cannot evaluate") -> tuple[Path, Path]:
    """``(run dir, checkpoint)`` for a run directory (its newest checkpoint, downloaded once when
    the run's checkpoints are in object storage) or a checkpoint inside one."""
    from igniter.checkpoint.location import find_in_run

    return find_in_run(target, header)


def _apply_choice(cfg: DictConfig, schema: DictConfig, group: str, choice: str) -> None:
    """Put config group ``group``'s option ``choice`` (``igniter.configs/<group>/<choice>.yaml``)
    into ``cfg`` as Hydra would: the group's node replaced by the schema's defaults with the
    file merged on top; a ``# @package _global_`` file (experiments) is merged at the root
    after the group choices of its ``defaults`` list (``override /model: lenet``)."""
    from igniter.config import CONFIG_MODULE
    from igniter.registry import suggest

    folder = importlib.resources.files(CONFIG_MODULE) / group
    options = sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    if choice not in options:
        expected = (
            f"no such option in config group '{group}' (available: {', '.join(options)}).{suggest(choice, options)}"
        )
        raise ConfigError([Problem(group, expected, choice)], "cannot evaluate")
    text = (folder / f"{choice}.yaml").read_text()
    node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    defaults = node.pop("defaults", None) or []
    for entry in defaults:
        for key, value in entry.items() if isinstance(entry, Mapping) else []:  # "_self_" entries: no choice
            _apply_choice(cfg, schema, str(key).split()[-1].strip("/"), str(value))
    if "@package _global_" in text:
        cfg.merge_with(node)
    else:
        cfg[group] = OmegaConf.merge(schema[group], node)


def _load_config(run_dir: Path, overrides: list[str], checkpoint: Path) -> DictConfig:
    """The run's saved config with ``overrides`` applied (group choices first, then dotted
    keys, as Hydra orders them), validated and resolved.

    Raises:
        ConfigError: no ``config.yaml`` in ``run_dir``, a bad override, an invalid config.
    """
    from igniter.checkpoint.location import default_format
    from igniter.compose import config_groups as _config_groups
    from igniter.compose import plain_config
    from igniter.config import IgniterConfig
    from igniter.launch.runners import make_runner
    from igniter.registry import runner_registry
    from igniter.validate import validate

    path = run_dir / "config.yaml"
    if not path.is_file():
        where = f"{checkpoint} is not inside an igniter run directory (<run dir>/checkpoints/<file>)"
        raise ConfigError([Problem("run", f"{path} not found: {where}", str(run_dir))], "cannot evaluate")
    groups = _config_groups() - {"hydra"}
    choices, dotted = [], []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+") in groups:
            choices.append((key.lstrip("+"), value))
        elif "/" in key:
            raise ConfigError(
                [Problem(key, f"not a config group igniter eval uses (groups: {', '.join(sorted(groups))})", value)],
                "cannot evaluate",
            )
        else:
            dotted.append(override)
    schema = OmegaConf.structured(IgniterConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.load(path))
    except Exception as e:
        raise ConfigError(
            [Problem("run", f"{path} is not a valid igniter config: {str(e).splitlines()[0]}", str(run_dir))],
            "cannot evaluate",
        ) from None
    try:
        for group, choice in choices:
            _apply_choice(cfg, schema, group, choice)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    except ConfigError:
        raise
    except Exception as e:
        key = getattr(e, "full_key", None) or "overrides"
        raise ConfigError([Problem(str(key), str(e).splitlines()[0])], "cannot evaluate") from None
    asked = "runner.strategy" in {o.partition("=")[0].lstrip("+") for o in dotted}
    if (
        cfg.runner.strategy == "fsdp"
        and not asked
        and cfg.runner.name in runner_registry
        and make_runner(cfg.runner).world_size == 1
    ):
        cfg.checkpoint.format, cfg.runner.strategy = (
            default_format(cfg),
            "ddp",
        )  # trained sharded, evaluated whole in one process
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, "invalid configuration")
    return plain_config(cfg)


def _check_fits(cfg: DictConfig, state: Mapping[str, torch.Tensor], checkpoint: Path) -> None:
    """Build the model on the CPU here and check the weights fit it, before any process starts."""
    from igniter.build import build_model
    from igniter.checkpoint.files import CheckpointInvalid, check_model_state
    from igniter.registry import RegistryError

    if cfg.data.val is None:
        raise ConfigError(
            [Problem("data.val", "no validation dataset to evaluate on: set data.val (e.g. data.val.name=...)")],
            "cannot evaluate",
        )
    try:
        check_model_state(state, build_model(cfg.model))
    except CheckpointInvalid as e:
        raise _checkpoint_error(checkpoint, e, "cannot evaluate") from None
    except RegistryError as e:
        raise ConfigError([Problem("model.name", str(e))], "cannot evaluate") from None


def evaluate(cfg: DictConfig, checkpoint: str, output: str) -> None:
    """Every process: build the evaluation side only (model, validation data, evaluator: no
    optimizer, trainer or training set), load the weights, run the evaluator; rank 0 prints
    and writes ``output``.

    Raises:
        ConfigError: no validation dataset, or the checkpoint cannot be read or does not
            fit the model (:func:`eval_main` checks both before starting processes).
    """
    from igniter.assemble import build_evaluation
    from igniter.checkpoint.files import CheckpointInvalid

    ctx = build_evaluation(cfg, Path(output).parent)
    if ctx.evaluator is None:
        raise ConfigError([Problem("data.val", "no validation dataset to evaluate on")], "cannot evaluate")
    try:
        if is_sharded(ctx.model):  # every rank reads the whole weights and keeps its shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                unwrap_compiled(ctx.model),
                dict(read_weights(checkpoint_path(checkpoint))),
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            unwrap_model(ctx.model).load_state_dict(read_weights(checkpoint_path(checkpoint)))
    except (CheckpointInvalid, RuntimeError) as e:
        raise _checkpoint_error(checkpoint, CheckpointInvalid(str(e).splitlines()[0]), "cannot evaluate") from None
    with evaluation_scope(ctx.model):
        ctx.evaluator.run(ctx.val_loader)
    metrics = {k: float(v) for k, v in ctx.evaluator.state.metrics.items()}
    if idist.get_rank() == 0:
        result = {
            "checkpoint": str(checkpoint),
            "samples": len(ctx.val_set),
            "world_size": idist.get_world_size(),
            "strategy": cfg.runner.strategy,
            "metrics": metrics,
        }
        Path(output).write_text(json.dumps(result, indent=2))
        print(" ".join(f"{k}={v:.6f}" for k, v in metrics.items()) + f"  ({len(ctx.val_set)} samples, {checkpoint})")
    # the wrapped model holds the process group; left to reference cycles (engine handlers) until after the
    # group is destroyed at exit, it made about one run in ten abort ("terminate called without an active exception")
    del ctx
    gc.collect()
    if idist.get_world_size() > 1:
        idist.barrier()  # no rank leaves before every rank is done, as at the end of training


def eval_main(argv: list[str]) -> int:
    """``igniter eval <run dir | checkpoint> [key=value ...]``.

    Returns:
        0; 2 (printed in one paragraph, nothing written) when the target is not a run
        directory or checkpoint, the checkpoint cannot be read or does not fit the
        model, the run's ``config.yaml`` is missing or an override is bad; 1 when a
        process of the evaluation fails.
    """
    from igniter.checkpoint.files import CheckpointInvalid
    from igniter.launch.runners import RankFailed, make_runner

    if not argv or argv[0].startswith("-"):
        print("usage: igniter eval <run dir | checkpoint> [key=value ...]", file=sys.stderr)
        return EXIT_CONFIG
    try:
        run_dir, checkpoint = _locate(Path(argv[0]))
        try:  # the checkpoint first: its problem is the one to report, not the config's
            state = read_weights(checkpoint)
        except CheckpointInvalid as e:
            raise _checkpoint_error(checkpoint, e, "cannot evaluate") from None
        cfg = _load_config(run_dir, argv[1:], checkpoint)
        _check_fits(cfg, state, checkpoint)
        del state
        make_runner(cfg.runner).launch(evaluate, cfg, str(checkpoint), str(run_dir / "eval_metrics.json"))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    except RankFailed as e:
        print(f"igniter: the evaluation failed: {e}", file=sys.stderr)
        return 1
    return 0


def export_main(argv: list[str]) -> int:
    """``igniter export <run dir | checkpoint> --format safetensors [--output PATH]`` (a run
    directory: its newest checkpoint, as ``eval`` takes it).

    Returns:
        0; 2 (printed in one paragraph, nothing written) when the checkpoint cannot be
        read, has no model weights, or its weights cannot be stored as safetensors, or
        the output cannot be written or would replace the checkpoint.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="igniter export", description="Write a checkpoint's model weights alone.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint, or a run directory (its newest checkpoint)")
    parser.add_argument("--format", choices=["safetensors"], default="safetensors")
    parser.add_argument("--output", type=Path, default=None, help="default: the checkpoint's name with .safetensors")
    args = parser.parse_args(argv)
    from safetensors.torch import save

    from igniter.atomic_files import atomic_write
    from igniter.checkpoint.files import CheckpointInvalid

    try:
        run_dir, args.checkpoint = _locate(args.checkpoint, "cannot export")
        name = str(args.checkpoint).rstrip("/").rsplit("/", 1)[-1]  # a dcp checkpoint in a store is its URL
        output: Path = args.output or (
            args.checkpoint.with_suffix(".safetensors")
            if isinstance(args.checkpoint, Path)
            else run_dir / Path(name).with_suffix(".safetensors")
        )
        try:
            state = read_weights(args.checkpoint)
        except CheckpointInvalid as e:
            raise _checkpoint_error(args.checkpoint, e, "cannot export") from None
        if output.resolve() == args.checkpoint.resolve():
            raise ConfigError(
                [Problem("--output", "is the checkpoint itself: choose another file", str(output))], "cannot export"
            )
        try:
            data = save({k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        except (ValueError, RuntimeError) as e:
            reason = " ".join(str(e).split()).split(". ")[0]
            raise _checkpoint_error(
                args.checkpoint, CheckpointInvalid(f"cannot be stored as safetensors: {reason}"), "cannot export"
            ) from None
        try:
            atomic_write(output, lambda f: f.write(data))
        except OSError as e:
            raise ConfigError(
                [Problem("--output", f"cannot write {output}: {e.strerror or e}", str(output))], "cannot export"
            ) from None
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {output} ({len(state)} tensors)")
    return 0
