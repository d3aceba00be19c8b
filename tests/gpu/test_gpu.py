"""Real training runs on CUDA through the command line (``pytest -m gpu tests/gpu``).

Skipped without CUDA (and the two-process tests with fewer than 2 GPUs): CI's CPU
runs collect and skip them; ``bench/gpu_check.sh`` runs them on a GPU machine. Each
test trains LeNet on a 8000-image MNIST subset for one epoch (62 optimizer steps of
128) and reads ``metrics.json``, the rank-0 log and the last checkpoint. MNIST is
found like the other MNIST tests (``$IGNITER_TEST_MNIST_ROOT``/MNIST/raw); without it
the runs use the digits default when scikit-learn is installed, else they are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import MNIST_ROOT, read_metrics, run_igniter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

#: Slow first steps (CUDA context, cuDNN autotuning, torch.compile) fit easily in this.
TIMEOUT = 420
QUANTITIES = ("utilization_pct", "memory_used_bytes", "memory_total_bytes", "power_w", "temperature_c")


def data_args() -> list[str]:
    """Overrides for a short run on MNIST, else on the digits default, else skip."""
    if (MNIST_ROOT / "MNIST" / "raw").is_dir():
        return [
            "experiment=mnist",
            f"data.root={MNIST_ROOT}",
            "data.train.subset=8000",
            "data.val.subset=2000",
            "trainer.max_epochs=1",
        ]
    if importlib.util.find_spec("sklearn") is not None:
        return ["trainer.max_epochs=3"]
    pytest.skip(
        f"no data: MNIST not at {MNIST_ROOT}/MNIST/raw (IGNITER_TEST_MNIST_ROOT) and no scikit-learn for digits"
    )


def train(cwd: Path, *overrides: str) -> tuple[Path, dict, str]:
    """Run igniter with ``overrides`` in ``cwd``; returns (run dir, metrics.json, stdout + rank-0 log)."""
    run = cwd / "run"
    proc = run_igniter([*data_args(), *overrides, f"output_dir={run}"], cwd, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    log = (run / "rank0.log").read_text() if (run / "rank0.log").exists() else ""
    return run, read_metrics(run), proc.stdout + proc.stderr + log


def assert_learned(metrics: dict) -> None:
    """Completed, finite losses, validation accuracy well above chance (10 classes)."""
    assert metrics["status"] == "completed", metrics.get("status")
    final = metrics["final"]
    assert math.isfinite(final["loss"]), final
    assert final["accuracy"] > 0.5, final
    if metrics.get("train_loss") is not None:
        assert math.isfinite(metrics["train_loss"]), metrics["train_loss"]
    for _, loss in metrics.get("train_loss_history") or []:
        assert math.isfinite(loss), metrics["train_loss_history"]


def assert_on_cuda(metrics: dict, text: str) -> None:
    """The run's device is CUDA: the rank-0 line ``... device cuda[:N] ...`` (and ``metrics.json``'s
    ``device`` where it has one)."""
    assert "device cuda" in text, "rank 0 did not log 'device cuda'"
    assert "device cpu" not in text
    if "device" in metrics:
        assert str(metrics["device"]).startswith("cuda"), metrics["device"]


def last_checkpoint(run: Path) -> dict:
    files = list((run / "checkpoints").glob("last_checkpoint_*.pt"))
    assert files, f"no last_checkpoint_*.pt in {run / 'checkpoints'}"
    newest = max(files, key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return torch.load(newest, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def one_gpu_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """The default precision on one GPU, NVML sampled every 5 iterations."""
    return train(tmp_path_factory.mktemp("one_gpu"), "logging.gpu_telemetry_every=5")


def test_one_process_cuda_run(one_gpu_run):
    run, metrics, text = one_gpu_run
    assert metrics["world_size"] == 1
    assert metrics["backend"] in (None, "none"), metrics["backend"]
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    state = last_checkpoint(run)
    assert set(state) >= {"model", "optimizer", "trainer"}
    assert state["trainer"]["iteration"] == metrics["iterations"]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nvml_telemetry_has_real_values(one_gpu_run):
    _, metrics, text = one_gpu_run
    assert "GPU telemetry off" not in text, "NVML was not used"
    gpu = metrics.get("gpu")
    assert gpu and set(gpu) == {"0"}, gpu
    rank0 = gpu["0"]
    for q in QUANTITIES:
        assert set(rank0[q]) == {"mean", "max"}, (q, rank0[q])
        assert all(math.isfinite(v) for v in rank0[q].values()), (q, rank0[q])
    util, used, total = rank0["utilization_pct"], rank0["memory_used_bytes"], rank0["memory_total_bytes"]
    assert 0 <= util["mean"] <= util["max"] <= 100, util
    assert used["max"] > 0 and total["max"] > 0, (used, total)
    assert used["max"] <= total["max"], (used, total)
    assert total["max"] >= 2**30, "a GPU with at least 1 GiB"
    assert rank0["temperature_c"]["max"] > 0, rank0["temperature_c"]
    assert rank0["power_w"]["max"] > 0, rank0["power_w"]


@two_gpus
def test_two_process_nccl(tmp_path):
    _, metrics, text = train(tmp_path, "runner=spawn", "runner.nproc_per_node=2")
    assert metrics["world_size"] == 2
    assert metrics["backend"] == "nccl", metrics["backend"]
    assert "backend nccl" in text
    assert_on_cuda(metrics, text)
    assert_learned(metrics)


def test_bf16_mixed(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    run, metrics, text = train(tmp_path, "trainer.precision=bf16-mixed")
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    state = last_checkpoint(run)
    # the weights stay float32 under autocast
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_fp16_mixed_with_grad_scaler(tmp_path):
    run, metrics, text = train(tmp_path, "trainer.precision=16-mixed")
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    state = last_checkpoint(run)
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    assert "scaler" in state, f"no 'scaler' in the checkpoint: {sorted(state)}"
    scale = state["scaler"]["scale"]
    assert isinstance(scale, float) and math.isfinite(scale) and scale > 0, state["scaler"]


def test_compile(tmp_path):
    run, metrics, text = train(tmp_path, "trainer.compile=true")
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    model = last_checkpoint(run)["model"]
    assert not [k for k in model if "_orig_mod." in k], sorted(model)
    if "experiment=mnist" in data_args():  # the uncompiled module's state_dict: loads into a fresh LeNet
        from igniter.models import LeNet

        fresh = LeNet(num_classes=10, dropout=0.0)
        fresh.load_state_dict(model)


def test_accumulation_one_gpu(tmp_path):
    run, metrics, text = train(tmp_path, "trainer.accumulate_grad_batches=4")
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    if "experiment=mnist" in data_args():
        # one iteration is one optimizer step of the global batch (128): 8000 // 128 of them
        assert metrics["global_batch_size"] == 128
        assert metrics["iterations"] == 62, metrics["iterations"]
    assert last_checkpoint(run)["trainer"]["iteration"] == metrics["iterations"]


@two_gpus
def test_accumulation_under_ddp_no_sync(tmp_path):
    """Two NCCL processes, 4 micro-batches each per optimizer step (the first 3 under no_sync)."""
    run, metrics, text = train(tmp_path, "runner=spawn", "runner.nproc_per_node=2", "trainer.accumulate_grad_batches=4")
    assert metrics["world_size"] == 2 and metrics["backend"] == "nccl", (metrics["world_size"], metrics["backend"])
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    if "experiment=mnist" in data_args():
        assert metrics["global_batch_size"] == 128
        assert metrics["iterations"] == 62, metrics["iterations"]
    # only rank 0 wrote the run: one log per rank, one checkpoint series
    assert (run / "rank1.log").exists()
    assert last_checkpoint(run)["trainer"]["iteration"] == metrics["iterations"]


def test_pin_memory_with_non_blocking_copies(tmp_path):
    _, metrics, text = train(tmp_path, "data.loader.pin_memory=true")
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    # torch warns when pin_memory has no accelerator to pin for
    assert "no accelerator is found" not in text and "pin_memory' argument is set as true but" not in text


@two_gpus
def test_fsdp_bf16_mixed_two_processes(tmp_path):
    """FSDP2 over two NCCL processes with bfloat16 compute (``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``), every child of 100+ parameters its own unit, ``dcp`` checkpoints, its
    validation evaluated sharded (one unit gathered at a time over NCCL, the shorter shard padded);
    ``igniter eval`` in one process reads the last one back and gives the same accuracy."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    from igniter.checkpoint.dcp import dcp_model_state
    from igniter.checkpoint.files import checkpoint_files

    run, metrics, text = train(tmp_path, "runner=spawn", "runner.nproc_per_node=2", "runner.strategy=fsdp",
                               "runner.fsdp.min_params=100", "trainer.precision=bf16-mixed")  # fmt: skip
    assert metrics["world_size"] == 2 and metrics["backend"] == "nccl", (metrics["world_size"], metrics["backend"])
    assert_on_cuda(metrics, text)
    assert_learned(metrics)
    newest = checkpoint_files(run / "checkpoints")[0]
    assert newest.is_dir() and newest.name == f"last_checkpoint_{metrics['iterations']}.dcp", newest
    state = dcp_model_state(newest)  # consolidated from both ranks' shards
    # the sharded parameters stay float32; only the gathered copies used for compute are bfloat16
    assert state and all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    if "experiment=mnist" in data_args():
        from igniter.models import LeNet

        LeNet(num_classes=10, dropout=0.0).load_state_dict(state)
    proc = run_igniter(["eval", str(run)], tmp_path, timeout=TIMEOUT)  # one process: evaluated unsharded
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((run / "eval_metrics.json").read_text())
    assert evaluated["world_size"] == 1
    # autocast in one process vs bfloat16 parameters under FSDP: the same weights, rounding apart
    assert evaluated["metrics"]["accuracy"] == pytest.approx(metrics["final"]["accuracy"], abs=0.01)


def test_activation_checkpointing_lowers_peak_cuda_memory():
    """A GPT-2 of 8 blocks (width 512, 512 positions, batch 8) in this process: one training step's
    peak allocated memory (torch.cuda.max_memory_allocated) with every GPT2Block checkpointed is
    below 0.7x the plain model's, with the same loss (recomputation in float32 gives the same values)."""
    pytest.importorskip("transformers")
    import copy

    from igniter.lm import causal_lm
    from igniter.parallel.strategy import checkpoint_activations

    torch.manual_seed(0)
    plain = causal_lm(256, block_size=512, n_layer=8, n_head=8, n_embd=512).cuda()
    checkpointed = checkpoint_activations(copy.deepcopy(plain), ["GPT2Block"])
    x = torch.randint(0, 256, (8, 512), device="cuda")
    peaks, losses = {}, {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.cuda.synchronize()
        peaks[name], losses[name] = torch.cuda.max_memory_allocated() - base, loss.item()
        model.zero_grad(set_to_none=True)
    print(f"peak allocated above the model: {peaks}")  # the figures, for bench/results/gpu/pytest.txt
    assert peaks["checkpointed"] < 0.7 * peaks["plain"], peaks
    assert losses["checkpointed"] == pytest.approx(losses["plain"], abs=1e-4)


@two_gpus
def test_hsdp_over_nccl(tmp_path):
    """runner.fsdp.replicate over the GPUs of this machine: 2 replica groups of (GPUs / 2) shards (needs an even count)."""
    gpus = torch.cuda.device_count() // 2 * 2
    run, metrics, text = train(
        tmp_path, "runner=spawn", f"runner.nproc_per_node={gpus}", "runner.strategy=fsdp", "runner.fsdp.replicate=2",
        "runner.fsdp.min_params=1000",
    )  # fmt: skip
    assert_learned(metrics)
    assert_on_cuda(metrics, text)
    assert f"HSDP: 2 replica groups x {gpus // 2} shards" in text


def test_check_on_cuda_refuses_a_step_larger_than_the_free_memory_and_reports_cuda_oom(tmp_path):
    """``igniter check`` on a GPU: activations of 256 MB per sample x 1024 (262 GB, estimated
    from 2 samples) exceed the device's free memory: refused before the step, exit 2 naming
    data.loader.batch_size; the pairwise model's real step (a 268 GB allocation) raises CUDA's
    OutOfMemoryError: the same paragraph. Digits (scikit-learn) with the fixture model."""
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("needs scikit-learn (the digits dataset)")
    wide = ["check", "imports=[my_project]", "model.name=wide_activations", "data.loader.batch_size=1024"]
    refused = run_igniter([*wide, "model.params.hidden=[1000000]"], tmp_path, timeout=TIMEOUT)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    for needle in ("data.loader.batch_size = 1024", "the step was not run", "free memory of cuda"):
        assert needle in refused.stderr, refused.stderr
    oom = run_igniter([*wide, "model.params.hidden=[1000]", "+model.params.pairwise=true"], tmp_path, timeout=TIMEOUT)
    assert oom.returncode == 2, oom.stdout + oom.stderr
    for needle in ("data.loader.batch_size = 1024", "ran out of memory", "CUDA out of memory"):
        assert needle in oom.stderr, oom.stderr
    assert "Traceback" not in refused.stderr + oom.stderr
    assert not any(tmp_path.iterdir())
