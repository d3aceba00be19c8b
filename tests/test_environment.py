"""The launch environment in one module (igniter.launch.environment), scheduler
signals in igniter.launch.signals, and no import cycle inside igniter.launch.

Detection tests pass the environment as a dict: os.environ is never touched.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import igniter.launch.environment as environment
from igniter.launch.environment import NoLauncher, Slurm, SubmititLocal, Torchrun, detect, expand_nodelist
from igniter.launch.hostlist import tasks_per_node

PACKAGE = Path(environment.__file__).resolve().parents[1]  # .../igniter

# --- who reads the launchers' variables ------------------------------------------------------

#: A string that is exactly the name of a SLURM, torchrun or submitit variable.
LAUNCHER_VARIABLE = re.compile(
    r"(SLURM|SLURMD|SRUN|SBATCH|TORCHELASTIC|SUBMITIT)_[A-Z0-9_]*"
    r"|RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE"
    r"|MASTER_ADDR|MASTER_PORT"
)

#: Modules of igniter/launch that may name those variables.
READERS = {"launch/environment.py"}  # one class per launcher; no other module needs an exception


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def launcher_variable_uses(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Every string constant (docstrings aside) or keyword argument (``os.environ.update(RANK=...)``)
    under ``root`` that names a launcher variable, by file relative to ``root``."""
    uses: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                name = node.value
            elif isinstance(node, ast.keyword) and node.arg:
                name = node.arg
            if name is not None and LAUNCHER_VARIABLE.fullmatch(name):
                uses.setdefault(path.relative_to(root).as_posix(), []).append(f"{node.lineno}: {name}")
    return uses


def test_no_module_outside_launch_reads_launcher_variables():
    outside = {f: u for f, u in launcher_variable_uses().items() if not f.startswith("launch/")}
    assert outside == {}, "ask igniter.launch.environment instead"


def test_inside_launch_only_environment_reads_launcher_variables():
    inside = {f: u for f, u in launcher_variable_uses().items() if f.startswith("launch/") and f not in READERS}
    assert inside == {}, "ask igniter.launch.environment instead"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    (tmp_path / "m.py").write_text(
        '"""Docstrings may name SLURM_JOB_ID."""\nimport os\n'
        'a = os.environ.get("SLURM_PROCID")\nb = "RANK" in os.environ\nos.environ.update(MASTER_PORT="1")\n'
        'c = "the RANK of a task"\n'
    )
    assert launcher_variable_uses(tmp_path) == {"m.py": ["3: SLURM_PROCID", "4: RANK", "5: MASTER_PORT"]}


# --- detection -------------------------------------------------------------------------------

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}

#: Task 5 of a 6-task srun step on node 2 of 4.
SRUN_TASK = {
    "SLURM_JOB_ID": "4321",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "6",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "node[01-03,07]",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "2(x3)",
    "PATH": "/usr/bin:/bin",
}

#: What submitit's local executor gives task 1 of 2 (submitit/local/local.py: start_controller, Controller).
SUBMITIT_LOCAL = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_JOB_ID": "12345",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
}


@pytest.fixture
def no_scontrol(monkeypatch):
    """Host lists expanded by igniter, whatever this machine has on PATH."""

    def missing(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(environment.subprocess, "run", missing)


def test_no_launcher():
    for env in ({}, {"PATH": "/bin", "HOME": "/root"}):
        found = detect(env)
        assert isinstance(found, NoLauncher) and found.name == "none"
        assert (found.rank, found.local_rank, found.world_size, found.node_rank) == (0, 0, 1, 0)
        assert (found.master_addr, found.master_port, found.job_id, found.in_step) == (None, None, None, False)
        assert found.variables() == {}
    assert detect({"SLURM_JOB_ID": "7"}).name == "none", "a bare salloc shell: no task of the job"
    assert Slurm({"SLURM_JOB_ID": "7"}).in_job


def test_torchrun():
    found = detect(TORCHRUN)
    assert isinstance(found, Torchrun) and found.name == "torchrun"
    assert (found.rank, found.local_rank, found.world_size) == (3, 1, 8)
    assert (found.master_addr, found.master_port) == ("10.1.2.3", 29400)
    assert found.local_world_size is None and found.node_rank == 0, "torchrun's own LOCAL_WORLD_SIZE/GROUP_RANK absent"
    assert found.is_worker and found.missing() == [] and found.in_step is False
    assert found.run_id is None and not found.uses_agent_store
    more = detect(
        {
            **TORCHRUN,
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "TORCHELASTIC_RUN_ID": "r1",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "2",
        }
    )
    assert (more.local_world_size, more.node_rank, more.run_id, more.uses_agent_store, more.restart_count) == (
        4,
        1,
        "r1",
        True,
        2,
    )
    assert Torchrun({"RANK": "0", "WORLD_SIZE": "2"}).missing() == ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
    assert not Torchrun({"RANK": "0", "WORLD_SIZE": "2"}).is_worker


def test_slurm_srun_step(no_scontrol):
    found = detect(SRUN_TASK)
    assert isinstance(found, Slurm) and found.name == "slurm"
    assert found.in_job and found.in_step and found.is_task and found.missing_task_vars() == []
    assert (found.rank, found.local_rank, found.world_size, found.node_rank, found.num_nodes) == (5, 1, 6, 2, 4)
    assert found.local_world_size == 2
    assert found.hosts() == ["node01", "node02", "node03", "node07"]
    # ignite's rendezvous: the first host, port 15000 + the job id's last 4 digits
    assert (found.master_addr, found.master_port, found.job_id) == ("node01", 15000 + 4321, "4321")
    assert found.variables()["SLURM_JOB_NODELIST"] == "node[01-03,07]" and "PATH" not in found.variables()
    assert found.torch_variables(29500) == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "6",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500",
    }
    # torch's variables, all set (runner.master_port), take over as ignite does; array jobs requeue as <array>_<task>
    both = Slurm(
        {**SRUN_TASK, **found.torch_variables(29500), "SLURM_ARRAY_JOB_ID": "4320", "SLURM_ARRAY_TASK_ID": "1"}
    )
    assert (both.master_addr, both.master_port, both.job_id) == ("node01", 29500, "4320_1")
    assert Slurm({**SRUN_TASK, "MASTER_PORT": "1234"}).master_port == 19321, "MASTER_PORT alone is ignored by ignite"


def test_slurm_sbatch_script_is_not_a_task(no_scontrol):
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    found = detect(batch)
    assert isinstance(found, Slurm) and found.in_job
    assert not found.in_step and not found.is_task and found.missing_task_vars() == ["SLURM_STEP_ID"]


def test_submitit_local():
    found = detect(SUBMITIT_LOCAL)
    assert isinstance(found, SubmititLocal) and found.name == "submitit-local"
    assert (found.rank, found.local_rank, found.world_size, found.local_world_size, found.node_rank) == (1, 1, 2, 2, 0)
    assert found.job_id == "12345" and found.master_addr == socket.gethostname()
    assert found.master_port == random.Random("12345").randint(20000, 60000)
    assert SubmititLocal({**SUBMITIT_LOCAL, "MASTER_PORT": "29501"}).master_port == 29501
    assert detect({**SUBMITIT_LOCAL, **SRUN_TASK}).name == "slurm", "submitit on SLURM is a SLURM job"


def test_submitit_local_agrees_with_submitit():
    pytest.importorskip("submitit")
    code = (
        "import json, submitit; t = submitit.helpers.TorchDistributedEnvironment(); "
        "print(json.dumps([t.rank, t.local_rank, t.world_size, t.local_world_size, t.master_addr, t.master_port]))"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **SUBMITIT_LOCAL}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = SubmititLocal(SUBMITIT_LOCAL)
    assert json.loads(out.stdout) == [
        found.rank,
        found.local_rank,
        found.world_size,
        found.local_world_size,
        found.master_addr,
        found.master_port,
    ]


def test_environment_read_at_each_question():
    env: dict[str, str] = {}
    torchrun = Torchrun(env)
    assert not torchrun.present
    env.update(TORCHRUN)
    assert torchrun.present and torchrun.rank == 3


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[7-9],cpu5", ["gpu7", "gpu8", "gpu9", "cpu5"]),
        ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01", "node]", "node[]", "x[a-b]"])
def test_expand_nodelist_rejects_malformed_lists(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4] and tasks_per_node("") == [] and tasks_per_node("x") == []


def test_doctor_asks_the_environment():
    import igniter.doctor as doctor
    from igniter.launch.runners import default_backend

    assert doctor.default_backend is default_backend
    assert not hasattr(doctor, "_first_host")
    d = doctor.distributed_environment(SUBMITIT_LOCAL)
    assert d["mode"].startswith("submitit local") and (d["world_size"], d["rank"]) == (2, 1)


# --- errors and scheduler signals ------------------------------------------------------------


def test_rank_failed_and_preempted_are_igniter_errors():
    from igniter.errors import EXIT_FAILED, IgniterError
    from igniter.launch.runners import RankFailed
    from igniter.launch.slurm_job import Preempted

    failed, stopped = RankFailed(3, "Traceback ..."), Preempted(signal.SIGUSR2, 40, True)
    assert isinstance(failed, IgniterError) and isinstance(stopped, IgniterError)
    assert failed.exit_status == stopped.exit_status == EXIT_FAILED == 1
    assert (failed.rank, failed.details) == (3, "Traceback ...") and "rank 3 failed" in str(failed)
    assert (stopped.signum, stopped.iteration, stopped.requeued) == (signal.SIGUSR2, 40, True)
    assert str(stopped) == "stopped on SIGUSR2 at iteration 40 (checkpoint saved)"


def test_note_signals_records_and_restores():
    from igniter.launch.signals import default_action, note_signals

    before = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    noted = note_signals(signal.SIGUSR2, signal.SIGTERM)
    try:
        assert noted.received == 0
        os.kill(os.getpid(), signal.SIGUSR2)
        assert noted.received == signal.SIGUSR2
        default_action(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        noted.restore()
    assert (signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)) == before


# Import cycles: tests/test_structure.py walks the whole package (this module's subject included).
