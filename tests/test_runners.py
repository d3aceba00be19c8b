"""Launch modes on real processes (gloo on loopback and across network namespaces).

Invariance: the same seed, global batch size and number of steps give the same
final weights whatever the launch mode, up to float32 summation order
(``torch.allclose(atol=1e-6, rtol=1e-5)``). The model is the digits MLP, which
has no dropout or batch-norm, so the forward pass is deterministic.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import igniter_env, read_metrics, run_igniter

from igniter.checkpoint.dcp import dcp_model_state
from igniter.checkpoint.files import checkpoint_files
from igniter.launch.runners import free_port

# 25 steps of global batch 32 on digits, evaluation and checkpoint at the end only.
COMMON = [
    "trainer.max_epochs=1",
    "trainer.epoch_length=25",
    "data.loader.batch_size=32",
    "trainer.seed=7",
    "solver.lr=0.01",
]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpts = checkpoint_files(run / "checkpoints")
    assert ckpts, f"no checkpoint in {run}"
    return dcp_model_state(ckpts[0]) if ckpts[0].is_dir() else torch.load(ckpts[0], weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())


def one_process_weights(args: list[str], cwd: Path) -> dict[str, torch.Tensor]:
    """The final weights of a 1-process run of ``args`` in ``cwd``."""
    proc = run_igniter([*args, f"output_dir={cwd / 'run'}"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(cwd / "run")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return one_process_weights(COMMON, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def spawn_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process spawn job in its own working directory, Hydra's default run dir."""
    cwd = tmp_path_factory.mktemp("spawn")
    proc = run_igniter([*COMMON, "runner=spawn", "runner.nproc_per_node=2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


@pytest.mark.slow
def test_spawn_two_processes_matches_single(reference, spawn_job):
    cwd, proc = spawn_job
    (run,) = [p for p in (cwd / "outputs").glob("*/*")]
    assert_same_weights(reference, final_weights(run))
    assert "world size 2, backend gloo" in proc.stdout and "per-process batch 16" in proc.stdout


@pytest.mark.slow
def test_spawn_rank_discipline_one_run_dir(spawn_job):
    cwd, proc = spawn_job
    runs = [p for p in (cwd / "outputs").glob("*/*")]
    assert len(runs) == 1, f"one Hydra output directory per job, found {runs}"
    run = runs[0]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints",
        "config.yaml",
        "curves.png",
        "metrics.json",
        "rank0.log",
        "rank1.log",
        "tb",
    ]
    assert len(list((run / "tb").iterdir())) == 1, "one TensorBoard event file, written by rank 0"
    assert len(list((run / "checkpoints").glob("last_*.pt"))) == 1
    assert "[rank1]" in (run / "rank1.log").read_text()
    metrics = read_metrics(run)
    assert metrics["world_size"] == 2 and metrics["per_process_batch_size"] == 16
    # every rank's peak memory, gathered at the end; the data wait of the rank that waited most
    assert set(metrics["peak_memory_bytes"]) == {"0", "1"} and min(metrics["peak_memory_bytes"].values()) > 0
    assert 0 <= metrics["data_wait_fraction"] <= 1
    # only rank 0 prints: the summary line appears once
    assert proc.stdout.count("summary:") == 1 and "samples/s" in proc.stdout


@pytest.mark.slow
def test_torchrun_matches_single(reference, tmp_path):
    """Also: torchrun's workers keep freed heap (:mod:`igniter.launch.cpu_heap`), as spawned ones do."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**igniter_env(), "PYTHONPATH": probe_path(tmp_path)}
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "igniter",
        *COMMON,
        "runner=torchrun",
        *HEAP_PROBE,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*")]
    assert len(runs) == 1, f"rank 1 must not create a second run directory: {runs}"
    assert {"rank0.log", "rank1.log"} <= {p.name for p in runs[0].iterdir()}
    assert_same_weights(reference, final_weights(runs[0]))
    assert_heap(runs[0], kept=True)


# SGD with momentum: Adam divides each gradient by its running RMS, so on a weight whose
# gradient is ~0 float32 summation order (4 ranks' all-reduce vs one sum) moves the update
# by up to lr; measured: 3e-6 after 25 Adam steps with 4 processes, no accumulation at all.
SGD = [*COMMON, "solver=sgd"]


@pytest.fixture(scope="module")
def sgd_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return one_process_weights(SGD, tmp_path_factory.mktemp("sgd"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch, k",
    [
        ([], 4),
        (["runner=spawn", "runner.nproc_per_node=2"], 2),
        (["runner=spawn", "runner.nproc_per_node=4"], 1),
        (["runner=spawn", "runner.nproc_per_node=2", "runner.strategy=fsdp", "runner.fsdp.shard_modules=[Linear]"], 2),
    ],
    ids=["1proc-k4", "2proc-k2", "4proc-k1", "fsdp2-linear-k2"],
)
def test_same_model_at_every_scale_strategy_and_accumulation(sgd_reference, launch, k, tmp_path):
    """Global batch 32 as 1 x 32 (the reference), 1 process x 4 micro-batches of 8,
    2 processes x 2 of 8, 4 processes x 1 of 8, FSDP over 2 processes (each Linear a unit,
    the root holding the rest; 2 micro-batches): the same final weights."""
    proc = run_igniter(
        [*SGD, *launch, f"trainer.accumulate_grad_batches={k}", f"output_dir={tmp_path / 'run'}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["accumulate_grad_batches"] == k and metrics["iterations"] == 25, (
        "one iteration is one optimizer step"
    )
    assert_same_weights(sgd_reference, final_weights(tmp_path / "run"))


@pytest.mark.slow
def test_fsdp_bf16_stays_within_bf16_rounding_of_float32(sgd_reference, tmp_path):
    """FSDP2 with bf16-mixed (weights cast to bfloat16 for every op, gradients reduced in
    float32) against the float32 1-process run: bfloat16 keeps 8 significant bits (relative
    rounding 2^-9), so weights of scale ~0.3 move by ~1e-3 per rounding and the 25 steps
    drift further; measured 2.4e-3 for this run and 3.3e-3 for 1-process autocast bf16. The
    bound, 5e-3, is 2^-6 of the weights' scale; a real error (a missed gradient reduction, a
    wrong scale) moves weights by the learning rate's order, 5e-2."""
    run = tmp_path / "run"
    proc = run_igniter(
        [
            *SGD,
            "runner=spawn",
            "runner.nproc_per_node=2",
            "runner.strategy=fsdp",
            "trainer.precision=bf16-mixed",
            f"output_dir={run}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = final_weights(run)
    for k, expected in sgd_reference.items():
        assert got[k].dtype == torch.float32, "FSDP keeps float32 master weights"
        assert torch.allclose(got[k], expected, atol=5e-3, rtol=0), (k, (got[k] - expected).abs().max())


@pytest.mark.slow
def test_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """2 processes, 4 micro-batches per step: 4 forward passes of 4 samples per step on each
    rank, and DDP's communication hook runs once per step (the small MLP's gradients fit
    one bucket), not once per micro-batch."""
    args = [
        "trainer.max_epochs=1", "trainer.epoch_length=6", "data.loader.batch_size=32", "trainer.accumulate_grad_batches=4",
        "runner=spawn", "runner.nproc_per_node=2", "imports=[my_project]", "checkpoint.enabled=false", "logging.loggers=[]",
        "+handlers=[{name: count_allreduces, event: COMPLETED}]", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        counted = json.loads((tmp_path / "run" / f"allreduces_rank{rank}.json").read_text())
        # 6 steps x 4 micro-batches of 32 / 2 / 4 = 4 samples, one all-reduce per step
        assert counted == {"allreduces": 6, "iterations": 6, "forward_batch_sizes": [4], "forwards": 24}, counted


def _launch_nodes(
    prefixes: list[list[str]], addr: str, cwd: Path, env_extra: list[dict], nproc: int = 1, more: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    port = free_port() if addr == "127.0.0.1" else 29517
    procs = []
    for node_rank, (prefix, extra) in enumerate(zip(prefixes, env_extra)):
        args = [
            *COMMON,
            *more,
            "runner=spawn",
            f"runner.nproc_per_node={nproc}",
            "runner.nnodes=2",
            f"runner.node_rank={node_rank}",
            f"runner.master_addr={addr}",
            f"runner.master_port={port}",
            f"output_dir={cwd / f'node{node_rank}'}",
        ]
        env = {**igniter_env(), **extra}
        procs.append(
            subprocess.Popen(
                [*prefix, sys.executable, "-m", "igniter", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_nodes_on_loopback_match_single(reference, tmp_path):
    procs = _launch_nodes([[], []], "127.0.0.1", tmp_path, [{}, {}])
    for code, _out, err in _wait_all(procs):
        assert code == 0, err[-3000:]
    assert_same_weights(reference, final_weights(tmp_path / "node0"))
    assert not (tmp_path / "node1" / "checkpoints").exists(), "only rank 0 writes checkpoints"
    assert (tmp_path / "node0" / "rank0.log").exists()


@pytest.mark.slow
def test_fsdp_on_two_nodes_shards_within_a_node_and_replicates_across_nodes(reference, tmp_path):
    """``runner.strategy=fsdp`` on 2 nodes (loopback) of 2 processes, ``runner.fsdp.replicate``
    unset: HSDP by default, parameters sharded over the 2 processes of a node and replicated
    across the nodes (logged once), every rank holding half of the model's parameter bytes
    (not a quarter), and the weights of one process (to float summation order)."""
    more = [
        "runner.strategy=fsdp", "runner.fsdp.shard_modules=[Linear]", "imports=[my_project]",
        "+handlers=[{name: record_param_bytes, event: COMPLETED}]",
    ]  # fmt: skip
    procs = _launch_nodes([[], []], "127.0.0.1", tmp_path, [{}, {}], nproc=2, more=tuple(more))
    for code, _out, err in _wait_all(procs):
        assert code == 0, err[-3000:]
    log = (tmp_path / "node0" / "rank0.log").read_text()
    assert log.count("HSDP: 2 replica groups x 2 shards") == 1, log[-3000:]
    for rank in range(4):  # every dim 0 of the MLP (128, 128, 10, 10) is even; one run dir, rank 0's
        local, whole = (int(v) for v in (tmp_path / "node0" / f"param_bytes_rank{rank}.txt").read_text().split())
        assert local * 2 == whole, (rank, local, whole)
    hsdp = final_weights(tmp_path / "node0")
    for k, w in reference.items():  # 25 SGD steps; reduce-scatter then all-reduce sums in another order
        assert torch.allclose(w, hsdp[k], atol=1e-5, rtol=1e-5), (k, (w - hsdp[k]).abs().max())


NETNS = ("igniter-n0", "igniter-n1")
VETH = ("igv0", "igv1")
ADDRS = ("10.77.0.1", "10.77.0.2")


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.77.0.1/24 and 10.77.0.2/24."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    for ns in NETNS:
        _sh("ip", "netns", "del", ns)
    made = _sh("ip", "netns", "add", NETNS[0])
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    try:
        steps = [
            ("ip", "netns", "add", NETNS[1]),
            ("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]),
        ]
        for i in (0, 1):
            steps += [
                ("ip", "link", "set", VETH[i], "netns", NETNS[i]),
                ("ip", "-n", NETNS[i], "addr", "add", f"{ADDRS[i]}/24", "dev", VETH[i]),
                ("ip", "-n", NETNS[i], "link", "set", VETH[i], "up"),
                ("ip", "-n", NETNS[i], "link", "set", "lo", "up"),
            ]
        for step in steps:
            r = _sh(*step)
            if r.returncode != 0:
                pytest.skip(f"network namespace setup failed at {' '.join(step)}: {r.stderr.strip()}")
        yield
    finally:
        for ns in NETNS:
            _sh("ip", "netns", "del", ns)


@pytest.mark.slow
def test_two_hosts_in_network_namespaces_match_single(reference, tmp_path, two_hosts):
    prefixes = [["ip", "netns", "exec", ns] for ns in NETNS]
    envs = [{"GLOO_SOCKET_IFNAME": veth} for veth in VETH]
    procs = _launch_nodes(prefixes, ADDRS[0], tmp_path, envs)
    results = _wait_all(procs)
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    assert "world size 2, backend gloo" in results[0][1]
    assert_same_weights(reference, final_weights(tmp_path / "node0"))


@pytest.mark.slow
def test_two_spawn_jobs_at_once_both_finish(tmp_path):
    procs = []
    for i in range(2):
        cwd = tmp_path / f"job{i}"
        cwd.mkdir()
        args = [
            *COMMON,
            "runner=spawn",
            "runner.nproc_per_node=2",
            "checkpoint.enabled=false",
            f"output_dir={cwd / 'run'}",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "igniter", *args],
                cwd=cwd,
                env=igniter_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for i, (code, _out, err) in enumerate(_wait_all(procs)):
        assert code == 0, err[-3000:]
        assert read_metrics(tmp_path / f"job{i}" / "run")["status"] == "completed"


@pytest.mark.slow
def test_dead_rank_ends_the_job(tmp_path):
    marker = f"output_dir={tmp_path / 'failing_run'}"
    args = [
        "imports=[my_project]",
        "trainer.step=fail_on_rank",
        *COMMON,
        "runner=spawn",
        "runner.nproc_per_node=2",
        marker,
    ]
    tag = f"dead-rank-{os.getpid()}-{time.monotonic_ns()}"  # inherited by the launcher and its workers
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env={**igniter_env(), "IGNITER_TEST_TAG": tag},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "rank 1 failed" in proc.stderr
    assert "injected failure on rank 1 at iteration 5" in proc.stderr
    deadline = time.monotonic() + 10  # a condition: the job's processes are gone (exiting ones may linger a moment)
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_tagged(tag) == set(), "processes left behind"


def processes_tagged(tag: str) -> set[int]:
    """PIDs of processes whose environment holds ``IGNITER_TEST_TAG=tag`` (read from /proc):
    this test's launcher and workers only, whatever else runs on the machine."""
    needle = f"IGNITER_TEST_TAG={tag}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.add(int(entry.name))
    return pids


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["runner=spawn", "runner.nproc_per_node=3"], "data.loader.batch_size"),  # 32 % 3
        (["runner=spawn", "runner.backend=nccl"], "runner.backend"),
        (["runner=spawn", "runner.master_port=80"], "runner.master_port"),
        (["runner=spawn", "runner.nproc_per_node=0"], "runner.nproc_per_node"),
        (["runner=spawn", "runner.nnodes=2"], "runner.master_port"),
        (["runner=spawn", "runner.nnodes=2", "runner.node_rank=2", "runner.master_port=29500"], "runner.node_rank"),
        (["runner=torchrun"], "runner.name"),
    ],
)
def test_runner_settings_rejected_before_spawning(overrides, key, tmp_path, monkeypatch, capsys):
    from igniter.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(overrides)
    assert info.value.code == 2
    assert f"  {key}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- a runner inside another launcher (torchrun / a multi-task srun step) ----------------------


def _torchrun() -> str:
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


@pytest.mark.slow
def test_torchrun_with_runner_single_exits_without_training(tmp_path):
    """Two torchrun workers with runner=single were two independent runs in one directory, exit 0."""
    run = tmp_path / "run"
    cmd = [
        _torchrun(),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "igniter",
        *COMMON,
        "runner=single",
        f"output_dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=igniter_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    problem = next((line for line in proc.stderr.splitlines() if "this process is rank 0 of 2" in line), "")
    assert "runner.name = 'single'" in problem and "runner=torchrun" in problem, proc.stderr[-3000:]
    assert "summary:" not in proc.stdout
    assert not run.exists() or not any(run.iterdir()), f"nothing may be written: {list(run.rglob('*'))}"


def test_multi_task_slurm_step_with_runner_single_exits_2(tmp_path):
    """The environment of task 0 of a 2-task srun step."""
    env = {**igniter_env(), "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"}
    cmd = [sys.executable, "-m", "igniter", *COMMON, "runner=single", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "runner.name = 'single'" in proc.stderr and "runner=slurm" in proc.stderr and "2-task SLURM step" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "env, runner, rejected",
    [
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "single", True),
        ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "spawn", True),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "single", False),  # a 1-process torchrun
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}, "spawn", True),
        (
            {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"},
            "single",
            False,
        ),  # srun -n1
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "spawn", False),  # the sbatch script itself
        ({}, "single", False),
    ],
)
def test_outer_launcher_rule(env, runner, rejected, monkeypatch):
    from omegaconf import OmegaConf

    from igniter.config import RunnerConfig
    from igniter.launch.runners import make_runner

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = OmegaConf.structured(RunnerConfig(name=runner, nproc_per_node=2 if runner == "spawn" else 1))
    keys = [p.key for p in make_runner(cfg).validate(here=True)]
    assert keys.count("runner.name") == (1 if rejected else 0)
    assert "runner.name" not in [p.key for p in make_runner(cfg).validate(here=False)], "a job submitted elsewhere"


# --- threads per process ---------------------------------------------------------------------

PROBE = """
import ctypes
from pathlib import Path

import torch

from igniter.registry import event_handler_registry


@event_handler_registry("record_threads")
def record_threads(ctx):
    def record(engine):
        Path(ctx.output_dir, f"threads_rank{ctx.rank}.txt").write_text(str(torch.get_num_threads()))
    return record


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


@event_handler_registry("record_heap")
def record_heap(ctx):
    # allocate and free 4 blocks of 30 MiB: the MiB glibc served by mmap, the heap MiB kept after the free
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    def record(engine):
        before = mallinfo2()
        blocks = [torch.ones(30 * 2**18) for _ in range(4)]
        during = mallinfo2()
        del blocks
        after = mallinfo2()
        mmapped, kept = (during.hblkhd - before.hblkhd) >> 20, (after.arena - before.arena) >> 20
        Path(ctx.output_dir, f"heap_rank{ctx.rank}.txt").write_text(f"{mmapped} {kept}")
    return record
"""


#: The overrides that run ``PROBE``'s ``record_heap`` when training starts (PYTHONPATH: :func:`probe_path`).
HEAP_PROBE = ["imports=[threads_probe]", "handlers=[{name: record_heap, event: STARTED}]"]


def probe_path(tmp_path: Path) -> str:
    """Write ``PROBE`` into ``tmp_path`` as the module ``threads_probe``; the PYTHONPATH that
    imports it (``imports=[threads_probe]``) beside the test fixtures."""
    (tmp_path / "threads_probe.py").write_text(PROBE)
    return f"{tmp_path}{os.pathsep}{igniter_env()['PYTHONPATH']}"


def _two_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))[:2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, omp, expected, heap_kept",
    [
        ([], None, max(1, len(_two_cpus()) // 2), True),  # the rule: usable cores / 2 processes
        (["runner.threads_per_process=2", "runner.malloc_trim_threshold_mb=null"], None, 2, False),
        ([], "2", 2, True),
    ],
    ids=["rule", "threads_per_process-adaptive_malloc", "OMP_NUM_THREADS"],
)
def test_spawn_processes_share_the_cores(extra, omp, expected, heap_kept, tmp_path):
    """Every process sets its thread count, and (glibc) keeps freed heap for reuse
    (:mod:`igniter.launch.cpu_heap`): 30 MiB blocks come from the heap and stay after the free;
    with ``runner.malloc_trim_threshold_mb=null`` glibc's default serves them by mmap."""
    env = {**igniter_env(), "PYTHONPATH": probe_path(tmp_path)}
    env.pop("OMP_NUM_THREADS")
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    run = tmp_path / "run"
    args = [
        "imports=[threads_probe]",
        "handlers=[{name: record_threads, event: STARTED}, {name: record_heap, event: STARTED}]",
        "trainer.max_epochs=1",
        "trainer.epoch_length=2",
        "checkpoint.enabled=false",
        "data.val=null",
        "logging.loggers=[]",
        "runner=spawn",
        "runner.nproc_per_node=2",
        *extra,
        f"output_dir={run}",
    ]
    cpus = _two_cpus()  # the same expectation on any machine: this run may use (up to) 2 CPUs
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(run / f"threads_rank{r}.txt").read_text() for r in (0, 1)] == [str(expected)] * 2
    lines = [line for line in proc.stdout.splitlines() if "threads:" in line]
    assert len(lines) == 1 and f"threads: {expected} per process" in lines[0], proc.stdout[-2000:]
    assert f"threads: {expected} per process" in (run / "rank1.log").read_text()
    assert_heap(run, kept=heap_kept)


def assert_heap(run: Path, kept: bool) -> None:
    """What ``PROBE``'s ``record_heap`` found in ranks 0 and 1 (glibc only): with the heap kept
    (igniter's default) the 30 MiB blocks came from the heap and stayed after the free; with
    glibc's adaptive default they were mmapped."""
    if platform.libc_ver()[0] != "glibc":
        return
    heap = [tuple(map(int, (run / f"heap_rank{r}.txt").read_text().split())) for r in (0, 1)]
    for mmapped, heap_mib in heap:  # MiB of the 120 allocated (part of it may reuse free heap)
        assert (mmapped == 0 and heap_mib >= 100) if kept else (mmapped >= 120 and heap_mib < 20), heap


def test_thread_choice_rules(monkeypatch):
    import igniter.launch.cpu_threads as threads
    from igniter.launch.cpu_threads import ThreadPlan, choose_threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    for var in ("OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    assert choose_threads(ThreadPlan(), 2).threads == 4
    assert choose_threads(ThreadPlan(), 16).threads == 1
    assert choose_threads(ThreadPlan(configured=3), 2).threads == 3
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)  # never above PyTorch's own default
    assert choose_threads(ThreadPlan(), 1).threads == 2
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # srun --cpus-per-task: each task owns its CPUs
    assert choose_threads(ThreadPlan(cpus_per_process_var="SLURM_CPUS_PER_TASK"), 2).threads == 3
    assert choose_threads(ThreadPlan(), 2).threads == 4, "only the slurm runner reads it"
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    # torchrun's own OMP_NUM_THREADS=1 (absent from the torchrun process's environment) is not the user's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(threads, "_initial_environ", lambda pid: {"PATH": "/bin"})
    choice = choose_threads(ThreadPlan(), 2)
    assert (choice.source, choice.threads) == ("rule", 4)
    monkeypatch.setattr(threads, "_initial_environ", lambda pid: {"OMP_NUM_THREADS": "1"})  # the user's 1
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 1)
    assert choose_threads(ThreadPlan(), 2).source == "OMP_NUM_THREADS"
    monkeypatch.setattr(threads, "_initial_environ", lambda pid: None)  # unreadable: the user's
    assert choose_threads(ThreadPlan(), 2).source == "OMP_NUM_THREADS"


def test_malloc_thresholds_the_user_set_are_kept(monkeypatch):
    """README: MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or a glibc.malloc tunable the user
    exported is left alone (glibc read it at start-up); other tunables are not the user's heap setting."""
    from igniter.launch.cpu_heap import keep_freed_memory, user_malloc_settings

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert user_malloc_settings() == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert user_malloc_settings() == ["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"]
    assert keep_freed_memory(1024) is False
    assert keep_freed_memory(None) is False


@pytest.mark.parametrize(
    "override",
    ["runner.threads_per_process=0", "runner.malloc_trim_threshold_mb=0", "runner.malloc_trim_threshold_mb=4096"],
)
def test_cpu_settings_out_of_range_exit_2(override, tmp_path, monkeypatch, capsys):
    from igniter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["runner=spawn", override])
    assert info.value.code == 2
    key, value = override.split("=")
    assert f"  {key} = {value}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing written"


# --- Ctrl-C ----------------------------------------------------------------------------------


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the condition"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["background", "repeated"])
def test_sigint_to_spawn_launcher_stops_the_run_quietly(case, tmp_path):
    """``background``: started as ``igniter ... &`` from a script (SIGINT inherited as ignored),
    one ``kill -INT`` to the launcher. ``repeated``: SIGINT to the launcher every 0.1 s until it
    exits (Ctrl-C pressed again while the run shuts down). Exit 130, no noise."""
    import signal

    run = tmp_path / "run"
    args = [
        "trainer.max_epochs=1000",
        "logging.progress_bar=false",
        "runner=spawn",
        "runner.nproc_per_node=2",
        f"output_dir={run}",
    ]
    ignored = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if case == "background" else None
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "igniter", *args],
            cwd=tmp_path,
            env=igniter_env(),
            stdout=o,
            stderr=e,
            start_new_session=True,
            preexec_fn=ignored,
        )
    try:
        started = "ignite.engine.engine.Trainer: Engine run starting"
        logs = [run / "rank0.log", run / "rank1.log"]
        _wait_for(lambda: all(p.exists() and started in p.read_text() for p in logs), 120, proc)
        os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            if case == "repeated" and proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        rc = proc.poll()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.read_text() + err.read_text()
    assert rc == 130, text[-3000:]
    for noise in ("Engine run is terminating due to exception", "Exception ignored", "Traceback"):
        assert noise not in text, text[-3000:]
    assert read_metrics(run)["status"] == "interrupted"
    time.sleep(0.5)
    assert not _session_processes(proc.pid), "the workers ended with the launcher"


def _session_processes(sid: int) -> list[int]:
    """PIDs of the processes of session ``sid`` still alive (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def test_sigint_scope_takes_back_an_ignored_sigint_and_ignores_it_after_ctrl_c():
    import signal

    from igniter.launch.signals import raise_interrupt, sigint_scope

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with sigint_scope():
            assert signal.getsignal(signal.SIGINT) is raise_interrupt
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "restored after a normal end"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):
            with sigint_scope():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises in the main thread at the next bytecode
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "shutting down: further SIGINTs are ignored"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ignite_error_line_dropped_for_ctrl_c_only(caplog):
    from ignite.engine import Engine

    from igniter.launch.signals import quiet_engine_interrupts

    class Quiet(Engine):
        pass

    def interrupt(engine, batch):
        raise KeyboardInterrupt

    def fail(engine, batch):
        raise RuntimeError("real failure")

    caplog.set_level("ERROR")
    Quiet(interrupt)  # its logger exists
    quiet_engine_interrupts()
    with pytest.raises(KeyboardInterrupt):
        Quiet(interrupt).run([1, 2])
    with pytest.raises(RuntimeError):
        Quiet(fail).run([1, 2])
    messages = [r.getMessage() for r in caplog.records if r.name.endswith(".Quiet")]
    assert not any(m.endswith("exception: ") for m in messages), messages
    assert any("Engine run is terminating due to exception: real failure" in m for m in messages), messages
