"""Tokens/s of igniter's language-model run against a hand-written loop with the same model, data
and optimizer: one process and ``runner=spawn`` with 2 processes, fp32 and ``bf16-mixed``.

    python bench/lm.py --rounds 5                      # ~10 min on 2 cores
    python bench/lm.py --rounds 3 --iterations 40 --configs 1p-fp32 2p-fp32

The workload is the reference recipe's (``experiment=shakespeare_char``: a 4-layer, 4-head,
128-wide GPT-2 from ``transformers``, windows of 64 characters of the Shakespeare shards at every
offset, global batch 12, AdamW with decay on matrices, warm-up + cosine learning rate, clipping
1.0). The hand-written loop (:func:`hand_loop`) builds the same ``causal_lm`` and
``token_shards`` dataset and loops over a ``DataLoader`` with a ``DistributedSampler`` (2
processes: ``torch.multiprocessing`` spawn, gloo, ``DistributedDataParallel``), ``autocast``
for bf16; ``--threads N`` gives every process of both variants N intra-op threads (igniter's
``runner.threads_per_process``); the default, 0, leaves each variant its own default (igniter's:
usable cores / processes on the node; the loop's: PyTorch's, ``torch.get_num_threads()``). igniter runs its default run (progress bar, TensorBoard, checkpoints at its default
cadence; validation off: the loop has none).

Both are timed the same way, from inside the training process (rank 0): the time at every
iteration's end; tokens/s is ``global batch x 64`` over the median time of an iteration after
the first ``--warmup`` iterations (start-up, first-step FLOP counting and allocator warm-up
excluded). Each round runs every configuration's two variants back to back, in a fresh
process each, in alternating order (this shared VM's speed drifts by tens of per cent over
minutes: a pair run seconds apart shares the host's state). The table gives, per
configuration, the median over rounds of igniter's tokens/s, the loop's, and of the paired
ratio igniter/loop with the 95% confidence interval of that median (bootstrap over rounds).
The issue's target: igniter within 5% of the loop (ratio >= 0.95). Beside each run's speed the
script prints its minor page faults per iteration: a process whose C library hands the step's
freed memory back to the OS faults it in again every iteration (igniter fixes glibc's threshold,
:mod:`igniter.launch.cpu_heap`; the hand-written loop keeps glibc's adaptive default).

``--side-by-side`` (one-process configurations, 2 usable CPUs) runs the two variants of a round
at the same time, one intra-op thread each, each pinned to its own CPU (the CPUs swap every
round), and times each over the seconds both were running (:func:`overlapping`): a slowdown of
the host then hits both, so the paired ratio's interval shrinks to what the variants differ by.
It measures one thread per process, not the defaults (a default one-process run uses every core).

    python bench/lm.py --side-by-side --rounds 20 --iterations 200 --configs 1p-fp32 1p-bf16

``--time-sliced SECONDS`` measures the defaults the same way: the two variants of a round run at
once with their default threads and take turns on the whole machine (:func:`run_time_sliced`:
the process group of one is stopped while the other runs ``SECONDS``), each timed over the
seconds both were running. The iteration a turn ends in is stretched by the pause; the median
iteration is not (a turn holds ~60 iterations at 3 s).

    python bench/lm.py --time-sliced 3 --rounds 12 --iterations 300 --configs 1p-fp32 1p-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BLOCK, BATCH = 64, 12
CONFIGS = {"1p-fp32": (1, "32"), "1p-bf16": (1, "bf16-mixed"), "2p-fp32": (2, "32"), "2p-bf16": (2, "bf16-mixed")}

try:  # registered when igniter imports this module (imports=[lm], bench/ on PYTHONPATH)
    from igniter.registry import event_handler_registry

    @event_handler_registry("bench_lm_clock")
    def bench_lm_clock(ctx: Any) -> Any:
        """Append :func:`stamp` at every iteration's end (rank 0) to ``<run dir>/clock.txt``."""
        path = Path(ctx.output_dir) / "clock.txt"

        def handler(engine: Any) -> None:
            if ctx.rank == 0:
                with open(path, "a") as f:
                    f.write(stamp() + "\n")

        return handler
except ImportError:  # pragma: no cover
    pass


def stamp() -> str:
    """``"<time.perf_counter()> <minor page faults of this process so far>"``: one iteration's end."""
    return f"{time.perf_counter()} {resource.getrusage(resource.RUSAGE_SELF).ru_minflt}"


def read_stamps(path: Path) -> list[tuple[float, int]]:
    """The ``(seconds, page faults)`` :func:`stamp` lines of one run."""
    return [(float(t), int(f)) for t, f in (line.split() for line in path.read_text().splitlines())]


def iteration_seconds(stamps: list[tuple[float, int]], warmup: int) -> float:
    """The median time between consecutive iteration ends, after the first ``warmup`` iterations."""
    steps = [b[0] - a[0] for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return statistics.median(steps)


def faults_per_iteration(stamps: list[tuple[float, int]], warmup: int) -> float:
    """Minor page faults per iteration after the first ``warmup`` iterations (a step that hands
    freed memory back to the OS faults it in again: :mod:`igniter.launch.cpu_heap`)."""
    return (stamps[-1][1] - stamps[warmup][1]) / (len(stamps) - 1 - warmup)


def _hand_worker(rank: int, world: int, args: dict[str, Any], port: int) -> None:
    """One process of the hand-written loop (``args``: shards, precision, iterations, threads, out)."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from igniter.lm import causal_lm
    from igniter.solver import adamw_matrices
    from igniter.token_shards import TokenShards

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(1337)
    data = TokenShards(args["shards"], "train", BLOCK, 1)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1337, drop_last=True)
    loader = DataLoader(data, batch_size=BATCH // world, sampler=sampler, drop_last=True)
    model = causal_lm(65, BLOCK, 4, 4, 128, activation="gelu", bias=False)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = adamw_matrices(model.parameters(), lr=1e-3, weight_decay=0.1, betas=[0.9, 0.99])
    total, warm = 2000, 100
    import math

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: (
            (it + 1) / warm
            if it < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (it - warm) / (total - warm))))
        ),
    )
    bf16 = args["precision"] == "bf16-mixed"
    stamps = []
    for it, (x, y) in enumerate(loader):
        if it == args["iterations"]:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        stamps.append(stamp())
    if rank == 0:
        Path(args["out"]).write_text("\n".join(stamps) + "\n")
    if world > 1:
        dist.destroy_process_group()


def hand_loop(shards: str, world: int, precision: str, iterations: int, threads: int, out: str) -> None:
    """The hand-written loop (``world`` processes), writing rank 0's iteration end times to ``out``."""
    args = {"shards": shards, "precision": precision, "iterations": iterations, "threads": threads, "out": out}
    if world == 1:
        _hand_worker(0, 1, args, 0)
        return
    import torch.multiprocessing as mp

    from igniter.launch.runners import free_port

    mp.spawn(_hand_worker, args=(world, args, free_port()), nprocs=world, join=True)


def run_variant(
    variant: str, config: str, shards: str, iterations: int, threads: int, tmp: Path
) -> list[tuple[float, int]]:
    """One run in a fresh process; returns rank 0's :func:`read_stamps`."""
    return finish_variant(start_variant(variant, config, shards, iterations, threads, tmp))


class Started(NamedTuple):
    """A run :func:`start_variant` started: its variant and config, the process (leader of its
    own process group), rank 0's clock file and the file its output goes to."""

    variant: str
    config: str
    proc: subprocess.Popen
    clock: Path
    log: Path


def start_variant(
    variant: str, config: str, shards: str, iterations: int, threads: int, tmp: Path, cpu: int | None = None
) -> Started:
    """Start one run in a fresh process, in a session of its own (its processes are one group:
    :func:`run_time_sliced`), pinned to ``cpu`` when given; :func:`finish_variant` waits."""
    world, precision = CONFIGS[config]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = tmp / f"{variant}-{config}-{time.monotonic_ns()}"
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    if variant == "loop":
        code = f"import lm; lm.hand_loop({shards!r}, {world}, {precision!r}, {iterations}, {threads}, {str(out)!r})"
        command = [sys.executable, "-c", code]
        clock = out
    else:
        overrides = [
            "experiment=shakespeare_char",
            f"data.root={shards}",
            "data.val=null",
            f"trainer.precision={precision}",
            "trainer.max_epochs=1",
            f"trainer.epoch_length={iterations}",
            *([f"runner.threads_per_process={threads}"] if threads else []),
            "imports=[lm]",
            "+handlers=[{name: bench_lm_clock, event: ITERATION_COMPLETED}]",
            f"output_dir={out}",
        ]
        if world > 1:
            overrides += ["runner=spawn", f"runner.nproc_per_node={world}"]
        command = [sys.executable, "-m", "igniter", *overrides]
        clock = out / "clock.txt"
    log = Path(f"{out}.log")
    with open(log, "w") as f:  # a file, not a pipe: nobody reads a pipe while runs are sliced
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=f, stderr=f, preexec_fn=pin, start_new_session=True)
    return Started(variant, config, proc, clock, log)


def finish_variant(run: Started) -> list[tuple[float, int]]:
    """Wait for a run :func:`start_variant` started; returns rank 0's :func:`read_stamps`."""
    if run.proc.wait() != 0:
        raise SystemExit(f"{run.variant} {run.config} failed:\n{run.log.read_text()[-3000:]}")
    return read_stamps(run.clock)


def run_time_sliced(started: list[Started], slice_s: float) -> None:
    """Let two started runs take turns: one runs ``slice_s`` seconds while the other's process
    group is stopped (SIGSTOP; SIGCONT when its turn comes), until one of them exits; the other
    then runs alone to its end. Each variant has the whole machine in its turns, and a drift of
    the host slower than a few turns reaches both."""
    procs = [run.proc for run in started]
    turn = 0
    try:
        while all(p.poll() is None for p in procs):
            os.killpg(procs[1 - turn].pid, signal.SIGSTOP)
            os.killpg(procs[turn].pid, signal.SIGCONT)
            try:
                procs[turn].wait(timeout=slice_s)
            except subprocess.TimeoutExpired:
                pass
            turn = 1 - turn
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)


def overlapping(
    a: list[tuple[float, int]], b: list[tuple[float, int]], warmup: int
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """The stamps of two runs that ran at once, cut to the seconds both were past their first
    ``warmup`` iterations and neither had finished (``perf_counter`` is CLOCK_MONOTONIC on Linux:
    one clock for every process)."""
    start, end = max(a[warmup][0], b[warmup][0]), min(a[-1][0], b[-1][0])
    return [s for s in a if start <= s[0] <= end], [s for s in b if start <= s[0] <= end]


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% confidence interval of the median of ``values`` (one per round), bootstrap over rounds."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=60, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=10, help="first iterations not timed")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per process, both variants (0: each one's default)"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="one-process configs only: run the two variants at once, one thread each, each pinned to its own CPU",
    )
    parser.add_argument(
        "--time-sliced",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the two variants at once, taking turns of SECONDS on the whole machine (default threads)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lm.json")
    args = parser.parse_args()
    if args.side_by_side and args.time_sliced:
        parser.error("--side-by-side and --time-sliced are two ways of running the variants at once: choose one")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if args.side_by_side and (len(cpus) < 2 or any(CONFIGS[c][0] != 1 for c in args.configs)):
        parser.error("--side-by-side needs 2 usable CPUs and one-process configs (1p-fp32, 1p-bf16)")
    at_once = args.side_by_side or args.time_sliced
    pins = cpus if args.side_by_side else [None, None]  # the first variant of a round gets the first CPU
    threads = 1 if args.side_by_side else args.threads
    sys.path.insert(0, str(REPO))
    from igniter.prepare_text import prepare_text

    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        prepare_text(TEXT, shards)
        results: dict[str, dict[str, list[float]]] = {c: {"igniter": [], "loop": []} for c in args.configs}
        faults: dict[str, dict[str, list[float]]] = {c: {"igniter": [], "loop": []} for c in args.configs}
        start = time.monotonic()
        for r in range(args.rounds):
            for config in args.configs:
                order = ["igniter", "loop"] if (r + args.configs.index(config)) % 2 == 0 else ["loop", "igniter"]
                if at_once:  # side by side: each on its own CPU, which swap every round; or taking turns
                    started = [
                        start_variant(v, config, str(shards), args.iterations, threads, tmp, cpu)
                        for v, cpu in zip(order, pins)
                    ]
                    if args.time_sliced:
                        run_time_sliced(started, args.time_sliced)
                    both = dict(zip(order, overlapping(*(finish_variant(run) for run in started), args.warmup)))
                    warmup = 0
                else:
                    both = {v: run_variant(v, config, str(shards), args.iterations, threads, tmp) for v in order}
                    warmup = args.warmup
                for variant, stamps in both.items():
                    if len(stamps) - warmup < 10:
                        raise SystemExit(f"{variant} {config}: {len(stamps)} iterations overlap; raise --iterations")
                    tokens_per_s = BATCH * BLOCK / iteration_seconds(stamps, warmup)
                    results[config][variant].append(tokens_per_s)
                    faults[config][variant].append(faults_per_iteration(stamps, warmup))
            print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - start:.0f} s)", flush=True)

    rows = {}
    timed = "the iterations both ran at once" if at_once else f"{args.iterations - args.warmup - 1} timed ones"
    print(
        f"\ntokens/s (median over {args.rounds} rounds, each the median iteration of {timed}); ratio: median over"
        " rounds of igniter/loop of the same round, [95% interval]"
    )
    for config in args.configs:
        ign, loop = results[config]["igniter"], results[config]["loop"]
        ratios = [a / b for a, b in zip(ign, loop)]
        low, high = bootstrap_ci(ratios)
        rows[config] = {
            "igniter_tokens_per_s": statistics.median(ign),
            "loop_tokens_per_s": statistics.median(loop),
            "ratio": statistics.median(ratios),
            "ratio_ci95": [low, high],
            "rounds": {"igniter": ign, "loop": loop},
            "page_faults_per_iteration": faults[config],
        }
        met = "MET" if low >= 0.95 else "MISSED" if high < 0.95 else "undecided"
        print(
            f"  {config:8s} igniter {statistics.median(ign):8.0f}  loop {statistics.median(loop):8.0f}  "
            f"ratio {statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}]  target >= 0.95: {met}"
        )
        print(
            "           page faults per iteration, by round: igniter "
            + " ".join(f"{f:.0f}" for f in faults[config]["igniter"])
            + "; loop "
            + " ".join(f"{f:.0f}" for f in faults[config]["loop"])
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "iterations": args.iterations,
        "warmup": args.warmup,
        "threads": threads or "each variant's default",
        "side_by_side": args.side_by_side,
        "time_sliced_s": args.time_sliced or None,
    }
    args.out.write_text(json.dumps({**meta, "results": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
