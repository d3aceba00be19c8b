"""A run directory that is left as it was when the run cannot start.

Hydra creates the run directory and its ``.hydra/`` files before igniter's task
runs, and a run writes ``config.yaml`` and ``rank{N}.log`` before it has built
its datasets or read its checkpoint. When the run then cannot start (a missing
data file, a damaged checkpoint: :class:`~igniter.errors.ConfigError`, exit 2),
:meth:`RunDirectory.discard` undoes exactly that, so a sweep directory does not
fill with empty runs and an existing run's files are not replaced by those of a
start that failed. Checkpoints and anything else already there are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RunDirectory"]

#: Files a run (or Hydra) writes before it has built: restored or removed by ``discard``.
_EARLY_FILES = ("config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
#: Directories a run creates before it has built; removed by ``discard`` when they are empty.
_EARLY_DIRS = (".hydra", "checkpoints", "tb")


class RunDirectory:
    """A snapshot of a run directory's early files, taken before the run writes them.

    Args:
        path: the run directory (need not exist).
        fresh: treat the directory as new even if it exists (Hydra's multirun makes
            each job's directory, with its ``.hydra/`` files, just before the job).
    """

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.existed = self.path.is_dir() and not fresh
        self._files: dict[str, bytes | None] = {}
        self._logs: dict[str, int] = {}
        self._dirs: set[str] = set()
        self._tb_files: set[str] = set()
        # the parents the run's mkdir will create with it (Hydra's outputs/<date>/), deepest first
        self._new_parents = [] if self.path.exists() else [p for p in self.path.absolute().parents if not p.exists()]
        if self.existed:
            self._dirs = {rel for rel in _EARLY_DIRS if (self.path / rel).is_dir()}
            self._tb_files = {p.name for p in self.path.glob("tb/events.out.tfevents.*")}
            for rel in _EARLY_FILES:
                file = self.path / rel
                self._files[rel] = file.read_bytes() if file.is_file() else None
            self._logs = {p.name: p.stat().st_size for p in self.path.glob("rank*.log")}

    @classmethod
    def of_job(cls, path: str | Path) -> "RunDirectory":
        """For a directory Hydra may have just made: fresh when it holds nothing but ``.hydra/``."""
        path = Path(path)
        fresh = path.is_dir() and all(p.name == ".hydra" for p in path.iterdir())
        return cls(path, fresh=fresh)

    def discard(self) -> None:
        """Put the directory back as the snapshot found it: remove it if it is new,
        else restore the early files, cut the rank logs back to their old length and
        remove new empty directories. A new directory goes with the parents that did not exist
        when the snapshot was taken, while they are empty. Errors are ignored (best effort,
        never raises)."""
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self._new_parents:
                try:
                    parent.rmdir()
                except OSError:  # not empty: another run's (a run started in the same second), or gone
                    break
            return
        try:
            for rel, content in self._files.items():
                file = self.path / rel
                if content is None:
                    file.unlink(missing_ok=True)
                else:
                    file.write_bytes(content)
            for log in self.path.glob("rank*.log"):
                size = self._logs.get(log.name)
                if size is None:
                    log.unlink(missing_ok=True)
                else:
                    with open(log, "r+b") as f:
                        f.truncate(size)
            for events in self.path.glob(
                "tb/events.out.tfevents.*"
            ):  # TensorBoard started before a later logger failed
                if events.name not in self._tb_files:
                    events.unlink(missing_ok=True)
            for rel in _EARLY_DIRS:
                folder = self.path / rel
                if rel not in self._dirs and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        except OSError:
            pass
