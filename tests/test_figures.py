"""The figures a GPU user judges a run by (issue 28, items 6 and 7): MFU against the dense peak
of the device (the table keyed by NVML name, ``logging.peak_tflops``), the data-wait fraction,
peak memory per rank, and ``logging.torch_profiler``'s traces.

The pure parts are unit tests; one tiny digits run (profiler on, a CPU peak given) checks what
reaches ``metrics.json``, the summary, TensorBoard and ``<run dir>/profiler``. The GPU side (a
bf16 run's MFU on CUDA, the lookup through NVML) is in ``tests/gpu/test_gpu_figures.py``.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_igniter

from igniter.flops import PEAK_TFLOPS, achieved_tflops, compute_dtype, mfu, run_peak, table_key, table_peak_tflops
from igniter.profiling import profiler_options, profiler_problems
from igniter.summary import summary_table
from igniter.telemetry import peak_memory_bytes, rss_bytes
from igniter.timing import data_wait_fraction

# NVML names as nvidia-smi / pynvml.nvmlDeviceGetName report them -> the table entry
NVML_NAMES = [
    ("NVIDIA A100-SXM4-80GB", "A100 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA B200", "B200"),
    # not in the table: no MFU unless logging.peak_tflops is given
    ("NVIDIA L40", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla T4", None),
]


@pytest.mark.parametrize("name, key", NVML_NAMES)
def test_the_peak_table_finds_a_gpu_by_its_nvml_name(name, key):
    assert table_key(name) == key
    if key is not None:
        assert table_peak_tflops(name, "bf16") == PEAK_TFLOPS[key]["bf16"]


def test_the_peak_table_is_dense_and_ordered_by_dtype():
    """Every entry has the four dtypes; tensor bf16 = fp16 = about 2 x tf32 (the datasheets' ratio;
    the B200's TF32 is printed rounded, 2.2 PFLOPS), fp32 (no tensor cores) at most tf32."""
    for key, peaks in PEAK_TFLOPS.items():
        assert set(peaks) == {"bf16", "fp16", "tf32", "fp32"}, key
        assert peaks["bf16"] == peaks["fp16"] == pytest.approx(2 * peaks["tf32"], rel=0.03), key
        assert peaks["fp32"] <= peaks["tf32"], key
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # 1,979 with sparsity
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert table_peak_tflops("NVIDIA L40S", "fp32") == 91.6


def test_the_compute_dtype_follows_trainer_precision_and_tf32():
    assert compute_dtype("bf16-mixed") == "bf16"
    assert compute_dtype("16-mixed") == "fp16"
    assert compute_dtype("32") == "fp32"  # PyTorch's default: float32 matmuls in full precision
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores allowed
        assert compute_dtype("32") == "tf32"
        assert compute_dtype("bf16-mixed") == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)


def test_run_peak_from_the_override_the_table_or_none(monkeypatch):
    import igniter.telemetry

    run_peak.cache_clear()
    monkeypatch.setattr(igniter.telemetry, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    try:
        gpu = run_peak("bf16-mixed", torch.device("cuda", 0), None)
        assert gpu.tflops == 989.5 and "NVIDIA H100 80GB HBM3, bf16 (H100 SXM" in gpu.source
        assert run_peak("bf16-mixed", torch.device("cuda", 0), 400.0).tflops == 400.0  # the override wins
        cpu = run_peak("32", torch.device("cpu"), None)
        assert cpu.tflops is None and "logging.peak_tflops" in cpu.source
        assert run_peak("32", torch.device("cpu"), 0.5).source == "logging.peak_tflops"
        monkeypatch.setattr(igniter.telemetry, "device_name", lambda device: "NVIDIA GeForce RTX 4090")
        run_peak.cache_clear()
        unknown = run_peak("bf16-mixed", torch.device("cuda", 0), None)
        assert unknown.tflops is None and "not in igniter.flops.PEAK_TFLOPS" in unknown.source
    finally:
        run_peak.cache_clear()


def test_mfu_is_the_achieved_flops_over_the_peak_of_every_device():
    # 4 GPUs at 989.5 TFLOP/s, a step of 1.2e15 FLOPs (all 4 together) every 2 s
    tflops = achieved_tflops(1.2e15, steps=10, seconds=20.0)
    assert tflops == pytest.approx(600.0)
    assert mfu(tflops, 989.5, 4) == pytest.approx(600.0 / (4 * 989.5))
    assert achieved_tflops(None, 10, 20.0) is None and achieved_tflops(1e12, 10, 0.0) is None
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1)


def test_data_wait_fraction_and_rss_units():
    assert data_wait_fraction(1.0, 3.0) == 0.25
    assert data_wait_fraction(0.0, 2.0) == 0.0
    assert data_wait_fraction(0.0, 0.0) is None
    assert rss_bytes(1000, "linux") == 1_024_000  # KiB on Linux
    assert rss_bytes(1000, "darwin") == 1000  # bytes on macOS
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert now <= peak_memory_bytes(torch.device("cpu")) <= now + 2**30


@pytest.mark.parametrize(
    "value, key",
    [
        ({"active": 0}, "logging.torch_profiler.active"),
        ({"wait": -1}, "logging.torch_profiler.wait"),
        ({"repeat": 1.5}, "logging.torch_profiler.repeat"),
        ({"ranks": [0, 2]}, "logging.torch_profiler.ranks[1]"),
        ({"ranks": []}, "logging.torch_profiler.ranks"),
        ({"activ": 3}, "logging.torch_profiler.activ"),
        ("yes", "logging.torch_profiler"),
    ],
)
def test_profiler_problems_name_the_key(value, key):
    problems = profiler_problems(value, world_size=2)
    assert [p.key for p in problems] == [key]


def test_profiler_options():
    assert profiler_options(None) is None and profiler_options(False) is None
    assert profiler_options(True).ranks == [0]
    options = profiler_options({"active": 5, "ranks": [0, 1], "wait": None})
    assert (options.wait, options.warmup, options.active, options.repeat, options.ranks) == (1, 1, 5, 1, [0, 1])
    assert profiler_problems(True, 1) == [] and profiler_problems({"active": 2, "ranks": [1]}, 2) == []


def test_summary_rows_for_mfu_data_wait_and_memory():
    m = {
        "world_size": 2,
        "model_flops_per_step": 2e12,
        "mfu": 0.4123,
        "peak_tflops": 989.5,
        "peak_tflops_source": "NVIDIA H100 80GB HBM3, bf16 (H100 SXM in igniter.flops.PEAK_TFLOPS)",
        "data_wait_fraction": 0.031,
        "peak_memory_bytes": {"0": 12_300_000_000, "1": 12_100_000_000},
    }
    table = summary_table(m)
    assert "  MFU         41.2% of 2 x 989.5 TFLOP/s peak (NVIDIA H100 80GB HBM3, bf16" in table
    assert "  data wait   3.1% of batch fetch + step time (the largest of the ranks)" in table
    assert "  memory      peak 12.3 GB (rank 0), 12.1 GB (rank 1)" in table
    cpu = summary_table({"model_flops_per_step": 1e9, "mfu": None, "peak_tflops_source": "no peak for a cpu device"})
    assert "  MFU         - (no peak for a cpu device)" in cpu
    many = summary_table({"peak_memory_bytes": {str(r): 1e9 + r * 1e6 for r in range(8)}})
    assert "peak 1.01 GB (rank 7) to 1 GB (rank 0) over 8 ranks" in many


#: The digits MLP whose first training step sleeps 2 s (``fixtures/slow_first_step.py``).
SLOW_FIRST_STEP = ["imports=[slow_first_step]", "model.name=mlp_slow_first_step"]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> Path:
    """One epoch of the digits default (44 iterations), a CPU peak given, the profiler recording
    iterations 3-4 (wait 1, warm-up 1, active 2, once); the MLP's first step sleeps 2 s
    (``fixtures/slow_first_step.py``), as a first step's one-time costs would."""
    cwd = tmp_path_factory.mktemp("profiled")
    proc = run_igniter(
        [
            *SLOW_FIRST_STEP,
            "trainer.max_epochs=1",
            "logging.peak_tflops=0.05",
            "logging.torch_profiler={wait:1,warmup:1,active:2}",
            "logging.progress_bar=false",
            f"output_dir={cwd / 'run'}",
        ],
        cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def test_metrics_json_has_mfu_data_wait_and_peak_memory(profiled_run):
    m = read_metrics(profiled_run)
    assert m["peak_tflops"] == 0.05 and m["peak_tflops_source"] == "logging.peak_tflops"
    assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] / 0.05)
    assert 0 < m["mfu"] < 1
    assert 0 <= m["data_wait_fraction"] <= 1
    split = m["time_split"]
    assert m["data_wait_fraction"] == pytest.approx(split["data_s"] / (split["data_s"] + split["step_s"]))
    assert set(m["peak_memory_bytes"]) == {"0"}
    assert 50e6 < m["peak_memory_bytes"]["0"] < 8e9  # a Python process with torch: tens of MB at least
    summary = (profiled_run / "rank0.log").read_text()
    assert "MFU         " in summary and "data wait   " in summary and "memory      peak" in summary


def assert_first_step_left_out(m: dict) -> None:
    """``metrics.json`` of a process that trained one digits epoch (44 steps of 32) of
    ``fixtures/slow_first_step.py``: the first step's sleep is in ``first_step_s``, and the
    throughput's time base holds the other 43 steps only."""
    from slow_first_step import FIRST_STEP_SLEEP_S

    assert m["first_step_s"] >= FIRST_STEP_SLEEP_S
    # the other 43 steps of a digits MLP take milliseconds each: the sleep is not in the time base
    assert m["train_time_s"] < FIRST_STEP_SLEEP_S
    assert m["samples_per_s"] == pytest.approx(43 * 32 / m["train_time_s"])


def test_the_first_step_is_left_out_of_the_throughput_figures(profiled_run):
    m = read_metrics(profiled_run)
    assert_first_step_left_out(m)
    assert m["model_tflops_per_s"] == pytest.approx(m["model_flops_per_step"] * 43 / m["train_time_s"] / 1e12)


@pytest.mark.slow
def test_every_spawned_process_and_a_resumed_one_leave_their_first_step_out(tmp_path):
    """Two spawned processes train one epoch; the same command with ``trainer.max_epochs=2`` then
    resumes in two fresh processes. Every process's first step sleeps 2 s: neither run's
    ``metrics.json`` (rank 0's figures, this process's epochs only) has the sleep in its time base."""
    run = tmp_path / "run"
    args = [*SLOW_FIRST_STEP, "runner=spawn", "runner.nproc_per_node=2"]
    for epochs in (1, 2):
        proc = run_igniter(
            [*args, f"trainer.max_epochs={epochs}", "logging.progress_bar=false", f"output_dir={run}"], tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = read_metrics(run)
        assert m["iterations"] == 44 * epochs
        assert_first_step_left_out(m)
    assert "resumed from" in proc.stdout + proc.stderr


def test_trackers_get_the_figures_per_epoch(profiled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(profiled_run / "tb"))
    events.Reload()
    for tag in ("train/model_tflops_per_s", "train/mfu", "train/data_wait_fraction", "train/peak_memory_bytes"):
        values = events.Scalars(tag)
        assert [e.step for e in values] == [44], tag
        assert all(math.isfinite(e.value) and e.value >= 0 for e in values), tag


def test_the_profiler_writes_a_trace_perfetto_and_tensorboard_read(profiled_run):
    traces = sorted((profiled_run / "profiler").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list((profiled_run / "profiler").iterdir())  # repeat 1: one cycle, one file
    trace = json.loads(traces[0].read_text())
    assert trace["traceEvents"], "no events"
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}, steps  # the 2 active steps after wait 1, warm-up 1
