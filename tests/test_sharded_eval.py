"""Sharded evaluation: a model sharded with FSDP2 is evaluated sharded, one unit gathered at a time.

Three processes evaluate 1,001 validation digits (the world size does not divide them): the
shards are 334, 334 and 333 samples, rank 2's padded by one sample to 334, so every rank runs
the same number of forward passes (each gathers parameters: collectives that must line up) and
the padding is left out of every metric. With a per-process batch of 3, rank 2's last batch is
its padding alone (the step's output is None and metrics skip it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_metrics, run_igniter, run_together

pytestmark = pytest.mark.slow  # three-process runs

THREE_FSDP = ["runner=spawn", "runner.nproc_per_node=3", "runner.strategy=fsdp", "runner.fsdp.shard_modules=[Linear]"]
RUN = [
    "imports=[my_project]",
    "model.params.hidden=[64,64,64,64,64,64]",  # 7 Linear units of at most 4,160 parameters
    "+data.train.params.val_fraction=0.557",
    "+data.val.params.val_fraction=0.557",  # round(1797 x 0.557) = 1,001 validation samples
    "data.loader.batch_size=48",
    "data.loader.val_batch_size=9",  # 3 per process
    "trainer.max_epochs=1",
    "trainer.epoch_length=6",
    "logging.loggers=[]",
    "logging.progress_bar=false",
    "+handlers=[{name: record_eval_param_bytes, event: STARTED}]",
]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A 3-process fsdp run of 6 iterations, evaluated at its end; then its checkpoint evaluated
    by ``igniter eval`` with one process (``single/``) and with 3 fsdp processes (``three/``)."""
    root = tmp_path_factory.mktemp("sharded_eval")
    run = root / "run"
    proc = run_igniter([*RUN, *THREE_FSDP, f"output_dir={run}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("single", "three"):
        shutil.copytree(run, root / name)
    evals = run_together(
        [["eval", str(root / "single"), "runner=single"], ["eval", str(root / "three"), *THREE_FSDP]], root
    )
    for proc in evals:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_metrics_of_three_sharded_processes_equal_one_process_s_on_1001_samples(sharded_run):
    """The run's own evaluation (3 sharded processes) and ``igniter eval`` with 3 sharded
    processes count each of the 1,001 samples once: accuracy equal to one process's exactly,
    the loss up to float summation order (a duplicated padding sample would change both)."""
    single = json.loads((sharded_run.parent / "single" / "eval_metrics.json").read_text())
    three = json.loads((sharded_run.parent / "three" / "eval_metrics.json").read_text())
    assert single["world_size"] == 1 and three["world_size"] == 3
    assert single["samples"] == three["samples"] == 1001
    in_run = read_metrics(sharded_run)["final"]
    for metrics in (three["metrics"], in_run):
        assert metrics["accuracy"] == single["metrics"]["accuracy"]
        assert metrics["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-6)
    # k/1001 with 0 < k < 1001 is no (k or k+1)/1002: a counted padding sample would show
    assert 0 < single["metrics"]["accuracy"] < 1


def test_a_sharded_evaluation_holds_at_most_0_6_of_the_model_s_parameter_bytes(sharded_run):
    """During evaluation each rank holds its shards (1/3) and the unit whose forward runs, never
    the whole model as the gather-once evaluation did (DDP holds 1.0), and every rank ran
    the same number of forward passes (112: 334 samples in batches of 3)."""
    for rank in range(3):
        peak, whole, forwards = (int(v) for v in (sharded_run / f"eval_param_bytes_rank{rank}.txt").read_text().split())
        assert forwards == 112, (rank, forwards)
        assert peak <= 0.6 * whole, (rank, peak / whole)
        assert peak > whole / 3  # a unit was gathered (the measure sees gathered parameters)
