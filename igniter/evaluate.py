"""``igniter eval`` and ``igniter export``: use a finished run's weights.

    igniter eval <run dir | checkpoint> [key=value ...]     # e.g. data.val.subset=1000 runner.name=spawn
    igniter export <checkpoint> --format safetensors [--output model.safetensors]

``eval`` rebuilds the model from the run's saved ``config.yaml`` (dotted
overrides merged on top and validated like any config), loads the weights
safely (``torch.load(weights_only=True)``), runs only the evaluator on the
validation set with the configured runner (so ``runner.name=spawn
runner.nproc_per_node=2`` evaluates in parallel), prints the metrics and writes
them to ``<run dir>/eval_metrics.json``. Given a run directory it uses the
newest ``last_checkpoint_*.pt`` (the run's final weights).

``export`` writes the model weights alone with ``safetensors`` for use outside
igniter (``safetensors.torch.load_file``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from omegaconf import DictConfig, OmegaConf

from igniter.errors import EXIT_CONFIG, ConfigError, Problem

__all__ = ["model_state", "evaluate", "eval_main", "export_main"]


def model_state(ckpt: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model's state dict inside a checkpoint: ``ckpt["model"]`` for ``last_*`` files,
    the file itself for ``best_model_*`` files (Ignite stores a single object unwrapped)."""
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        return ckpt["model"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"no model weights in this checkpoint (entries: {', '.join(map(str, ckpt))})")


def _locate(target: Path) -> tuple[Path, Path]:
    """``(run dir, checkpoint file)`` for a run directory or a checkpoint inside one."""
    from igniter.resume import checkpoint_files

    if target.is_dir():
        files = checkpoint_files(target / "checkpoints")
        if not files:
            raise ConfigError([Problem("run", f"no last_checkpoint_*.pt in {target / 'checkpoints'}", str(target))], "cannot evaluate")
        return target, files[0]
    if target.is_file():
        return target.parent.parent, target
    raise ConfigError([Problem("run", "no such run directory or checkpoint file", str(target))], "cannot evaluate")


def _load_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    from igniter.cli import plain_config
    from igniter.config import IgniterConfig
    from igniter.validate import validate

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError([Problem("run", f"{path} not found: is this an igniter run directory?", str(run_dir))], "cannot evaluate")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(IgniterConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    except Exception as e:
        key = getattr(e, "full_key", None) or "overrides"
        raise ConfigError([Problem(str(key), str(e).splitlines()[0])], "cannot evaluate") from None
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, "invalid configuration")
    return plain_config(cfg)


def evaluate(cfg: DictConfig, checkpoint: str, output: str) -> None:
    """Every process: build, load the weights, run the evaluator; rank 0 prints and writes ``output``."""
    from igniter.resume import CheckpointInvalid
    from igniter.run import build_run

    ctx = build_run(cfg, Path(output).parent)
    if ctx.evaluator is None:
        raise ConfigError([Problem("data.val", "no validation dataset to evaluate on")], "cannot evaluate")
    try:
        state = model_state(torch.load(checkpoint, map_location="cpu", weights_only=True))
        getattr(ctx.model, "module", ctx.model).load_state_dict(state)
    except (CheckpointInvalid, ValueError, RuntimeError) as e:
        raise ConfigError([Problem("checkpoint", f"{checkpoint}: {str(e).splitlines()[0]}")], "cannot evaluate") from None
    ctx.evaluator.run(ctx.val_loader)
    metrics = {k: float(v) for k, v in ctx.evaluator.state.metrics.items()}
    if idist.get_rank() == 0:
        result = {"checkpoint": str(checkpoint), "samples": len(ctx.val_set), "world_size": idist.get_world_size(), "metrics": metrics}
        Path(output).write_text(json.dumps(result, indent=2))
        print(" ".join(f"{k}={v:.6f}" for k, v in metrics.items()) + f"  ({len(ctx.val_set)} samples, {checkpoint})")


def eval_main(argv: list[str]) -> int:
    """``igniter eval <run dir | checkpoint> [key=value ...]``."""
    from igniter.distributed import make_runner

    if not argv or argv[0].startswith("-"):
        print("usage: igniter eval <run dir | checkpoint> [key=value ...]", file=sys.stderr)
        return EXIT_CONFIG
    try:
        run_dir, checkpoint = _locate(Path(argv[0]))
        cfg = _load_config(run_dir, argv[1:])
        make_runner(cfg.runner).launch(evaluate, cfg, str(checkpoint), str(run_dir / "eval_metrics.json"))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    return 0


def export_main(argv: list[str]) -> int:
    """``igniter export <checkpoint> --format safetensors [--output PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="igniter export", description="Write a checkpoint's model weights alone.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", choices=["safetensors"], default="safetensors")
    parser.add_argument("--output", type=Path, default=None, help="default: the checkpoint's name with .safetensors")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    try:
        state = model_state(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    except Exception as e:
        print(f"igniter export: cannot read {args.checkpoint}: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(output))
    print(f"wrote {output} ({len(state)} tensors)")
    return 0
