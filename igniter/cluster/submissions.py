"""What igniter remembers of the SLURM jobs it submitted, and what SLURM says of them.

``<sweep dir>/submitted.json`` (a single run submitted without ``-m``: its run
directory) is written by :mod:`igniter.cluster.submit` before it waits for
anything (or returns, with ``hydra.launcher.wait=false``)::

    command   the command that re-submits what did not complete (argv, sweep dir pinned)
    jobs      {job number: {"dir": run directory relative to the sweep dir,
                            "overrides": [...],
                            "submissions": [{"id", "log", "err", "at"}, ...]}}  oldest first

A job is *completed* when its run directory's ``metrics.json`` has ``status:
completed`` (what igniter writes when training ended normally, early stopping
included); SLURM's own ``COMPLETED`` is not enough (igniter may have exited 0 after
a handled failure). A job whose newest submission SLURM still holds (pending,
running, requeued) is *active*. Re-running the command re-submits every job that is
neither, into its own run directory.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from igniter.atomic_files import atomic_write
from igniter.record import read_record

__all__ = ["RECORD_FILE", "ACTIVE_STATES", "Submissions", "slurm_states", "run_status", "is_completed", "hydra_value"]

#: The record's file name, in the sweep directory.
RECORD_FILE = "submitted.json"
#: SLURM states of a job that has not ended (a second submission would run beside it).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
    }
)


class Submissions:
    """The submission record of one sweep directory (see the module docstring).

    Args:
        sweep_dir: the directory holding :data:`RECORD_FILE` (need not exist yet).
    """

    def __init__(self, sweep_dir: str | Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        path = self.sweep_dir / RECORD_FILE
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.command: list[str] = list(data.get("command") or [])
        self.jobs: dict[str, dict[str, Any]] = dict(data.get("jobs") or {})

    @property
    def exists(self) -> bool:
        """Whether the record file exists."""
        return (self.sweep_dir / RECORD_FILE).is_file()

    def latest_id(self, num: int | str) -> str | None:
        """The SLURM id of job ``num``'s newest submission (``None``: never submitted)."""
        subs = self.jobs.get(str(num), {}).get("submissions") or []
        return subs[-1]["id"] if subs else None

    def run_dir(self, num: int | str) -> Path:
        """Job ``num``'s run directory."""
        return self.sweep_dir / self.jobs[str(num)]["dir"]

    def add(self, num: int, run_dir: Path, overrides: list[str], job_id: str, log: Path, err: Path) -> None:
        """Note that job ``num`` (run directory ``run_dir``) was submitted as SLURM job ``job_id``."""
        job = self.jobs.setdefault(
            str(num), {"dir": _relative(run_dir, self.sweep_dir), "overrides": list(overrides), "submissions": []}
        )
        job["submissions"].append(
            {"id": job_id, "log": str(log), "err": str(err), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )

    def save(self, command: list[str]) -> None:
        """Write the record (atomically), with ``command``: what re-submits the jobs not completed.

        Raises:
            OSError: the sweep directory cannot be written.
        """
        self.command = list(command)
        ordered = dict(sorted(self.jobs.items(), key=lambda kv: int(kv[0])))
        text = json.dumps({"command": self.command, "jobs": ordered}, indent=2)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.sweep_dir / RECORD_FILE, lambda f: f.write(text), binary=False)


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (``.`` for ``base`` itself), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _run(cmd: list[str]) -> str:
    """stdout of ``cmd``; empty when it is missing or fails (SLURM unreachable: states unknown)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """SLURM's state of each of ``job_ids`` (``RUNNING``, ``COMPLETED``, ``CANCELLED``, ...).

    The controller (``squeue``, one line per array task) is asked first: it knows a job
    the moment it is submitted, and finished ones for ``MinJobAge`` seconds; accounting
    (``sacct``), which lags behind it, for the others. Ids neither knows are left out.

    Args:
        job_ids: SLURM job ids, ``<array job>_<task>`` for array tasks (submitit's form).
    """
    wanted = {i for i in job_ids if i}
    if not wanted:
        return {}
    states: dict[str, str] = {}
    # all of the user's jobs, not `-j ids`: squeue rejects the whole query when one id has aged out
    for line in _run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"]).split():
        job_id, _, state = line.partition("|")
        if job_id in wanted:
            states[job_id] = state
    missing = sorted(wanted - states.keys())
    if missing:
        for line in _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State"]).split("\n"):
            job_id, _, state = line.strip().partition("|")
            if job_id in wanted and job_id not in states and state:
                states[job_id] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def run_status(run_dir: Path) -> str | None:
    """``status`` of ``run_dir``'s ``metrics.json`` (``None``: none, or unreadable)."""
    try:
        record = read_record(run_dir)
    except (OSError, ValueError):
        return None
    return str(record.get("status")) if record else None


def is_completed(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` completed (its ``metrics.json`` says so)."""
    return run_status(run_dir) == "completed"


def hydra_value(path: Path) -> str:
    """``path`` as a Hydra override value: quoted when it has characters Hydra would parse."""
    text = str(path)
    if all(c.isalnum() or c in "/._-+~" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
