"""The ``igniter`` command: a Hydra app with validation up front, plus subcommands.

``igniter [overrides]``          compose, validate, train (Hydra run dir)
``igniter -m [sweep overrides]`` validate every sweep point, then Hydra multirun
``igniter -m hparams_search=...`` an Optuna study: each trial validated before it runs
``igniter check [overrides]``    compose, validate, build everything, print the plan
``igniter --cfg job``            Hydra's resolved-config print (and other Hydra flags)

Every config problem is reported at once, one line each, with exit status 2
and no traceback, before any process is spawned or job submitted. Composing and
validating live in :mod:`igniter.compose`, launcher checks in
:mod:`igniter.cluster.hydra_launchers`; the exit status of a run that ended by an
error is that error's ``exit_status`` (:mod:`igniter.errors`).
"""

from __future__ import annotations

import importlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from igniter.cluster.hydra_launchers import one_job_sweep, secondary_launcher_settings
from igniter.compose import (
    compose_config,
    config_dir_problems,
    config_problems,
    hydra_args,
    plain_config,
    sweep_points,
)
from igniter.config import CONFIG_MODULE, register_schema
from igniter.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    ConfigError,
    IgniterError,
    Problem,
    TrainingDiverged,
    report_problems,
)
from igniter.sweeps import (
    best_value,
    optuna_direction,
    plain_optuna_logging,
    proposes_lazily,
    record_failed_trial,
    study_problems,
    sweep_exit_status,
    trial_problems,
    worst_value,
)

# compose_config, sweep_points, config_problems, plain_config: re-exported from
# igniter.compose, where they live, for code that imports them from here
__all__ = ["main", "compose_config", "sweep_points", "config_problems", "plain_config", "launch"]


def _prevalidate(args: Any) -> tuple[int, list[DictConfig]]:
    """Validate every job's config; returns ``(exit status, composed configs)``.

    A problem found in some sweep points only names those points. A sweeper that
    proposes its points one trial at a time (Optuna) gets :func:`_study_problems`."""
    study = _study_problems(args) if args.multirun else None
    if study is not None:
        return study
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
    return (report_problems(problems) if problems else 0), configs


def _study_problems(args: Any) -> tuple[int, list[DictConfig]] | None:
    """Validate a study's config once, without the swept keys (its points are proposed one
    trial at a time: each is validated by its trial, :func:`_trial`), and what the study
    needs: ``evaluation.monitor``, an Optuna ``direction`` that follows ``evaluation.mode``.

    Returns ``None`` for Hydra's basic sweeper (every point is validated up front), or
    when the config without the sweep does not compose (each point says why)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(args.overrides))
    except Exception:
        return None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg, problems = config_problems(fixed, args.config_name or "config", args.config_dir, keep_hydra=True)
    if cfg is None and any(o.is_interval_sweep() for o in parsed):  # not a grid: its points cannot say more
        return report_problems(problems), [cfg]
    if cfg is None or not proposes_lazily(cfg.hydra):
        return ((report_problems(problems) if problems else 0), [cfg]) if len(fixed) == len(parsed) else None
    problems = study_problems(cfg, problems, parsed)
    return (report_problems(problems) if problems else 0), [cfg]


def _sweeper_overrides(cfg: DictConfig | None, overrides: Sequence[str]) -> list[str]:
    """The Optuna ``direction`` that follows ``evaluation.mode``, unless the command line
    gives one (:func:`~igniter.sweeps.study_problems` checked it)."""
    want = optuna_direction(cfg) if cfg is not None else None
    given = any(o.startswith("hydra.sweeper.direction=") for o in overrides)
    return [f"hydra.sweeper.direction={want}"] if want and not given else []


def launch(cfg: DictConfig, output_dir: Path, job: dict[str, Any] | None = None) -> None:
    """Save the resolved config in ``output_dir`` and start the runner's processes.

    ``job``: Hydra's job id, number and overrides, recorded in ``metrics.json``."""
    from igniter.atomic_files import atomic_write
    from igniter.launch.runners import make_runner
    from igniter.run import train

    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = plain_config(cfg)
    cfg.output_dir = str(output_dir)
    text = OmegaConf.to_yaml(cfg)
    atomic_write(output_dir / "config.yaml", lambda f: f.write(text), binary=False)
    make_runner(cfg.runner).launch(train, cfg, output_dir, job or {})


#: Run directories snapshotted before Hydra created them (``_run_composed``), by absolute path.
_SNAPSHOTS: dict[str, Any] = {}


def _end_of_run(e: IgniterError, output_dir: Path, run_dir: Any) -> int:
    """Say on stderr why the run ended by ``e`` and return the command's exit status
    for it: ``e.exit_status``.

    Args:
        e: what :func:`launch` raised.
        output_dir: the run directory (for where the traceback is).
        run_dir: its :class:`~igniter.rundir.RunDirectory`, discarded when the run never started.
    """
    from igniter.launch.runners import RankFailed
    from igniter.launch.slurm_job import Preempted, wait_for_requeue
    from igniter.loading import SampleFailed
    from igniter.preflight import StepFailed

    if isinstance(e, StepFailed):  # the run built: its directory and rank logs (with the traceback) stay
        message = f"{e}\nigniter: the full traceback is in {output_dir / 'rank0.log'}"
    elif isinstance(e, SampleFailed):  # the run trained: its checkpoints and rank logs stay (the message names the log)
        message = str(e)
    elif isinstance(e, ConfigError):  # the run could not start: leave no trace of it
        run_dir.discard()
        message = str(e)
    elif isinstance(e, RankFailed):
        message = f"igniter: the run failed: {e}"
    elif isinstance(e, TrainingDiverged):
        message = f"igniter: training diverged: {e}"
    else:
        if isinstance(e, Preempted):  # exiting now would let submitit record a finished job: SLURM ends this attempt
            wait_for_requeue(e)
        message = f"igniter: {e}"
    print(message, file=sys.stderr)
    return e.exit_status


def _task(cfg: DictConfig) -> float | None:
    """Hydra's task function: run one job in Hydra's run directory.

    Returns:
        The best value of ``evaluation.monitor`` (by ``evaluation.mode``) over the run's
        evaluations, ``None`` without one: what a sweeper such as Optuna optimizes.

    Raises:
        SystemExit: the run ended by an error (its exit status, the reason on stderr)
            or by Ctrl-C (130); a study's trial (:func:`_trial`) only by Ctrl-C.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from igniter.record import read_record
    from igniter.rundir import RunDirectory

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job = {
        "id": str(hydra_cfg.job.get("id") or ""),
        "num": hydra_cfg.job.get("num"),
        "overrides": list(hydra_cfg.overrides.task),
    }
    if hydra_cfg.mode == RunMode.MULTIRUN and proposes_lazily(hydra_cfg):
        return _trial(cfg, hydra_cfg, output_dir, job)
    run_dir = _SNAPSHOTS.pop(str(output_dir.resolve()), None) or RunDirectory.of_job(output_dir)
    try:
        launch(cfg, output_dir, job)
    except IgniterError as e:  # RankFailed, Preempted, TrainingDiverged, ConfigError, ...
        sys.exit(_end_of_run(e, output_dir, run_dir))
    except KeyboardInterrupt:  # rank 0 logged where the run stopped and how to resume it
        print("igniter: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    return best_value(read_record(output_dir), cfg.evaluation.monitor)


def _trial(cfg: DictConfig, hydra_cfg: DictConfig, output_dir: Path, job: dict[str, Any]) -> float:
    """One trial of a study: validate the proposed point (as ``igniter`` validates a run,
    before anything is written), run it, return the best ``evaluation.monitor``.

    A trial that cannot run or fails says why on stderr, keeps its directory's ``.hydra/``
    (the table lists it) and returns :func:`~igniter.sweeps.worst_value`: the sweeper
    goes on with the study. Ctrl-C and a SLURM preemption end the study as they end a run.
    """
    from igniter.launch.slurm_job import Preempted
    from igniter.record import read_record
    from igniter.rundir import RunDirectory

    where = f"trial {job['num']} ({' '.join(job['overrides'])})"
    problems = trial_problems(cfg, hydra_cfg)
    if problems:
        print(ConfigError(problems, f"{where}: invalid configuration"), file=sys.stderr)
        status, state = EXIT_CONFIG, "invalid config"
    else:
        run_dir = RunDirectory(output_dir)  # Hydra's .hydra/ files stay when the trial cannot start
        try:
            launch(cfg, output_dir, job)
        except Preempted as e:
            sys.exit(_end_of_run(e, output_dir, run_dir))
        except IgniterError as e:
            status = _end_of_run(e, output_dir, run_dir)
            state = (
                "invalid config"
                if isinstance(e, ConfigError)
                else "diverged"
                if isinstance(e, TrainingDiverged)
                else "failed"
            )
        except KeyboardInterrupt:
            print("igniter: interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        else:
            value = best_value(read_record(output_dir), cfg.evaluation.monitor)
            if value is not None:
                return value
            print(
                f"igniter: {where}: no evaluation of {cfg.evaluation.monitor} (evaluation.every={cfg.evaluation.every})",
                file=sys.stderr,
            )
            status, state = EXIT_FAILED, "no evaluation"
    worst = worst_value(cfg.evaluation.mode)
    print(f"igniter: trial {job['num']} failed ({state}); it returns {worst} and the study goes on", file=sys.stderr)
    record_failed_trial(output_dir, state, worst, status)
    return worst


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
        sys.exit(
            report_problems(
                [Problem("output_dir", f"cannot create the run directory: {e.strerror}", str(run_dir))],
                "cannot start the run",
            )
        )
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
        "<run dir | checkpoint> [--format safetensors] [--output PATH]",
        "Write a checkpoint's model weights alone (safetensors).\n"
        "A run directory means its newest checkpoint; default output: the checkpoint's path with the suffix .safetensors.",
    ),
    "status": Subcommand(
        "igniter.status:main",
        "<sweep dir | run dir>",
        "Each SLURM job's state, latest epoch and metrics; how to re-submit the failed.",
    ),
    "prepare-text": Subcommand(
        "igniter.prepare_text:main",
        "<text file | directory> <output dir> [--tokenizer char|bpe] [--vocab-size N] [--tokenizer-file PATH] "
        "[--val-fraction F] [--shard-tokens N] [--pattern GLOB]",
        "Tokenize text into token shards (meta.json + flat uint16/uint32 files) for the token_shards dataset.\n"
        "A character vocabulary, a byte-level BPE trained here, or a Hugging Face tokenizer.json; 90/10 train/val\n"
        "split by characters. The same input gives the same files, byte for byte.",
    ),
    "help": Subcommand("igniter.cli:overview", "", "This overview."),
}

_HELP_FLAGS = ("-h", "--help")


def overview(argv: Sequence[str] = ()) -> int:
    """``igniter help``: the subcommands, then how to train."""
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: igniter [overrides ...]            train (Hydra app; see below)",
        "       igniter <subcommand> [args ...]",
        "",
        "subcommands:",
    ]
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


def _not_an_override(word: str) -> bool:
    """A word that is neither ``key=value`` nor Hydra's ``~key`` (delete)."""
    return "=" not in word and not word.startswith("~")


def _unknown_subcommand(word: str) -> int:
    """Say that ``word`` is no subcommand (the closest one, every one) and return exit status 2."""
    import difflib

    close = difflib.get_close_matches(word, list(SUBCOMMANDS), n=1, cutoff=0.5)
    close = close or [name for name in SUBCOMMANDS if word.startswith(name) or name.startswith(word)][:1]
    hint = f" Did you mean `{close[0]}`?" if close else ""
    print(
        f"igniter: '{word}' is neither a subcommand nor an override (key=value).{hint} "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (`igniter help`); overrides look like "
        "`solver.lr=0.01` or `model=lenet`. Nothing was run.",
        file=sys.stderr,
    )
    return EXIT_CONFIG


_PASS_THROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "version")


def register_launcher() -> None:
    """Give Hydra igniter's SLURM launcher (``hydra/launcher=slurm``:
    ``hydra_plugins.igniter_submitit``). Hydra finds plugins by scanning the
    ``hydra_plugins`` namespace on disk, which an editable install (``pip install -e``)
    hides from the scan; registering it by hand works for either install. Nothing
    happens without the ``slurm`` extra (hydra-submitit-launcher)."""
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.igniter_submitit import SlurmLauncher
    except ImportError:
        return
    Plugins.instance().register(SlurmLauncher)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``igniter`` and ``python -m igniter``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # `igniter ... &` from a script: Ctrl-C/kill -INT must work
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv and argv[0] in SUBCOMMANDS:
        sys.exit(_run_subcommand(argv[0], argv[1:]))
    args = hydra_args(argv)
    if args.overrides and _not_an_override(args.overrides[0]):
        sys.exit(_unknown_subcommand(args.overrides[0]))
    if config_dir_problems(args.config_dir):  # --cfg and the other pass-through flags too
        sys.exit(report_problems(config_dir_problems(args.config_dir)))
    if args.help:  # the subcommands first, then Hydra's own help
        overview()
    if args.cfg and not args.resolve:  # the config a run would use: interpolations resolved
        argv.append("--resolve")
        args.resolve = True
    if not any(getattr(args, flag, None) for flag in _PASS_THROUGH):
        status, configs = _prevalidate(args)
        if status:
            sys.exit(status)
        one_job = (
            None if args.multirun else one_job_sweep(configs[0], argv)
        )  # hydra/launcher=slurm without -m: submit it
        if not args.multirun and one_job is None:
            _run_composed(configs[0], args.config_name or "config")
            return
        argv = one_job or argv
        argv += _sweeper_overrides(configs[0], args.overrides)
        if configs[0] is not None and proposes_lazily(configs[0].hydra):
            plain_optuna_logging()
    import hydra

    register_schema()
    register_launcher()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")(_task)()
    if sweep_exit_status():  # a study none of whose trials completed (igniter.sweeps)
        sys.exit(sweep_exit_status())
