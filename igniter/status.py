"""``igniter status <sweep dir | run dir>``: where the SLURM jobs of a sweep (or one run) are.

One row per job: its number, SLURM job id and state (``squeue``, else ``sacct``:
:func:`igniter.cluster.submissions.slurm_states`), the run's own status, latest
epoch and final metrics (its ``metrics.json``), and its run directory. Jobs that
ended without completing are listed with their log and the command that re-submits
them (the sweep's command with its sweep directory pinned, recorded at submission:
it skips the completed jobs and puts each other one back into its own directory).

The jobs are read from the directory's ``submitted.json`` (written by
``hydra/launcher=slurm``); without one (a run of ``slurm/sbatch_template.sh``, an
older sweep), from the ``metrics.json`` of the directory or of its numbered job
directories (the SLURM id the run recorded).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from igniter.cluster.submissions import ACTIVE_STATES, Submissions, slurm_states
from igniter.console import format_table
from igniter.errors import EXIT_CONFIG
from igniter.record import read_record

__all__ = ["main", "StatusError", "Job", "find_jobs", "status_rows"]


class StatusError(Exception):
    """The directory given to ``igniter status`` is not one it can report on (exit 2)."""


@dataclass
class Job:
    """One job of a sweep: its number (``None`` when unknown), run directory, newest SLURM id and log."""

    num: int | None
    run_dir: Path
    slurm_id: str | None
    log: str | None = None


def _read(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s ``metrics.json`` (empty when missing or unreadable)."""
    try:
        return read_record(run_dir) or {}
    except (OSError, ValueError):
        return {}


def _from_record(record: Submissions, only: Path | None = None) -> list[Job]:
    jobs = []
    for num, entry in sorted(record.jobs.items(), key=lambda kv: int(kv[0])):
        subs = entry.get("submissions") or [{}]
        job = Job(int(num), record.run_dir(num), subs[-1].get("id"), subs[-1].get("log"))
        if only is None or job.run_dir.resolve() == only.resolve():
            jobs.append(job)
    return jobs


def _from_metrics(run_dir: Path) -> Job:
    job = _read(run_dir).get("job") or {}
    num = job.get("num")
    return Job(num if isinstance(num, int) else None, run_dir, str(job.get("id") or "") or None)


def find_jobs(target: Path) -> tuple[list[Job], list[str] | None]:
    """The jobs of ``target`` (a sweep directory, or one run directory) and the command
    that re-submits those not completed (``None`` when igniter did not record one).

    Raises:
        StatusError: ``target`` does not exist, is not a directory or holds no job.
    """
    if not target.exists():
        raise StatusError(
            f"{target} does not exist. Give the sweep directory printed at submission (hydra.sweep.dir) or a run directory."
        )
    if not target.is_dir():
        raise StatusError(
            f"{target} is not a directory. Give the sweep directory printed at submission (hydra.sweep.dir) or a run directory."
        )
    record = Submissions(target)
    if record.exists:
        return _from_record(record), record.command or None
    parent = Submissions(target.parent)
    if parent.exists and _from_record(parent, only=target):
        return _from_record(parent, only=target), parent.command or None
    if (target / "metrics.json").is_file():
        return [_from_metrics(target)], None
    numbered = sorted((p for p in target.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    jobs = [_from_metrics(p) for p in numbered if (p / "metrics.json").is_file() or (p / ".hydra").is_dir()]
    if not jobs:
        raise StatusError(
            f"{target} holds no jobs: no submitted.json (written when `igniter [-m] hydra/launcher=slurm ...` submits), "
            "no metrics.json and no numbered job directories. Give the sweep directory printed at submission or a run directory."
        )
    return jobs, None


def _failed(state: str, run: str) -> bool:
    """Ended without completing: SLURM no longer runs it and its run did not complete."""
    return state not in ACTIVE_STATES and run != "completed"


def status_rows(jobs: list[Job], base: Path) -> list[dict[str, Any]]:
    """One row per job: job, SLURM id and state, run status (``-``: no metrics.json yet), latest epoch, run directory, final metrics.

    Args:
        jobs: from :func:`find_jobs`.
        base: directory names are shown relative to it.
    """
    states = slurm_states(j.slurm_id for j in jobs if j.slurm_id)
    rows = []
    for job in jobs:
        metrics = _read(job.run_dir)
        epochs = metrics.get("epochs") or []
        row: dict[str, Any] = {
            "job": "-" if job.num is None else job.num,
            "slurm id": job.slurm_id or "-",
            "state": states.get(job.slurm_id or "", "UNKNOWN" if job.slurm_id else "-"),
            "run": metrics.get("status", "-"),
            "epoch": epochs[-1].get("epoch", "-") if epochs else "-",
            "directory": _shown(job.run_dir, base),
        }
        row.update({k: v for k, v in (metrics.get("final") or {}).items() if k not in ("epoch", "iteration")})
        rows.append(row)
    return rows


def _shown(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve())) or "."
    except ValueError:
        return str(path)


def main(argv: Sequence[str]) -> int:
    """``igniter status <dir>``: print the jobs' table, then how to re-submit those that failed.

    Args:
        argv: the subcommand's arguments: one directory.

    Returns:
        0, or 2 when the directory is not one to report on (one paragraph on stderr).
    """
    if len(argv) != 1 or argv[0].startswith("-"):
        print(
            "igniter status: give one directory: a sweep directory (hydra.sweep.dir) or a run directory. See `igniter status --help`.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    target = Path(argv[0])
    try:
        jobs, command = find_jobs(target)
    except StatusError as e:
        print(f"igniter status: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as e:  # a submitted.json that is not JSON, an unreadable directory
        print(f"igniter status: cannot read the jobs of {target}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    rows = status_rows(jobs, target)
    print(f"igniter status of {target.resolve()}:\n{format_table(rows)}")
    failed = [(row, job) for row, job in zip(rows, jobs) if _failed(row["state"], row["run"])]
    if failed:
        lines = ["", "ended without completing:"]
        lines += [f"  job {row['job']} ({row['state']}, run {row['run']}): log {job.log or '-'}" for row, job in failed]
        if command:
            lines.append(
                f"re-submit them, each into its own run directory (completed jobs are skipped):\n  {shlex.join(command)}"
            )
        else:
            lines.append("re-submit them: run the sweep's command again with hydra.sweep.dir set to this directory")
        print("\n".join(lines))
    return 0
