"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, with two changes.

* ``hydra.launcher.wait=false``: every job of the sweep is submitted (one job array),
  the job ids, log files and sweep directory are printed, and the command returns;
  the jobs are SLURM's from then on (nothing in them refers to the submitting shell).
  The plugin always waits on ``job.results()``, so a dead login shell lost every
  batch not yet submitted (hydra#2479).
* Re-running a sweep's command with the same ``hydra.sweep.dir`` submits only the
  jobs that did not complete, each under its own job number, so into its own earlier
  run directory (no renumbering, no completed run overwritten; hydra#3328): see
  :mod:`igniter.cluster.submissions` for "completed" and the record kept.

A single run (no ``-m``) with this launcher is a one-job sweep whose directory is the
run's ``output_dir`` (:func:`igniter.cluster.hydra_launchers.one_job_sweep`). The job
itself runs exactly as under the plugin (its ``__call__``, pickled by submitit).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from igniter.cluster.submissions import ACTIVE_STATES, Submissions, hydra_value, is_completed, slurm_states
from igniter.errors import Problem

__all__ = ["SlurmLauncher", "resubmit_command"]


class SlurmLauncher(plugin.SlurmLauncher):
    """hydra-submitit-launcher's ``SlurmLauncher`` that may return without waiting and
    skips the jobs of its sweep directory that completed or are still in SLURM.

    Args:
        wait: wait for every job to end and return their results (the plugin's way);
            ``False``: return once all are submitted.
        params: the plugin's settings (``hydra.launcher.*``).
    """

    def __init__(self, wait: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.wait = bool(wait)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the jobs of one batch that still need to run; wait for them unless ``wait`` is false.

        Args:
            job_overrides: each job's overrides (the sweeper's batch).
            initial_job_idx: the job number of the batch's first job.

        Returns:
            One :class:`JobReturn` per job: the job's result when waiting, else a completed
            return without a value (Hydra's sweeper reads each; the jobs are SLURM's now).

        Raises:
            SystemExit: 2 when the sweep directory's run directories hold other jobs.
        """
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        record = Submissions(sweep_dir)
        planned = [
            (initial_job_idx + i, list(o), self._run_dir(list(o), initial_job_idx + i))
            for i, o in enumerate(job_overrides)
        ]
        _check_same_jobs(planned, record)
        states = slurm_states(filter(None, (record.latest_id(num) for num, _, _ in planned)))
        todo, skipped = [], []
        for num, overrides, run_dir in planned:
            state = states.get(record.latest_id(num) or "")
            if is_completed(run_dir):
                skipped.append(f"job {num} (completed)")
            elif state in ACTIVE_STATES:
                skipped.append(f"job {num} (still {state} as SLURM job {record.latest_id(num)})")
            else:
                todo.append((num, overrides, run_dir))
        jobs = self._submit(todo) if todo else []
        for (num, overrides, run_dir), job in zip(todo, jobs):
            record.add(num, run_dir, overrides, job.job_id, job.paths.stdout, job.paths.stderr)
        command = resubmit_command(
            sys.argv[1:], sweep_dir, single=all(run_dir == sweep_dir for _, _, run_dir in planned)
        )
        record.save(command)
        _report(
            sweep_dir, [(num, run_dir, job) for (num, _, run_dir), job in zip(todo, jobs)], skipped, command, self.wait
        )
        if not self.wait:
            return [_done(overrides, run_dir) for _, overrides, run_dir in planned]
        results = {num: job.results()[0] for (num, _, _), job in zip(todo, jobs)}
        return [results.get(num) or _done(overrides, run_dir) for num, overrides, run_dir in planned]

    def _run_dir(self, overrides: list[str], num: int) -> Path:
        """The run directory job ``num`` will have (``hydra.sweep.subdir`` may interpolate anything)."""
        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return Path(str(self.config.hydra.sweep.dir)).absolute() / str(cfg.hydra.sweep.subdir)

    def _submit(self, todo: list[tuple[int, list[str], Path]]) -> list[Any]:
        """Submit ``todo`` as one job array, set up as the plugin's ``launch`` does; returns submitit's jobs."""
        import submitit

        assert self.config is not None
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params[k] for k in ("max_num_timeout",) if k in self.params},
        )
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in common else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        state = Singleton.get_state()
        args = [(overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", state) for num, overrides, _ in todo]
        return executor.map_array(self, *zip(*args))


def _check_same_jobs(planned: list[tuple[int, list[str], Path]], record: Submissions) -> None:
    """Exit 2 (nothing submitted) when a job's run directory already holds a job of other
    overrides: the sweep directory belongs to another sweep, whose runs must not be mixed."""
    import yaml

    problems = []
    for num, overrides, run_dir in planned:
        recorded = record.jobs.get(str(num), {}).get("overrides")
        if recorded is None and (run_dir / ".hydra" / "overrides.yaml").is_file():
            recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        if recorded is not None and list(map(str, recorded)) != overrides:
            problems.append(
                Problem(
                    "hydra.sweep.dir",
                    f"job {num}'s directory {run_dir} holds a run of other overrides ({' '.join(map(str, recorded))}): give a new sweep directory",
                    str(record.sweep_dir),
                )
            )
    if problems:
        from igniter.errors import report_problems

        sys.exit(report_problems(problems, "cannot submit into this sweep directory"))


def _done(overrides: list[str], run_dir: Path) -> JobReturn:
    """A job's return when it is not waited for (or did not need to run again)."""
    return JobReturn(overrides=overrides, working_dir=str(run_dir), status=JobStatus.COMPLETED)


def resubmit_command(argv: list[str], sweep_dir: Path, single: bool) -> list[str]:
    """The command that re-submits what did not complete, in the same directory.

    Args:
        argv: the arguments Hydra ran with (``-m`` and the sweep's overrides).
        sweep_dir: the sweep directory (absolute): pinned, as the default is a new one each time.
        single: a single run submitted without ``-m`` (:func:`~igniter.cluster.hydra_launchers.one_job_sweep`
            added ``-m``, its ``output_dir`` and the sweep directory settings): its own command.

    Returns:
        ``["igniter", ...]``.
    """
    if single:
        return [
            "igniter",
            *(
                a
                for a in argv
                if a not in ("-m", "--multirun") and not a.startswith(("hydra.sweep.dir=", "hydra.sweep.subdir="))
            ),
        ]
    return [
        "igniter",
        *(a for a in argv if not a.startswith("hydra.sweep.dir=")),
        f"hydra.sweep.dir={hydra_value(sweep_dir)}",
    ]


def _report(
    sweep_dir: Path, submitted: list[tuple[int, Path, Any]], skipped: list[str], command: list[str], wait: bool
) -> None:
    """Print what was submitted (job, SLURM id, run directory, log), what was not and why, and the next commands."""
    from igniter.console import format_table

    rows = [
        {"job": num, "slurm id": job.job_id, "run directory": str(run_dir), "log": str(job.paths.stdout)}
        for num, run_dir, job in submitted
    ]
    how = "waiting for them" if wait else "not waiting (hydra.launcher.wait=false)"
    lines = [f"igniter: submitted {len(submitted)} SLURM job(s), {how}; sweep directory: {sweep_dir}"]
    if rows:
        lines.append(format_table(rows))
    if skipped:
        lines.append(f"not submitted again: {', '.join(skipped)}")
    lines.append(f"state and metrics: igniter status {shlex.quote(str(sweep_dir))}")
    lines.append(f"re-submit the jobs that do not complete: {shlex.join(command)}")
    print("\n".join(lines), flush=True)
