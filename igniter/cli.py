"""The ``igniter`` command: a Hydra app with validation up front, plus subcommands.

``igniter [overrides]``          compose, validate, train (Hydra run dir)
``igniter -m [sweep overrides]`` validate every sweep point, then Hydra multirun
``igniter check [overrides]``    compose, validate, build everything, print the plan
``igniter --cfg job``            Hydra's resolved-config print (and other Hydra flags)

Every config problem is reported at once, one line each, with exit status 2
and no traceback, before any process is spawned or job submitted.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import itertools
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from igniter.config import CONFIG_MODULE, register_schema, unknown_keys
from igniter.distributed.launchers import is_cluster_launcher, launcher_problems, secondary_launcher_settings
from igniter.errors import EXIT_CONFIG, EXIT_INTERRUPTED, NO_VALUE, ConfigError, Problem, TrainingDiverged
from igniter.registry import suggest

__all__ = ["main", "compose_config", "sweep_points", "config_problems", "launch"]

def _config_groups() -> set[str]:
    root = importlib.resources.files(CONFIG_MODULE)
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}


def _with_config_dir(overrides: Sequence[str], config_dir: str | None) -> list[str]:
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
        return compose(config_name=config_name, overrides=_with_config_dir(overrides, config_dir), return_hydra_config=with_hydra)


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """Expand ``a=1,2 b=x,y`` into the override lists of every multirun job (cartesian product)."""
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


def _composition_problem(override: Any, exc: BaseException, base: DictConfig | None) -> Problem:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = override.key_or_group if override is not None else "command line"
    value = override.value() if override is not None else None
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        options = list(exc.options)
        return Problem(key, f"no such option in config group '{key}' (available: {', '.join(options)}).{suggest(str(value), options)}", value)
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


def config_problems(
    overrides: Sequence[str], config_name: str = "config", config_dir: str | None = None, keep_hydra: bool = False
) -> tuple[DictConfig | None, list[Problem]]:
    """Compose and validate one job's config (``keep_hydra``: return it with its ``hydra`` node).

    Returns:
        ``(cfg, problems)``; ``cfg`` is ``None`` when composition itself failed. A
        failing composition is retried one override at a time so every bad
        override is reported, not just the first.
    """
    from hydra.errors import OverrideParseException

    from igniter.validate import validate

    try:
        parsed = _parse(overrides)
    except OverrideParseException as e:
        return None, [Problem("command line", " ".join(str(e).split()))]
    try:
        cfg = compose_config(overrides, config_name, config_dir, with_hydra=True)
    except Exception as first:
        groups = _config_groups()
        choices = [o for o in parsed if o.key_or_group.split("@")[0].lstrip("~+") in groups]
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
    problems = _schema_problems(cfg) or validate(cfg, here=here) + launcher_problems(launcher, cfg)
    if keep_hydra:
        with read_write(cfg), open_dict(cfg):
            cfg.hydra = hydra_node
    return cfg, problems


def _schema_problems(cfg: DictConfig) -> list[Problem]:
    """Keys added with ``+`` that the schema does not declare (Hydra accepts them and
    nothing would read them): one problem each, with a did-you-mean."""
    problems = []
    for key, declared in unknown_keys(cfg):
        parent, _, leaf = key.rpartition(".")
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:
            value = NO_VALUE
        close = difflib.get_close_matches(leaf, declared, n=1, cutoff=0.6) or [d for d in declared if d.startswith(leaf)][:1]
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


def _report(problems: list[Problem], header: str = "invalid configuration") -> int:
    print(str(ConfigError(problems, header)), file=sys.stderr)
    print("igniter: nothing was run. Fix the keys above (see `igniter --cfg job`).", file=sys.stderr)
    return EXIT_CONFIG


def _hydra_args(argv: Sequence[str]) -> Any:
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


def _prevalidate(args: Any) -> tuple[int, list[DictConfig]]:
    """Validate every job's config; returns ``(exit status, composed configs)``.

    A problem found in some sweep points only names those points."""
    points = sweep_points(args.overrides) if args.multirun else [args.overrides]
    found: dict[str, tuple[Problem, list[str]]] = {}  # keyed by text: values may be unhashable lists
    configs = []
    for point in points:
        cfg, problems = config_problems(point, args.config_name or "config", args.config_dir, keep_hydra=True)
        for p in problems:
            found.setdefault(str(p), (p, []))[1].append(" ".join(point))
        configs.append(cfg)
    problems = [
        p if len(where) == len(points) else Problem(p.key, f"{p.expected} [sweep point: {'; '.join(where)}]", p.value)
        for p, where in found.values()
    ]
    return (_report(problems) if problems else 0), configs


def plain_config(cfg: DictConfig) -> DictConfig:
    """The resolved config as a plain (struct) ``DictConfig``: no Hydra resolvers needed,
    safe to pickle into spawned processes."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(out, True)
    return out


def launch(cfg: DictConfig, output_dir: Path, job: dict[str, Any] | None = None) -> None:
    """Save the resolved config in ``output_dir`` and start the runner's processes.

    ``job``: Hydra's job id, number and overrides, recorded in ``metrics.json``."""
    from igniter.distributed import make_runner
    from igniter.io import atomic_write
    from igniter.run import train

    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = plain_config(cfg)
    cfg.output_dir = str(output_dir)
    text = OmegaConf.to_yaml(cfg)
    atomic_write(output_dir / "config.yaml", lambda f: f.write(text), binary=False)
    make_runner(cfg.runner).launch(train, cfg, output_dir, job or {})


#: Run directories snapshotted before Hydra created them (``_run_composed``), by absolute path.
_SNAPSHOTS: dict[str, Any] = {}


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from igniter.distributed.runners import RankFailed
    from igniter.distributed.slurm import Preempted, wait_for_requeue
    from igniter.preflight import StepFailed
    from igniter.rundir import RunDirectory

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job = {"id": str(hydra_cfg.job.get("id") or ""), "num": hydra_cfg.job.get("num"), "overrides": list(hydra_cfg.overrides.task)}
    run_dir = _SNAPSHOTS.pop(str(output_dir.resolve()), None) or RunDirectory.of_job(output_dir)
    try:
        launch(cfg, output_dir, job)
    except StepFailed as e:  # the run built: its directory and rank logs (with the traceback) stay
        print(f"{e}\nigniter: the full traceback is in {output_dir / 'rank0.log'}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except ConfigError as e:  # the run could not start: leave no trace of it
        run_dir.discard()
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except RankFailed as e:
        print(f"igniter: the run failed: {e}", file=sys.stderr)
        sys.exit(1)
    except TrainingDiverged as e:
        print(f"igniter: training diverged: {e}", file=sys.stderr)
        sys.exit(3)
    except Preempted as e:
        wait_for_requeue(e)
        print(f"igniter: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # rank 0 logged where the run stopped and how to resume it
        print("igniter: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _run_composed(cfg: DictConfig, config_name: str) -> None:
    """Run one job on the config composed for validation, as ``hydra.main`` would
    (Hydra's ``run_job``: run directory, ``.hydra/`` files, logging, callbacks), without
    composing it twice more (once to choose run or multirun mode, once to run: ~0.5 s
    of start-up). Re-raises what the job raised."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    with read_write(cfg), open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
        for key, value in secondary_launcher_settings(cfg).items():
            OmegaConf.update(cfg, key, value)
    run_dir = Path(cfg.hydra.run.dir)
    from igniter.rundir import RunDirectory

    _SNAPSHOTS[str(run_dir.resolve())] = RunDirectory(run_dir)
    try:  # Hydra would fail on it with a traceback
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(_report([Problem("output_dir", f"cannot create the run directory: {e.strerror}", str(run_dir))], "cannot start the run"))
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=config_name)
    ret = run_job(
        task_function=_task,
        config=cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
        hydra_context=HydraContext(config_loader=None, callbacks=callbacks),
    )
    callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
    ret.return_value  # noqa: B018  (raises the job's exception, as hydra.main does)


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: ``target`` is ``"module:function"`` (``function(argv) -> exit status``,
    imported only when used), ``usage`` its arguments, ``about`` what it does."""

    target: str
    usage: str
    about: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "check": Subcommand(
        "igniter.check:main",
        "[overrides ...]",
        "Validate the config and try one batch through the model; print the plan.\n"
        "Builds every component on CPU, runs one training step (forward and backward) and one\n"
        "evaluation batch on real data of the per-process batch size. Exit 2 on a problem.",
    ),
    "doctor": Subcommand(
        "igniter.doctor:main",
        "[--json]",
        "What the launcher sees: versions, CUDA/NCCL/gloo, GPUs, torchrun/SLURM, SLURM tools.",
    ),
    "summary": Subcommand(
        "igniter.summary:main", "<run dir>", "Print a run's end-of-run table again and redraw its curves.png."
    ),
    "eval": Subcommand(
        "igniter.evaluate:eval_main",
        "<run dir | checkpoint> [key=value | group=choice ...]",
        "Evaluate a run's saved weights (the evaluator alone).\n"
        "Uses the newest checkpoint of a run directory; writes <run dir>/eval_metrics.json.\n"
        "E.g. igniter eval outputs/.../run runner=spawn runner.nproc_per_node=2",
    ),
    "export": Subcommand(
        "igniter.evaluate:export_main",
        "<checkpoint> [--format safetensors] [--output PATH]",
        "Write a checkpoint's model weights alone (safetensors).\n"
        "Default output: the checkpoint's path with the suffix .safetensors.",
    ),
    "help": Subcommand("igniter.cli:overview", "", "This overview."),
}

_HELP_FLAGS = ("-h", "--help")


def overview(argv: Sequence[str] = ()) -> int:
    """``igniter help``: the subcommands, then how to train."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: igniter [overrides ...]            train (Hydra app; see below)", "       igniter <subcommand> [args ...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {sub.about.splitlines()[0]}" for name, sub in SUBCOMMANDS.items()]
    lines += ["", "`igniter <subcommand> --help` shows a subcommand's usage.", ""]
    print("\n".join(lines))
    return 0


def _run_subcommand(name: str, argv: list[str]) -> int:
    sub = SUBCOMMANDS[name]
    if any(a in _HELP_FLAGS for a in argv):
        print(f"usage: igniter {name} {sub.usage}".rstrip() + f"\n\n{sub.about}")
        return 0
    module, _, function = sub.target.partition(":")
    return getattr(importlib.import_module(module), function)(argv)


_PASS_THROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "version")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``igniter`` and ``python -m igniter``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # `igniter ... &` from a script: Ctrl-C/kill -INT must work
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv and argv[0] in SUBCOMMANDS:
        sys.exit(_run_subcommand(argv[0], argv[1:]))
    args = _hydra_args(argv)
    if args.help:  # the subcommands first, then Hydra's own help
        overview()
    if args.cfg and not args.resolve:  # the config a run would use: interpolations resolved
        argv.append("--resolve")
        args.resolve = True
    if not any(getattr(args, flag, None) for flag in _PASS_THROUGH):
        status, configs = _prevalidate(args)
        if status:
            sys.exit(status)
        if not args.multirun:
            _run_composed(configs[0], args.config_name or "config")
            return
    import hydra

    register_schema()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")(_task)()
