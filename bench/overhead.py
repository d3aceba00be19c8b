"""Per-iteration cost of igniter against a hand-written loop, raw Ignite and Lightning.

    python bench/overhead.py --workloads digits --rounds 30    # digits MLP, batch 32: ~8 min
    python bench/overhead.py --workloads mnist --rounds 12     # MNIST LeNet, batch 128: ~14 min
    python bench/overhead.py --workloads digits --variants igniter_no_bar igniter_no_tensorboard \
        igniter_no_checkpoint igniter_no_handlers           # what each default handler costs
    python bench/overhead.py --workloads digits --variants loop igniter igniter_checkpoint_unwritten \
        igniter_checkpoint_state_only igniter_no_checkpoint  # what a checkpoint's steps cost
    python bench/overhead.py --workloads mnist --rounds 5 --variants loop_bf16 igniter_bf16 \
        loop_accum4 igniter_accum4                           # precision and accumulation, each against its twin
    python bench/overhead.py --workloads mnist --device cuda --rounds 3 --variants loop igniter \
        --out bench/results/gpu/overhead_mnist.json          # on a GPU (data and model on cuda:0)

Variants, all in one process with ``torch.set_num_threads(1)``, the same model
initialisation, data, data order, batch size and number of iterations:

A ``loop``          hand-written PyTorch loop
B ``ignite``        a raw ``ignite.engine.Engine`` with the equivalent process function
C ``igniter_bare``  igniter's built trainer (DeterministicEngine + its step), no handlers
D ``igniter``       igniter's default run: progress bar, TensorBoard, checkpoint every
                    epoch, NaN guard, throughput (validation off: it is not per-iteration work)
E ``lightning``     ``lightning.Trainer`` with its defaults (progress bar, checkpointing, logger)
F ``lightning_off`` the same with them off
(E and F only when ``lightning`` is installed: ``pip install lightning``.)

Not run unless named in ``--variants``: igniter's default run without one of its
handlers, to see what each costs: ``igniter_no_bar``, ``igniter_no_tensorboard``,
``igniter_no_checkpoint``, and ``igniter_no_handlers`` (the three off; the NaN guard,
timers and periodic events stay); the checkpoint's cost split: ``igniter_checkpoint_state_only``
(Ignite's ``Checkpoint`` collects every ``state_dict()``, nothing is serialized) and
``igniter_checkpoint_unwritten`` (serialized by ``torch.save`` as always, no file written);
and ``ignite_lean``, B with igniter's event dispatch (``igniter.engines.LeanDispatch``), to
see what Ignite's per-event debug message costs.

Mixed precision and gradient accumulation, each igniter variant against its own
hand-written twin (its paired ratio and target are to the twin, not to A; the table's
``vs`` column names the reference, :data:`BASELINE`):

``loop_bf16``       A with ``torch.autocast(<device type>, torch.bfloat16)`` around forward and loss
``igniter_bf16``    D with ``trainer.precision=bf16-mixed``               (against ``loop_bf16``)
``loop_accum4``     A accumulating: the batch split in 4 (``tensor_split``), ``loss / 4``
                    backward on each, one optimizer step
``igniter_accum4``  D with ``trainer.accumulate_grad_batches=4``          (against ``loop_accum4``)
``loop_precision_off``  A with what igniter's default step now adds when precision is off:
                    ``contextlib.nullcontext()`` around forward and loss, and a disabled
                    ``GradScaler``'s ``scale``/``step``/``update`` (against A: what "off" costs)

Device: ``--device cpu`` (default; CUDA is hidden from the rounds' processes, so igniter's
``idist.device()`` is the CPU too) or ``--device cuda`` (the model on ``cuda:0`` as igniter
places it, every batch moved there with ``non_blocking=True`` in the hand-written
variants as igniter's step does, and ``torch.cuda.synchronize()`` before every epoch
boundary is timed, so queued kernels are counted in the epoch that launched them).

Variants take turns a few epochs at a time (``--block``, 3), each in its own thread,
only one running at any moment (A1-3 B1-3 C1-3 A4-6 ...): this VM's speed moves by
+-30% over seconds, so whole runs made one after the other differ by the host as much
as by the code; epoch k of every variant runs within a second or two of the others.
Every variant builds its run while it holds the turn. The first epoch of each turn is
not timed: it absorbs what the previous variant's background threads still do (a
checkpoint write, a TensorBoard flush), which in a real run overlaps the same run's
next epoch, and so do the timed epochs here. An epoch's time is from its
``EPOCH_STARTED`` to the next one's, so it includes the end-of-epoch handlers
(checkpoint, TensorBoard); the run's last epoch (end-of-run work) is not timed either.

Every round (one interleaved run of all variants) is a fresh process: code and heap
layout change from process to process and move a variant's speed by a few per cent for
the whole process (Mytkowicz et al., "Producing wrong data without doing anything
obviously wrong!", ASPLOS 2009), so only rounds in separate processes are independent
samples. The table shows the median microseconds per training iteration and its ratio
to A's median; the median over every round and epoch of the ratio to A's same epoch
("paired"), with the interquartile range of those ratios and the 95% confidence
interval of their median (bootstrap over rounds), against which the issue's targets
are judged MET, MISSED or undecided (from 10 rounds on); the ratio of each variant's
fastest epoch to A's fastest (the noise of a shared host only ever adds time, so the
minimum is the estimate least disturbed by it, as ``timeit``'s documentation argues);
and the final loss of each variant (equal losses mean equal work).
Writes ``bench/results/overhead_<workloads>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


from igniter.assemble import build_training  # noqa: E402
from igniter.checkpoint.saver import AtomicDiskSaver  # noqa: E402
from igniter.compose import compose_config, plain_config  # noqa: E402
from igniter.handlers import loss_of  # noqa: E402
from igniter.registry import event_handler_registry, io_registry  # noqa: E402
from igniter.run import train  # noqa: E402

WORKLOADS = {
    "digits": ["data.loader.batch_size=32", "model.params.hidden=[128]"],
    "mnist": ["experiment=mnist", "data.loader.batch_size=128"],
}


def config(workload: str, epochs: int, mnist_root: str, out: str, extra: list[str] = ()) -> Any:
    overrides = [*WORKLOADS[workload], f"trainer.max_epochs={epochs}", "data.val=null", f"output_dir={out}", *extra]
    if workload == "mnist":
        overrides += [f"data.root={mnist_root}", f"data.train.subset={mnist_subset}"]
    return plain_config(compose_config(overrides))


# 20 iterations of 128 per epoch (0.3 s): the turns come round every ~2 s, before the host's
# speed moves much; per-epoch costs (checkpoint) weigh 23 times more than in a full
# 469-iteration MNIST epoch, so the figure errs against igniter
mnist_subset = 2560


class Turns:
    """Round-robin turns between the variants' threads, ``block`` epochs per turn.

    ``begin(v)`` waits for ``v``'s first turn; ``epoch_started(v)`` (at every epoch start)
    closes ``v``'s previous epoch and, after ``block`` epochs, hands the turn on and waits
    for the next one; ``finish(v)`` leaves the rotation. ``epochs[v]``: seconds of every
    epoch but the first of each turn (it absorbs what the previous variant's background
    threads still do, e.g. a checkpoint write, and warms the caches) and the last of the
    run (end-of-run work), in order.
    """

    def __init__(self, names: list[str], block: int) -> None:
        self.active = list(names)
        self.turn = names[0]
        self.block = block
        self.cond = threading.Condition()
        self.epochs: dict[str, list[float]] = {n: [] for n in names}
        self._in_turn = {n: 0 for n in names}  # epochs started in the current turn
        self._since: dict[str, tuple[float, bool]] = {}  # start of the running epoch, and whether it is timed

    def _hand_on(self, name: str) -> None:  # with self.cond held
        self.turn = self.active[(self.active.index(name) + 1) % len(self.active)]
        self.cond.notify_all()

    def begin(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def epoch_started(self, name: str) -> None:
        _sync()
        if name in self._since:
            start, timed = self._since.pop(name)
            if timed:
                self.epochs[name].append(time.perf_counter() - start)
        if self._in_turn[name] == self.block:
            with self.cond:
                self._hand_on(name)
                self.cond.wait_for(lambda: self.turn == name)
            self._in_turn[name] = 0
        self._in_turn[name] += 1
        self._since[name] = (time.perf_counter(), self._in_turn[name] > 1)

    def finish(self, name: str) -> None:
        _sync()  # the next variant's epochs must not absorb this one's queued kernels
        self._since.pop(name, None)  # the last epoch holds the end of the run: not timed
        with self.cond:
            if len(self.active) > 1:
                self._hand_on(name)
            self.active.remove(name)


TURNS = Turns(["none"], 1)  # replaced for every interleaved run

#: the device of this round's process (``--device``): the hand-written variants move batches there
DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for the GPU's queued work, so that an epoch boundary's clock reading counts it (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@event_handler_registry("bench_epoch_turn")
def bench_epoch_turn(variant: str) -> Callable[[Any], None]:
    """``EPOCH_STARTED`` handler: ``TURNS.epoch_started(variant)``."""
    return lambda engine: TURNS.epoch_started(variant)


def run_loop(cfg: Any) -> tuple[int, float]:
    """A: the loop a user would write by hand around the same model, loader and optimizer."""
    ctx = build_training(cfg, Path(cfg.output_dir))
    model, opt, loader, loss_fn = ctx.model, ctx.optimizer, ctx.train_loader, ctx.loss_fn
    sampler = loader.sampler
    cuda = DEVICE.type == "cuda"
    n, loss = 0, torch.tensor(0.0)
    for epoch in range(cfg.trainer.max_epochs):
        TURNS.epoch_started("loop")
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            if cuda:
                x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n += 1
    return n, float(loss.detach())


def run_loop_bf16(cfg: Any) -> tuple[int, float]:
    """``loop_bf16``: A with forward and loss under ``torch.autocast(<device type>, torch.bfloat16)``
    (what ``trainer.precision=bf16-mixed`` does; weights, gradients and optimizer stay float32)."""
    ctx = build_training(cfg, Path(cfg.output_dir))
    model, opt, loader, loss_fn = ctx.model, ctx.optimizer, ctx.train_loader, ctx.loss_fn
    cuda = DEVICE.type == "cuda"
    n, loss = 0, torch.tensor(0.0)
    for epoch in range(cfg.trainer.max_epochs):
        TURNS.epoch_started("loop_bf16")
        loader.sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            if cuda:
                x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type, torch.bfloat16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n += 1
    return n, float(loss.detach().float())


def run_loop_accum(cfg: Any, k: int = 4) -> tuple[int, float]:
    """``loop_accum4``: A accumulating over ``k`` micro-batches: the batch (moved to the device
    whole) split by ``tensor_split``, backward of each micro-batch's ``loss / k``, one
    optimizer step per batch. The reported loss is the batch's (mean of the micro-batches')."""
    ctx = build_training(cfg, Path(cfg.output_dir))
    model, opt, loader, loss_fn = ctx.model, ctx.optimizer, ctx.train_loader, ctx.loss_fn
    cuda = DEVICE.type == "cuda"
    n, batch_loss = 0, torch.tensor(0.0)
    for epoch in range(cfg.trainer.max_epochs):
        TURNS.epoch_started(f"loop_accum{k}")
        loader.sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            if cuda:
                x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            batch_loss = torch.zeros((), device=DEVICE)
            for xm, ym in zip(x.tensor_split(k), y.tensor_split(k)):
                loss = loss_fn(model(xm), ym) / k
                loss.backward()
                batch_loss = batch_loss + loss.detach()
            opt.step()
            n += 1
    return n, float(batch_loss)


def run_loop_precision_off(cfg: Any) -> tuple[int, float]:
    """``loop_precision_off``: A with the calls igniter's default step (precision ``32``, no
    accumulation) makes around it: ``contextlib.nullcontext()`` for autocast and a disabled
    ``GradScaler``'s ``scale``, ``step`` and ``update``. Against A: what features that are off cost."""
    ctx = build_training(cfg, Path(cfg.output_dir))
    model, opt, loader, loss_fn = ctx.model, ctx.optimizer, ctx.train_loader, ctx.loss_fn
    autocast, scaler = contextlib.nullcontext, torch.amp.GradScaler(DEVICE.type, enabled=False)
    cuda = DEVICE.type == "cuda"
    n, loss = 0, torch.tensor(0.0)
    for epoch in range(cfg.trainer.max_epochs):
        TURNS.epoch_started("loop_precision_off")
        loader.sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            if cuda:
                x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n += 1
    return n, float(loss.detach())


def run_ignite(cfg: Any, lean: bool = False) -> tuple[int, float]:
    """B: a raw ignite Engine with the equivalent process function (``lean``: the same
    Engine with igniter's :class:`~igniter.engines.LeanDispatch`)."""
    from ignite.engine import Engine, Events

    from igniter.engines import Evaluator

    ctx = build_training(cfg, Path(cfg.output_dir))
    model, opt, loss_fn = ctx.model, ctx.optimizer, ctx.loss_fn

    def step(engine: Engine, batch: Any) -> torch.Tensor:
        model.train()
        x, y = batch
        if DEVICE.type == "cuda":
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    engine = (Evaluator if lean else Engine)(step)
    engine.add_event_handler(Events.EPOCH_STARTED, bench_epoch_turn("ignite_lean" if lean else "ignite"))
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: ctx.train_loader.sampler.set_epoch(e.state.epoch - 1))
    engine.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs)
    return engine.state.iteration, float(loss_of(engine.state.output))


def run_igniter_bare(cfg: Any) -> tuple[int, float]:
    """C: igniter's trainer as built from config, without handlers (but the sampler epoch)."""
    from ignite.engine import Events

    ctx = build_training(cfg, Path(cfg.output_dir))
    ctx.trainer.add_event_handler(Events.EPOCH_STARTED, bench_epoch_turn("igniter_bare"))
    ctx.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: ctx.train_loader.sampler.set_epoch(e.state.epoch - 1))
    ctx.trainer.run(ctx.train_loader, max_epochs=cfg.trainer.max_epochs)
    return ctx.trainer.state.iteration, float(loss_of(ctx.trainer.state.output))


class UnwrittenSaver(AtomicDiskSaver):
    """Serializes every checkpoint as igniter's saver does, writes no file."""

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        self.serialize(checkpoint)

    def remove(self, filename: str) -> None:
        pass


class StateOnlySaver(UnwrittenSaver):
    """Receives Ignite's checkpoint (every ``state_dict()`` collected), serializes nothing."""

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        pass


io_registry("bench_unwritten")(lambda dirname: UnwrittenSaver(dirname, require_empty=False, create_dir=True))
io_registry("bench_state_only")(lambda dirname: StateOnlySaver(dirname, require_empty=False, create_dir=True))

# igniter's default run and the same without some of its handlers: config overrides
IGNITER_RUNS = {
    "igniter": [],
    "igniter_no_bar": ["logging.progress_bar=false"],
    "igniter_no_tensorboard": ["logging.loggers=[]"],
    "igniter_no_checkpoint": ["checkpoint.enabled=false"],
    "igniter_checkpoint_unwritten": ["checkpoint.saver=bench_unwritten"],
    "igniter_checkpoint_state_only": ["checkpoint.saver=bench_state_only"],
    "igniter_no_handlers": ["logging.progress_bar=false", "logging.loggers=[]", "checkpoint.enabled=false"],
    "igniter_bf16": ["trainer.precision=bf16-mixed"],
    "igniter_accum4": ["trainer.accumulate_grad_batches=4"],
}


def run_igniter(cfg: Any) -> tuple[int, float]:
    """D: igniter's default run (handlers on, progress bar forced on as on a terminal;
    the turn-taking handler comes from the config, see ``interleaved_run``)."""
    result = train(cfg, cfg.output_dir)
    return result["iterations"], result["train_loss"]


def _lightning(cfg: Any, defaults: bool) -> tuple[int, float]:
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its banners and tips, not the table

    ctx = build_training(cfg, Path(cfg.output_dir))
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
    accelerator = "gpu" if DEVICE.type == "cuda" else "cpu"
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.trainer.max_epochs, accelerator=accelerator, devices=1, default_root_dir=cfg.output_dir
    )
    if not defaults:
        kwargs.update(enable_progress_bar=False, enable_checkpointing=False, logger=False, enable_model_summary=False)
    trainer = L.Trainer(**kwargs, use_distributed_sampler=False)
    name = "lightning" if defaults else "lightning_off"

    class EpochStart(L.Callback):
        def on_train_epoch_start(self, trainer: Any, *a: Any) -> None:
            TURNS.epoch_started(name)
            ctx.train_loader.sampler.set_epoch(trainer.current_epoch)

    trainer.callbacks.append(EpochStart())
    trainer.fit(module, ctx.train_loader)
    return trainer.global_step, float(module.last)


VARIANTS: dict[str, Callable[[Any], tuple[int, float]]] = {
    "loop": run_loop,
    "ignite": run_ignite,
    "ignite_lean": lambda cfg: run_ignite(cfg, lean=True),
    "igniter_bare": run_igniter_bare,
    **{name: run_igniter for name in IGNITER_RUNS},
    "lightning": lambda cfg: _lightning(cfg, True),
    "lightning_off": lambda cfg: _lightning(cfg, False),
    "loop_bf16": run_loop_bf16,
    "loop_accum4": run_loop_accum,
    "loop_precision_off": run_loop_precision_off,
}

#: the hand-written twin each variant's paired ratio (and target) is taken against; every other variant: ``loop``
BASELINE = {"igniter_bf16": "loop_bf16", "igniter_accum4": "loop_accum4"}
#: variants run only when named in ``--variants`` (or needed as a named variant's baseline)
OPT_IN = (*(v for v in IGNITER_RUNS if v != "igniter"), "ignite_lean", "loop_bf16", "loop_accum4", "loop_precision_off")


def baseline(variant: str) -> str:
    return BASELINE.get(variant, "loop")


def interleaved_run(
    order: list[str], workload: str, args: argparse.Namespace, tmp: str
) -> dict[str, tuple[int, float, list[float]]]:
    """One run of every variant in ``order``, taking turns ``args.block`` epochs at a time (see :class:`Turns`).

    Returns ``{variant: (iterations, final loss, seconds per epoch)}``.
    """
    global TURNS
    TURNS = Turns(order, args.block)
    done: dict[str, tuple[int, float, list[float]]] = {}
    errors: list[BaseException] = []

    def run(v: str) -> None:
        TURNS.begin(v)
        try:
            if v in IGNITER_RUNS:
                turn = f"handlers=[{{name: bench_epoch_turn, event: EPOCH_STARTED, params: {{variant: {v}}}}}]"
                extra = ["logging.progress_bar=true", turn, *IGNITER_RUNS[v]]
            else:
                extra = ["checkpoint.enabled=false", "logging.loggers=[]"]
            cfg = config(workload, args.epochs, args.mnist, str(Path(tmp) / v), extra)
            iterations, loss = VARIANTS[v](cfg)
            done[v] = (iterations, loss, TURNS.epochs[v])
        except BaseException as e:  # reported below; the others must not wait for this one
            errors.append(e)
        finally:
            TURNS.finish(v)

    threads = [threading.Thread(target=run, args=(v,), name=v) for v in order]
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(io.StringIO()):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return done


# the bars for the paired ratio to the hand-written loop (to its twin, :data:`BASELINE`)
TARGETS = {
    "digits": {"igniter_bare": 1.06, "igniter": 1.20},
    "mnist": {"igniter_bare": 1.03, "igniter": 1.05, "igniter_bf16": 1.05, "igniter_accum4": 1.05},
}


def bootstrap_ci(rounds: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% confidence interval of the median paired ratio, resampling whole rounds
    (epochs of one round share the host's state, so they are not independent draws;
    Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, percentile interval)."""
    rng = random.Random(seed)
    medians = sorted(
        statistics.median([x for r in rng.choices(rounds, k=len(rounds)) for x in r]) for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def verdict(row: dict[str, Any], rounds: int) -> str:
    """Whether the paired median meets the target, at 95% confidence (from 10 rounds on)."""
    target = row["target"]
    if target is None:
        return ""
    if rounds < 10:
        return f"   target x{target:.2f}: too few rounds to judge"
    low, high = row["ratio_ci95"]
    met = "MET" if high <= target else "MISSED" if low > target else "undecided (target inside the interval)"
    return f"   target x{target:.2f}: {met}"


def one_round(args: argparse.Namespace) -> None:
    """The child process of one round: the interleaved run of ``args.variants`` in that
    order, ``{variant: [iterations, final loss, [epoch seconds]]}`` written to ``args.one_round``."""
    global DEVICE
    torch.set_num_threads(1)
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)  # where idist.device() puts igniter's model in a 1-process run
        DEVICE = torch.device("cuda", 0)
    # inside a SLURM allocation igniter would install its preemption signal handlers,
    # which only the main thread may do; the benchmark measures training, not preemption
    os.environ.pop("SLURM_JOB_ID", None)
    with tempfile.TemporaryDirectory() as tmp:
        done = interleaved_run(args.variants, args.workloads[0], args, tmp)
    Path(args.one_round).write_text(json.dumps(done))


def run_rounds(workload: str, variants: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.rounds`` interleaved runs, each in a fresh process (see the module docstring)."""
    rounds = []
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]  # who goes first alternates too
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "round.json"
            cmd = [sys.executable, __file__, "--one-round", str(out), "--workloads", workload, "--variants", *order]
            cmd += [
                "--epochs",
                str(args.epochs),
                "--block",
                str(args.block),
                "--mnist",
                args.mnist,
                "--device",
                args.device,
            ]
            env = dict(os.environ)
            if args.device == "cpu":  # igniter takes idist.device(): CUDA hidden, it is the CPU as for the loop
                env["CUDA_VISIBLE_DEVICES"] = ""
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"round {round_ + 1} failed:\n{proc.stderr[-3000:]}")
            rounds.append(json.loads(out.read_text()))
        print(f"  {workload} round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["digits", "mnist"], choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs, each in a fresh process")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (digits: 44 iterations each; mnist: 20)")
    parser.add_argument("--block", type=int, default=3, help="epochs per turn (the first of each is not timed)")
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data"))
    default = [v for v in VARIANTS if v not in OPT_IN]
    parser.add_argument(
        "--variants",
        nargs="+",
        default=default,
        choices=list(VARIANTS),
        help="'loop' is always run, and each variant's twin (igniter_bf16: loop_bf16, igniter_accum4: loop_accum4): ratios are to it",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default; CUDA hidden from the rounds) or cuda (model and batches on cuda:0, epochs timed after torch.cuda.synchronize())",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON written (default: bench/results/overhead_<workloads>.json)"
    )
    parser.add_argument(
        "--one-round", metavar="JSON", help=argparse.SUPPRESS
    )  # internal: run one round in this process
    args = parser.parse_args()
    if args.one_round:
        return one_round(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "none: a CPU-only build"
        sys.exit(
            f"--device cuda: torch.cuda.is_available() is False here (torch {torch.__version__}, CUDA {built}); "
            "run on a machine with a GPU and a CUDA build of torch, or use --device cpu"
        )
    variants = ["loop"]
    for v in args.variants:
        for name in (baseline(v), v):
            if name not in variants:
                variants.append(name)
    if importlib.util.find_spec("lightning") is None:
        variants = [v for v in variants if not v.startswith("lightning")]
        print("lightning not installed: variants E/F skipped (pip install lightning)")

    results: dict[str, Any] = {}
    for workload in args.workloads:
        epoch_us: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        round_ratios: dict[str, list[list[float]]] = {v: [] for v in variants}
        losses: dict[str, float] = {}
        for done in run_rounds(workload, variants, args):
            per_epoch = {v: iterations / args.epochs for v, (iterations, _, _) in done.items()}
            us = {v: [s / per_epoch[v] * 1e6 for s in epochs] for v, (_, _, epochs) in done.items()}
            for v, (_iterations, loss, _epochs) in done.items():
                epoch_us[v] += us[v]
                round_ratios[v].append([x / b for x, b in zip(us[v], us[baseline(v)])])
                ratios[v] += round_ratios[v][-1]
                losses[v] = loss
        rows = {}
        for v in variants:
            q1, _, q3 = statistics.quantiles(ratios[v], n=4)
            low, high = bootstrap_ci(round_ratios[v])
            base = baseline(v)
            rows[v] = {
                "baseline": base,
                "us_per_iter": statistics.median(epoch_us[v]),
                "ratio_of_medians": statistics.median(epoch_us[v]) / statistics.median(epoch_us[base]),
                "ratio": statistics.median(ratios[v]),
                "ratio_iqr": [q1, q3],
                "ratio_ci95": [low, high],
                "target": TARGETS[workload].get(v),
                "best_ratio": min(epoch_us[v]) / min(epoch_us[base]),
                "ratio_to_loop": statistics.median(epoch_us[v]) / statistics.median(epoch_us["loop"]),
                "final_loss": losses[v],
                "epochs_us_per_iter": epoch_us[v],
            }
        results[workload] = rows
        n = len(ratios["loop"])
        print(
            f"\n{workload} on {args.device}: us/iteration (median of {n} epochs) and its ratio to its reference's (vs: the\n"
            "  hand-written loop, or the variant's hand-written twin); paired: median (IQR) of the ratio to the reference's\n"
            "  same epoch, and the 95% confidence interval of that median (bootstrap over rounds); best: fastest epoch / the\n"
            "  reference's fastest (the host's noise only adds time); final loss; the issue's target for the paired ratio"
        )
        width = max(map(len, rows))
        bwidth = max(len(r["baseline"]) for r in rows.values())
        for v, r in rows.items():
            q1, q3 = r["ratio_iqr"]
            low, high = r["ratio_ci95"]
            print(
                f"  {v:{width}s} vs {r['baseline']:{bwidth}s} {r['us_per_iter']:9.1f} us x{r['ratio_of_medians']:.3f}"
                f"   paired x{r['ratio']:.3f} ({q1:.3f}-{q3:.3f})"
                f" CI {low:.3f}-{high:.3f}   best x{r['best_ratio']:.3f}   loss {r['final_loss']:.6f}{verdict(r, args.rounds)}"
            )
        # the twins compute something else than the loop (bfloat16; micro-batch sums in another order):
        # only variants that do the same arithmetic as their reference must end with its loss
        same_work = {v: r for v, r in rows.items() if v not in BASELINE.values()}
        unequal = [
            f"{v} {r['final_loss']:.6f} vs {r['baseline']} {rows[r['baseline']]['final_loss']:.6f}"
            for v, r in same_work.items()
            if round(r["final_loss"], 5) != round(rows[r["baseline"]]["final_loss"], 5)
        ]
        print(
            f"  same final loss as its reference (twins: as their igniter variant): {'yes' if not unequal else 'NO: ' + '; '.join(unequal)}"
        )
    out = args.out or HERE / "results" / f"overhead_{'_'.join(args.workloads)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "device": args.device,
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    record = {
        "benchmark": "overhead",
        "machine": meta,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "block": args.block,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
