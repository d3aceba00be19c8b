"""Bad input found inside a spawned process reaches the launcher as what it is.

``torch.multiprocessing`` hands the launcher a worker's exception only as traceback
text (``ProcessRaisedException``), so a :class:`~igniter.errors.ConfigError` raised
while a worker builds (a missing data file, a damaged checkpoint) or on its first step
would surface as "rank 1 failed" with a traceback and exit status 1. Each worker of
``runner=spawn`` therefore records a ``ConfigError`` in a directory the launcher
made (as torchelastic's ``TORCHELASTIC_ERROR_FILE`` does for any error); the launcher
re-raises the lowest rank's, and the CLI reports it as one paragraph with exit status 2.
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ignite.distributed as idist

from igniter.errors import ConfigError

__all__ = ["RecordConfigErrors", "recorded_config_errors", "first_config_error"]


class RecordConfigErrors:
    """A picklable wrapper of a worker function: ``fn(*args)``, and a ``ConfigError`` it
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
        except ConfigError as e:
            path = Path(self.directory) / f"rank{idist.get_rank():06d}.pickle"
            try:
                path.write_bytes(pickle.dumps(e))
            except Exception:  # an unpicklable value in a Problem: the traceback text still reaches the launcher
                pass
            raise


@contextlib.contextmanager
def recorded_config_errors() -> Iterator[str]:
    """A temporary error directory for one launch, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="igniter-worker-errors-") as directory:
        yield directory


def first_config_error(directory: str) -> ConfigError | None:
    """The ``ConfigError`` of the lowest rank that recorded one, or ``None``."""
    for path in sorted(Path(directory).glob("rank*.pickle")):
        try:
            error = pickle.loads(path.read_bytes())
        except Exception:
            continue
        if isinstance(error, ConfigError):
            return error
    return None
