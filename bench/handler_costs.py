"""Where the default run's time goes: the cost of each standard handler alone.

    python bench/handler_costs.py --rounds 40

Builds one trainer per variant on the digits MLP workload (batch 32, 44 iterations
per epoch, ``torch.set_num_threads(1)``): a bare trainer, and one trainer each with
only the progress bar (forced on), TensorBoard (scalars on the ``LOG`` event every
50 iterations), the NaN guard, or the per-epoch checkpoint attached (its background
write is waited for inside the timed epoch: an upper bound of its cost). The variants
then run one epoch each, alternated (bare, bar, tb, ... bare, bar, ...) for
``--rounds`` rounds; the table shows the median over rounds of (variant epoch time /
bare epoch time of the same round). Short alternations pair each variant with a bare
epoch measured a fraction of a second apart, which is what makes a few per cent
visible on a noisy VM. Writes ``bench/results/handler_costs.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from overhead import config  # noqa: E402

from igniter.events import fire_log_events  # noqa: E402
from igniter.handlers import attach_checkpoints, attach_nan_guard, attach_progress, flush_checkpoints  # noqa: E402
from igniter.io import tensorboard  # noqa: E402
from igniter.run import RunContext, build_run  # noqa: E402


def _tensorboard(ctx: RunContext) -> None:
    fire_log_events(ctx.trainer, ctx.cfg.logging.log_every)
    tensorboard(ctx)


VARIANTS: dict[str, Callable[[RunContext], Any]] = {
    "bare": lambda ctx: None,
    "progress bar": attach_progress,
    "tensorboard": _tensorboard,
    "nan guard": lambda ctx: attach_nan_guard(ctx.trainer),
    "checkpoint every epoch": attach_checkpoints,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    contexts = {}
    checkpointers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, attach) in enumerate(VARIANTS.items()):
            cfg = config("digits", 1, "", str(Path(tmp) / str(i)), ["logging.progress_bar=true"])
            ctx = build_run(cfg, Path(cfg.output_dir))
            attached = attach(ctx)
            if isinstance(attached, dict) and "checkpointer" in attached:
                checkpointers[name] = attached["checkpointer"]
            contexts[name] = ctx
        seconds: dict[str, list[float]] = {name: [] for name in contexts}
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            for epoch in range(1, args.rounds + 1):
                for name, ctx in contexts.items():
                    start = time.perf_counter()
                    ctx.trainer.run(ctx.train_loader, max_epochs=epoch)  # one more epoch
                    # the checkpoint's background write would slow the next variant's epoch:
                    # wait for it here, so its whole cost is charged to the checkpoint (an upper bound)
                    if name in checkpointers:
                        flush_checkpoints(checkpointers[name])
                    seconds[name].append(time.perf_counter() - start)
    bare = seconds["bare"]
    rows = {}
    print(f"digits MLP b32, one epoch (44 iterations) per run, median of {args.rounds} paired rounds:")
    for name, t in seconds.items():
        ratio = statistics.median(x / b for x, b in zip(t, bare))
        rows[name] = {"us_per_iter": statistics.median(t) / 44 * 1e6, "ratio_to_bare": ratio, "all_s": t}
        print(f"  {name:24s} {rows[name]['us_per_iter']:7.0f} us/it  x{ratio:.3f}")
    out = HERE / "results" / "handler_costs.json"
    out.write_text(json.dumps({"benchmark": "handler_costs", "torch": torch.__version__, "cpus": os.cpu_count(), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
