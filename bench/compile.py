"""``trainer.compile``: MNIST + LeNet training samples/s compiled against eager on the CPU,
and what compiling costs.

    python bench/compile.py --mnist ../shared/data                 # 3 rounds, ~4 min on 2 cores
    python bench/compile.py --mnist ../shared/data --rounds 5 --iterations 300

Each run is ``python -m igniter experiment=mnist`` (batch 128, no validation, no
checkpoint, no TensorBoard, no progress bar) for ``--epochs`` epochs of
``--iterations`` iterations, with igniter's default threads (no thread variable in the
environment: one process keeps PyTorch's default), ``trainer.compile=false``
(``eager``) or ``trainer.compile=true`` (``compiled``: ``torch.compile`` with its
defaults, the inductor backend). Variants alternate (eager, compiled, compiled, eager, ...)
over ``--rounds`` rounds, each run a fresh process.

Every compiled run gets an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a fresh
temporary directory), so its compile time is a first compile's (``cold``). With
``--warm`` a second compiled run per round (``compiled_warm``) reuses the cache the
first one left, as a user's next run on the same machine does.

From igniter's ``metrics.json``: ``samples_per_s`` (global samples / training time, the
time ``torch.compile`` spent inside the epochs left out, so it is the compiled model's
speed), ``compile_s`` (seconds in ``torch.compile`` in the process) and
``compile_train_s`` (the part inside training epochs); and the run's wall time
(process start to exit) from here. The table shows medians; ``speed-up`` is compiled
samples/s over eager's. Writes ``bench/results/compile.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

#: variant -> (trainer.compile, shares the previous compiled run's inductor cache)
VARIANTS = {"eager": ("false", False), "compiled": ("true", False), "compiled_warm": ("true", True)}


def run(variant: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """One igniter run of ``variant``: its ``metrics.json`` plus ``wall_s``."""
    compile_value, _ = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "experiment=mnist",
            f"data.root={args.mnist}",
            "data.val=null",
            f"data.loader.batch_size={args.batch}",
            f"trainer.epoch_length={args.iterations}",
            f"trainer.max_epochs={args.epochs}",
            f"trainer.compile={compile_value}",
            "checkpoint.enabled=false",
            "logging.loggers=[]",
            "logging.progress_bar=false",
            f"output_dir={tmp}/run",
        ]
        # igniter's default threads: no thread variable; CUDA hidden (a CPU benchmark)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env.update(CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_CACHE_DIR=str(cache))
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "igniter", *overrides], capture_output=True, text=True, env=env, cwd=tmp
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(Path(tmp, "run", "metrics.json").read_text())
    keep = ("samples_per_s", "train_time_s", "compile_s", "compile_train_s", "train_loss")
    return {"wall_s": wall, **{k: metrics[k] for k in keep if k in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mnist", default=str(HERE.parent.parent / "shared" / "data"), help="directory containing MNIST/raw"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200, help="iterations per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset, PyTorch's default)"
    )
    parser.add_argument(
        "--warm", action="store_true", help="also a compiled run on the inductor cache the cold one left"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compile.json")
    args = parser.parse_args()

    names = ["eager", "compiled", *(["compiled_warm"] if args.warm else [])]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache_dir:
            cache = Path(cache_dir)  # empty: the round's first compiled run compiles cold
            order = names if round_ % 2 == 0 else ["compiled", *(["compiled_warm"] if args.warm else []), "eager"]
            for v in order:
                runs[v].append(run(v, args, cache))
        print(
            f"  round {round_ + 1}/{args.rounds}: "
            + " ".join(f"{v} {runs[v][-1]['samples_per_s']:.0f}/s" for v in names),
            file=sys.stderr,
            flush=True,
        )

    def med(v: str, key: str) -> float | None:
        values = [r[key] for r in runs[v] if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {
        v: {key: med(v, key) for key in ("samples_per_s", "compile_s", "compile_train_s", "wall_s", "train_loss")}
        for v in names
    }
    for v in names:
        if v != "eager":
            summary[v]["speedup"] = summary[v]["samples_per_s"] / summary["eager"]["samples_per_s"]
            summary[v]["speedup_paired"] = statistics.median(
                c["samples_per_s"] / e["samples_per_s"] for c, e in zip(runs[v], runs["eager"])
            )
    threads = args.threads or torch.get_num_threads()
    where = f"PyTorch's default threads ({threads} here)" if not args.threads else f"{args.threads} thread(s)"
    print(
        f"\nMNIST + LeNet, batch {args.batch}, {args.epochs} x {args.iterations} iterations, CPU, {where},"
        f" medians of {args.rounds} runs (samples/s excludes compilation):"
    )
    for v in names:
        s = summary[v]
        line = f"  {v:13s} {s['samples_per_s']:8.0f} samples/s   wall {s['wall_s']:5.1f} s"
        if v != "eager":
            line += (
                f"   speed-up x{s['speedup']:.3f} (paired x{s['speedup_paired']:.3f})"
                f"   compile {s['compile_s']:.1f} s (in training {s['compile_train_s']:.1f} s)"
            )
        print(line + f"   loss {s['train_loss']:.4f}")
    record = {
        "benchmark": "compile",
        "workload": f"MNIST + lenet, batch {args.batch}, 1 process, CPU, {where}, trainer.compile=true vs false",
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "threads": threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "rounds": args.rounds, "epochs": args.epochs, "iterations": args.iterations,
        "summary": summary, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
