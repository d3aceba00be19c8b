"""Hydra callbacks: after a sweep, a table of every job's result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from igniter.record import read_record

__all__ = ["ResultsTable", "results_rows", "format_table"]


def results_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of ``sweep_dir``: job number and id, overrides,
    state and final metrics, read from the job's ``metrics.json`` (state
    ``no metrics.json`` when the job never got that far)."""
    rows = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job_dir in jobs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(map(str, overrides)), "id": "-", "state": "no metrics.json"}
        metrics = read_record(job_dir)
        if metrics is not None:
            row["id"] = metrics.get("job", {}).get("id") or "-"
            row["state"] = metrics.get("status", "?")
            final = {k: v for k, v in metrics.get("final", {}).items() if k not in ("epoch", "iteration")}
            row.update(final)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; numbers with 4 significant digits."""
    if not rows:
        return "(no jobs)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


class ResultsTable(Callback):
    """Prints :func:`format_table` of the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            print(f"\nigniter sweep results ({sweep_dir}):\n{format_table(results_rows(sweep_dir))}", flush=True)
