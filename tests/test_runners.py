"""Launch modes on real processes (gloo on loopback and across network namespaces).

Invariance: the same seed, global batch size and number of steps give the same
final weights whatever the launch mode, up to float32 summation order
(``torch.allclose(atol=1e-6, rtol=1e-5)``). The model is the digits MLP, which
has no dropout or batch-norm, so the forward pass is deterministic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import igniter_env, read_metrics, run_igniter
from igniter.distributed.runners import free_port

# 25 steps of global batch 32 on digits, evaluation and checkpoint at the end only.
COMMON = ["trainer.max_epochs=1", "trainer.epoch_length=25", "data.loader.batch_size=32", "trainer.seed=7", "solver.lr=0.01"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((run / "checkpoints").glob("last_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert ckpts, f"no checkpoint in {run}"
    return torch.load(ckpts[-1], weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    cwd = tmp_path_factory.mktemp("single")
    proc = run_igniter([*COMMON, f"output_dir={cwd / 'run'}"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(cwd / "run")


@pytest.fixture(scope="module")
def spawn_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process spawn job in its own working directory, Hydra's default run dir."""
    cwd = tmp_path_factory.mktemp("spawn")
    proc = run_igniter([*COMMON, "runner=spawn", "runner.nproc_per_node=2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_spawn_two_processes_matches_single(reference, spawn_job):
    cwd, proc = spawn_job
    (run,) = [p for p in (cwd / "outputs").glob("*/*")]
    assert_same_weights(reference, final_weights(run))
    assert "world size 2, backend gloo" in proc.stdout and "per-process batch 16" in proc.stdout


def test_spawn_rank_discipline_one_run_dir(spawn_job):
    cwd, proc = spawn_job
    runs = [p for p in (cwd / "outputs").glob("*/*")]
    assert len(runs) == 1, f"one Hydra output directory per job, found {runs}"
    run = runs[0]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "config.yaml", "curves.png", "metrics.json", "rank0.log", "rank1.log", "tb",
    ]
    assert len(list((run / "tb").iterdir())) == 1, "one TensorBoard event file, written by rank 0"
    assert len(list((run / "checkpoints").glob("last_*.pt"))) == 1
    assert "[rank1]" in (run / "rank1.log").read_text()
    metrics = read_metrics(run)
    assert metrics["world_size"] == 2 and metrics["per_process_batch_size"] == 16
    # only rank 0 prints: the summary line appears once
    assert proc.stdout.count("summary:") == 1 and "samples/s" in proc.stdout


def test_torchrun_matches_single(reference, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "igniter", *COMMON, "runner=torchrun"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=igniter_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*")]
    assert len(runs) == 1, f"rank 1 must not create a second run directory: {runs}"
    assert {"rank0.log", "rank1.log"} <= {p.name for p in runs[0].iterdir()}
    assert_same_weights(reference, final_weights(runs[0]))


def _launch_nodes(prefixes: list[list[str]], addr: str, cwd: Path, env_extra: list[dict]) -> list[subprocess.Popen]:
    port = free_port() if addr == "127.0.0.1" else 29517
    procs = []
    for node_rank, (prefix, extra) in enumerate(zip(prefixes, env_extra)):
        args = [
            *COMMON,
            "runner=spawn",
            "runner.nproc_per_node=1",
            "runner.nnodes=2",
            f"runner.node_rank={node_rank}",
            f"runner.master_addr={addr}",
            f"runner.master_port={port}",
            f"output_dir={cwd / f'node{node_rank}'}",
        ]
        env = {**igniter_env(), **extra}
        procs.append(
            subprocess.Popen([*prefix, sys.executable, "-m", "igniter", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def test_two_nodes_on_loopback_match_single(reference, tmp_path):
    procs = _launch_nodes([[], []], "127.0.0.1", tmp_path, [{}, {}])
    for code, out, err in _wait_all(procs):
        assert code == 0, err[-3000:]
    assert_same_weights(reference, final_weights(tmp_path / "node0"))
    assert not (tmp_path / "node1" / "checkpoints").exists(), "only rank 0 writes checkpoints"
    assert (tmp_path / "node0" / "rank0.log").exists()


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


def test_two_hosts_in_network_namespaces_match_single(reference, tmp_path, two_hosts):
    prefixes = [["ip", "netns", "exec", ns] for ns in NETNS]
    envs = [{"GLOO_SOCKET_IFNAME": veth} for veth in VETH]
    procs = _launch_nodes(prefixes, ADDRS[0], tmp_path, envs)
    results = _wait_all(procs)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "world size 2, backend gloo" in results[0][1]
    assert_same_weights(reference, final_weights(tmp_path / "node0"))


def test_two_spawn_jobs_at_once_both_finish(tmp_path):
    procs = []
    for i in range(2):
        cwd = tmp_path / f"job{i}"
        cwd.mkdir()
        args = [*COMMON, "runner=spawn", "runner.nproc_per_node=2", "checkpoint.enabled=false", f"output_dir={cwd / 'run'}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "igniter", *args], cwd=cwd, env=igniter_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for i, (code, out, err) in enumerate(_wait_all(procs)):
        assert code == 0, err[-3000:]
        assert read_metrics(tmp_path / f"job{i}" / "run")["status"] == "completed"


def test_dead_rank_ends_the_job(tmp_path):
    marker = f"output_dir={tmp_path / 'failing_run'}"
    args = ["imports=[my_project]", "trainer.step=fail_on_rank", *COMMON, "runner=spawn", "runner.nproc_per_node=2", marker]
    before = igniter_processes()
    start = time.monotonic()
    proc = run_igniter(args, tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "rank 1 failed" in proc.stderr
    assert "injected failure on rank 1 at iteration 5" in proc.stderr
    time.sleep(1)
    assert igniter_processes() - before == set(), "processes left behind"


def igniter_processes() -> set[int]:
    """PIDs of igniter launchers and of torch-multiprocessing workers (read from /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "-m igniter" in cmdline or "multiprocessing.spawn" in cmdline:
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
