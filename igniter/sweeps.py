"""Hydra callbacks: after a sweep, a table of every job's result; after a study of a
sweeper that proposes its points one trial at a time (Optuna), the best value and
parameters too.

A study's trial returns the best value of ``evaluation.monitor`` over its evaluations
(:func:`best_value`); a trial that fails (an invalid proposed point, a diverged or
failed run) returns the worst value there is (:func:`worst_value`: ``-inf`` for
``evaluation.mode=max``), so that the sweeper goes on with the study, and is noted
here (:func:`record_failed_trial`) for the table and the command's exit status.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from igniter.console import format_table
from igniter.errors import Problem
from igniter.record import read_record

__all__ = [
    "plain_optuna_logging",
    "ResultsTable",
    "results_rows",
    "BASIC_SWEEPER",
    "OPTUNA_SWEEPER",
    "proposes_lazily",
    "optuna_direction",
    "study_problems",
    "swept_keys",
    "trial_problems",
    "best_value",
    "worst_value",
    "record_failed_trial",
    "sweep_exit_status",
]

#: ``hydra.sweeper._target_`` of Hydra's own sweeper (a grid: every point known up front).
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: ``hydra.sweeper._target_`` of hydra-optuna-sweeper (``hydra/sweeper=optuna``).
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
#: The file hydra-optuna-sweeper writes in the sweep directory at the end of a study.
OPTUNA_RESULTS = "optimization_results.yaml"

#: Trials of this process that failed: ``{job dir: (state, value told, exit status)}``.
_FAILED: dict[str, tuple[str, float, int]] = {}
#: The exit status of the last study that ended in this process (0: a trial completed).
_STUDY_EXIT = {"status": 0}


def plain_optuna_logging() -> None:
    """Optuna's log lines without ANSI colour codes when stderr is not a terminal (a file, a
    pipe, CI): Optuna's own handler colours them whatever the stream (colorlog with no stream
    given). Its lines keep their format; on a terminal nothing changes."""
    import logging
    import sys

    if sys.stderr.isatty():
        return
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.disable_default_handler()
    handler = logging.StreamHandler()  # sys.stderr, as Optuna's
    handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s] %(message)s"))
    logger = logging.getLogger("optuna")
    if not any(getattr(h, "_igniter_plain", False) for h in logger.handlers):
        handler._igniter_plain = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def proposes_lazily(hydra_node: Any) -> bool:
    """Whether a sweep's sweeper (``hydra_node``: the ``hydra`` config node) proposes its
    points one trial at a time (Optuna, Nevergrad, Ax: anything but Hydra's basic
    sweeper), so that they cannot be validated before the sweep starts."""
    target = OmegaConf.select(hydra_node, "sweeper._target_", default=None) if hydra_node is not None else None
    return target is not None and target != BASIC_SWEEPER


def optuna_direction(cfg: DictConfig) -> str | None:
    """Optuna's ``direction`` for ``cfg`` (with its ``hydra`` node): ``maximize`` when
    ``evaluation.mode`` is ``max``, ``minimize`` when ``min``; ``None`` for another sweeper."""
    if OmegaConf.select(cfg, "hydra.sweeper._target_", default=None) != OPTUNA_SWEEPER:
        return None
    return {"max": "maximize", "min": "minimize"}.get(cfg.evaluation.mode)


def study_problems(cfg: DictConfig, problems: list[Problem], parsed: list[Any]) -> list[Problem]:
    """The problems of a study's config (composed without its sweep, with its ``hydra``
    node), before the study starts: ``problems`` less those of the swept keys (each
    trial validates its own values), a missing ``evaluation.monitor`` (what a trial
    returns), an Optuna ``direction`` on the command line (``parsed``: Hydra's parsed
    overrides) against ``evaluation.mode``."""
    swept = swept_keys(cfg, parsed)
    problems = [p for p in problems if not any(p.key == k or p.key.startswith(f"{k}.") for k in swept)]
    if cfg.evaluation.monitor is None:
        problems.append(
            Problem("evaluation.monitor", "a study optimizes evaluation.monitor: name one of evaluation.metrics", None)
        )
    if (
        OmegaConf.select(cfg, "hydra.launcher.wait", default=True) is False
    ):  # the sweeper proposes from each trial's result
        problems.append(Problem("hydra.launcher.wait", "a study needs each trial's result: it must be true", False))
    given = [o for o in parsed if o.get_key_element() == "hydra.sweeper.direction"]
    want = optuna_direction(cfg)
    if given and want and str(given[-1].value()) != want:
        expected = (
            f"expected {want} (evaluation.mode={cfg.evaluation.mode}; each trial returns its best evaluation.monitor)"
        )
        problems.append(Problem("hydra.sweeper.direction", expected, given[-1].value()))
    return problems


def swept_keys(cfg: DictConfig, parsed: list[Any]) -> set[str]:
    """The keys a study sweeps: a sweep (``choice``, ``interval``, ...) in ``hydra.sweeper.params``
    or on the command line (``parsed``), and no fixed value in either (the sweeper fixes them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    try:
        overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]) + list(parsed)
    except Exception:  # not Optuna's params: the command line alone
        overrides = list(parsed)
    return {o.key_or_group for o in overrides if o.is_sweep_override()} - {
        o.key_or_group for o in overrides if not o.is_sweep_override()
    }


def trial_problems(cfg: DictConfig, hydra_cfg: DictConfig) -> list[Problem]:
    """The problems of one trial's config (``cfg``, composed by Hydra with the point the
    sweeper proposed; ``hydra_cfg``: its ``hydra`` node), as ``igniter`` finds them for a
    run (:func:`igniter.compose.config_problems`, without composing again)."""
    from igniter.cluster.hydra_launchers import is_cluster_launcher, launcher_problems
    from igniter.compose import schema_problems
    from igniter.validate import validate

    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True)
    return schema_problems(cfg) or validate(cfg, here=not is_cluster_launcher(launcher)) + launcher_problems(
        launcher, cfg
    )


def best_value(record: dict[str, Any] | None, monitor: str | None) -> float | None:
    """The best value of ``monitor`` in a ``metrics.json`` record (its ``best`` row, chosen
    by ``evaluation.mode``); ``None`` when the run has no evaluation of it."""
    value = (record or {}).get("best", {}).get(monitor) if monitor else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def worst_value(mode: str) -> float:
    """What a failed trial returns: worse than any result (``-inf`` when ``mode`` is ``max``)."""
    return -math.inf if mode == "max" else math.inf


def record_failed_trial(job_dir: Path, state: str, value: float, exit_status: int) -> None:
    """Note that the trial in ``job_dir`` failed (``state``: ``invalid config``, ``diverged``,
    ``failed``, ...), returned ``value`` and would have exited with ``exit_status``."""
    _FAILED[str(Path(job_dir).resolve())] = (state, value, exit_status)


def sweep_exit_status() -> int:
    """The exit status for the last study that ended in this process: 0 when at least one
    trial completed, else the first failed trial's (2: its point was invalid)."""
    return _STUDY_EXIT["status"]


def results_rows(sweep_dir: Path, monitor: str | None = None) -> list[dict[str, Any]]:
    """One row per job directory of ``sweep_dir``: job number and id, overrides,
    state and final metrics, read from the job's ``metrics.json`` (state
    ``no metrics.json`` when the job never got that far, or the reason a trial of
    this process failed); with ``monitor``, the ``value`` each trial returned (the
    best ``monitor``) after the state."""
    rows = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if (
        not jobs and (Path(sweep_dir) / ".hydra").is_dir()
    ):  # a single run submitted without -m: the sweep dir is its run dir
        jobs = [Path(sweep_dir)]
    for job_dir in jobs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        row: dict[str, Any] = {
            "job": job_dir.name,
            "overrides": " ".join(map(str, overrides)),
            "id": "-",
            "state": "no metrics.json",
        }
        if monitor:
            row["value"] = "-"
        metrics = read_record(job_dir)
        if metrics is not None:
            row["id"] = metrics.get("job", {}).get("id") or "-"
            row["state"] = metrics.get("status", "?")
            if monitor and best_value(metrics, monitor) is not None:
                row["value"] = best_value(metrics, monitor)
            final = {k: v for k, v in metrics.get("final", {}).items() if k not in ("epoch", "iteration")}
            row.update(final)
        failed = _FAILED.get(str(job_dir.resolve()))
        if failed is not None:
            row["state"] = failed[0]
            if monitor:
                row["value"] = failed[1]
        rows.append(row)
    return rows


def without_common_overrides(rows: list[dict[str, Any]], given: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """``rows`` without the overrides of the command line (``given``) that every one of them
    has (when there are two rows or more), and those overrides, in order."""
    split = [str(r["overrides"]).split() for r in rows]
    common = [o for o in given if all(o in s for s in split)] if len(rows) > 1 else []
    shown = [{**r, "overrides": " ".join(o for o in s if o not in common)} for r, s in zip(rows, split)]
    return shown, common


def study_summary(sweep_dir: Path, rows: list[dict[str, Any]], monitor: str, mode: str) -> str:
    """The lines after a study's table: trials completed and failed, the best value and
    parameters (from the sweeper's ``optimization_results.yaml``, when it wrote one)."""
    done = [r for r in rows if isinstance(r.get("value"), float) and math.isfinite(r["value"])]
    failed = len(rows) - len(done)
    lines = [
        f"igniter study: {len(rows)} trials, {len(done)} completed, {failed} failed; value = the best {monitor} ({mode}) of a trial"
    ]
    results = Path(sweep_dir) / OPTUNA_RESULTS
    if results.is_file():
        best = OmegaConf.to_container(OmegaConf.load(results))
        if "best_value" in best and done:
            at = [r["job"] for r in done if r["value"] == best["best_value"]]
            params = " ".join(f"{k}={v}" for k, v in best.get("best_params", {}).items())
            lines.append(f"igniter study: best value {best['best_value']:.6g}" + (f" (job {at[0]})" if at else ""))
            lines.append(f"igniter study: best parameters: {params}")
        lines.append(f"igniter study: {results}")
    if not done:
        lines.append("igniter study: no trial completed")
    return "\n".join(lines)


class ResultsTable(Callback):
    """Prints :func:`igniter.console.format_table` of the sweep directory when a multirun ends; after a
    study (:func:`proposes_lazily`), the value of every trial and :func:`study_summary`."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        study = proposes_lazily(config.hydra)
        monitor = OmegaConf.select(config, "evaluation.monitor", default=None) if study else None
        if not sweep_dir.is_dir() or OmegaConf.select(config, "hydra.launcher.wait", default=True) is False:
            return  # wait=false: the launcher listed the jobs it submitted; `igniter status` shows them later
        rows = results_rows(sweep_dir, monitor)
        shown, common = without_common_overrides(rows, [str(o) for o in config.hydra.overrides.task])
        every = f"\nevery job: {' '.join(common)}" if common else ""
        print(f"\nigniter sweep results ({sweep_dir}):\n{format_table(shown)}{every}", flush=True)
        if study and monitor:
            mode = str(OmegaConf.select(config, "evaluation.mode", default="max"))
            print(study_summary(sweep_dir, rows, monitor, mode), flush=True)
            if any(isinstance(r.get("value"), float) and math.isfinite(r["value"]) for r in rows):
                _STUDY_EXIT["status"] = 0
            else:
                here = [_FAILED[k][2] for k in (str((sweep_dir / r["job"]).resolve()) for r in rows) if k in _FAILED]
                _STUDY_EXIT["status"] = here[0] if here else 1
