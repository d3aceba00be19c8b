"""SLURM launch, against a real single-node SLURM started here (slurm/start_cluster.sh).

Skipped with the reason when SLURM cannot be started (not root, packages missing);
in CI (CI=true) a failure to start is an error, since .ci/run installs SLURM.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, igniter_env, read_metrics, run_igniter
from test_runners import COMMON, HEAP_PROBE, assert_heap, assert_same_weights, final_weights, probe_path

# a real SLURM cluster started by the fixture, jobs of several processes; one pytest-xdist worker
# runs this whole file (`pytest -n 2 --dist loadfile`): the cluster is one per machine
pytestmark = pytest.mark.slow

NEEDED = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")


@pytest.fixture(scope="session")  # session: under pytest-xdist other modules' tests run in between
def slurm(tmp_path_factory):
    missing = [c for c in NEEDED if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    reason = None
    if os.geteuid() != 0:
        reason = "starting slurmctld/slurmd needs root"
    elif missing:
        reason = f"SLURM packages missing ({', '.join(missing)}): run slurm/install_debian.sh"
    state = tmp_path_factory.mktemp("slurm")
    if reason is None:
        subprocess.run(["bash", str(REPO / "slurm" / "stop_cluster.sh"), str(state)], capture_output=True)
        started = subprocess.run(
            ["bash", str(REPO / "slurm" / "start_cluster.sh"), str(state)], capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            reason = f"slurm/start_cluster.sh failed:\n{started.stderr[-2000:]}"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM tests must run in CI: {reason}")
        pytest.skip(reason)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(REPO / "slurm" / "stop_cluster.sh"), str(state)], capture_output=True, timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def sacct_jobs() -> dict[str, str]:
    """Job id -> state of every allocation SLURM's accounting knows."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State"], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def job_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "multirun").glob("*/*/*/metrics.json"))


def wait_until_accounted(job_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sacct_jobs().get(job_id)
        if state and state.split()[0] not in ("PENDING", "RUNNING", "REQUEUED"):
            return state
        time.sleep(1)
    return sacct_jobs().get(job_id, "UNKNOWN")


def test_single_task_job_trains_mnist_on_slurm(slurm, tmp_path, mnist_root):
    args = [
        "-m",
        "hydra/launcher=slurm",
        "experiment=mnist",
        f"data.root={mnist_root}",
        "data.train.subset=6000",
        "data.val.subset=1000",
        "trainer.max_epochs=2",
    ]
    proc = run_igniter(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = job_dirs(tmp_path)
    metrics = read_metrics(job)
    assert metrics["status"] == "completed" and metrics["final"]["accuracy"] > 0.85
    job_id = metrics["job"]["id"]
    assert job_id and job_id != "-"
    assert wait_until_accounted(job_id).startswith("COMPLETED"), "sacct knows the job: it ran on SLURM"
    assert "igniter sweep results" in proc.stdout and job_id in proc.stdout


def two_task_job_matching_single_process(launcher: str, tmp_path: Path, probe_heap: bool = False) -> Path:
    """Run COMMON in one local process and as a 2-task job through ``launcher``; assert the
    job had world size 2 and the same final weights. Returns the job's run directory.
    ``probe_heap``: the job's tasks also run ``test_runners.PROBE``'s ``record_heap`` at start."""
    local = run_igniter([*COMMON, f"output_dir={tmp_path / 'local'}"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    job_args, env = [], None
    if probe_heap:  # the job inherits the submitting environment (sbatch --export=ALL)
        env = {"PYTHONPATH": probe_path(tmp_path)}
        job_args = HEAP_PROBE
    proc = run_igniter(
        ["-m", f"hydra/launcher={launcher}", "runner=slurm", "runner.nproc_per_node=2", *COMMON, *job_args],
        tmp_path,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = job_dirs(tmp_path)
    assert read_metrics(job)["world_size"] == 2
    assert_same_weights(final_weights(tmp_path / "local"), final_weights(job))
    return job


def test_two_task_job_matches_single_process(slurm, tmp_path):
    """Also: the job's tasks keep freed heap (:mod:`igniter.launch.cpu_heap`), as spawned ones do."""
    job = two_task_job_matching_single_process("slurm", tmp_path, probe_heap=True)
    assert_heap(job, kept=True)
    assert {"rank0.log", "rank1.log", "metrics.json", "checkpoints"} <= {p.name for p in job.iterdir()}
    assert len(list((job / "tb").iterdir())) == 1


def test_sweep_gives_two_jobs_and_a_table(slurm, tmp_path):
    proc = run_igniter(
        ["-m", "hydra/launcher=slurm", "solver.lr=0.01,0.1", "trainer.max_epochs=1", "checkpoint.enabled=false"],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2
    overrides = [json.loads((j / "metrics.json").read_text())["job"]["overrides"] for j in jobs]
    assert sorted(o for job in overrides for o in job if o.startswith("solver.lr")) == [
        "solver.lr=0.01",
        "solver.lr=0.1",
    ]
    table = proc.stdout[proc.stdout.index("igniter sweep results") :]
    assert "solver.lr=0.01" in table and "solver.lr=0.1" in table and table.count("completed") == 2


def controller_jobs() -> set[str]:
    """Ids of every job slurmctld holds, finished ones included (until MinJobAge): unlike
    sacct, which lags behind by its database writes, it knows a job once it is submitted."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_config_error_in_one_sweep_point_submits_nothing(slurm, tmp_path):
    before = controller_jobs()
    proc = run_igniter(["-m", "hydra/launcher=slurm", "solver.lr=0.01,-5"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "solver.lr = -5" in proc.stderr and "sweep point" in proc.stderr
    assert not controller_jobs() - before, "nothing may reach sbatch"
    assert not (tmp_path / "multirun").exists()


def test_usr2_saves_requeues_resumes_and_matches_uninterrupted(slurm, tmp_path):
    train = [
        "imports=[my_project]",
        "trainer.step=slow_supervised",
        "trainer.max_epochs=6",
        "checkpoint.every_iterations=20",
        "trainer.seed=5",
        "logging.progress_bar=false",
    ]
    # the uninterrupted run, side by side with the job (its steps mostly sleep)
    with open(tmp_path / "reference.err", "w") as errors:  # a file: a pipe nobody reads can fill up
        reference = subprocess.Popen(
            [sys.executable, "-m", "igniter", *train, f"output_dir={tmp_path / 'reference'}"],
            cwd=tmp_path, env=igniter_env(), stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip

    cwd = tmp_path / "slurm_job"
    cwd.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "igniter", "-m", "hydra/launcher=slurm", *train],
        cwd=cwd,
        env=igniter_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        job_id = None
        while time.monotonic() < deadline and job_id is None:
            logs = list(cwd.glob("multirun/*/*/0/rank0.log"))
            if logs and "epoch 2" in logs[0].read_text():
                out = subprocess.run(
                    ["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True
                ).stdout.split()
                job_id = out[0] if out else None
            time.sleep(0.5)
        assert job_id, "the job never reached epoch 2"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if sys.exc_info()[0] is not None:
            reference.kill()
    assert launcher.returncode == 0, err[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.err").read_text()[-3000:]
    (job,) = job_dirs(cwd)
    log = (job / "rank0.log").read_text()
    assert "SLURM signal SIGUSR2" in log and "requeued" in log
    assert "resumed from" in log
    assert read_metrics(job)["status"] == "completed"
    assert torch.equal(final_weights(job)["net.0.weight"], final_weights(tmp_path / "reference")["net.0.weight"])
    for k, v in final_weights(tmp_path / "reference").items():
        assert torch.equal(v, final_weights(job)[k]), k


def template_script(tmp_path: Path) -> Path:
    """slurm/sbatch_template.sh as a user would submit it (GPU line dropped: this node has none)."""
    template = (REPO / "slurm" / "sbatch_template.sh").read_text()
    script = tmp_path / "job.sh"
    script.write_text("\n".join(line for line in template.splitlines() if "gpus-per-node" not in line) + "\n")
    return script


def sbatch_and_wait(args: list[str], cwd: Path, env: dict[str, str], limit_s: float = 300) -> tuple[str, str]:
    """``sbatch --parsable *args``, then wait for the job to end by polling ``squeue`` every
    0.3 s (``sbatch --wait`` polls at growing intervals: a job of 10 s took 42). Returns the
    job id and its final state (``COMPLETED``, ``FAILED``, ...); cancels it past ``limit_s``."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id, state = submitted.stdout.strip().split(";")[0], "PENDING"
    deadline = time.monotonic() + limit_s
    while state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True)
            break
        time.sleep(0.3)
        out = subprocess.run(
            ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
        state = out.stdout.strip() or state
    return job_id, state


def test_sbatch_template_runs_two_tasks_with_srun(slurm, tmp_path):
    """slurm/sbatch_template.sh as a user would submit it (GPU line dropped: this node has none)."""
    script = template_script(tmp_path)
    env = {
        **igniter_env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RUN_DIR": str(tmp_path / "run"),
    }
    job_id, state = sbatch_and_wait(
        [
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/job-%j.out",
            str(script),
            *COMMON,
        ],
        tmp_path,
        env,
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert state == "COMPLETED", f"job {job_id}: {state}\n" + logs[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["world_size"] == 2 and metrics["status"] == "completed"
    assert {"rank0.log", "rank1.log"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_submitit_local_two_tasks_match_single_process(tmp_path):
    """`hydra/launcher=submitit_local`: the SLURM job layout as local processes (no SLURM needed)."""
    two_task_job_matching_single_process("submitit_local", tmp_path)


def test_runner_single_in_a_two_task_srun_step_exits_2_but_runs_in_the_batch_script(slurm, tmp_path):
    """`srun igniter runner=single` in a 2-task job would be two runs in one directory: each task
    exits 2 naming runner=slurm and nothing is written. The sbatch script itself (the batch step,
    one process for the whole allocation) may still run runner=single (here: `igniter check`)."""
    run = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "env | grep '^SLURM_' | sort > batch_env.txt\n"
        'python -m igniter check runner=single > batch.txt 2>&1; echo "batch $?" >> status.txt\n'
        f'srun python -m igniter runner=single trainer.max_epochs=1 output_dir={run} > srun.txt 2>&1; echo "srun $?" >> status.txt\n'
    )
    env = {**igniter_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    job_id, state = sbatch_and_wait(
        ["--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/job-%j.out", str(script)],
        tmp_path,
        env,
    )
    status = dict(line.split() for line in (tmp_path / "status.txt").read_text().splitlines())
    details = "".join(
        f"--- {n}\n{(tmp_path / n).read_text()[-2000:]}" for n in ("batch_env.txt", "batch.txt", "srun.txt")
    )
    assert status["batch"] == "0", details
    assert status["srun"] != "0", details
    srun_out = (tmp_path / "srun.txt").read_text()
    assert srun_out.count("2-task SLURM step") == 2 and "runner=slurm" in srun_out, details
    assert not run.exists(), "nothing may be written"
    assert state == "COMPLETED", f"job {job_id}: {state}"


def sacct_attempts(job_id: str) -> list[tuple[str, str, str]]:
    """(JobID, State, ExitCode) of every attempt of ``job_id`` and of its steps, oldest first (``sacct -D``)."""
    out = subprocess.run(
        ["sacct", "-D", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [tuple(line.split("|")) for line in out.split() if line.count("|") == 2]


def test_a_hang_under_srun_ends_the_step_with_4_and_requeue_on_hang_resumes(slurm, tmp_path):
    """2 srun tasks (slurm/sbatch_template.sh, runner=slurm): rank 1 sleeps forever in a handler
    after iteration 25, the first time only. Rank 0's watchdog names it, every rank dumps its
    stacks and the step ends with exit code 4 within seconds (the time limit is 10 minutes);
    runner.requeue_on_hang requeues the job once, and the second attempt resumes from
    iteration 20's checkpoint and completes."""
    run = tmp_path / "run"
    env = {
        **igniter_env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RUN_DIR": str(run),
        "SLEEP_ONCE_MARKER": str(tmp_path / "slept"),
    }
    overrides = [
        "imports=[my_project]",
        "logging.progress_bar=false",
        "logging.loggers=[]",
        "trainer.max_epochs=1",
        "trainer.epoch_length=40",
        "data.loader.batch_size=32",
        "trainer.seed=7",
        "checkpoint.every_iterations=10",
        "runner.hang_timeout_s=5",
        "runner.requeue_on_hang=true",
        'handlers=[{name: sleep_once_on_rank, event: "ITERATION_COMPLETED(once=25)", params: {rank: 1}}]',
    ]
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/job-%j.out",
            str(template_script(tmp_path)),
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = "PENDING"
    try:  # both attempts, with SLURM's hold of a requeued job (BeginTime, about 12 s here)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and state not in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ):
            time.sleep(0.5)
            out = subprocess.run(
                ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
            )
            state = out.stdout.strip() or state
    finally:
        if state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            subprocess.run(["scancel", job_id], capture_output=True)
    output = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))  # --open-mode=append: both attempts
    details = f"job {job_id}: {state}\n{output[-4000:]}"
    assert state == "COMPLETED", details
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1 " in job, details + job  # requeued exactly once

    # the first attempt: rank 0 named rank 1, requeued the job; both tasks left with status 4
    assert f"rank 1 (host {socket.gethostname()}, pid " in output and "made no progress for" in output, details
    assert "after the training step of iteration 25" in output and "rank 1's innermost frames" in output, details
    assert output.count(f"job {job_id} requeued") == 1, details
    assert "Exited with exit code 4" in output, details
    deadline = time.monotonic() + 30  # accounting lags behind the controller
    while ((job_id, "COMPLETED", "0:0") not in sacct_attempts(job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    attempts = sacct_attempts(job_id)
    assert attempts[0][:2] == (job_id, "REQUEUED") and (f"{job_id}.0", "FAILED", "4:0") in attempts, attempts
    assert attempts[-3:] == [
        (job_id, "COMPLETED", "0:0"),
        (f"{job_id}.batch", "COMPLETED", "0:0"),
        (f"{job_id}.0", "COMPLETED", "0:0"),
    ], attempts
    rank1 = (run / "rank1.log").read_text()
    assert "the stacks of every thread" in rank1 and 'components.py", line' in rank1 and "in handler" in rank1
    assert "the stacks of every thread" in (run / "rank0.log").read_text()

    # the second attempt: resumed from the newest checkpoint (iteration 20), completed
    assert "resumed from" in output and "iteration 20)" in output, details
    assert read_metrics(run)["status"] == "completed"


def controller_states() -> dict[str, str]:
    """Job id -> state of every job (one line per array task: ``123_0``) the controller holds."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split("|", 1) for line in out.stdout.split())


def wait_for(condition, what: str, limit_s: float = 120) -> dict[str, str]:
    """Poll the controller every 0.3 s until ``condition(states)`` holds; returns the states."""
    deadline = time.monotonic() + limit_s
    while not condition(states := controller_states()):
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s: {states}"
        time.sleep(0.3)
    return states


def test_single_run_without_m_is_one_slurm_job_in_its_output_dir(slurm, tmp_path):
    run = tmp_path / "run"
    proc = run_igniter(
        [
            "hydra/launcher=slurm",
            "trainer.max_epochs=1",
            "checkpoint.enabled=false",
            "logging.progress_bar=false",
            f"output_dir={run}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    job_id = metrics["job"]["id"]
    assert metrics["status"] == "completed" and job_id and job_id in proc.stdout
    assert wait_for(lambda s: s.get(job_id) not in ("RUNNING", "COMPLETING"), "job ended")[job_id] == "COMPLETED", (
        "it ran on SLURM"
    )
    assert not (tmp_path / "multirun").exists(), "a single run: its own output_dir"
    record = json.loads(
        (run / "submitted.json").read_text()
    )  # what `igniter status <run>` reads (the sweep test runs it)
    assert record["jobs"]["0"]["dir"] == "." and record["jobs"]["0"]["submissions"][0]["id"] == job_id
    assert "-m" not in record["command"] and f"output_dir={run}" in record["command"], "re-submits as it was given"


def test_status_of_a_missing_or_empty_directory_exits_2(tmp_path, capsys):
    from igniter.status import main as status_main

    assert status_main([str(tmp_path / "nope")]) == 2
    assert status_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds no jobs" in err and "Traceback" not in err


def test_sweep_without_waiting_status_and_resubmitting_the_cancelled_job(slurm, tmp_path, monkeypatch):
    """A 3-job sweep with wait=false returns while its jobs run; job 1 sleeps in its first epoch
    (the first time only) until it is cancelled; `igniter status` shows the states, metrics and
    the command that re-submits; that command, run again, submits job 1 alone into its directory."""
    monkeypatch.setenv("SLEEP_ONCE_MARKER", str(tmp_path / "slept"))
    sweep = tmp_path / "sweep"
    command = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.wait=false",
        f"hydra.sweep.dir={sweep}",
        "imports=[my_project]",
        'handlers=[{name: sleep_once_on_rank, event: "ITERATION_COMPLETED(once=2)", params: {rank: 0}}]',
        "handlers.0.params.rank=3,0,4",
        "trainer.max_epochs=1",
        "checkpoint.enabled=false",
        "logging.progress_bar=false",
    ]
    proc = run_igniter(command, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads((sweep / "submitted.json").read_text())["jobs"]
    ids = {int(n): job["submissions"][-1]["id"] for n, job in jobs.items()}
    assert sorted(ids) == [0, 1, 2] and str(sweep) in proc.stdout
    assert all(
        i in proc.stdout and job["submissions"][-1]["log"] in proc.stdout for i, job in zip(ids.values(), jobs.values())
    )
    assert controller_states()[ids[1]] in ("PENDING", "RUNNING"), "returned before the jobs ended"

    wait_for(
        lambda s: s[ids[0]] == s[ids[2]] == "COMPLETED" and (tmp_path / "slept").exists(),
        "jobs 0 and 2 complete, job 1 sleeps",
    )
    subprocess.run(["scancel", ids[1]], check=True, timeout=30)
    wait_for(lambda s: s[ids[1]] == "CANCELLED", "job 1 cancelled")
    status = run_igniter(["status", str(sweep)], tmp_path)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line[:2] in ("0 ", "1 ", "2 ")}
    assert rows["0"][1:5] == [ids[0], "COMPLETED", "completed", "1"] and rows["2"][1:5] == [
        ids[2],
        "COMPLETED",
        "completed",
        "1",
    ], status.stdout
    assert rows["1"][1:3] == [ids[1], "CANCELLED"] and "accuracy" in status.stdout, status.stdout
    assert "job 1 (CANCELLED" in status.stdout and f"hydra.sweep.dir={sweep}" in status.stdout, status.stdout

    kept = {n: (sweep / n / "metrics.json").read_bytes() for n in ("0", "2")}
    first_log = (sweep / "1" / "rank0.log").read_bytes()
    again = run_igniter(command, tmp_path)  # the same command: only job 1 is not completed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted 1 SLURM job" in again.stdout and "job 0 (completed), job 2 (completed)" in again.stdout, (
        again.stdout
    )
    record = json.loads((sweep / "submitted.json").read_text())["jobs"]
    assert [len(record[n]["submissions"]) for n in ("0", "1", "2")] == [1, 2, 1]
    new_id = record["1"]["submissions"][-1]["id"]
    wait_for(lambda s: s.get(new_id) == "COMPLETED", "the re-submitted job completes")
    metrics = read_metrics(sweep / "1")
    assert metrics["status"] == "completed" and metrics["job"]["id"] == new_id and metrics["job"]["num"] == 1
    assert (sweep / "1" / "rank0.log").read_bytes().startswith(first_log), "the same run directory, its log continued"
    assert {n: (sweep / n / "metrics.json").read_bytes() for n in ("0", "2")} == kept, "completed runs untouched"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2"]
    other = run_igniter(
        [*command[:-4], "handlers.0.params.rank=3,0,5", *command[-3:]], tmp_path
    )  # another sweep, same directory
    assert other.returncode == 2 and "job 2's directory" in other.stderr and "Traceback" not in other.stderr, (
        other.stderr[-3000:]
    )
    assert json.loads((sweep / "submitted.json").read_text())["jobs"] == record, "nothing submitted"
