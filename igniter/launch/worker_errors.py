"""A run-ending error raised inside a spawned process reaches the launcher as what it is.

``torch.multiprocessing`` hands the launcher a worker's exception only as traceback
text (``ProcessRaisedException``), so an :class:`~igniter.errors.IgniterError` raised
in a worker (a :class:`~igniter.errors.ConfigError` while it builds: a missing data
file, a damaged checkpoint; a :class:`~igniter.errors.CheckpointWriteFailed` when the
disk is full; a :class:`~igniter.errors.TrainingDiverged`) would surface as "rank 1
failed" with a traceback and exit status 1. Each worker of ``runner=spawn`` therefore
records its ``IgniterError`` in a directory the launcher made (as torchelastic's
``TORCHELASTIC_ERROR_FILE`` does for any error); the launcher re-raises the lowest
rank's, and the CLI reports it as its paragraph with its own exit status (2, 5, 3...).
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ignite.distributed as idist

from igniter.errors import IgniterError

__all__ = ["RecordWorkerErrors", "recorded_worker_errors", "first_worker_error"]


class RecordWorkerErrors:
    """A picklable wrapper of a worker function: ``fn(*args)``, and an ``IgniterError`` it
    raises is also written to ``<directory>/rank<rank>.pickle`` before propagating.

    Args:
        directory: the launcher's error directory.
        fn: the worker function.
    """

    def __init__(self, directory: str, fn: Callable[..., Any]) -> None:
        self.directory, self.fn = directory, fn

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        except IgniterError as e:
            path = Path(self.directory) / f"rank{idist.get_rank():06d}.pickle"
            try:
                data = pickle.dumps(e)
                pickle.loads(data)  # an error that cannot be rebuilt (a custom __init__) is left to the traceback text
                path.write_bytes(data)
            except Exception:  # e.g. an unpicklable value in a Problem: the traceback text still reaches the launcher
                pass
            raise


@contextlib.contextmanager
def recorded_worker_errors() -> Iterator[str]:
    """A temporary error directory for one launch, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="igniter-worker-errors-") as directory:
        yield directory


def first_worker_error(directory: str) -> IgniterError | None:
    """The ``IgniterError`` of the lowest rank that recorded one, or ``None``."""
    for path in sorted(Path(directory).glob("rank*.pickle")):
        try:
            error = pickle.loads(path.read_bytes())
        except Exception:
            continue
        if isinstance(error, IgniterError):
            return error
    return None
