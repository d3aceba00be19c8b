"""Scaling of igniter's launch modes on MNIST + LeNet: samples/s for 1 process vs 2
processes (spawn and torchrun), one thread per process, over per-process batch sizes.

    python bench/scaling.py --mnist ../shared/data            # full table, ~10 min on 2 cores
    python bench/scaling.py --mnist ../shared/data --batches 64 128 --rounds 3

For each per-process batch ``b`` the 1-process run uses global batch ``b`` and the
2-process runs global batch ``2b`` (same work per process per step). Throughput is
igniter's own training samples/s (``metrics.json``: global samples / epoch time,
no start-up, no evaluation). Variants alternate (1, spawn, torchrun, 1, ...) over
``--rounds`` rounds; the table shows medians and the scaling efficiency
``T1 / (2 * T2)`` in time per sample, i.e. ``S2 / (2 * S1)`` in samples/s.
Writes ``bench/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: str, per_process_batch: int, iterations: int, mnist: str, extra: list[str] = ()) -> float:
    nproc = 1 if variant == "single" else 2
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "experiment=mnist",
            f"data.root={mnist}",
            "data.val=null",
            f"data.loader.batch_size={per_process_batch * nproc}",
            f"trainer.epoch_length={iterations}",
            "trainer.max_epochs=1",
            "checkpoint.enabled=false",
            "logging.loggers=[]",
            "logging.progress_bar=false",
            f"output_dir={tmp}/run",
            *extra,
        ]
        if variant == "single":
            cmd = [sys.executable, "-m", "igniter", *args]
        elif variant == "spawn":
            cmd = [sys.executable, "-m", "igniter", *args, "runner=spawn", "runner.nproc_per_node=2"]
        else:
            torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
            cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "igniter", *args, "runner=torchrun"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        return float(json.loads(Path(tmp, "run", "metrics.json").read_text())["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data"), help="directory containing MNIST/raw")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="per-process batch sizes")
    parser.add_argument("--iterations", type=int, default=60, help="training iterations per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["single", "spawn", "torchrun"])
    parser.add_argument("--extra", nargs="*", default=[], help="more igniter overrides, e.g. runner.bucket_cap_mb=0.02")
    args = parser.parse_args()

    rows = []
    for b in args.batches:
        samples: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.rounds):
            for v in args.variants:  # alternate: A B C A B C ...
                samples[v].append(run(v, b, args.iterations, args.mnist, args.extra))
        med = {v: statistics.median(s) for v, s in samples.items()}
        row = {"per_process_batch": b, "samples_per_s": med, "all": samples}
        for v in args.variants:
            if v != "single" and "single" in med:
                row[f"efficiency_{v}"] = med[v] / (2 * med["single"])
                row[f"speedup_{v}"] = med[v] / med["single"]
        rows.append(row)
        cells = " ".join(f"{v}={med[v]:8.0f}" for v in args.variants)
        eff = " ".join(f"{k}={row[k]:.2f}" for k in row if k.startswith(("speedup", "efficiency")))
        print(f"batch/process {b:4d} | samples/s {cells} | {eff}", flush=True)

    result = {
        "benchmark": "scaling",
        "workload": "MNIST + lenet, threads=1 per process, gloo",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "iterations": args.iterations,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = HERE / "results" / "scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
