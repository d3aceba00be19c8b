"""Resuming at another world size and across strategies (ddp, fsdp), on real processes (gloo).

A 2-process run dies mid-epoch (rank 1 SIGKILLs itself at iteration 19 of 26; the newest
checkpoint is at iteration 16, mid-epoch, or, with an asynchronous save still in flight, 13 or 12) and the run is resumed with 1 or 3 processes: every
global batch after the resume holds the same samples in the same order as in an
uninterrupted 2-process run, and the final weights agree with it (SGD: see test_runners).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import igniter_env

from igniter.checkpoint.dcp import dcp_model_state
from igniter.checkpoint.files import checkpoint_files

pytestmark = pytest.mark.slow  # several multi-process runs per test

# 624 digits = 13 global batches of 48 per epoch, 2 epochs (26 iterations); rank 1 dies at iteration 19
BASE = [
    "imports=[my_project]", "data.train.name=indexed_digits", "+data.train.params.limit=624",
    "+handlers=[{name: record_indices, event: ITERATION_COMPLETED}]", "data.loader.batch_size=48", "trainer.max_epochs=2",
    "solver=sgd", "trainer.seed=11", "checkpoint.every_iterations=4", "logging.loggers=[]", "evaluation.every=2",
    "trainer.step=die_once", "+trainer.step_params.iteration=19",
]  # fmt: skip
LAST = 26
TWO = ["runner=spawn", "runner.nproc_per_node=2"]
FSDP = ["runner.strategy=fsdp", "runner.fsdp.shard_modules=[Linear]"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    newest = checkpoint_files(run / "checkpoints")[0]
    return dcp_model_state(newest) if newest.is_dir() else torch.load(newest, weights_only=True)["model"]


def global_batches(run: Path, tag: str) -> dict[int, list[int]]:
    """iteration -> the global batch's sample indices in sampler order (rank r holds positions
    r, r + W, ...), as the processes started with ``RUN_TAG=tag`` logged them."""
    parts: dict[int, dict[int, list[int]]] = {}
    for log in run.glob(f"indices_{tag}_rank*.txt"):
        for line in log.read_text().splitlines():
            iteration, rank, indices = line.split(" ")
            parts.setdefault(int(iteration), {})[int(rank)] = [int(i) for i in indices.split(",")]
    batches = {}
    for iteration, by_rank in parts.items():
        world = max(by_rank) + 1
        order = [0] * sum(len(v) for v in by_rank.values())
        for rank, indices in by_rank.items():
            order[rank::world] = indices
        batches[iteration] = order
    return batches


def _run(args: list[str], cwd: Path, marker: Path, tag: str) -> subprocess.CompletedProcess:
    env = {**igniter_env(), "DIE_ONCE_MARKER": str(marker), "RUN_TAG": tag}
    return subprocess.run(
        [sys.executable, "-m", "igniter", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (the marker exists: die_once never fires)."""
    cwd = tmp_path_factory.mktemp("reference")
    (cwd / "marker").touch()
    proc = _run([*BASE, *TWO, f"output_dir={cwd / 'run'}"], cwd, cwd / "marker", "reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


@pytest.mark.parametrize(
    "killed, resumed",
    [
        ([], ["runner=single"]),
        (FSDP, ["runner=single"]),  # no checkpoint.format: the run follows its dcp checkpoints
        ([*FSDP, "checkpoint.async_save=true"], ["runner=spawn", "runner.nproc_per_node=3", *FSDP]),
    ],
    ids=["ddp2-to-1", "fsdp2-to-ddp1", "fsdp2-to-fsdp3"],
)
def test_resume_at_another_world_size_continues_the_same_global_batches(reference, killed, resumed, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    died = _run([*BASE, *TWO, *killed, f"output_dir={run}"], tmp_path, marker, "killed")
    assert died.returncode != 0 and marker.exists(), "rank 1 killed itself at iteration 19"
    newest = checkpoint_files(run / "checkpoints")[0]
    position = int(newest.name.rsplit("_", 1)[1].split(".")[0])
    assert position in ((12, 13, 16) if "checkpoint.async_save=true" in killed else (16,)), newest
    proc = _run([*BASE, *resumed, f"output_dir={run}"], tmp_path, marker, "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "rank0.log").read_text()
    assert f"resumed from {newest}" in log and "world size changed: the checkpoint was written by 2 processes" in log

    expected, killed_part, got = (
        global_batches(reference, "reference"),
        global_batches(run, "killed"),
        global_batches(run, "resumed"),
    )
    assert sorted(expected) == list(range(1, LAST + 1)) and sorted(got) == list(range(position + 1, LAST + 1)), (
        "the resume starts after the checkpoint"
    )
    assert all(killed_part[i] == expected[i] for i in range(1, position + 1))
    for iteration in range(position + 1, LAST + 1):
        assert got[iteration] == expected[iteration], f"iteration {iteration}: other samples or order after the resume"
    if "runner.strategy=fsdp" in killed and "runner=single" in resumed:  # keeps writing dcp into that run
        assert checkpoint_files(run / "checkpoints")[0].suffix == ".dcp"
    a, b = final_weights(reference), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
