"""Real training runs through the command line, on the embedded digits data."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from conftest import read_metrics, run_igniter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from igniter.models import MLP


def only_run_dir(cwd: Path) -> Path:
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_default_run_reaches_95_percent_and_writes_outputs(tmp_path):
    start = time.monotonic()
    proc = run_igniter([], tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    assert metrics["final"]["accuracy"] >= 0.95, metrics["final"]
    assert len(metrics["epochs"]) == 20 and metrics["samples_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert 0.1 < metrics["first_iteration_s"] < elapsed, "seconds from process start to the first iteration"
    assert "world size 1" in proc.stdout and "samples/s" in proc.stdout
    for name in ("config.yaml", "rank0.log", "checkpoints", "tb"):
        assert (run / name).exists(), name
    # TensorBoard: training loss, learning rate and validation metrics
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "lr/group_0", "val/accuracy", "val/loss"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(50, 881, 50)), "every logging.log_every iterations"
    # the newest checkpoint loads into a fresh model with equal weights
    last = max((run / "checkpoints").glob("last_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    state = torch.load(last, weights_only=True)
    assert set(state) >= {"model", "optimizer", "trainer"}
    fresh = MLP(64, [128], 10)
    fresh.load_state_dict(state["model"])
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    assert state["trainer"]["iteration"] == metrics["iterations"]
    # the best checkpoint is the best epoch's model
    assert len(list((run / "checkpoints").glob("best_model_*.pt"))) == 1


def test_cfg_job_prints_resolved_config(tmp_path):
    proc = run_igniter(["--cfg", "job", "solver.lr=0.5", "experiment=mnist", "data.root=/x"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.5" in proc.stdout and "name: lenet" in proc.stdout and "root: /x" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_local_sweep_runs_every_point(tmp_path):
    proc = run_igniter(["-m", "solver.lr=0.01,0.02", "trainer.max_epochs=1", "checkpoint.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "multirun").glob("*/*/*") if (p / "metrics.json").exists())
    assert len(runs) == 2
    lrs = sorted(float(__import__("yaml").safe_load((r / "config.yaml").read_text())["solver"]["lr"]) for r in runs)
    assert lrs == [0.01, 0.02]


def test_explicit_output_dir(tmp_path):
    out = tmp_path / "my_run"
    proc = run_igniter([f"output_dir={out}", "trainer.max_epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").exists()
    assert not (tmp_path / "outputs").exists()


def test_early_stopping_from_config(tmp_path):
    # monitor the validation loss in "max" mode: it only goes down, so it never improves
    args = [
        "trainer.max_epochs=10",
        "evaluation.monitor=loss",
        "evaluation.mode=max",
        "evaluation.patience=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["epochs_completed"] == 3 and len(metrics["epochs"]) == 3


def test_log_event_fires_every_log_every_iterations(tmp_path):
    """The LOG event (TensorBoard scalars, log lines) is usable by user handlers too."""
    run = tmp_path / "run"
    args = [
        "trainer.max_epochs=1",
        "logging.log_every=20",
        "handlers=[{name:log_state,event:LOG,params:{message:tick}}]",
        f"output_dir={run}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticks = [line for line in (run / "rank0.log").read_text().splitlines() if "tick epoch" in line]
    assert [line.split("iteration ")[1].split()[0] for line in ticks] == ["20", "40"]
