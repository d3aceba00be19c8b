"""ddp vs fsdp at W=2 on CPU (gloo): per-rank memory, step time, checkpoint save time.

    python bench/fsdp.py                      # LeNet and a 4 x 2048 MLP, ~1 min on 2 cores
    python bench/fsdp.py --models lenet --steps 10 --repeats 1

Two processes (``torch.multiprocessing`` spawn, gloo, one thread each) train each model
on synthetic MNIST-shaped data (per-rank batch ``--batch``, Adam), wrapped as igniter
wraps it: ``ddp`` is ``DistributedDataParallel``; ``fsdp`` is igniter's own
:func:`igniter.parallel.strategy.shard_model` (FSDP2 ``fully_shard`` on each child with
at least ``--min-params`` parameters, then the root).

* **memory**: per rank, the bytes of the parameters and of Adam's state this rank holds,
  measured from the local tensors (``DTensor.to_local()`` under fsdp: the rank's own
  shard), after one optimizer step; the largest rank is shown. ``check`` is what
  ``igniter check`` prints for the same model (:func:`igniter.check.memory_plan`,
  computed in one process from the whole model): it should equal the measurement.
  Target: fsdp <= 0.55 x ddp.
* **step**: median wall time of one training step (forward, backward, optimizer step)
  over ``--steps`` steps after 3 warm-up steps, the slower rank's. fsdp all-gathers the
  parameters before forward and backward and reduce-scatters the gradients, where ddp
  all-reduces once: on gloo and one core per process fsdp is expected to be slower.
* **save**: median over ``--repeats`` of writing the model and Adam state:
  ``torch.save`` (rank 0 writes the whole state, what ``checkpoint.format=torch`` does,
  ddp only), ``dcp`` (``torch.distributed.checkpoint.save``, every rank writes its
  shards; igniter's :class:`~igniter.checkpoint.dcp.DcpSaver`, temporary
  directory and rename included) and ``async``: ``checkpoint.async_save=true``, where the
  training thread waits only for ``stall`` (the state copied to host memory and the
  write started) and ``async total`` is until the files are on disk.

Writes ``bench/results/fsdp.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {
    "lenet": ("LeNet", (1, 28, 28)),
    "mlp4x2048": ("MLP 784-2048x4-10", (784,)),
}


def build(name: str) -> torch.nn.Module:
    from igniter.models import MLP, LeNet

    torch.manual_seed(0)
    if name == "lenet":
        return LeNet(num_classes=10, dropout=0.0)
    return MLP(784, [2048] * 4, 10)


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def measure(name: str, strategy: str, args: argparse.Namespace, scratch: Path) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from igniter.check import memory_plan
    from igniter.checkpoint.dcp import DcpSaver, ModelState, OptimizerState
    from igniter.parallel.strategy import shard_model

    world, rank = dist.get_world_size(), dist.get_rank()
    model = build(name)
    whole = copy.deepcopy(model)
    if strategy == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        fsdp = SimpleNamespace(
            shard_modules=[], min_params=args.min_params, reshard_after_forward=True, cpu_offload=False
        )
        wrapped = shard_model(model, fsdp, "32")
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, *MODELS[name][1], generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(3):
        step(wrapped, optimizer)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step(wrapped, optimizer)
        times.append(time.perf_counter() - t0)
    params = local_bytes(wrapped.parameters())
    adam = local_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))

    # what igniter check prints: computed in this process from the whole model
    whole_opt = torch.optim.Adam(whole.parameters(), lr=1e-3)
    step(whole, whole_opt)
    plan = memory_plan(whole, whole_opt, strategy, world)

    saves: dict[str, list[float]] = {"torch_save_s": [], "dcp_save_s": [], "async_stall_s": [], "async_total_s": []}
    for i in range(args.repeats):
        if strategy == "ddp":
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, scratch / f"{name}_{i}.pt"
                )
            dist.barrier()
            saves["torch_save_s"].append(time.perf_counter() - t0)
        for async_save in (False, True):
            saver = DcpSaver(scratch / f"{name}_{strategy}", async_save=async_save)
            dist.barrier()
            t0 = time.perf_counter()
            state = {
                "model": ModelState(wrapped).state_dict(),
                "optimizer": OptimizerState(wrapped, optimizer).state_dict(),
                "trainer": {"iteration": i},
            }
            saver(state, f"last_checkpoint_{i}_{int(async_save)}.dcp")
            stall = time.perf_counter() - t0
            saver.flush()
            dist.barrier()
            total = time.perf_counter() - t0
            if async_save:
                saves["async_stall_s"] += [stall]
                saves["async_total_s"] += [total]
            else:
                saves["dcp_save_s"] += [total]
    per_rank = [None] * world
    mine = {
        "params": params,
        "adam": adam,
        "step_s": statistics.median(times),
        **{k: statistics.median(v) if v else None for k, v in saves.items()},
    }
    dist.all_gather_object(per_rank, mine)
    worst = lambda key: max((r[key] for r in per_rank if r[key] is not None), default=None)  # noqa: E731
    return {
        "model": name,
        "strategy": strategy,
        "world_size": world,
        "n_params": sum(p.numel() for p in whole.parameters()),
        "params_bytes_per_rank": [r["params"] for r in per_rank],
        "adam_bytes_per_rank": [r["adam"] for r in per_rank],
        "params_adam_bytes": max(r["params"] + r["adam"] for r in per_rank),
        "check_params_adam_bytes": plan["parameters"][0] + plan["optimizer state"][0],
        "step_ms": 1000 * worst("step_s"),
        **{k: worst(k) for k in saves},
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace, scratch: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    import ignite.distributed as idist
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    idist.sync()  # ignite adopts the group (igniter's shard_model asks it for the device and world size)
    results = []
    for name in args.models:
        for strategy in ("ddp", "fsdp"):
            results.append(measure(name, strategy, args, Path(scratch)))
            if rank == 0:
                r = results[-1]
                print(
                    f"  {name} {strategy}: {r['params_adam_bytes'] / 1e6:.2f} MB, step {r['step_ms']:.1f} ms",
                    flush=True,
                )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: list[dict]) -> str:
    head = f"{'model':<11} {'strategy':<8} {'params+Adam/rank':>16} {'vs ddp':>7} {'check':>9} {'step ms':>8} {'torch.save s':>12} {'dcp s':>7} {'async stall s':>13} {'async total s':>13}"
    lines = [head, "-" * len(head)]
    ddp = {r["model"]: r["params_adam_bytes"] for r in results if r["strategy"] == "ddp"}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        ratio = r["params_adam_bytes"] / ddp[r["model"]]
        lines.append(
            f"{r['model']:<11} {r['strategy']:<8} {r['params_adam_bytes'] / 1e6:>13.3f} MB {ratio:>7.3f} {r['check_params_adam_bytes'] / 1e6:>6.3f} MB"
            f" {r['step_ms']:>8.1f} {fmt(r['torch_save_s']):>12} {fmt(r['dcp_save_s']):>7} {fmt(r['async_stall_s']):>13} {fmt(r['async_total_s']):>13}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each kind (default 3)")
    parser.add_argument("--min-params", type=int, default=100, help="runner.fsdp.min_params (default 100)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "fsdp.json")
    args = parser.parse_args()
    world = 2
    scratch = Path(tempfile.mkdtemp(prefix="igniter_fsdp_bench_"))
    out = scratch / "results.json"
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    try:
        torch.multiprocessing.spawn(
            worker, args=(world, free_port(), args, str(scratch), str(out)), nprocs=world, join=True
        )
        results = json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ddp = {r["model"]: r["params_adam_bytes"] for r in results if r["strategy"] == "ddp"}
    summary = {
        r["model"]: {"fsdp_vs_ddp_params_adam": r["params_adam_bytes"] / ddp[r["model"]], "target": 0.55,
                     "met": r["params_adam_bytes"] / ddp[r["model"]] <= 0.55, "check_matches": r["check_params_adam_bytes"] == r["params_adam_bytes"]}
        for r in results if r["strategy"] == "fsdp"
    }  # fmt: skip
    print(table(results))
    for model, s in summary.items():
        print(
            f"{model}: fsdp / ddp params+Adam per rank = {s['fsdp_vs_ddp_params_adam']:.3f} (target <= 0.55: {'met' if s['met'] else 'NOT met'}); igniter check's figure {'matches' if s['check_matches'] else 'DIFFERS from'} the measurement"
        )
    record = {
        "benchmark": "bench/fsdp.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "world_size": world,
        "backend": "gloo",
        "threads_per_process": 1,
        "torch": torch.__version__,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_1m_before_after": [
            round(load_before, 2),
            round(os.getloadavg()[0], 2),
        ],  # other jobs on the cores skew the times
        "summary": summary,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
