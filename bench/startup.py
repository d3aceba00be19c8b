"""Start-up cost: whole-process wall time of a 1-iteration igniter run, and the time
from its process start to the end of that iteration (``first_iteration_s`` in its
``metrics.json``), against the ``import torch, ignite`` floor, a hand-written script
doing the same iteration, and a Lightning script doing it (when ``lightning`` is
installed); plus the slowest imports of ``import igniter``.

    python bench/startup.py --rounds 5

Variants alternate over ``--rounds`` rounds; medians are reported. Writes
``bench/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What a user would write by hand for the same iteration (same data file, model, optimizer).
PLAIN_SCRIPT = """
import importlib.util, pathlib, numpy as np, torch
path = pathlib.Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"
data = np.loadtxt(path, delimiter=",", dtype=np.float32)
x = torch.from_numpy(data[:, :-1] / 16.0); y = torch.from_numpy(data[:, -1].astype(np.int64))
net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = torch.optim.Adam(net.parameters())
loss = torch.nn.functional.cross_entropy(net(x[:32]), y[:32]); loss.backward(); opt.step()
"""

LIGHTNING_SCRIPT = """
import torch, lightning as L
from sklearn.datasets import load_digits
d = load_digits()
x = torch.tensor(d.data, dtype=torch.float32) / 16; y = torch.tensor(d.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    def training_step(self, b, i): return torch.nn.functional.cross_entropy(self.net(b[0]), b[1])
    def configure_optimizers(self): return torch.optim.Adam(self.parameters())
L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(M(), loader)
"""


def timed(cmd: list[str], cwd: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def import_times() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """``python -X importtime -c 'import igniter.cli, igniter.run'``: the seconds each
    top-level package's modules take themselves (self time summed: torch, ignite, hydra,
    igniter...), and the 12 modules with the largest self time, largest first."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import igniter.cli, igniter.run"], capture_output=True, text=True
    )
    modules = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            modules.append((m.group(3), int(m.group(1)) / 1e6))
    packages: dict[str, float] = {}
    for name, self_s in modules:
        top = name.split(".")[0]
        packages[top] = packages.get(top, 0.0) + self_s
    by_package = sorted(packages.items(), key=lambda r: -r[1])[:12]
    return by_package, sorted(modules, key=lambda r: -r[1])[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = {
        "floor: import torch, ignite": [sys.executable, "-c", "import torch, ignite"],
        "hand-written script, 1 iteration": [sys.executable, "-c", PLAIN_SCRIPT],
        "igniter check": [sys.executable, "-m", "igniter", "check"],
        "igniter, 1 iteration": [
            sys.executable,
            "-m",
            "igniter",
            "trainer.max_epochs=1",
            "trainer.epoch_length=1",
            "data.val=null",
            "checkpoint.enabled=false",
            "logging.loggers=[]",
            "output_dir=run",
        ],
    }
    try:
        import lightning  # noqa: F401

        variants["lightning, 1 iteration"] = [sys.executable, "-c", LIGHTNING_SCRIPT]
    except ImportError:
        print("lightning not installed: its variant is skipped (pip install lightning)")
    times: dict[str, list[float]] = {v: [] for v in variants}
    first_iteration: list[float] = []  # igniter's metrics.json: process start -> end of iteration 1
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, cmd in variants.items():
                times[name].append(timed(cmd, tmp))
                if name == "igniter, 1 iteration":
                    first_iteration.append(
                        json.loads((Path(tmp) / "run" / "metrics.json").read_text())["first_iteration_s"]
                    )
    med = {k: statistics.median(v) for k, v in times.items()}
    med["igniter, to the end of iteration 1"] = statistics.median(first_iteration)
    floor = med["floor: import torch, ignite"]
    print(f"whole-process wall time, median of {args.rounds} (threads=1):")
    for k, v in med.items():
        print(f"  {k:36s} {v:6.2f} s   (+{v - floor:.2f} s over the floor)")
    print("(the first torch.optim optimizer imports torch._dynamo, ~0.6-0.9 s here: any training script pays it)")
    by_package, offenders = import_times()
    print("`python -X importtime` of igniter's CLI: self time summed per top-level package (s)")
    for name, sec in by_package:
        print(f"  {name:40s} {sec:6.3f}")
    print("the slowest single modules (self time, s)")
    for name, sec in offenders:
        print(f"  {name:40s} {sec:6.3f}")
    out = HERE / "results" / "startup.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "python": platform.python_version()}
    out.write_text(
        json.dumps(
            {
                "benchmark": "startup",
                "machine": meta,
                "median_s": med,
                "all_s": {**times, "igniter, to the end of iteration 1": first_iteration},
                "import_by_package_s": by_package,
                "import_offenders_s": offenders,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
