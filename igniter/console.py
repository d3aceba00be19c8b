"""Console and log-file setup: what a run prints, and how it shares the terminal with the progress bar.

Every rank appends to ``<run dir>/rank{rank}.log``; rank 0 also prints igniter's own
INFO lines and everyone's warnings to stdout as ``[igniter] <message>``.

The progress bar (tqdm, :func:`igniter.handlers.attach_progress`) keeps the cursor at
the end of its own line, so anything else printed while it is drawn would start right
after the bar and the bar's clearing at the epoch's end would then erase the wrong line.
Console log lines and Python warnings are therefore written through tqdm's
``external_write_mode`` (what ``tqdm.write`` does): live bars are cleared first and
redrawn after. Without a live bar this is a plain write.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, TextIO

from tqdm.std import tqdm  # already imported by torch (torch.hub): no start-up cost

__all__ = ["setup_logging", "TqdmConsoleHandler", "bars_cleared", "route_warnings", "close_bars", "format_table"]


#: Ignite's engines log this at ERROR for every exception that ends a run; igniter reports
#: the failure itself (a paragraph, or the traceback), so the console skips it (the rank log keeps it).
_IGNITE_TERMINATING = ("Engine run is terminating due to exception", "Current run is terminating due to exception")


class _ConsoleFilter(logging.Filter):
    """igniter's own INFO lines, and warnings from everyone else; never a record logged with
    ``extra={"console": False}`` (a traceback meant for the rank log only) or Ignite's
    "terminating due to exception" line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        if record.name.startswith("ignite.engine") and str(record.msg).startswith(_IGNITE_TERMINATING):
            return False
        return record.name.startswith("igniter") or record.levelno >= logging.WARNING


def close_bars() -> None:
    """Close every live progress bar (a run ended by an exception never reaches the
    events that close its bar; what is printed next must not glue onto it)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def bars_cleared(stream: TextIO | None) -> ContextManager[Any]:
    """A context in which ``stream`` may be written to without gluing onto a live tqdm bar:
    bars on that stream (or on the other of stdout/stderr: both reach the same terminal)
    are cleared on entry and redrawn on exit, under tqdm's lock."""
    if stream is None or not getattr(tqdm, "_instances", None):  # no bar was ever made, or none is alive
        return contextlib.nullcontext()
    return tqdm.external_write_mode(file=stream)


class TqdmConsoleHandler(logging.StreamHandler):
    """A ``StreamHandler`` whose lines never share a terminal line with a progress bar.

    ``emit`` writes through :func:`bars_cleared` (``tqdm.write``): with a bar live,
    the bar is cleared, the line printed and the bar drawn again below it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with bars_cleared(self.stream):
                self.stream.write(msg + self.terminator)
                self.flush()  # as StreamHandler: a pipe or a SLURM log file sees the line at once
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def route_warnings() -> None:
    """Make Python's warning display (``warnings.showwarning``) clear live progress bars
    before it prints and redraw them after.

    Warnings keep their place (stderr, every rank) and format; only the bar moves out of
    the way. The display in place (Python's, or a test framework's) is wrapped, once.
    """
    previous: Callable[..., None] = warnings.showwarning
    if getattr(previous, "_igniter_bars_cleared", False):
        return

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        with bars_cleared(file if file is not None else sys.stderr):
            previous(message, category, filename, lineno, file, line)

    showwarning._igniter_bars_cleared = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def setup_logging(output_dir: Path, rank: int, level: str = "INFO") -> None:
    """Every rank appends to ``<run dir>/rank{rank}.log``; only rank 0 also logs to stdout
    (through :class:`TqdmConsoleHandler`). Warnings clear the progress bar before printing."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    output_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(output_dir / f"rank{rank}.log", mode="a")
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if rank == 0:
        console = TqdmConsoleHandler(sys.stdout)
        console.setFormatter(logging.Formatter("[igniter] %(message)s"))
        console.addFilter(_ConsoleFilter())
        root.addHandler(console)
    root.setLevel(level)
    route_warnings()


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
