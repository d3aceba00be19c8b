"""``logging.torch_profiler``: ``torch.profiler`` on the trainer, traces in ``<run dir>/profiler``.

Off by default (``null``): then nothing here runs and no handler is attached. When set (``true``
or a mapping of the keys of :class:`igniter.config.TorchProfilerConfig`, :func:`profiler_options`),
every rank listed in ``ranks`` profiles with
``torch.profiler.schedule(wait, warmup, active, repeat)`` counted in training iterations: the
profiler is started before the first iteration, stepped once per iteration (an Ignite
``ITERATION_COMPLETED`` handler) and stopped when training ends (:meth:`TorchProfiler.close`,
also when the run fails). Each cycle's trace is written by
``torch.profiler.tensorboard_trace_handler`` as ``rank<N>.<time>.pt.trace.json``: Chrome trace
JSON (``traceEvents``) that TensorBoard's profiler plugin (``tensorboard --logdir <run dir>/profiler``,
``pip install torch-tb-profiler``) and Perfetto (ui.perfetto.dev) open. CPU activity always, CUDA
kernels too on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite.engine import Events

from igniter.config import TorchProfilerConfig
from igniter.errors import Problem

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = [
    "PROFILER_DIR",
    "PROFILER_KEYS",
    "profiler_options",
    "profiler_problems",
    "TorchProfiler",
    "attach_torch_profiler",
]

logger = logging.getLogger("igniter")

#: The traces' directory inside the run directory.
PROFILER_DIR = "profiler"


#: The keys ``logging.torch_profiler`` takes.
PROFILER_KEYS = tuple(f.name for f in fields(TorchProfilerConfig))


def _plain(value: Any) -> Any:
    """An OmegaConf container as Python lists and dicts."""
    if hasattr(value, "keys"):
        return {k: _plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def profiler_options(value: Any) -> TorchProfilerConfig | None:
    """``logging.torch_profiler`` -> its settings, or ``None`` when it is off (``null``/``false``);
    ``true`` and missing (or ``null``) keys take :class:`TorchProfilerConfig`'s defaults. The value
    is assumed checked (:func:`profiler_problems`)."""
    if value is None or value is False:
        return None
    if value is True:
        return TorchProfilerConfig()
    given = {k: v for k, v in _plain(value).items() if v is not None}
    return TorchProfilerConfig(**given)


def profiler_problems(value: Any, world_size: int) -> list[Problem]:
    """Problems with ``logging.torch_profiler``: its type, unknown keys, ``wait``/``warmup``/``repeat``
    not integers >= 0, ``active`` not an integer >= 1, ``ranks`` not a non-empty list of ranks of a
    run of ``world_size`` processes."""
    key = "logging.torch_profiler"
    if value is None or isinstance(value, bool):
        return []
    if not (isinstance(value, Mapping) or hasattr(value, "keys")):
        return [Problem(key, f"expected null (off), true or a mapping of {', '.join(PROFILER_KEYS)}", value)]
    given = _plain(value)
    problems = [
        Problem(f"{key}.{k}", f"not a key of the profiler (accepted: {', '.join(PROFILER_KEYS)})", v)
        for k, v in given.items()
        if k not in PROFILER_KEYS
    ]

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for k, least in (("wait", 0), ("warmup", 0), ("active", 1), ("repeat", 0)):
        v = given.get(k)
        if v is not None and not (integer(v) and v >= least):
            problems.append(Problem(f"{key}.{k}", f"expected an integer >= {least} (iterations)", v))
    ranks = given.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list) or not ranks:
            problems.append(Problem(f"{key}.ranks", "expected a non-empty list of ranks, e.g. [0]", ranks))
        else:
            problems += [
                Problem(f"{key}.ranks[{i}]", f"expected a rank of this run, 0 to {world_size - 1}", r)
                for i, r in enumerate(ranks)
                if not (integer(r) and 0 <= r < world_size)
            ]
    return problems


class TorchProfiler:
    """A started ``torch.profiler.profile`` with :meth:`step` (once per iteration) and :meth:`close`.

    Args:
        directory: where the traces are written (created by the trace handler).
        rank: this process's rank (the traces' file-name prefix ``rank<N>``).
        wait, warmup, active, repeat: ``torch.profiler.schedule``'s arguments (iterations; ``repeat`` 0: no end).
        cuda: record CUDA kernels too.
    """

    def __init__(
        self, directory: Path, rank: int, wait: int, warmup: int, active: int, repeat: int, cuda: bool
    ) -> None:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
        self.directory = Path(directory)
        self.profiler = tp.profile(
            activities=activities,
            schedule=tp.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
            on_trace_ready=tp.tensorboard_trace_handler(str(self.directory), worker_name=f"rank{rank}"),
        )
        self.profiler.start()
        self.running = True

    def step(self, *_: Any) -> None:
        """One training iteration done (an Ignite handler)."""
        if self.running:
            self.profiler.step()

    def close(self) -> None:
        """Stop profiling (a cycle still recording writes its trace); idempotent."""
        if self.running:
            self.running = False
            self.profiler.stop()


def attach_torch_profiler(ctx: RunContext) -> TorchProfiler | None:
    """A :class:`TorchProfiler` stepped every training iteration of ``ctx.trainer``, writing to
    ``<run dir>/profiler``, on the ranks ``logging.torch_profiler.ranks`` lists; ``None`` (nothing
    attached) elsewhere. The caller closes it when training ends."""
    p = profiler_options(ctx.cfg.logging.torch_profiler)
    if p is None or ctx.rank not in p.ranks:
        return None
    profiler = TorchProfiler(
        ctx.output_dir / PROFILER_DIR, ctx.rank, p.wait, p.warmup, p.active, p.repeat, ctx.device.type == "cuda"
    )
    ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, profiler.step)
    ctx.trainer.add_event_handler(Events.COMPLETED, lambda _: profiler.close())
    if ctx.rank == 0:
        logger.info(
            "torch profiler on ranks %s: wait %d, warmup %d, active %d, repeat %d; traces in %s",
            list(p.ranks), p.wait, p.warmup, p.active, p.repeat, ctx.output_dir / PROFILER_DIR,
        )  # fmt: skip
    return profiler
