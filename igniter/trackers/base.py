"""What the experiment trackers (:mod:`igniter.trackers.mlflow_tracker`: MLflow, :mod:`igniter.trackers.wandb_tracker`:
W&B) share: failures that disable a tracker once and never the run, how a run's end maps to a
tracker's run status, and short, password-free reasons in messages."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
import sys
from typing import Any, Callable

from igniter.errors import Problem

__all__ = [
    "ARTIFACTS",
    "GuardedTracker",
    "attach_standard_handlers",
    "package_problem",
    "reason",
    "redact",
    "tracker_key",
]

logger = logging.getLogger("igniter")

ARTIFACTS = ("config.yaml", "metrics.json", "curves.png")  #: uploaded by close(), those this run wrote


def redact(uri: str) -> str:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user:***@host``)."""
    return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1:***@", uri)


def reason(error: BaseException, timeout_s: float | None = None) -> str:
    """A short reason for a failed request: the OS error (``Connection refused``), a timeout, or the message."""
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno -?\d+\] ([^\"')(]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
        return f"no answer within {timeout_s} s" if timeout_s else "the request timed out"
    return (text[:300] + "...") if len(text) > 300 else text or type(error).__name__


class GuardedTracker:
    """What the trackers share (mixed into an Ignite ``BaseLogger`` subclass): every handler
    attached and every call made through :meth:`guard` is guarded: the first failure is logged
    once (a warning, the traceback in ``rank0.log``) and the tracker is then left alone; the
    run goes on. Subclasses set ``name``, ``label``, ``ctx``, ``failed``, ``completed``, ``started`` and say
    what failed in :meth:`failure_detail` and :meth:`run_id_for_messages`."""

    name = "tracker"  # in messages' prefix
    label = "the tracker"  # "the run goes on without <label>"
    ctx: Any
    failed: bool
    completed: bool

    def attach(self, engine: Any, log_handler: Callable, event_name: Any, *args: Any, **kwargs: Any) -> Any:
        """Ignite's ``attach``, the handler guarded: whatever it raises disables the tracker, never the run."""

        def guarded(engine: Any, tracker: Any, event: Any, *more: Any, **kw: Any) -> None:
            self.guard(
                f"logging at {getattr(event, 'name', event)}", lambda: log_handler(engine, tracker, event, *more, **kw)
            )

        return super().attach(engine, guarded, event_name, *args, **kwargs)  # type: ignore[misc]

    def call_scope(self) -> Any:
        """The context every guarded call runs in (e.g. shorter HTTP retries)."""
        return contextlib.nullcontext()

    def failure_detail(self, error: BaseException) -> str:
        """Why a call failed, for the warning (e.g. the URI and :func:`reason`)."""
        return reason(error)

    def run_id_for_messages(self) -> str:
        """The tracker's run id, for the warning."""
        return "?"

    def guard(self, what: str, call: Callable[[], Any]) -> None:
        """``call()`` unless the tracker failed before; an exception is logged once and disables it."""
        if self.failed:
            return
        try:
            with self.call_scope():
                call()
        except Exception as e:  # any failure of the tracker: the training goes on
            self.failed = True
            logger.warning(
                "%s: %s failed (%s); the run goes on without %s, whose run %s stops here; "
                "metrics.json, TensorBoard and the checkpoints in %s are complete",
                self.name,
                what,
                self.failure_detail(e),
                self.label,
                self.run_id_for_messages(),
                self.ctx.output_dir,
            )
            logger.info("%s failure:", self.name, exc_info=e, extra={"console": False})

    def end_status(self) -> str:
        """How training ended, in MLflow's run statuses: FAILED (an exception on its way, a
        diverged loss), KILLED (stopped before the end), FINISHED."""
        status, state = self.ctx.status, self.ctx.trainer.state
        if sys.exc_info()[1] is not None or status.diverged:
            return "FAILED"
        done = self.completed or bool(
            state.epoch_length and state.iteration >= state.epoch_length * self.ctx.cfg.trainer.max_epochs
        )
        return "KILLED" if status.stopped_by is not None or not done else "FINISHED"


def package_problem(package: str, key: str = "logging.loggers", import_it: bool = True) -> Problem | None:
    """The :class:`Problem` with the tracker's ``package`` (the extra of the same name) under
    ``key``: not installed, or (when ``import_it``) its import fails; ``None`` when it is usable.
    ``import_it=False`` only looks it up (``find_spec``, milliseconds): for a check before
    anything is built."""
    try:
        if importlib.util.find_spec(package) is not None:
            if import_it:
                importlib.import_module(package)
            return None
        why = f"the {package} package is not installed"
    except Exception as e:  # a broken install: its import fails (ImportError, or anything else)
        why = f"the {package} package cannot be imported ({type(e).__name__}: {e})"
    return Problem(key, f"{why}: pip install 'igniter[{package}]' (or remove {package} from logging.loggers)", package)


def tracker_key(ctx: Any, name: str) -> str:
    """``logging.loggers[i]``: where ``name`` is listed (the key its start-up errors name)."""
    loggers = list(ctx.cfg.logging.loggers)
    return f"logging.loggers[{loggers.index(name)}]" if name in loggers else "logging.loggers"


def throughput_attributes(ctx: Any) -> list[str]:
    """The trainer-state figures a tracker logs per epoch (:func:`igniter.handlers.attach_throughput`):
    ``samples_per_s``; ``tokens_per_s`` when the training set is tokens (``token_shards``);
    ``model_tflops_per_s`` when FLOPs are counted (not under ``trainer.compile``) and ``mfu`` when a
    peak is known too (:func:`igniter.flops.run_peak`); rank 0's ``data_wait_fraction`` and
    ``peak_memory_bytes``."""
    from igniter.compile import compile_options
    from igniter.flops import run_peak
    from igniter.token_shards import tokens_per_sample

    counted = compile_options(ctx.cfg.trainer.compile) is None
    peak = run_peak(str(ctx.cfg.trainer.precision), ctx.device, ctx.cfg.logging.peak_tflops)
    return [
        "samples_per_s",
        *(["tokens_per_s"] if tokens_per_sample(ctx.train_set) else []),
        *(["model_tflops_per_s"] if counted else []),
        *(["mfu"] if counted and peak.tflops else []),
        "data_wait_fraction",
        "peak_memory_bytes",
    ]


def attach_standard_handlers(tracker: Any, ctx: Any) -> Any:
    """Attach to ``tracker`` (an Ignite logger) what every tracker logs, with TensorBoard's names:
    ``train/loss`` and ``lr/group_<i>`` every ``logging.log_every`` iterations,
    ``train/samples_per_s`` (and the other figures of :func:`throughput_attributes`) per epoch, ``val/<metric>`` after every evaluation (step = trainer
    iteration); ``tracker.completed`` is set when training reaches its end. Returns ``tracker``."""
    from ignite.engine import Events
    from ignite.handlers import global_step_from_engine

    from igniter.events import PeriodicEvents

    trainer, every = ctx.trainer, PeriodicEvents.LOG  # every logging.log_every iterations
    tracker.attach_output_handler(trainer, event_name=every, tag="train", output_transform=lambda out: out)
    tracker.attach_opt_params_handler(trainer, event_name=every, optimizer=ctx.optimizer, param_name="lr")
    at_iteration = global_step_from_engine(trainer, Events.ITERATION_COMPLETED)
    tracker.attach_output_handler(
        trainer,
        event_name=Events.EPOCH_COMPLETED,
        tag="train",
        state_attributes=throughput_attributes(ctx),
        global_step_transform=at_iteration,
    )
    if ctx.evaluator is not None:
        tracker.attach_output_handler(
            ctx.evaluator,
            event_name=Events.COMPLETED,
            tag="val",
            metric_names="all",
            global_step_transform=at_iteration,
        )
    trainer.add_event_handler(Events.COMPLETED, lambda _: setattr(tracker, "completed", True))
    return tracker
