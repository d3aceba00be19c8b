"""The hang watchdog (issue 19): a rank that stops making progress ends the job, named, with
exit status 4; a slow but progressing rank is never killed.

The multi-process tests start real processes (gloo on loopback) and wait for conditions (a
pid file, the process's exit), never a fixed delay."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import igniter_env, read_metrics

from igniter.checkpoint.files import checkpoint_files, load_checkpoint
from igniter.errors import EXIT_HUNG
from igniter.launch.runners import free_port
from igniter.supervision.watchdog import HangDetector

SPAWN = [
    "runner=spawn",
    "runner.nproc_per_node=2",
    "imports=[my_project]",
    "logging.progress_bar=false",
    "trainer.seed=3",
    "logging.loggers=[]",
]


def _record(rank: int, iteration: int, phase: str = "train", beat: int = 0, count: int = 0, cpu_s: float = 0.0) -> dict:
    return {
        "rank": rank,
        "host": "h",
        "pid": 100 + rank,
        "iteration": iteration,
        "phase": phase,
        "count": count,
        "compiling": 0,
        "cpu_s": cpu_s,
        "bytes": 0,
        "beat": beat,
    }


def _observe(detector: HangDetector, t: float, *records: dict):
    return detector.observe({r["rank"]: r for r in records}, t)


def test_detector_names_the_rank_that_stopped_beating():
    d = HangDetector([0, 1], timeout_s=10, beat_s=1, now=0.0)
    for t in range(0, 30):  # rank 1 stops (no beat, no progress) at t=5; rank 0 waits from t=6 on
        r0 = _record(0, min(t, 6), beat=t)
        r1 = _record(1, min(t, 5), beat=min(t, 5))
        verdict = _observe(d, float(t), r0, r1)
        if verdict is not None:
            break
    assert verdict is not None and t == 16, t  # 10 s after the last progress of any rank (t=6)
    assert [c["rank"] for c in verdict.culprits] == [1] and verdict.not_responding
    assert "rank 1 (host h, pid 101) made no progress for 10 s" in verdict.message()
    assert "cannot be read" in verdict.message()
    # where it was when it last reported, said as such (a stopped rank's record can be a beat old)
    assert "(its last report, before it stopped: in the training step of iteration 5)" in verdict.message()


def test_detector_names_the_rank_behind_when_every_reporter_is_alive():
    d = HangDetector([0, 1, 2], timeout_s=5, beat_s=1, now=0.0)
    verdict = None
    for t in range(0, 20):  # rank 2 blocks after iteration 7's step; the others wait in iteration 8
        records = [_record(0, 8, beat=t), _record(1, 8, beat=t), _record(2, 7, phase="trained", beat=t)]
        verdict = _observe(d, float(t), *records) or verdict
        if verdict:
            break
    assert verdict is not None and [c["rank"] for c in verdict.culprits] == [2] and not verdict.not_responding
    assert (
        "after the training step of iteration 7" in verdict.message() and "Waiting for it: rank 0" in verdict.message()
    )


def test_detector_names_every_rank_of_a_deadlock():
    d = HangDetector([0, 1], timeout_s=5, beat_s=1, now=0.0)
    verdicts = [_observe(d, float(t), _record(0, 3, beat=t), _record(1, 3, beat=t)) for t in range(8)]
    verdict = next(v for v in verdicts if v is not None)
    assert [c["rank"] for c in verdict.culprits] == [0, 1]
    assert "not every rank called" in verdict.message()


def test_detector_keeps_a_job_alive_while_any_rank_progresses():
    """Rank 1 waits 60 s for rank 0's evaluation, which reports a batch every 2 s; CPU time
    counts only while setting up or compiling; bytes count while writing a checkpoint."""
    d = HangDetector([0, 1], timeout_s=5, beat_s=1, now=0.0)
    for t in range(60):
        assert (
            _observe(d, float(t), _record(0, 10, "eval", beat=t, count=t // 2), _record(1, 10, "trained", beat=t))
            is None
        )
    d = HangDetector([0], timeout_s=5, beat_s=1, now=0.0)
    assert all(_observe(d, float(t), _record(0, -1, "setup", beat=t, cpu_s=float(t))) is None for t in range(30))
    d = HangDetector([0, 1], timeout_s=5, beat_s=1, now=0.0)  # rank 0 draws the curves, rank 1 waits for it
    assert all(
        _observe(d, float(t), _record(0, 44, "done", beat=t, cpu_s=float(t)), _record(1, 44, "done", beat=t)) is None
        for t in range(30)
    )
    assert any(_observe(d, float(t), _record(0, -1, "train", beat=t, cpu_s=float(t))) for t in range(30, 60))
    d = HangDetector([0], timeout_s=5, beat_s=1, now=0.0)
    assert all(
        _observe(d, float(t), {**_record(0, 3, "checkpoint", beat=t), "bytes": 1000 * t}) is None for t in range(30)
    )


def test_processes_that_are_leaving_are_not_hung_however_slow_their_exit():
    """A reporter stopped by its process (its function returned) publishes a last record with
    ``final``; a slow exit afterwards (3 processes tearing down on a loaded machine took over
    5 s: a false hang verdict with runner.hang_timeout_s=5) is not a hang, nor is a rank that
    left while the others are still finishing; a rank stuck beside a leaving one still is."""
    d = HangDetector([0, 1, 2], timeout_s=5, beat_s=0.5, now=0.0)
    for t in range(60):  # every reporter stopped at t=3, each after its final record
        final = [{**_record(r, 70, "done", beat=min(t, 3)), "final": t >= 3} for r in range(3)]
        assert _observe(d, float(t), *final) is None
    d = HangDetector([0, 1], timeout_s=5, beat_s=0.5, now=0.0)
    verdict = None
    for t in range(60):  # rank 0 left at t=3; rank 1 stays in the step of iteration 12, beating
        verdict = verdict or _observe(d, float(t), {**_record(0, 12, "done", beat=min(t, 3)), "final": t >= 3}, _record(1, 12, beat=t))  # fmt: skip
    assert verdict is not None and [c["rank"] for c in verdict.culprits] == [1] and not verdict.not_responding


def test_detector_counts_a_compile_in_flight_as_progress_while_its_reporter_beats():
    d = HangDetector([0, 1], timeout_s=5, beat_s=1, now=0.0)
    for t in range(40):  # rank 0 compiles its first step for 40 s (inductor works in other processes)
        assert _observe(d, float(t), {**_record(0, 1, beat=t), "compiling": 1}, _record(1, 1, beat=t)) is None
    assert any(_observe(d, float(t), _record(0, 1, beat=t), _record(1, 1, beat=t)) for t in range(40, 60))


def test_detector_waits_for_the_first_reports():
    d = HangDetector([0, 1], timeout_s=5, beat_s=1, now=0.0)
    assert all(d.observe({0: None, 1: None}, float(t)) is None for t in range(100))


def _start(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=igniter_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_one_worker(
    args: list[str], run: Path, tmp_path: Path, rank: int
) -> tuple[subprocess.Popen, int, float, str, str]:
    """Start ``args``, SIGSTOP rank ``rank``'s process once it wrote its pid (mid-epoch);
    return the process, the stopped pid, the stop time and the output."""
    proc = _start(args, tmp_path)
    pid_file = run / f"pid_rank{rank}.txt"
    try:
        _wait_for(pid_file, proc)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, pid, stopped, out, err


def _pid_handler(iteration: int) -> str:
    return f'handlers=[{{name: write_pid, event: "ITERATION_COMPLETED(once={iteration})"}}]'


@pytest.mark.slow
def test_sigstop_of_a_spawned_worker_ends_the_job_named_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "igniter",
        *SPAWN,
        "runner.hang_timeout_s=10",
        "trainer.max_epochs=2",
        "checkpoint.every_iterations=10",
        _pid_handler(30),
        f"output_dir={run}",
    ]
    proc, pid, stopped, out, err = _stop_one_worker(args, run, tmp_path, rank=1)
    ended = time.monotonic() - stopped
    assert proc.returncode == EXIT_HUNG, err[-3000:]
    assert ended < 60, f"the job ended {ended:.0f} s after the stop"
    assert f"rank 1 (host {os.uname().nodename}, pid {pid}) made no progress for" in err and "cannot be read" in err, (
        err[-3000:]
    )
    assert "Traceback" not in err
    assert not _alive(pid) and not _alive(int((run / "pid_rank0.txt").read_text()))
    assert "the stacks of every thread" in (run / "rank0.log").read_text()  # the live rank dumped its stacks
    newest = checkpoint_files(run / "checkpoints")[0]
    load_checkpoint(newest)
    again = subprocess.run(
        args[:-2] + [f"output_dir={run}"], cwd=tmp_path, env=igniter_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"resumed from {newest}" in again.stdout
        or f"resumed from {newest.name}" in again.stdout
        or "resumed from" in again.stdout
    )
    assert read_metrics(run)["status"] == "completed"


@pytest.mark.slow
def test_a_handler_sleeping_forever_on_rank_1_is_named_with_its_stack(tmp_path):
    run = tmp_path / "run"
    handler = (
        'handlers=[{name: sleep_on_rank, event: "ITERATION_COMPLETED(once=15)", params: {rank: 1, seconds: 100000}}]'
    )
    args = [*SPAWN, "runner.hang_timeout_s=5", "trainer.max_epochs=2", handler, f"output_dir={run}"]
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    assert "rank 1 (host" in proc.stderr and "after the training step of iteration 15" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert "rank 1's innermost frames" in proc.stderr and "time.sleep(seconds)" in proc.stderr
    log = (run / "rank1.log").read_text()
    assert "the stacks of every thread" in log and 'components.py", line' in log and "in handler" in log


@pytest.mark.slow
def test_a_skipped_all_reduce_deadlock_is_ended_and_named(tmp_path):
    run = tmp_path / "run"
    args = [
        *SPAWN,
        "runner.hang_timeout_s=5",
        "trainer.max_epochs=2",
        "trainer.step=skip_allreduce_on_rank",
        "+trainer.step_params.iteration=12",
        f"output_dir={run}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    assert "rank 0 (host" in proc.stderr and "rank 1 (host" in proc.stderr and "not every rank called" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "all_reduce" in proc.stderr  # rank 0's innermost frames: the user's collective


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0], ids=["rank1", "rank0-hosting-the-store"])
def test_torchrun_sigstop_of_a_worker_ends_the_job_named(rank, tmp_path):
    """Rank 1 stopped: rank 0's watchdog names it. Rank 0 stopped (it hosts the store, whose
    clients then wait forever): rank 1 notices and names it on its stderr."""
    run = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    args = [
        torchrun,
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "igniter",
        "runner=torchrun",
        *SPAWN[2:],
        "runner.hang_timeout_s=10",
        "trainer.max_epochs=3",
        _pid_handler(30),
        f"output_dir={run}",
    ]
    proc, pid, stopped, out, err = _stop_one_worker(args, run, tmp_path, rank=rank)
    ended = time.monotonic() - stopped
    assert proc.returncode != 0 and ended < 60, f"exit {proc.returncode} {ended:.0f} s after the stop"
    named = f"rank {rank} (host {os.uname().nodename}, pid {pid}) made no progress for"
    assert named in (out if rank == 1 else err), out[-3000:] + err[-3000:]
    assert "exitcode  : 4" in err, err[-3000:]
    assert not _alive(pid)


@pytest.mark.slow
def test_a_long_evaluation_and_a_long_checkpoint_write_are_not_killed(tmp_path):
    """hang_timeout_s=4; the evaluation takes about 12 s (1 s per batch, each reported), then
    the last checkpoint trickles onto disk in 10 chunks a second apart while rank 0 waits for
    it (and rank 1 for rank 0): evaluation batches and bytes written are progress. The evaluation
    is three times the timeout, the write more than twice (the test fails when bytes written
    do not count)."""
    run = tmp_path / "run"
    args = [
        *SPAWN,
        "runner.hang_timeout_s=4",
        "trainer.max_epochs=1",
        "evaluation.step=slow_eval",
        "checkpoint.saver=trickle_disk",
        "checkpoint.n_best=0",
        f"output_dir={run}",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start > 20
    assert read_metrics(run)["status"] == "completed"
    load_checkpoint(checkpoint_files(run / "checkpoints")[0])


@pytest.mark.slow
def test_a_collective_timeout_without_watchdog_names_the_rank_that_did_not_join(tmp_path):
    """runner.hang_timeout_s=null: gloo's timeout (runner.timeout_s=8) ends the job, and the
    error names rank 1, asleep in a handler after iteration 15's step, beside gloo's message."""
    run = tmp_path / "run"
    handler = (
        'handlers=[{name: sleep_on_rank, event: "ITERATION_COMPLETED(once=15)", params: {rank: 1, seconds: 100000}}]'
    )
    args = [
        *SPAWN,
        "runner.hang_timeout_s=null",
        "runner.timeout_s=8",
        "trainer.max_epochs=2",
        handler,
        f"output_dir={run}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a collective timed out (runner.timeout_s); the rank(s) that did not join it: rank 1 (host" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "is behind: after the training step of iteration 15" in proc.stderr and "Timed out" in proc.stderr


def test_a_hang_timeout_that_is_not_positive_is_a_config_error(tmp_path, monkeypatch, capsys):
    from igniter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["runner=spawn", "runner.hang_timeout_s=0"])
    assert info.value.code == 2
    assert (
        "  runner.hang_timeout_s = 0.0: expected a positive number of seconds (or null: no hang watchdog)"
        in capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir()), "nothing written"
