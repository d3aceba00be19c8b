"""What per-sample seeding (igniter.loading.SeededSamples) costs.

    python bench/seeding.py                      # per-sample cost, in-process: ~1 min
    python bench/seeding.py --throughput --before /tmp/igniter-before --data-root ../shared/data
                                                 # MNIST default run with 2 workers, before/after: ~4 min

Per-sample cost: the same samples loaded through the bare dataset and through
``SeededSamples`` (the training loader's dataset), batches of 128, rounds alternating
(A B A B ...), so the host's speed changes hit both alike. Three variants:

``bare``     ``[dataset[i] for i in batch]``
``worker``   ``SeededSamples.__getitems__`` as in a DataLoader worker: each sample's global
             generators seeded from ``(seed, epoch, index)`` (torch, numpy, random)
``main``     the same in the training process (``num_workers=0``): the generators' states are
             also saved before the batch and put back after it

Datasets: digits (8x8, ``gaussian_noise``: a cheap sample, where seeding shows most) and,
when ``--data-root`` holds MNIST, MNIST with ``random_shift`` + ``normalize``.
Prints the median per-sample time of each variant and the difference to ``bare`` (us).

``--throughput``: the MNIST default run (``experiment=mnist``, LeNet, batch 128,
``data.train.subset``/``data.val.subset`` to keep a round short) with
``data.loader.num_workers=2``, alternately with the igniter source tree at ``--before``
(e.g. ``git archive <commit> | tar -x -C /tmp/igniter-before``) and this one, ``--rounds``
times each; prints every round's ``samples_per_s`` (metrics.json) and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _per_sample(args: argparse.Namespace) -> None:
    from unittest import mock

    import torch

    import igniter  # noqa: F401  (registries)
    import igniter.loading as loading
    from igniter.datasets import digits, mnist
    from igniter.transforms import gaussian_noise, normalize, random_shift

    torch.set_num_threads(1)
    sets = {"digits+gaussian_noise": digits("train", transform=gaussian_noise(0.1))}
    root = Path(args.data_root) if args.data_root else None
    if root is not None and (root / "MNIST" / "raw").is_dir():
        shift, norm = random_shift(2), normalize([0.1307], [0.3081])
        sets["mnist+random_shift+normalize"] = mnist(str(root), "train", transform=lambda x: norm(shift(x)))
    batch = 128
    for name, data in sets.items():
        seeded = loading.SeededSamples(data, 3, "data.train", name)
        n = args.samples // batch * batch
        order = (torch.randperm(len(data)).tolist() * (n // len(data) + 1))[:n]  # digits: 1438 samples, repeated
        batches = [[(1, i) for i in order[k : k + batch]] for k in range(0, n, batch)]

        def bare(data=data, batches=batches) -> None:
            for b in batches:
                [data[i] for _, i in b]

        def worker(seeded=seeded, batches=batches) -> None:
            with mock.patch.object(loading, "get_worker_info", lambda: object()):
                for b in batches:
                    seeded.__getitems__(b)

        def main(seeded=seeded, batches=batches) -> None:
            for b in batches:
                seeded.__getitems__(b)

        variants = {"bare": bare, "worker": worker, "main": main}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[v].append((time.perf_counter() - start) / n * 1e6)
        med = {v: statistics.median(t) for v, t in times.items()}
        print(f"{name}: {n} samples per round, {args.rounds} rounds, batch {batch}, median us per sample")
        for v in variants:
            extra = "" if v == "bare" else f"  (+{med[v] - med['bare']:.2f} us)"
            print(f"  {v:7s} {med[v]:8.2f}{extra}   rounds: {' '.join(f'{t:.1f}' for t in times[v])}")
    seeds = 100_000
    start = time.perf_counter()
    for i in range(seeds):
        loading.sample_seed(3, 1, i)
    hash_us = (time.perf_counter() - start) / seeds * 1e6
    start = time.perf_counter()
    for i in range(seeds):
        loading.seed_sample(i)
    seed_us = (time.perf_counter() - start) / seeds * 1e6
    print(f"sample_seed (the hash): {hash_us:.2f} us; seed_sample (torch + numpy + random): {seed_us:.2f} us")


def _throughput(args: argparse.Namespace) -> None:
    if not args.data_root or not (Path(args.data_root) / "MNIST" / "raw").is_dir():
        sys.exit("--throughput needs --data-root with MNIST/raw in it")
    trees = {"before": Path(args.before).resolve(), "after": REPO}
    results: dict[str, list[float]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, tree in trees.items():
                out = Path(tmp) / f"{label}{r}"
                cmd = [
                    sys.executable, "-m", "igniter", "experiment=mnist", f"data.root={Path(args.data_root).resolve()}",
                    f"data.train.subset={args.subset}", "data.val.subset=1000", "trainer.max_epochs=1",
                    "data.loader.num_workers=2", "logging.progress_bar=false", "checkpoint.enabled=false",
                    "logging.loggers=[]", f"output_dir={out}",
                ]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(tree)}
                proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{label} round {r} failed:\n{proc.stderr[-3000:]}")
                rate = json.loads((out / "metrics.json").read_text())["samples_per_s"]
                results[label].append(rate)
                print(f"round {r} {label:6s} {rate:8.1f} samples/s", flush=True)
    for label, rates in results.items():
        print(f"{label:6s} median {statistics.median(rates):8.1f} samples/s  ({' '.join(f'{x:.0f}' for x in rates)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--samples", type=int, default=12_800, help="samples per round (per-sample cost)")
    parser.add_argument("--data-root", default=None, help="the directory holding MNIST/raw")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--before", default=None, help="igniter source tree to compare with (--throughput)")
    parser.add_argument("--subset", type=int, default=12_000, help="MNIST training samples per round (--throughput)")
    args = parser.parse_args()
    if args.throughput:
        if not args.before:
            sys.exit("--throughput needs --before")
        args.rounds = args.rounds or 3
        _throughput(args)
    else:
        args.rounds = args.rounds or 9
        _per_sample(args)


if __name__ == "__main__":
    main()
