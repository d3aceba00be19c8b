"""Per-iteration cost of igniter against a hand-written loop, raw Ignite and Lightning.

    python bench/overhead.py                         # digits MLP (batch 32) and MNIST LeNet (batch 128)
    python bench/overhead.py --workloads digits --rounds 5 --epochs 10

Variants, all in this process with ``torch.set_num_threads(1)``, the same model
initialisation, data, data order, batch size and number of iterations:

A ``loop``          hand-written PyTorch loop
B ``ignite``        a raw ``ignite.engine.Engine`` with the equivalent process function
C ``igniter_bare``  igniter's built trainer (DeterministicEngine + its step), no handlers
D ``igniter``       igniter's default run: progress bar, TensorBoard, checkpoint every
                    epoch, NaN guard, throughput (validation off: it is not per-iteration work)
E ``lightning``     ``lightning.Trainer`` with its defaults (progress bar, checkpointing, logger)
F ``lightning_off`` the same with them off
(E and F only when ``lightning`` is installed: ``pip install lightning``.)

Variants alternate over ``--rounds`` rounds, every other round in reverse order
(A B C D, D C B A, A B C D, ...: a steady drift of the machine's speed during a
round then favours no variant); the table shows the median microseconds per
training iteration, the median over rounds of the ratio to A in the same round
with the interquartile range of those ratios (the run-to-run noise), and the
final loss of each variant (equal losses mean equal work). Writes
``bench/results/overhead_<workloads>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


from igniter.cli import compose_config, plain_config  # noqa: E402
from igniter.run import build_run, train  # noqa: E402

WORKLOADS = {
    "digits": ["data.loader.batch_size=32", "model.params.hidden=[128]"],
    "mnist": ["experiment=mnist", "data.loader.batch_size=128"],
}


def config(workload: str, epochs: int, mnist_root: str, out: str, extra: list[str] = ()) -> Any:
    overrides = [*WORKLOADS[workload], f"trainer.max_epochs={epochs}", "data.val=null", f"output_dir={out}", *extra]
    if workload == "mnist":
        overrides += [f"data.root={mnist_root}", f"data.train.subset={mnist_subset}"]
    return plain_config(compose_config(overrides))


mnist_subset = 12800  # 100 iterations of 128 per epoch


def _loss_of(out: Any) -> float:
    return float(out["loss"]) if isinstance(out, dict) else float(out)


def run_loop(cfg: Any) -> tuple[float, int, float]:
    """A: the loop a user would write by hand around the same model, loader and optimizer."""
    ctx = build_run(cfg, Path(cfg.output_dir))
    model, opt, loader, loss_fn = ctx.model, ctx.optimizer, ctx.train_loader, ctx.loss_fn
    sampler = loader.sampler
    start, n, loss = time.perf_counter(), 0, torch.tensor(0.0)
    for epoch in range(cfg.trainer.max_epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n += 1
    return time.perf_counter() - start, n, float(loss.detach())


def run_ignite(cfg: Any) -> tuple[float, int, float]:
    """B: a raw ignite Engine with the equivalent process function."""
    from ignite.engine import Engine, Events

    ctx = build_run(cfg, Path(cfg.output_dir))
    model, opt, loss_fn = ctx.model, ctx.optimizer, ctx.loss_fn

    def step(engine: Engine, batch: Any) -> torch.Tensor:
        model.train()
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: ctx.train_loader.sampler.set_epoch(e.state.epoch - 1))
    start = time.perf_counter()
    engine.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs)
    return time.perf_counter() - start, engine.state.iteration, _loss_of(engine.state.output)


def run_igniter_bare(cfg: Any) -> tuple[float, int, float]:
    """C: igniter's trainer as built from config, without handlers (but the sampler epoch)."""
    from ignite.engine import Events

    ctx = build_run(cfg, Path(cfg.output_dir))
    ctx.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: ctx.train_loader.sampler.set_epoch(e.state.epoch - 1))
    start = time.perf_counter()
    ctx.trainer.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs)
    return time.perf_counter() - start, ctx.trainer.state.iteration, _loss_of(ctx.trainer.state.output)


def run_igniter(cfg: Any) -> tuple[float, int, float]:
    """D: igniter's default run (handlers on, progress bar forced on as on a terminal)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(io.StringIO()):
        result = train(cfg, cfg.output_dir)
    # run_time_s: the whole trainer.run, handlers (progress, TensorBoard, checkpoints) included
    return result["run_time_s"], result["iterations"], result["train_loss"]


def _lightning(cfg: Any, defaults: bool) -> tuple[float, int, float]:
    import lightning as L

    ctx = build_run(cfg, Path(cfg.output_dir))
    model, loss_fn, opt = ctx.model, ctx.loss_fn, ctx.optimizer

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.last = torch.tensor(0.0)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = loss_fn(self.model(x), y)
            self.last = loss.detach()
            if defaults:
                self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            return opt

    module = Module()
    kwargs: dict[str, Any] = dict(max_epochs=cfg.trainer.max_epochs, accelerator="cpu", devices=1, default_root_dir=cfg.output_dir)
    if not defaults:
        kwargs.update(enable_progress_bar=False, enable_checkpointing=False, logger=False, enable_model_summary=False)
    trainer = L.Trainer(**kwargs, use_distributed_sampler=False)
    timer = {}

    class Timer(L.Callback):
        def on_train_start(self, *a: Any) -> None:
            timer["t"] = time.perf_counter()

        def on_train_epoch_start(self, trainer: Any, *a: Any) -> None:
            ctx.train_loader.sampler.set_epoch(trainer.current_epoch)

        def on_train_end(self, *a: Any) -> None:
            timer["t"] = time.perf_counter() - timer["t"]

    trainer.callbacks.append(Timer())
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(module, ctx.train_loader)
    return timer["t"], trainer.global_step, float(module.last)


VARIANTS: dict[str, Callable[[Any], tuple[float, int, float]]] = {
    "loop": run_loop,
    "ignite": run_ignite,
    "igniter_bare": run_igniter_bare,
    "igniter": run_igniter,
    "lightning": lambda cfg: _lightning(cfg, True),
    "lightning_off": lambda cfg: _lightning(cfg, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["digits", "mnist"], choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (digits: 44 iterations each; mnist: 100)")
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="'loop' is always run: ratios are to it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = ["loop", *(v for v in args.variants if v != "loop")]
    try:
        import lightning  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.startswith("lightning")]
        print("lightning not installed: variants E/F skipped (pip install lightning)")

    results: dict[str, Any] = {}
    for workload in args.workloads:
        times: dict[str, list[float]] = {v: [] for v in variants}
        losses: dict[str, float] = {}
        for round_ in range(args.rounds):
            for v in variants if round_ % 2 == 0 else variants[::-1]:
                with tempfile.TemporaryDirectory() as tmp:
                    extra = ["logging.progress_bar=true"] if v == "igniter" else ["checkpoint.enabled=false", "logging.loggers=[]"]
                    cfg = config(workload, args.epochs, args.mnist, tmp, extra)
                    gc.collect()  # the previous variant's garbage is not collected on this one's clock
                    seconds, iterations, loss = VARIANTS[v](cfg)
                times[v].append(seconds / iterations * 1e6)
                losses[v] = loss
        # ratio: median over rounds of (variant / loop of the same round): pairing cancels the
        # slow drifts of a shared VM's speed, which move all variants of a round together
        rows = {}
        for v, t in times.items():
            ratios = [x / b for x, b in zip(t, times["loop"])]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            rows[v] = {"us_per_iter": statistics.median(t), "ratio": statistics.median(ratios), "ratio_iqr": [q1, q3], "final_loss": losses[v], "all": t}
        results[workload] = rows
        print(f"\n{workload}: us/iteration (median of {args.rounds}), ratio to the hand-written loop (median of per-round ratios), final loss")
        for v, r in rows.items():
            q1, q3 = r["ratio_iqr"]
            print(f"  {v:14s} {r['us_per_iter']:9.1f} us  x{r['ratio']:.3f} (IQR {q1:.3f}-{q3:.3f})  loss {r['final_loss']:.6f}")
        same = len({round(r["final_loss"], 5) for r in rows.values()}) == 1
        print(f"  same final loss in every variant: {'yes' if same else 'NO'}")
    out = HERE / "results" / f"overhead_{'_'.join(args.workloads)}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "threads": 1}
    out.write_text(json.dumps({"benchmark": "overhead", "machine": meta, "epochs": args.epochs, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
