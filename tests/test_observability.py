"""GPU telemetry (no-NVML path for real, NVML path through a fake pynvml module),
doctor, summary and curves.png, TensorBoard tags, eval and export."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, igniter_env, read_metrics, run_igniter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from igniter.models import MLP


def run_with_env(args, cwd, extra_env):
    env = {**igniter_env(), **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "igniter", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("digits")
    proc = run_igniter(["trainer.max_epochs=4", "logging.log_every=10", f"output_dir={cwd / 'run'}"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def scalar_tags(run: Path) -> set[str]:
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_no_nvml_logs_one_line_and_attaches_nothing(digits_run):
    log = (digits_run / "rank0.log").read_text()
    assert log.count("GPU telemetry off:") == 1
    assert "gpu" not in read_metrics(digits_run)
    assert not any(t.startswith("gpu/") for t in scalar_tags(digits_run))


def test_profiler_off_and_no_peak_on_cpu(digits_run):
    """``logging.torch_profiler`` off (the default): no profiler directory; on CPU without
    ``logging.peak_tflops`` no MFU (and no MFU scalar), the reason recorded; the data wait and
    peak memory are there."""
    assert not (digits_run / "profiler").exists()
    m = read_metrics(digits_run)
    assert m["mfu"] is None and m["peak_tflops"] is None
    assert "logging.peak_tflops" in m["peak_tflops_source"]
    assert 0 <= m["data_wait_fraction"] <= 1 and m["peak_memory_bytes"]["0"] > 0
    tags = scalar_tags(digits_run)
    assert "train/mfu" not in tags and {"train/data_wait_fraction", "train/peak_memory_bytes"} <= tags


def test_fake_nvml_values_reach_tensorboard_and_metrics(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(FIXTURES / "fake_nvml"), igniter_env()["PYTHONPATH"]])}
    proc = run_with_env(
        ["trainer.max_epochs=1", "logging.gpu_telemetry_every=10", f"output_dir={tmp_path / 'run'}"], tmp_path, env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    tags = scalar_tags(run)
    for q in ("utilization_pct", "memory_used_bytes", "memory_total_bytes", "power_w", "temperature_c"):
        assert f"gpu/0/{q}" in tags
    gpu = read_metrics(run)["gpu"]["0"]
    assert gpu["utilization_pct"] == {"mean": 40.0, "max": 40.0}
    assert gpu["power_w"]["max"] == 150.0 and gpu["temperature_c"]["mean"] == 60.0
    assert gpu["memory_total_bytes"]["max"] == 16 * 2**30


def test_tensorboard_tags(digits_run):
    assert {"train/loss", "lr/group_0", "train/samples_per_s", "val/accuracy", "val/loss"} <= scalar_tags(digits_run)


def test_tensorboard_has_every_logged_loss(digits_run):
    """Batched hand-offs to TensorBoard lose nothing: every LOG step's loss, the last
    ones (handed on at close) included, matches metrics.json's loss history."""
    acc = EventAccumulator(str(digits_run / "tb"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    history = read_metrics(digits_run)["train_loss_history"]
    assert [step for step, _ in tb] == [step for step, _ in history] == list(range(10, 177, 10))
    assert all(abs(v - loss) <= 1e-6 * max(1.0, abs(loss)) for (_, v), (_, loss) in zip(tb, history))
    assert len(acc.Scalars("val/accuracy")) == 4


class RecordingWriter:
    """Stands in for a ``SummaryWriter``: records what reaches it."""

    log_dir = "somewhere"

    def __init__(self) -> None:
        self.scalars: list[tuple] = []
        self.closed = False

    def add_scalar(self, tag, value, step=None, walltime=None):
        self.scalars.append((tag, value, step, walltime))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_batched_scalars_hand_on_in_batches_with_their_values_and_times():
    from igniter.trackers.tensorboard import BatchedScalars

    inner = RecordingWriter()
    writer = BatchedScalars(inner, max_events=3, max_delay_s=60)
    loss = torch.tensor(1.5)
    before = time.time()
    writer.add_scalar("train/loss", loss, 1)
    loss.add_(1.0)  # changed after it was logged: the logged value stays 1.5
    time.sleep(0.05)
    writer.add_scalar("lr", 0.1, 1)
    assert inner.scalars == []  # kept
    writer.add_scalar("train/loss", 0.5, 2)
    assert [(t, v, s) for t, v, s, _ in inner.scalars] == [
        ("train/loss", 1.5, 1),
        ("lr", 0.1, 1),
        ("train/loss", 0.5, 2),
    ]
    first, second = inner.scalars[0][3], inner.scalars[1][3]
    assert before <= first and second - first >= 0.04  # each one's own wall time, not the hand-off's
    writer.add_scalar("lr", 0.2, 2)
    assert len(inner.scalars) == 3 and writer.log_dir == "somewhere"
    writer.close()
    assert inner.scalars[-1][:3] == ("lr", 0.2, 2) and inner.closed


def test_batched_scalars_hand_on_what_waited_max_delay():
    from igniter.trackers.tensorboard import BatchedScalars

    inner = RecordingWriter()
    writer = BatchedScalars(inner, max_events=100, max_delay_s=1.0)  # 1 s: a busy CI host stays inside it
    writer.add_scalar("a", 1.0, 1)
    writer.add_scalar("a", 2.0, 2)
    assert inner.scalars == []
    time.sleep(1.05)
    writer.add_scalar("a", 3.0, 3)
    assert [v for _, v, _, _ in inner.scalars] == [1.0, 2.0, 3.0]
    writer.add_scalar("a", 4.0, 4)
    writer.flush_pending(object())  # as an event handler: called with the engine
    assert [v for _, v, _, _ in inner.scalars] == [1.0, 2.0, 3.0, 4.0]


def test_summary_and_curves_png(digits_run, tmp_path):
    png = digits_run / "curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 300
    m = read_metrics(digits_run)
    assert len(m["train_loss_history"]) == 176 // 10 and m["time_split"]["step_s"] > 0
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "summary", str(digits_run)], capture_output=True, text=True, env=igniter_env()
    )
    assert proc.returncode == 0
    assert (
        "epochs      4 (176 iterations)" in proc.stdout and "world size 1" in proc.stdout and "samples/s" in proc.stdout
    )


def test_profile_logs_every_handler_and_splits_the_time(tmp_path):
    proc = run_igniter(["trainer.max_epochs=2", "logging.profile=true", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "rank0.log").read_text()
    table = log.split("time per handler (logging.profile=true):", 1)[1]
    for handler, event in [
        ("_guarded.<locals>.handler", "EPOCH_COMPLETED"),
        ("attach_nan_guard.<locals>._check", "CHECK_LOSS"),
    ]:
        assert any(handler in line and event in line for line in table.splitlines()), table
    assert "Processing took total" in table and "Dataflow took total" in table
    split = read_metrics(tmp_path / "run")["time_split"]
    assert split["step_s"] > 0 and split["data_s"] > 0 and split["handlers_s"] > 0


def test_doctor_json_in_torchrun_and_slurm_like_environments():
    base = {k: v for k, v in igniter_env().items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    torchrun = {
        **base,
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29400",
    }
    out = subprocess.run(
        [sys.executable, "-m", "igniter", "doctor", "--json"], env=torchrun, capture_output=True, text=True
    )
    assert out.returncode == 0
    d = json.loads(out.stdout)["distributed"]
    assert (d["world_size"], d["rank"], d["master_addr"], d["master_port"]) == (8, 3, "10.1.2.3", 29400)
    slurm = {
        **base,
        "SLURM_JOB_ID": "4321",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "6",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_STEP_ID": "0",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "igniter", "doctor", "--json"], env=slurm, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    d = r["distributed"]
    assert (d["world_size"], d["rank"], d["node_rank"], d["master_port"]) == (6, 5, 2, 15000 + 4321)
    assert d["master_addr"] == "gpu07"
    assert r["gloo"]["available"] and r["cuda"]["available"] is False and r["gpus"]["available"] is False
    text = subprocess.run([sys.executable, "-m", "igniter", "doctor"], env=base, capture_output=True, text=True)
    assert text.returncode == 0 and "gloo" in text.stdout and "torch" in text.stdout


def test_eval_reproduces_final_accuracy_and_export_loads(digits_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "eval", str(digits_run)], capture_output=True, text=True, env=igniter_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((digits_run / "eval_metrics.json").read_text())["metrics"]
    assert evaluated["accuracy"] == read_metrics(digits_run)["final"]["accuracy"]
    ckpt = max((digits_run / "checkpoints").glob("last_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    out = tmp_path / "weights.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "export", str(ckpt), "--format", "safetensors", "--output", str(out)],
        capture_output=True,
        text=True,
        env=igniter_env(),
    )
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    model = MLP(64, [128], 10)
    model.load_state_dict(load_file(str(out)))
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_eval_mnist_run_reproduces_test_accuracy(tmp_path, mnist_root):
    args = [
        "experiment=mnist",
        f"data.root={mnist_root}",
        "data.train.subset=4000",
        "trainer.max_epochs=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert run_igniter(args, tmp_path).returncode == 0
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "eval", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=igniter_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    assert evaluated["samples"] == 10_000
    assert evaluated["metrics"]["accuracy"] == read_metrics(tmp_path / "run")["final"]["accuracy"]


def test_progress_bar_off_when_not_a_terminal(digits_run):
    log = (digits_run / "rank0.log").read_text()
    assert "epoch 1/4 iteration 10/44 loss" in log  # periodic log lines replace the bar under a pipe


class SlowBatches:
    """Four batches, each taking ``seconds`` to fetch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __iter__(self):
        for i in range(4):
            time.sleep(self.seconds)
            yield i

    def __len__(self) -> int:
        return 4


def test_step_timer_splits_batch_fetching_from_the_step():
    from ignite.engine import Engine

    from igniter.timing import StepTimer

    timer = StepTimer()
    steps = []
    timer.on_first_step = lambda: steps.append("first step done")
    trainer = Engine(timer.wrap(lambda engine, batch: time.sleep(0.03)))
    timer.attach(trainer)
    trainer.run(SlowBatches(0.01), max_epochs=2)  # 8 fetches of 10 ms, 8 steps of 30 ms
    assert 0.08 <= timer.data_s < 0.16 and 0.24 <= timer.step_s < 0.4, (timer.data_s, timer.step_s)
    assert steps == ["first step done"]
