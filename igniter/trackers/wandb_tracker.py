"""The ``wandb`` logger of the io registry, beside :func:`igniter.trackers.tensorboard.tensorboard` and
:func:`igniter.trackers.mlflow_tracker.mlflow_logger`: Weights & Biases through Ignite's ``WandBLogger``.

Chosen with ``logging.loggers=[tensorboard,wandb]`` (``pip install 'igniter[wandb]'``).
Like every logger, the factory is called on rank 0 only, after the run has resumed
(:func:`igniter.run._observe`), and ``close()`` is called when training ends.

Where the run goes comes from W&B's own environment, never from the config file:
``WANDB_PROJECT`` (default ``igniter``), ``WANDB_ENTITY``, ``WANDB_MODE`` (``offline``:
nothing leaves the machine; ``wandb sync --append`` uploads later), ``WANDB_API_KEY``,
``WANDB_BASE_URL`` and ``WANDB_DIR`` (default: the run directory, so W&B's files are in
``<run dir>/wandb/``). Unless set there, ``WANDB_INIT_TIMEOUT`` is :data:`INIT_TIMEOUT_S`
and ``WANDB_CONSOLE`` is ``off`` (the console is igniter's: ``rank0.log`` keeps it).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ignite.handlers.wandb_logger import WandBLogger
from omegaconf import OmegaConf

from igniter.atomic_files import atomic_write
from igniter.errors import ConfigError, Problem
from igniter.registry import io_registry
from igniter.trackers import base as tracker_base
from igniter.trackers.base import ARTIFACTS, GuardedTracker, attach_standard_handlers, reason, redact, tracker_key

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = ["RUN_ID_FILE", "WandBTracker", "read_records", "package_problem", "start_wandb", "wandb_logger"]

logger = logging.getLogger("igniter")

RUN_ID_FILE = "wandb_run_id"  #: in the run directory: the W&B run a resumed run continues
DEFAULT_PROJECT = "igniter"  #: without WANDB_PROJECT
INIT_TIMEOUT_S = 30  #: seconds ``wandb.init`` has to reach the server, unless WANDB_INIT_TIMEOUT says


class WandBTracker(GuardedTracker, WandBLogger):
    """Ignite's ``WandBLogger`` bound to one W&B run (``run.log``, not the global
    ``wandb.log``), its handlers and calls guarded: the first failure is logged once (a
    warning with the reason) and the tracker is then left alone; the run goes on
    (``metrics.json``, TensorBoard and the checkpoints are written as always).

    Metric names are TensorBoard's (``train/loss``, ``lr/group_0``, ``val/accuracy``), the
    step is the trainer's iteration. A step below ``first_step`` (one the W&B run already
    holds: a run resumed from a checkpoint older than its last logged step) is skipped, as
    W&B refuses steps lower than its last one.

    Args:
        run: the W&B run (``wandb.init``'s).
        ctx: the run (its directory for the files, its status for the exit code).
        first_step: the lowest step this process may log.
    """

    def __init__(self, run: Any, ctx: "RunContext", first_step: int = 0) -> None:
        super().__init__(init=False)  # the run is started by start_wandb, not here
        self.run, self.ctx, self.first_step = run, ctx, first_step
        self.failed = False
        self.completed = False
        self.started = time.time()

    name, label = "wandb", "W&B"

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """``run.log(data, step=step)`` (what Ignite's handlers call); nothing when ``step``
        is below :attr:`first_step` or the tracker failed before."""
        if step is not None and step < self.first_step:
            return
        self.guard(f"logging at step {step}", lambda: self.run.log(dict(data), step=step))

    def run_id_for_messages(self) -> str:
        return self.run.id

    def close(self) -> None:
        """Save ``config.yaml``, ``metrics.json`` and ``curves.png`` (those this run has
        written by now) to the W&B run (copies in its files directory: what they are now,
        also when the W&B run is synced later) and finish it: exit code 0 when training
        reached its end, 1 when it failed, diverged or was stopped before the end."""
        files = Path(self.run.dir) / "igniter"  # beside W&B's own files (its config.yaml)
        for name in ARTIFACTS:
            path = Path(self.ctx.output_dir) / name  # a resumed run's directory may hold older ones
            if path.is_file() and (name == "config.yaml" or path.stat().st_mtime >= self.started):
                self.guard(f"saving {name}", lambda p=path: self._save(p, files))
        status = self.end_status()
        self.guard("finishing the run", lambda: self.run.finish(exit_code=0 if status == "FINISHED" else 1))

    def _save(self, path: Path, files: Path) -> None:
        """``path`` copied into the run's files directory and saved (uploaded now when online)."""
        files.mkdir(exist_ok=True)
        copy = files / path.name
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=str(files.parent), policy="now")


def package_problem(key: str = "logging.loggers", import_it: bool = True) -> Problem | None:
    """:func:`igniter.trackers.base.package_problem` of the wandb package."""
    return tracker_base.package_problem("wandb", key, import_it)


def read_records(path: str | Path) -> Iterator[Any]:
    """The protobuf records (``run``, ``history``, ``summary``, ``exit``...) of a W&B
    transaction log, ``<run>/run-<id>.wandb`` (what ``wandb sync`` uploads), in order.

    Its format is LevelDB's log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each a 7-byte header (checksum, length, type: full, first, middle,
    last) and the bytes of one ``wandb.proto.wandb_internal_pb2.Record`` or part of one.
    The wandb package has no reader of its own since its Python writer moved to wandb-core.
    A record cut short (a process killed mid-write) ends the reading; checksums are not checked.

    Raises:
        ValueError: the file is no W&B transaction log.
        OSError: it cannot be read.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is no W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind not in (1, 2, 3, 4) or pos + 7 + length > len(data):
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _offline_last_step(wandb_dir: Path, run_id: str, current: Path) -> int:
    """The last step the earlier offline runs of ``run_id`` in ``wandb_dir`` hold (-1: none):
    offline, W&B starts each process's run afresh (``wandb sync --append`` joins them)."""
    last = -1
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        if path.parent.resolve() == current.resolve():
            continue
        try:
            last = max(
                [last, *(r.history.step.num for r in read_records(path) if r.WhichOneof("record_type") == "history")]
            )
        except Exception as e:  # W&B's reader moved, or a damaged file: W&B will refuse the steps itself
            logger.info("wandb: cannot read %s (%s): its steps are not skipped", path, reason(e))
    return last


def _remove_new(folder: Path, before: set[str] | None) -> None:
    """What ``wandb.init`` left in ``folder`` (``<dir>/wandb``) beyond ``before`` (``None``:
    the folder is new): a run that cannot start leaves nothing behind."""
    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir() if folder.is_dir() else []:
        if entry.name not in before:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(
                missing_ok=True
            )


def start_wandb(ctx: RunContext, key: str = "logging.loggers") -> WandBTracker:
    """Start the W&B run (new, or the one in ``<run dir>/wandb_run_id`` when training resumed
    from a checkpoint: ``resume="allow"``) with the resolved config as its (nested) config.

    Raises:
        ConfigError: ``key`` named with the reason, under "cannot start the run" (exit 2,
            nothing left behind): the wandb package is missing, or ``wandb.init`` fails
            (no API key, server unreachable within the init timeout, project refused...).
    """
    problem = package_problem(key)
    if problem is not None:
        raise ConfigError([problem], header="cannot start the run")
    import wandb

    out = Path(ctx.output_dir)
    id_file = out / RUN_ID_FILE
    old_id = id_file.read_text().strip() if id_file.is_file() else ""
    resumed = bool(old_id) and ctx.trainer.state.iteration > 0
    run_id = old_id if resumed else None  # None: W&B makes a new id
    base = Path(os.environ.get("WANDB_DIR") or out)
    folder = base / "wandb"
    before = {p.name for p in folder.iterdir()} if folder.is_dir() else None
    project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    settings = {
        k: v
        for k, v, env in (("init_timeout", INIT_TIMEOUT_S, "WANDB_INIT_TIMEOUT"), ("console", "off", "WANDB_CONSOLE"))
        if not os.environ.get(env)
    }
    config = OmegaConf.to_container(ctx.cfg, resolve=True)
    try:
        run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            dir=str(base),
            name=out.name,
            config=config,
            settings=wandb.Settings(**settings),
        )
    except BaseException as e:  # wandb.Error, a timeout, or KeyboardInterrupt while waiting: nothing left behind
        _remove_new(folder, before)
        if not isinstance(e, Exception):
            raise
        logger.info("wandb start-up failure:", exc_info=e, extra={"console": False})
        where = f"WANDB_MODE={os.environ.get('WANDB_MODE') or 'online'}, project {project!r}"
        where += f", WANDB_BASE_URL={redact(os.environ['WANDB_BASE_URL'])}" if os.environ.get("WANDB_BASE_URL") else ""
        expected = (
            f"W&B cannot start a run ({where}): {reason(e, settings.get('init_timeout')).rstrip('.')}. "
            "Set WANDB_API_KEY (or run wandb login), check WANDB_BASE_URL, use WANDB_MODE=offline, or remove wandb from logging.loggers"
        )
        raise ConfigError([Problem(key, expected, "wandb")], header="cannot start the run") from None
    atomic_write(id_file, lambda f: f.write(run.id + "\n"), binary=False)
    first_step = 0
    if resumed:
        try:
            offline = bool(
                getattr(run, "offline", False) or getattr(run.settings, "_offline", False)
            )  # Run.offline: wandb>=0.19
            first_step = _offline_last_step(folder, run.id, Path(run.dir).parent) + 1 if offline else int(run.step)
        except Exception as e:  # the run has started: W&B itself then refuses the steps it holds (one warning each)
            logger.warning(
                "wandb: the last step of run %s is unknown (%s): steps it already holds are refused by W&B",
                run.id,
                reason(e),
            )
        logger.info(
            "wandb: continuing run %s from iteration %d%s",
            run.id,
            ctx.trainer.state.iteration,
            f" (W&B already holds steps up to {first_step - 1}: not logged again)"
            if first_step > ctx.trainer.state.iteration + 1
            else "",
        )
    return WandBTracker(run, ctx, first_step)


@io_registry("wandb")
def wandb_logger(ctx: RunContext) -> WandBTracker:
    """Weights & Biases (rank 0): the resolved config as the run's (nested) config,
    ``train/loss`` and ``lr/group_<i>`` every ``logging.log_every`` iterations,
    ``train/samples_per_s`` per epoch, ``val/<metric>`` after every evaluation (step =
    trainer iteration), and at the end the run directory's ``config.yaml``,
    ``metrics.json`` and ``curves.png`` (those written by then) as files of the run.

    The W&B run id is kept in ``<run dir>/wandb_run_id``: a run resumed from a checkpoint
    continues that W&B run (``resume="allow"``), its steps going on from the checkpoint's
    iteration; steps W&B already holds are not logged again. Project, mode and credentials
    come from W&B's environment (module docstring). A failure during training is logged
    once and the run goes on without W&B (:class:`WandBTracker`).

    Args:
        ctx: the run; its trainer has already resumed.

    Raises:
        ConfigError: before training (exit 2): the wandb package is missing, or the W&B
            run cannot start (see :func:`start_wandb`).
    """
    return attach_standard_handlers(start_wandb(ctx, tracker_key(ctx, "wandb")), ctx)
