"""Scaling of igniter's launch modes on MNIST + LeNet: samples/s for 1 process vs 2
processes (spawn and torchrun), over per-process batch sizes, with igniter's default
threads and with one thread per process.

    python bench/scaling.py --mnist ../shared/data            # full table, ~17 min on 2 cores
    python bench/scaling.py --mnist ../shared/data --batches 64 128 --rounds 3
    python bench/scaling.py --mnist ../shared/data --accumulation   # k=4 with and without no_sync, ~3 min

Threads: ``single``, ``spawn`` and ``torchrun`` pin one thread per process
(``OMP_NUM_THREADS=1``, as in the earlier tables); ``single-default``,
``spawn-default`` and ``torchrun-default`` run what a user gets: no thread variable in
the environment, igniter's rule (usable cores / processes on the node, see
``igniter/launch/cpu_threads.py``; one process keeps PyTorch's default). Each ``-default``
variant's speed-up is over ``single-default``.

For each per-process batch ``b`` the 1-process run uses global batch ``b`` and the
2-process runs global batch ``2b`` (same work per process per step). Throughput is
igniter's own training samples/s (``metrics.json``: global samples / epoch time,
no start-up, no evaluation). Variants alternate (1, spawn, torchrun, 1, ...) over
``--rounds`` rounds; the table shows medians and the scaling efficiency
``T1 / (2 * T2)`` in time per sample, i.e. ``S2 / (2 * S1)`` in samples/s.

The machine's own ceiling, with no igniter and no communication at all: ``alone``
is a hand-written loop (same model, data, batch, one thread) in one process, and
``pair`` is two such processes started together (they sleep until a common start
time, then train): their summed samples/s over ``alone`` is the best speed-up any
2-process run can reach here (cores shared with the other process's memory traffic,
turbo and the hypervisor). ``ddp`` is the same two processes as a hand-written
``DistributedDataParallel`` job (gloo, ``DistributedSampler``): what PyTorch itself
reaches once the processes all-reduce and wait for each other every step.
Writes ``bench/results/scaling.json`` (``--output``).

``--accumulation``: 2 processes (spawn, one thread each) with
``trainer.accumulate_grad_batches=4`` (``--accumulate``), ``nosync``: igniter's default
step, which runs the first k-1 micro-batches under DDP's ``no_sync()``
(``igniter.parallel.strategy.gradient_sync``), against ``sync``: a step registered
here (``bench_accumulate_always_sync``, the same micro-batches, ``loss / k``, one
optimizer step) that all-reduces after every micro-batch's backward. Both runs attach
``bench_count_allreduce`` from ``handlers``: its factory registers a DDP communication
hook (``default_hooks.allreduce_hook`` behind a counter) on ``ctx.model`` before the
first forward, and at ``COMPLETED`` every rank writes how many buckets it all-reduced;
the table shows igniter's samples/s and all-reduces per optimizer step (bucket
all-reduces / iterations; expected ``nosync`` 1 and ``sync`` k with LeNet's one bucket).
This module is importable by igniter's processes (``imports=[scaling]``, the bench
directory on ``PYTHONPATH``) for those two registrations.
Writes ``bench/results/scaling_accumulation.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from igniter.precision import micro_batches  # noqa: E402
from igniter.registry import event_handler_registry, function_registry  # noqa: E402


@function_registry("bench_accumulate_always_sync")
def accumulate_always_sync(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Any,
    device: torch.device,
    accumulate_grad_batches: int,
) -> Any:
    """igniter's accumulation without ``no_sync``: ``k`` micro-batches, backward of ``loss / k``
    on each (DDP all-reduces the gradients after every one), one optimizer step."""
    k = accumulate_grad_batches

    def step(engine: Any, batch: Any) -> dict[str, torch.Tensor]:
        if not model.training:
            model.train()
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in micro_batches(batch, k):
            x, y = micro[0].to(device, non_blocking=True), micro[1].to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            (loss / k).backward()
            total += loss.detach().float() / k
        optimizer.step()
        return {"loss": total}

    return step


@event_handler_registry("bench_count_allreduce")
def count_allreduce(ctx: Any) -> Any:
    """Registers a counting DDP communication hook on ``ctx.model`` now (before the first
    forward); the returned ``COMPLETED`` handler writes ``allreduce_rank<r>.json`` in the run
    directory: bucket all-reduces, iterations, and the buckets seen."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model = ctx.model
    if not isinstance(model, DistributedDataParallel):
        raise RuntimeError(f"bench_count_allreduce needs a DDP model (2 processes), got {type(model).__name__}")
    counts = {"allreduces": 0, "buckets": set()}

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations other than its own (strings here)
        state["allreduces"] += 1
        state["buckets"].add(bucket.index())
        return allreduce_hook(None, bucket)  # None: the default process group, as DDP's own all-reduce

    model.register_comm_hook(counts, hook)

    def write(engine: Any) -> None:
        record = {
            "allreduces": counts["allreduces"],
            "iterations": engine.state.iteration,
            "buckets": len(counts["buckets"]),
        }
        Path(ctx.output_dir, f"allreduce_rank{ctx.rank}.json").write_text(json.dumps(record))

    return write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: igniter variants: name -> (launch mode, one thread per process pinned?)
IGNITER_VARIANTS = {
    "single": ("single", True),
    "spawn": ("spawn", True),
    "torchrun": ("torchrun", True),
    "single-default": ("single", False),
    "spawn-default": ("spawn", False),
    "torchrun-default": ("torchrun", False),
}
MACHINE_VARIANTS = ("alone", "pair", "ddp")


def run(variant: str, per_process_batch: int, iterations: int, mnist: str, extra: list[str] = ()) -> float:
    """igniter's training samples/s for ``variant`` (:data:`IGNITER_VARIANTS`)."""
    return float(run_dir(variant, per_process_batch, iterations, mnist, extra)["samples_per_s"])


def run_dir(variant: str, per_process_batch: int, iterations: int, mnist: str, extra: list[str] = ()) -> dict[str, Any]:
    """igniter's ``metrics.json`` for ``variant``, with ``allreduce_rank<r>`` entries when
    the run wrote those files (``bench_count_allreduce``)."""
    mode, pinned = IGNITER_VARIANTS[variant]
    nproc = 1 if mode == "single" else 2
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
        if mode == "single":
            cmd = [sys.executable, "-m", "igniter", *args]
        elif mode == "spawn":
            cmd = [sys.executable, "-m", "igniter", *args, "runner=spawn", "runner.nproc_per_node=2"]
        else:
            torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
            cmd = [
                torchrun,
                "--nproc-per-node",
                "2",
                "--master-port",
                str(free_port()),
                "-m",
                "igniter",
                *args,
                "runner=torchrun",
            ]
        # pinned: one thread per process; default: no thread setting at all (igniter's rule)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if pinned:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])  # imports=[scaling]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(Path(tmp, "run", "metrics.json").read_text())
        for counts in sorted(Path(tmp, "run").glob("allreduce_rank*.json")):
            metrics[counts.stem] = json.loads(counts.read_text())
        return metrics


#: ``--accumulation`` variants: name -> igniter overrides (on top of spawn, one thread per process)
ACCUMULATION_VARIANTS = {"nosync": [], "sync": ["trainer.step=bench_accumulate_always_sync"]}


def accumulation(args: argparse.Namespace) -> None:
    """2 processes, ``trainer.accumulate_grad_batches=args.accumulate``, with and without
    ``no_sync``: samples/s and all-reduces per optimizer step (see the module docstring)."""
    k = args.accumulate
    common = [
        f"trainer.accumulate_grad_batches={k}",
        "imports=[scaling]",
        "handlers=[{name: bench_count_allreduce, event: COMPLETED}]",
        *args.extra,
    ]
    rows = []
    for b in args.batches:
        samples: dict[str, list[float]] = {v: [] for v in ACCUMULATION_VARIANTS}
        per_step: dict[str, list[float]] = {v: [] for v in ACCUMULATION_VARIANTS}
        buckets: dict[str, int] = {}
        for round_ in range(args.rounds):
            order = list(ACCUMULATION_VARIANTS) if round_ % 2 == 0 else list(ACCUMULATION_VARIANTS)[::-1]
            for v in order:
                m = run_dir("spawn", b, args.iterations, args.mnist, [*common, *ACCUMULATION_VARIANTS[v]])
                samples[v].append(float(m["samples_per_s"]))
                ranks = [m[key] for key in sorted(m) if key.startswith("allreduce_rank")]
                if len(ranks) != 2:
                    raise SystemExit(f"{v}: expected 2 ranks' all-reduce counts, got {len(ranks)}")
                per_step[v] += [r["allreduces"] / r["iterations"] for r in ranks]
                buckets[v] = max(r["buckets"] for r in ranks)
        med = {v: statistics.median(x) for v, x in samples.items()}
        row = {
            "per_process_batch": b, "micro_batch": b // k, "accumulate_grad_batches": k,
            "samples_per_s": med, "allreduces_per_step": {v: statistics.median(x) for v, x in per_step.items()},
            "buckets": buckets, "speedup_nosync": med["nosync"] / med["sync"], "all": samples,
        }  # fmt: skip
        rows.append(row)
        print(
            f"batch/process {b:4d} (micro-batch {b // k:3d}, k={k}) | samples/s "
            + " ".join(f"{v}={med[v]:7.0f}" for v in ACCUMULATION_VARIANTS)
            + f" | nosync/sync x{row['speedup_nosync']:.3f} | all-reduces/step "
            + " ".join(f"{v}={row['allreduces_per_step'][v]:g}" for v in ACCUMULATION_VARIANTS)
            + f" (buckets {buckets})",
            flush=True,
        )
        write_results(
            rows,
            args,
            benchmark="scaling_accumulation",
            workload=f"MNIST + lenet, 2 processes (spawn, gloo), one thread each, accumulate_grad_batches={k}",
        )


def machine_worker(per_process_batch: int, iterations: int, mnist: str, start_at: float, rank: int, port: int) -> None:
    """A hand-written LeNet loop (one thread) that sleeps until ``start_at`` (time.time(),
    s), trains ``iterations`` steps and prints its samples/s; with ``port`` > 0, rank
    ``rank`` of a 2-process DDP job (gloo, master 127.0.0.1:``port``)."""
    import faulthandler
    import time
    from datetime import timedelta

    # a hang (seen in DDP runs: DDP's destructor after its process group, see the end) prints
    # every thread's stack, then exits
    faulthandler.dump_traceback_later(240, exit=True)

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    sys.path.insert(0, str(HERE.parent))
    from igniter.datasets import mnist as mnist_dataset
    from igniter.models import LeNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = mnist_dataset(mnist)
    model: torch.nn.Module = LeNet()
    if port:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
        )
        loader = DataLoader(
            dataset, batch_size=per_process_batch, sampler=DistributedSampler(dataset, 2, rank), drop_last=True
        )
        model = DistributedDataParallel(model)
    else:
        loader = DataLoader(dataset, batch_size=per_process_batch, shuffle=True, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = iter(loader)
    if time.time() > start_at:
        print(
            "machine worker: start-up took longer than the common start time; the pair overlaps less", file=sys.stderr
        )
    time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for _ in range(iterations):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    print(iterations * per_process_batch / (time.perf_counter() - start), flush=True)
    if port:
        # DDP's reducer goes before its process group: destroying the group first and the
        # DDP module on return hung in its C++ destructor (faulthandler: no Python frame
        # below this function's call) in 3 of ~40 runs
        del model, optimizer
        dist.destroy_process_group()


def run_machine(variant: str, per_process_batch: int, iterations: int, mnist: str) -> float:
    """``alone``: one worker's samples/s; ``pair``: two workers at once; ``ddp``: a
    2-process DDP job (samples/s summed over the processes)."""
    import time

    start_at = time.time() + 6.0  # after both have imported torch and read MNIST
    port = free_port() if variant == "ddp" else 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--machine-worker",
                str(per_process_batch),
                str(iterations),
                mnist,
                str(start_at),
                str(rank),
                str(port),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(1 if variant == "alone" else 2)
    ]
    rates = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:  # e.g. one DDP rank died and the other waits in a collective
                out = ""
            if proc.returncode != 0 or not out.split():
                print(
                    f"machine worker ({variant}, batch {per_process_batch}) failed or hung (exit {proc.returncode}): "
                    "this measurement is left out",
                    file=sys.stderr,
                )
                return math.nan
            rates.append(float(out.split()[-1]))
    finally:
        for proc in procs:  # a failed or hung worker's peers are not left behind
            proc.kill()
    return sum(rates)


def main() -> None:
    if len(sys.argv) == 8 and sys.argv[1] == "--machine-worker":
        b, n, mnist, start_at, rank, port = sys.argv[2:]
        machine_worker(int(b), int(n), mnist, float(start_at), int(rank), int(port))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mnist", default=str(HERE.parent.parent / "shared" / "data"), help="directory containing MNIST/raw"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="per-process batch sizes"
    )
    parser.add_argument("--iterations", type=int, default=60, help="training iterations per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*IGNITER_VARIANTS, *MACHINE_VARIANTS],
        choices=[*IGNITER_VARIANTS, *MACHINE_VARIANTS],
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more igniter overrides, e.g. runner.bucket_cap_mb=0.02")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where the results JSON goes "
        "(default: bench/results/scaling.json, with --accumulation scaling_accumulation.json)",
    )
    parser.add_argument(
        "--accumulation", action="store_true", help="2 processes with accumulation, with and without no_sync"
    )
    parser.add_argument("--accumulate", type=int, default=4, help="--accumulation's accumulate_grad_batches")
    args = parser.parse_args()
    if args.accumulation:
        if "--batches" not in sys.argv:
            args.batches = [64, 128]
        if "--rounds" not in sys.argv:
            args.rounds = 3
        args.output = args.output or HERE / "results" / "scaling_accumulation.json"
        return accumulation(args)
    args.output = args.output or HERE / "results" / "scaling.json"

    rows = []
    for b in args.batches:
        samples: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.rounds):
            for v in args.variants:  # alternate: A B C A B C ...
                if v in MACHINE_VARIANTS:
                    samples[v].append(run_machine(v, b, args.iterations, args.mnist))
                else:
                    samples[v].append(run(v, b, args.iterations, args.mnist, args.extra))
        med = {v: statistics.median([x for x in s if not math.isnan(x)] or [math.nan]) for v, s in samples.items()}
        row: dict = {"per_process_batch": b, "samples_per_s": med, "all": samples}
        for v in args.variants:
            base = "single" if IGNITER_VARIANTS.get(v, ("", True))[1] else "single-default"
            if v in IGNITER_VARIANTS and IGNITER_VARIANTS[v][0] != "single" and base in med:
                row[f"efficiency_{v}"] = med[v] / (2 * med[base])
                row[f"speedup_{v}"] = med[v] / med[base]
        for v in ("pair", "ddp"):
            if v in med and "alone" in med:
                row[f"speedup_{v}"] = med[v] / med["alone"]
        rows.append(row)
        cells = " ".join(f"{v}={med[v]:8.0f}" for v in args.variants)
        eff = " ".join(f"{k}={row[k]:.2f}" for k in row if k.startswith(("speedup", "efficiency")))
        print(f"batch/process {b:4d} | samples/s {cells} | {eff}", flush=True)
        write_results(rows, args)


def write_results(
    rows: list[dict],
    args: argparse.Namespace,
    benchmark: str = "scaling",
    workload: str = "MNIST + lenet, gloo; threads=1 per process, except *-default: igniter's default threads",
) -> None:
    """``args.output``, rewritten after every batch size (a crash keeps the rows so far)."""
    result = {
        "benchmark": benchmark,
        "workload": workload,
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "iterations": args.iterations,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    # a left-out measurement (NaN) is null in the JSON
    out.write_text(json.dumps(json.loads(json.dumps(result), parse_constant=lambda _: None), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
