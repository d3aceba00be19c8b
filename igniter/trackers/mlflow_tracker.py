"""Experiment trackers of the io registry, beside :func:`igniter.trackers.tensorboard.tensorboard`: ``mlflow``.

Chosen with ``logging.loggers=[tensorboard,mlflow]`` (``pip install 'igniter[mlflow]'``).
Like every logger, the factory is called on rank 0 only, after the run has resumed
(:func:`igniter.run._observe`), and ``close()`` is called when training ends.

Where the runs go comes from MLflow's usual environment, never from the config file:
``MLFLOW_TRACKING_URI`` (unset: ``outputs/mlflow.db`` and ``outputs/mlruns/`` under the working
directory, beside Hydra's run directories; the run prints where and the ``mlflow ui`` command), ``MLFLOW_EXPERIMENT_NAME`` (default ``igniter``, created when missing) or
``MLFLOW_EXPERIMENT_ID``, and MLflow's own credential variables
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ignite.handlers.mlflow_logger import MLflowLogger
from omegaconf import OmegaConf

from igniter.atomic_files import atomic_write
from igniter.errors import ConfigError, Problem
from igniter.registry import io_registry
from igniter.trackers import base as tracker_base
from igniter.trackers.base import ARTIFACTS, GuardedTracker, attach_standard_handlers, reason, redact, tracker_key

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from igniter.context import RunContext

__all__ = [
    "ARTIFACTS",
    "GuardedTracker",
    "reason",
    "redact",
    "MLflowTracker",
    "RUN_ID_FILE",
    "flatten_params",
    "mlflow_logger",
    "default_store",
    "package_problem",
    "start_mlflow",
]

logger = logging.getLogger("igniter")

RUN_ID_FILE = "mlflow_run_id"  #: in the run directory: the MLflow run a resumed run continues
DEFAULT_EXPERIMENT = "igniter"  #: without MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID
#: Loggers whose INFO lines (a local store's table creation and migrations) stay off the console.
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")
DEFAULT_STORE_DIR = "outputs"  #: without MLFLOW_TRACKING_URI: outputs/mlflow.db and outputs/mlruns (default_store)
CHECK_TIMEOUT_S = 5  #: seconds the tracker has to answer at start-up (no retries)
#: During the run, unless set in the environment: retries and seconds per request, so that a
#: tracker gone away costs training seconds once (it is then left alone), not minutes of retries.
RUN_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH since MLflow 2.x
_TRUNCATED = "...[truncated]"


def flatten_params(tree: Any, prefix: str = "", max_length: int = _MAX_PARAM_VALUE) -> dict[str, str]:
    """``{"solver.lr": "0.001", ...}``: a resolved config as MLflow parameters.

    Mappings nest with dots; a list holding mappings nests by index (``handlers.0.name``),
    any other list is one value (``"['tensorboard', 'mlflow']"``); an empty mapping or list is
    ``"{}"``/``"[]"``. A value longer than ``max_length`` characters is cut to fit and ends
    with ``...[truncated]`` (MLflow refuses longer ones).
    """
    if isinstance(tree, Mapping) and tree:
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in tree):
        items = enumerate(tree)
    else:
        value = "{}" if isinstance(tree, Mapping) else str(list(tree) if isinstance(tree, tuple) else tree)
        if len(value) > max_length:
            value = value[: max_length - len(_TRUNCATED)] + _TRUNCATED
        return {prefix: value}
    return {
        k: v
        for key, value in items
        for k, v in flatten_params(value, f"{prefix}.{key}" if prefix else str(key), max_length).items()
    }


@contextlib.contextmanager
def _http_limits(limits: Mapping[str, str], force: bool = False) -> Iterator[None]:
    """MLflow's HTTP retry/timeout variables set to ``limits`` inside the block (MLflow reads
    them per request); a variable the user set is kept unless ``force``. urllib3's
    ``Retrying ...`` warnings are kept off the console (a failure is reported once, by the
    caller, its traceback in the rank log). Restored after."""
    saved = {k: os.environ.get(k) for k in limits}
    for key, value in limits.items():
        if force or saved[key] is None:
            os.environ[key] = value
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    pool.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool.setLevel(level)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for key in [k for k, v in saved.items() if v is None]:
            os.environ.pop(key, None)


class MLflowTracker(GuardedTracker, MLflowLogger):
    """Ignite's ``MLflowLogger`` bound to one MLflow run through an ``MlflowClient`` (no
    global active run), its handlers and calls guarded: the first failure is logged once (a
    warning naming the URI and the reason) and the tracker is then left alone; the run goes
    on (``metrics.json``, TensorBoard and the checkpoints are written as always).

    Metric names are TensorBoard's (``train/loss``, ``lr/group_0``, ``val/accuracy``);
    a step at or below the last one the run already holds for that name is skipped, so a
    run resumed from a checkpoint older than its last logged step adds no duplicates.

    Args:
        client: the ``MlflowClient`` of the tracking URI.
        run_id: the MLflow run logged to.
        uri: the tracking URI (for messages).
        last_steps: per metric name, the last step the run already holds (resumed runs).
        ctx: the run (its directory for the artifacts, its status for the run's end state).
    """

    def __init__(
        self, client: "MlflowClient", run_id: str, uri: str, last_steps: Mapping[str, int], ctx: "RunContext"
    ) -> None:
        # not MLflowLogger.__init__: it starts a run in mlflow's global (fluent) state
        self.client, self.run_id, self.uri, self.ctx = client, run_id, uri, ctx
        self.last_steps = dict(last_steps)
        self.failed = False
        self.completed = False
        self.started = time.time()

    name, label = "mlflow", "MLflow"

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` (Ignite's ``"tag name"`` keys become ``tag/name``) at ``step``;
        values that are no number are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            name = key.replace(" ", "/")
            if step is not None and step <= self.last_steps.get(name, -1):
                continue
            try:
                batch.append(Metric(name, float(value.item() if hasattr(value, "item") else value), now, step or 0))
            except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
                continue
        self.guard(
            f"logging metrics at step {step}",
            lambda: self.client.log_batch(self.run_id, metrics=batch) if batch else None,
        )

    def call_scope(self) -> Any:
        return _http_limits(RUN_LIMITS)

    def failure_detail(self, error: BaseException) -> str:
        return f"tracking URI {redact(self.uri)}: {reason(error)}"

    def run_id_for_messages(self) -> str:
        return self.run_id

    def close(self) -> None:
        """Upload ``config.yaml``, ``metrics.json`` and ``curves.png`` (those this run has
        written by now) and end the MLflow run: ``FAILED`` (an exception on its way, or a
        diverged loss), ``KILLED`` (stopped before the end: Ctrl-C, preemption) or ``FINISHED``."""
        for name in ARTIFACTS:
            path = Path(self.ctx.output_dir) / name  # a resumed run's directory may hold older ones
            if path.is_file() and (name == "config.yaml" or path.stat().st_mtime >= self.started):
                self.guard(f"uploading {name}", lambda p=path: self.client.log_artifact(self.run_id, str(p)))
        self.guard("ending the run", lambda: self.client.set_terminated(self.run_id, self.end_status()))


def package_problem(key: str = "logging.loggers", import_it: bool = True) -> Problem | None:
    """:func:`igniter.trackers.base.package_problem` of the mlflow package."""
    return tracker_base.package_problem("mlflow", key, import_it)


def default_store(outputs: str | Path = DEFAULT_STORE_DIR) -> tuple[str, str]:
    """Where runs go when ``MLFLOW_TRACKING_URI`` is unset: ``(tracking URI, artifact
    location)`` = ``sqlite:///<cwd>/outputs/mlflow.db`` and ``<cwd>/outputs/mlruns``, beside
    the run directories Hydra makes by default (MLflow's own default is ``mlflow.db`` and
    ``mlruns/`` in whatever directory the command ran). Creates ``outputs/``.

    Raises:
        OSError: the directory cannot be created.
    """
    root = Path(outputs).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlruns").as_uri()


def _experiment_id(client: "MlflowClient", artifact_location: str | None = None) -> str:
    """The experiment from ``MLFLOW_EXPERIMENT_ID``/``MLFLOW_EXPERIMENT_NAME`` (default
    ``igniter``, created when missing, its artifacts at ``artifact_location`` when given:
    :func:`default_store`). The first request to the tracker."""
    from mlflow.exceptions import MlflowException

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment = client.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"])
    else:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another job created it first
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"experiment {experiment.name!r} is deleted: restore it or set MLFLOW_EXPERIMENT_NAME")
    return experiment.experiment_id


def _open_run(
    ctx: RunContext, client: "MlflowClient", experiment_id: str
) -> tuple[str, dict[str, int], dict[str, str]]:
    """The MLflow run to log to: the one in ``<run dir>/mlflow_run_id`` when training resumed
    from a checkpoint (``trainer.state.iteration > 0``) and the tracker still has it, else a
    new one (an old one left ``RUNNING`` is set ``KILLED``). Returns ``(run id, last step per
    metric, the run's parameters)``."""
    from mlflow.exceptions import MlflowException

    id_file = Path(ctx.output_dir) / RUN_ID_FILE
    old_id = id_file.read_text().strip() if id_file.is_file() else ""
    if old_id:
        try:
            old = client.get_run(old_id)
        except MlflowException as e:
            old = None
            logger.warning(
                "mlflow: run %s (%s) is not at %s (%s): starting a new MLflow run",
                old_id,
                id_file,
                redact(client.tracking_uri),
                reason(e),
            )
        if old is not None and old.info.lifecycle_stage != "deleted":
            if ctx.trainer.state.iteration > 0:  # resumed: the same MLflow run, from the checkpoint's step
                client.update_run(old_id, status="RUNNING")
                last = {
                    k: max((m.step for m in client.get_metric_history(old_id, k)), default=-1) for k in old.data.metrics
                }
                logger.info("mlflow: continuing run %s from iteration %d", old_id, ctx.trainer.state.iteration)
                return old_id, last, dict(old.data.params)
            if old.info.status == "RUNNING":  # training starts over: the old run ended where it was killed
                client.set_terminated(old_id, "KILLED")
    tags = {"igniter.output_dir": str(Path(ctx.output_dir).resolve())}
    run = client.create_run(experiment_id, run_name=Path(ctx.output_dir).name, tags=tags)
    atomic_write(id_file, lambda f: f.write(run.info.run_id + "\n"), binary=False)
    return run.info.run_id, {}, {}


def _log_params(tracker: MLflowTracker, existing: Mapping[str, str]) -> None:
    """The resolved config as parameters; on a resumed run only the new keys (MLflow keeps
    a parameter's first value: those changed since are listed in one INFO line). A key
    MLflow refuses (characters, length) is left out and named in an INFO line."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, validate_param_and_metric_name

    params = flatten_params(OmegaConf.to_container(tracker.ctx.cfg, resolve=True), max_length=MAX_PARAM_VAL_LENGTH)
    refused = [k for k in params if not (k and len(k) <= MAX_ENTITY_KEY_LENGTH and validate_param_and_metric_name(k))]
    if refused:  # a free-form key (``model.params``...) MLflow does not take: that one is left out
        logger.info("mlflow: parameters left out (names MLflow refuses): %s", ", ".join(refused))
        params = {k: v for k, v in params.items() if k not in refused}
    changed = [f"{k} ({existing[k]} -> {v})" for k, v in params.items() if k in existing and existing[k] != v]
    if changed:
        logger.info("mlflow: parameters keep the first run's values; changed since: %s", ", ".join(changed))
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    if new:
        tracker.guard("logging the parameters", lambda: tracker.client.log_batch(tracker.run_id, params=new))


def start_mlflow(ctx: RunContext, key: str = "logging.loggers") -> MLflowTracker:
    """Connect to the tracker, open the MLflow run (new or continued) and log the parameters.

    Raises:
        ConfigError: ``key`` named with the reason, under "cannot start the run" (exit 2,
            nothing left behind): the mlflow package is missing, or the tracker cannot be
            reached or refuses the experiment/run (one request of at most
            :data:`CHECK_TIMEOUT_S` seconds, no retries, decides reachability).
    """
    problem = package_problem(key)
    if problem is not None:
        raise ConfigError([problem], header="cannot start the run")
    import mlflow
    from mlflow.tracking import MlflowClient

    for name in _QUIET_LOGGERS:  # "Creating initial MLflow database tables...": a local store's set-up, not news
        logging.getLogger(name).setLevel(logging.WARNING)
    uri, artifacts = default_store() if not os.environ.get("MLFLOW_TRACKING_URI") else (mlflow.get_tracking_uri(), None)
    client = MlflowClient(uri)
    try:
        with _http_limits(
            {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}, force=True
        ):
            experiment_id = _experiment_id(client, artifacts)
        with _http_limits(RUN_LIMITS):
            run_id, last_steps, params = _open_run(ctx, client, experiment_id)
    except Exception as e:
        logger.info("mlflow start-up failure:", exc_info=e, extra={"console": False})
        expected = (
            f"the MLflow tracker at {redact(uri)} (MLFLOW_TRACKING_URI) cannot be used: {reason(e, CHECK_TIMEOUT_S)}. "
            "Start the server or point MLFLOW_TRACKING_URI at one, or remove mlflow from logging.loggers"
        )
        raise ConfigError([Problem(key, expected, "mlflow")], header="cannot start the run") from None
    tracker = MLflowTracker(client, run_id, uri, last_steps, ctx)
    _log_params(tracker, params)
    if artifacts is not None:
        logger.info(
            "mlflow: runs are stored in %s (MLFLOW_TRACKING_URI is unset); see them with: mlflow ui --backend-store-uri %s",
            uri.removeprefix("sqlite:///"),
            uri,
        )
    return tracker


@io_registry("mlflow")
def mlflow_logger(ctx: RunContext) -> MLflowTracker:
    """MLflow tracking (rank 0): the resolved config as parameters (dotted keys such as
    ``solver.lr``, long values truncated), ``train/loss`` and ``lr/group_<i>`` every
    ``logging.log_every`` iterations, ``train/samples_per_s`` per epoch, ``val/<metric>``
    after every evaluation (step = trainer iteration), and at the end the run directory's
    ``config.yaml``, ``metrics.json`` and ``curves.png`` (those written by then) as artifacts.

    The MLflow run id is kept in ``<run dir>/mlflow_run_id``: a run resumed from a
    checkpoint continues that MLflow run, its steps going on from the checkpoint's
    iteration (steps the tracker already holds are not logged twice). The tracking URI and
    experiment come from the environment (module docstring). A failure of the tracker
    during training is logged once and the run goes on without it (:class:`MLflowTracker`).

    Args:
        ctx: the run; its trainer has already resumed.

    Raises:
        ConfigError: before training (exit 2): the mlflow package is missing, or the
            tracker cannot be reached (see :func:`start_mlflow`).
    """
    return attach_standard_handlers(start_mlflow(ctx, tracker_key(ctx, "mlflow")), ctx)
