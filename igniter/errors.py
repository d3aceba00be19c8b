"""The errors that end a run, each with the exit status the command returns for it.

:class:`IgniterError` carries ``exit_status``; the CLI maps every one of them once
(``igniter.cli``). :class:`ConfigError` (bad input: config, checkpoint, dataset path,
environment) is reported as one line per problem, exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = [
    "report_problems",
    "Problem",
    "IgniterError",
    "ConfigError",
    "TrainingDiverged",
    "Interrupted",
    "EXIT_FAILED",
    "EXIT_CONFIG",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_HUNG",
    "EXIT_CHECKPOINT_WRITE",
    "RankHung",
    "CheckpointWriteFailed",
    "NO_VALUE",
]

#: Exit status of a run that failed (a rank raised or died, a preempted job waiting for its requeue).
EXIT_FAILED = 1

#: Exit status for bad input: config, checkpoint, dataset path, environment.
EXIT_CONFIG = 2

#: Exit status when the loss became NaN or infinite.
EXIT_DIVERGED = 3

#: Exit status when a rank made no progress for ``runner.hang_timeout_s`` (the watchdog ended the job).
EXIT_HUNG = 4

#: Exit status when a checkpoint could not be written (no space left, or another OS error).
EXIT_CHECKPOINT_WRITE = 5

#: Exit status after Ctrl-C: 128 + SIGINT, the shell's convention for a process ended by SIGINT.
EXIT_INTERRUPTED = 130


class _NoValue:
    """The type of :data:`NO_VALUE`: one instance, kept as itself through pickling."""

    def __reduce__(self) -> str:
        return "NO_VALUE"

    def __repr__(self) -> str:
        return "NO_VALUE"


#: ``Problem.value`` when there is no value to show (e.g. a required key left out).
NO_VALUE: Any = _NoValue()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config: the dotted ``key``, the bad ``value``
    and what is ``expected`` (with a did-you-mean where one exists)."""

    key: str
    expected: str
    value: Any = NO_VALUE

    def __str__(self) -> str:
        shown = "" if self.value is NO_VALUE else f" = {self.value!r}"
        return f"{self.key}{shown}: {self.expected}"


class IgniterError(Exception):
    """Base of the errors that end a run; ``exit_status`` is what the command exits with."""

    exit_status: int = EXIT_FAILED


class TrainingDiverged(IgniterError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""

    exit_status = EXIT_DIVERGED


class RankHung(IgniterError):
    """A rank made no progress for ``runner.hang_timeout_s`` seconds; the watchdog
    (:mod:`igniter.supervision.watchdog`) wrote the live ranks' stacks to their rank logs
    and ended every process of the job. The message names the rank, host, pid, iteration
    and how long it was stalled."""

    exit_status = EXIT_HUNG


class CheckpointWriteFailed(IgniterError, OSError):
    """A checkpoint could not be written (``ENOSPC`` or another ``OSError``). The previous
    checkpoint is intact, the partial file was removed; the message names the directory
    and, for a full disk, the bytes needed and free.

    Also the ``OSError`` it stands for (``errno``), so code catching ``OSError`` around a
    save still catches it. ``str()`` is the one-paragraph message; ``directory``, ``needed``
    and ``free`` (bytes, or ``None``) are kept for programs. Pickles whole (a spawned worker
    hands it to the launcher).
    """

    exit_status = EXIT_CHECKPOINT_WRITE

    def __init__(
        self,
        message: str,
        code: int | None = None,
        directory: str | None = None,
        needed: int | None = None,
        free: int | None = None,
    ) -> None:
        OSError.__init__(self, message)
        self.errno, self.directory, self.needed, self.free = code, directory, needed, free

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple:
        return (type(self), (self.args[0], self.errno, self.directory, self.needed, self.free))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training. The checkpoints on disk are complete (no
    checkpoint is taken of a step cut short); rank 0 wrote the summary with status
    ``"interrupted"``. The message says where the run stopped and how to resume it.
    A ``KeyboardInterrupt`` (not an :class:`IgniterError`), so that ``except Exception``
    never swallows Ctrl-C; it carries ``exit_status`` all the same."""

    exit_status = EXIT_INTERRUPTED


class ConfigError(IgniterError):
    """The config (or an input it names) is invalid. ``problems`` lists every problem found."""

    exit_status = EXIT_CONFIG

    def __init__(self, problems: Iterable[Problem], header: str = "invalid configuration") -> None:
        self.problems = list(problems)
        self.header = header
        super().__init__(str(self))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its problems (spawned workers report through pickles)
        return (type(self), (self.problems, self.header))

    def __str__(self) -> str:
        n = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"igniter: {self.header} ({n} problem{'s' if n != 1 else ''}):\n{lines}"


def report_problems(problems: list[Problem], header: str = "invalid configuration") -> int:
    """Print ``problems`` on stderr, one line each, and return the exit status for them (2)."""
    print(str(ConfigError(problems, header)), file=sys.stderr)
    print("igniter: nothing was run. Fix the keys above (see `igniter --cfg job`).", file=sys.stderr)
    return EXIT_CONFIG
