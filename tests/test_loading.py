"""Per-sample seeding and loading failures (igniter.loading): in-process loaders first, then real
runs with DataLoader worker processes killed with SIGKILL and resumed, and failing samples."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import igniter_env, read_metrics, run_together
from omegaconf import OmegaConf
from test_fault_tolerance import assert_all_checkpoints_load, assert_bit_identical, command, final_model

import igniter.assemble as assemble
from igniter.assemble import make_loader
from igniter.config import LoaderConfig
from igniter.loading import LoaderWorkerDied, SampleFailed, sample_seed, worker_died


class Augmented(torch.utils.data.Dataset):
    """``(x + noise, index)``: noise drawn from torch's, numpy's and Python's global generators."""

    def __init__(self, n: int = 40, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise ValueError(f"bad pixel data in sample {i}")
        # normal draws too: each generator caches its second Gaussian, which seeding must drop
        noise = torch.randn(1) + torch.rand(2) + float(np.random.normal()) + random.gauss(0.0, 1.0)
        return torch.full((2,), float(i)) + noise, i


def _loader(dataset, batch_size: int, num_workers: int = 0, **cfg):
    loader_cfg = OmegaConf.structured(LoaderConfig(batch_size=batch_size, num_workers=num_workers, **cfg))
    return make_loader(dataset, batch_size, loader_cfg, True, 3, "data.train", "augmented")


def _epochs(loader, epochs=(0, 1)) -> list[tuple[torch.Tensor, list[int]]]:
    """Every batch of the given epochs as (x, indices)."""
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out += [(x, i.tolist()) for x, i in loader]
    return out


def _rows(batches) -> dict[tuple[int, int], torch.Tensor]:
    """``{(epoch, index): sample}`` of batches from :func:`_epochs` (5 batches per epoch)."""
    return {(t // 5, i): row for t, (x, idx) in enumerate(batches) for row, i in zip(x, idx)}


@pytest.fixture(scope="module")
def reference_batches():
    return _epochs(_loader(Augmented(), 8))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(
    "num_workers, options",
    [(2, {}), (3, {}), (2, {"persistent_workers": False, "prefetch_factor": 1})],
    ids=["2", "3", "2-new-workers-every-epoch"],
)
def test_batches_do_not_depend_on_num_workers(num_workers, options, reference_batches):
    batches = _epochs(_loader(Augmented(), 8, num_workers, **options))
    assert [i for _, i in batches] == [i for _, i in reference_batches]
    for (x, _), (ref, _) in zip(batches, reference_batches):
        assert torch.equal(x, ref)
    rows = _rows(reference_batches)
    assert not torch.equal(rows[(0, 7)], rows[(1, 7)])  # every epoch draws anew


def test_a_sample_draws_the_same_numbers_at_every_rank_and_world_size(monkeypatch, reference_batches):
    seen = {}
    for rank in (0, 1):  # the two ranks of a world of 2, one worker each (num_workers=2 per node)
        fake = SimpleNamespace(
            get_world_size=lambda: 2,
            get_rank=lambda r=rank: r,
            get_nproc_per_node=lambda: 2,
            device=lambda: torch.device("cpu"),
        )
        monkeypatch.setattr(assemble, "idist", fake)
        rows = _rows(_epochs(_loader(Augmented(), 8, 2)))
        assert not seen.keys() & rows.keys()
        seen.update(rows)
    reference = _rows(reference_batches)
    assert seen.keys() == reference.keys()
    for key, row in seen.items():
        assert torch.equal(row, reference[key]), key


def test_loading_in_the_training_process_leaves_its_random_stream_alone():
    loader = _loader(Augmented(), 8)

    def draws(load: bool) -> tuple:
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        if load:
            _epochs(loader)
        return torch.rand(3), np.random.rand(), random.random()

    with_loading, without = draws(True), draws(False)
    assert torch.equal(with_loading[0], without[0]) and with_loading[1:] == without[1:]


def test_sample_seeds_differ_between_neighbours():
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in range(3) for i in range(1000)}
    assert len(seeds) == 6000 and all(0 <= x < 2**64 for x in seeds)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sample_that_raises_names_the_dataset_index_and_error(num_workers):
    data = torch.utils.data.Subset(Augmented(fail_at=17), list(range(40))[::-1])  # position 22 holds sample 17
    with pytest.raises(SampleFailed) as info:
        _epochs(_loader(data, 8, num_workers))
    text = str(info.value)
    assert "data.train: dataset 'augmented' cannot load sample 22 (index 17 of the dataset before" in text
    assert "ValueError: bad pixel data in sample 17" in text and "rank0.log" in text
    assert info.value.exit_status == 2


def test_the_dataloaders_dead_worker_error_becomes_one_paragraph():
    error = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            raise error  # torch's SIGCHLD handler raising inside the run's cleanup
    except RuntimeError as e:
        died = worker_died(e, 4)
    assert isinstance(died, LoaderWorkerDied) and died.exit_status == 1
    assert "pid 4242" in str(died) and "data.loader.num_workers = 4" in str(died) and "\n" not in str(died)
    assert worker_died(RuntimeError("CUDA error"), 4) is None


# --- real runs: digits, an augmentation drawing from torch, numpy and random, 2 worker processes ---

# 2 epochs of 44 iterations; a checkpoint every 10 iterations.
RUN = [
    "imports=[my_project]",
    "data.train.transforms=[{name:jitter_everywhere,params:{std:0.1}}]",
    "trainer.max_epochs=2",
    "trainer.seed=3",
    "checkpoint.every_iterations=10",
    "checkpoint.n_saved=2",
    "logging.progress_bar=false",
    "logging.loggers=[]",
]
SPAWN = ["runner=spawn", "runner.nproc_per_node=2"]


def _runs(tmp: Path, variants: dict[str, list[str]]) -> dict[str, Path]:
    """Run ``RUN`` plus each variant's overrides, all at once (the runs are independent; on two
    cores they take little more than one), in ``tmp/<name>``; returns the run directories."""
    runs = [[*RUN, *extra, f"output_dir={tmp / name}"] for name, extra in variants.items()]
    for name, proc in zip(variants, run_together(runs, tmp, timeout=600)):
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return {name: tmp / name for name in variants}


@pytest.fixture(scope="module")
def by_workers(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs with data.loader.num_workers 2 (the reference), 0 and 3."""
    tmp = tmp_path_factory.mktemp("workers")
    return _runs(tmp, {f"w{n}": [f"data.loader.num_workers={n}"] for n in (2, 0, 3)})


@pytest.fixture(scope="module")
def two_workers(by_workers) -> Path:
    return by_workers["w2"]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """With 2 processes (1 worker each), started together: the uninterrupted run, and a run whose
    sample 77 raises. Returns both run directories and the failing run's completed process."""
    tmp = tmp_path_factory.mktemp("spawn")
    failing = subprocess.Popen(
        command([*FAILING, "+data.train.params.fail_at=77", *SPAWN, f"output_dir={tmp / 'fails'}"]),
        cwd=tmp, env=igniter_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reference = _runs(tmp, {"spawn": ["data.loader.num_workers=2", *SPAWN]})["spawn"]
    out, err = failing.communicate(timeout=300)  # a hang fails the test here
    return reference, tmp / "fails", subprocess.CompletedProcess(failing.args, failing.returncode, out, err)


@pytest.fixture(scope="module")
def spawn_two_workers(spawned) -> Path:
    return spawned[0]


def _checkpoints(run: Path) -> set[str]:
    folder = run / "checkpoints"
    return {p.name for p in folder.glob("last_checkpoint_*.pt")} if folder.exists() else set()


def kill_at_checkpoints(args: list[str], cwd: Path, kills: int, rng: random.Random) -> list[str]:
    """Start the run; SIGKILL its process group (launcher, ranks, loader workers) once the
    ``k``-th checkpoint file it writes appears (``k`` 1 or 2 at random), ``kills`` times; then
    run the same command to the end. Returns the checkpoint each kill followed."""
    run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    log = []
    for _ in range(kills):
        before, k = _checkpoints(run), rng.choice((1, 2))
        proc = subprocess.Popen(
            command(args), cwd=cwd, env=igniter_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while len(_checkpoints(run) - before) < k and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the condition
        assert proc.poll() is None, f"the run ended before its checkpoint {k}: {proc.stderr.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_all_checkpoints_load(run)
        log.append(max(_checkpoints(run) - before))
    proc = subprocess.run(command(args), cwd=cwd, env=igniter_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return log


def test_num_workers_does_not_change_the_training(by_workers):
    reference = final_model(by_workers["w2"])
    for n in (0, 3):
        assert_bit_identical(reference, final_model(by_workers[f"w{n}"]))


def test_killed_three_times_with_workers_resumes_bit_identical(tmp_path, two_workers):
    run = tmp_path / "killed"
    args = [*RUN, "data.loader.num_workers=2", f"output_dir={run}"]
    log = kill_at_checkpoints(args, tmp_path, 3, random.Random(int.from_bytes(os.urandom(4), "little")))
    print("killed after", log)
    assert_bit_identical(final_model(two_workers), final_model(run))
    assert read_metrics(run)["status"] == "completed"
    assert (run / "rank0.log").read_text().count("resumed from") == 3


@pytest.mark.slow
def test_two_processes_with_augmentation_end_where_one_does(two_workers, spawn_two_workers):
    one, two = final_model(two_workers), final_model(spawn_two_workers)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), f"{k}: {(one[k] - two[k]).abs().max()}"


@pytest.mark.slow
def test_spawn_killed_with_workers_resumes_bit_identical(tmp_path, spawn_two_workers):
    """Killed once (the suite's budget: a spawned run costs three interpreters' start-up);
    ``bench/soak.py --extra data.loader.num_workers=2 ...`` kills such runs 10 times."""
    run = tmp_path / "killed"
    args = [*RUN, "data.loader.num_workers=2", *SPAWN, f"output_dir={run}"]
    log = kill_at_checkpoints(args, tmp_path, 1, random.Random(int.from_bytes(os.urandom(4), "little")))
    print("killed after", log)
    assert_bit_identical(final_model(spawn_two_workers), final_model(run))


# --- failures in real runs ---


FAILING = [
    "imports=[my_project]",
    "data.train.name=faulty_digits",
    "data.loader.num_workers=2",
    "trainer.max_epochs=1",
    "logging.progress_bar=false",
    "logging.loggers=[]",
]


def _failing_runs(tmp: Path, variants: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Each variant's failing run, all at once; their completed processes (a hang fails the test)."""
    runs = [[*FAILING, *extra, f"output_dir={tmp / name}"] for name, extra in variants.items()]
    return dict(zip(variants, run_together(runs, tmp, timeout=300)))


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """A run whose sample 77 raises and one whose worker loading sample 77 is SIGKILLed."""
    tmp = tmp_path_factory.mktemp("failures")
    return tmp, _failing_runs(
        tmp, {"raises": ["+data.train.params.fail_at=77"], "killed": ["+data.train.params.kill_at=77"]}
    )


def _assert_sample_failed(proc: subprocess.CompletedProcess, run: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert (
        "data.train: dataset 'faulty_digits' cannot load sample 77: OSError: cannot read sample file 77.png: truncated"
        in proc.stderr
    )
    logs = "".join(p.read_text() for p in run.glob("rank*.log"))  # the run directory stays
    assert "Traceback" in logs and 'raise OSError(f"cannot read sample file' in logs


def test_a_sample_that_fails_to_load_stops_the_run_with_exit_2(failures):
    tmp, procs = failures
    _assert_sample_failed(procs["raises"], tmp / "raises")


@pytest.mark.slow
def test_a_sample_that_fails_to_load_stops_a_spawned_run_with_exit_2(spawned):
    _, run, proc = spawned
    _assert_sample_failed(proc, run)


def test_a_killed_loader_worker_is_one_paragraph_naming_num_workers(failures):
    tmp, procs = failures
    proc = procs["killed"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "igniter: a data loading worker process ended: DataLoader worker (pid"
    )
    assert "data.loader.num_workers = 2" in lines[0] and ("SIGKILL" in lines[0] or "Killed" in lines[0])
    assert "Traceback" in (tmp / "killed" / "rank0.log").read_text()
