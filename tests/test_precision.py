"""trainer.precision, trainer.accumulate_grad_batches and trainer.compile on CPU (gloo).

Multi-process invariance and the all-reduce count are in test_runners.py, the kill test
with bf16-mixed and accumulation in test_fault_tolerance.py, CUDA paths in tests/gpu/.
"""

from __future__ import annotations

import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import torch
from conftest import igniter_env, read_metrics, run_igniter, run_together

from igniter.checkpoint.files import checkpoint_files
from igniter.precision import accumulation_problems, micro_batches, precision_problems

SHORT = [
    "trainer.max_epochs=1",
    "data.train.subset=192",
    "logging.loggers=[]",
    "trainer.seed=5",
]  # 6 iterations per epoch, whole passes


def newest_checkpoint(run: Path) -> dict:
    return torch.load(checkpoint_files(run / "checkpoints")[0], weights_only=True)


def test_bf16_mixed_on_digits_reaches_95_percent(tmp_path):
    proc = run_igniter(["trainer.precision=bf16-mixed", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["precision"] == "bf16-mixed" and metrics["final"]["accuracy"] >= 0.95, metrics["final"]
    assert "precision bf16-mixed (trainer.precision: torch.autocast)" in proc.stdout  # on the processes line
    state = newest_checkpoint(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in state["model"].values()), "weights stay float32 under autocast"
    assert "scaler" not in state, "bf16 needs no loss scaling"


def test_16_mixed_on_cpu_exits_2_naming_the_key(tmp_path):
    proc = run_igniter(["trainer.precision=16-mixed", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    assert "trainer.precision" in proc.stderr and "bf16-mixed works on CPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_precision_checked_when_the_run_is_built_on_a_machine_validation_did_not_see():
    """A cluster job is validated without knowing its nodes (cuda unknown); the process that
    builds the run checks again."""
    assert precision_problems("16-mixed", None) == []
    (problem,) = precision_problems("16-mixed", False)
    assert problem.key == "trainer.precision"
    assert [p.key for p in precision_problems("fp16", True)] == ["trainer.precision"]
    assert precision_problems("bf16-mixed", False) == precision_problems("32", False) == []


def test_accumulation_must_split_the_global_batch_evenly():
    assert accumulation_problems(4, 32, 2) == [] and accumulation_problems(1, 33, 1) == []
    (problem,) = accumulation_problems(3, 32, 2)
    text = str(problem)
    for needle in (
        "trainer.accumulate_grad_batches",
        "data.loader.batch_size",
        "data.loader.batch_size=30 or 36",
        "trainer.accumulate_grad_batches=2 or 4",
    ):
        assert needle in text, text
    assert [p.key for p in accumulation_problems(0, 32, 1)] == ["trainer.accumulate_grad_batches"]


def test_bad_accumulation_on_the_command_line_exits_2(tmp_path):
    proc = run_igniter(["trainer.accumulate_grad_batches=3", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and "data.loader.batch_size=30 or 33" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_micro_batches_keep_the_batch_structure():
    Pair = namedtuple("Pair", "x y")
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    parts = micro_batches({"image": x, "label": y, "tag": "a"}, 3)
    assert [p["label"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]] and all(p["tag"] == "a" for p in parts)
    parts = micro_batches(Pair(x, y), 2)
    assert all(isinstance(p, Pair) for p in parts) and torch.equal(torch.cat([p.x for p in parts]), x)
    parts = micro_batches([x, y], 3)
    assert isinstance(parts[0], list) and parts[2][1].tolist() == [4, 5]
    batch = (x, y)
    assert micro_batches(batch, 1)[0] is batch


def test_a_custom_step_gets_autocast_scaler_and_accumulation(tmp_path, monkeypatch):
    """Step factories ask for ``autocast``, ``scaler`` and ``accumulate_grad_batches`` by name."""
    from igniter.assemble import build_training
    from igniter.compose import compose_config
    from igniter.registry import function_registry

    seen = {}

    def probe(model, optimizer, autocast, scaler, accumulate_grad_batches):
        seen.update(autocast=autocast, scaler=scaler, k=accumulate_grad_batches)
        return lambda engine, batch: None

    monkeypatch.chdir(tmp_path)
    function_registry.register(probe, "precision_probe")
    try:
        cfg = compose_config(
            [
                "trainer.step=precision_probe",
                "trainer.precision=bf16-mixed",
                "trainer.accumulate_grad_batches=2",
                f"output_dir={tmp_path}",
            ]
        )
        build_training(cfg, tmp_path)
    finally:
        function_registry.remove("precision_probe")
    with seen["autocast"]():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert isinstance(seen["scaler"], torch.amp.GradScaler) and not seen["scaler"].is_enabled()
    assert seen["k"] == 2


def test_compile_without_a_cxx_compiler_exits_2(tmp_path):
    env = {**igniter_env(), "CXX": str(tmp_path / "no-such-g++")}
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "trainer.compile=true", f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trainer.compile" in proc.stderr and "C++ compiler" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_compiled_and_eager_checkpoints_resume_each_other(tmp_path):
    """A compiled run (inductor) checkpoints the plain module's keys; an eager run resumes
    it, a compiled run (aot_eager) resumes that, export reads the result; the weights follow
    an all-eager run of the same steps (inductor's fused kernels round differently)."""
    run, eager = tmp_path / "run", tmp_path / "eager"
    for epochs, compile_arg in (
        (1, "trainer.compile=true"),
        (2, "trainer.compile=false"),
        (3, "trainer.compile={backend: aot_eager}"),
    ):
        args = [*SHORT, f"trainer.max_epochs={epochs}", compile_arg, f"output_dir={run}"]
        if epochs == 1:  # the all-eager run, side by side with the first (inductor's compile)
            proc, plain_run = run_together([args, [*SHORT, "trainer.max_epochs=3", f"output_dir={eager}"]], tmp_path)
            assert plain_run.returncode == 0, plain_run.stderr[-3000:]
        else:
            proc = run_igniter(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = newest_checkpoint(run)
        assert state["trainer"]["iteration"] == 6 * epochs
        assert not [k for k in state["model"] if k.startswith(("_orig_mod.", "module."))], list(state["model"])
        if epochs == 1:
            metrics = read_metrics(run)
            assert metrics["compile"] and metrics["compile_s"] > 0 and "s in torch.compile" in proc.stdout
    assert (run / "rank0.log").read_text().count("resumed from") == 2
    compiled, plain = newest_checkpoint(run)["model"], newest_checkpoint(eager)["model"]
    assert compiled.keys() == plain.keys()
    for k in plain:
        assert torch.allclose(compiled[k], plain[k], atol=1e-5, rtol=1e-4), (k, (compiled[k] - plain[k]).abs().max())
    out = tmp_path / "model.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "igniter",
            "export",
            str(checkpoint_files(run / "checkpoints")[0]),
            "--output",
            str(out),
        ],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
