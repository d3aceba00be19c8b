"""Crash soak: SIGKILL a 2-process run N times at random moments, resume it each time, and
check that every checkpoint left on disk loads and that the final weights are bit-identical
to an uninterrupted run.

    python bench/soak.py                     # 30 kills, 7-10 min on 2 cores
    python bench/soak.py --kills 3           # a quick check, ~2.5 min
    python bench/soak.py --kills 30 --seed 7 --every-iterations 5 --epochs 100 --workdir /tmp/soak
    python bench/soak.py --kills 10 --epochs 8 --out bench/results/soak_workers.json --extra \
        data.loader.num_workers=2 'data.train.transforms=[{name:gaussian_noise,params:{std:0.1}}]'
                                             # DataLoader workers and random augmentation

What it does, on the embedded digits data set (no downloads), the default MLP and Adam, with
the igniter next to this script (first on the runs' ``PYTHONPATH``; the JSON names its commit):

1. The reference: ``python -m igniter runner=spawn runner.nproc_per_node=2
   trainer.max_epochs=<epochs> checkpoint.every_iterations=<k> trainer.seed=<s>
   logging.progress_bar=false output_dir=<workdir>/reference``, run to the end. Its training
   time ``D`` (Ignite's "Engine run finished. Time taken" in its ``rank0.log``: the epochs,
   not the start-up nor the summary after them) sets the kill window: ``bound = 1.5 * D / N``,
   so that the N kills together cover about three quarters of the run on average and the run
   is not finished before its last kill.
2. The same command with ``output_dir=<workdir>/killed``, N times: each start is a new
   process group (``start_new_session``: the launcher and the workers it spawns), the script
   waits for a condition (``rank0.log`` gets one more "Trainer: Engine run starting" or
   "resuming" line: training has started, after any resume), then SIGKILLs the *whole group*
   (``os.killpg``, as a node failure does) a random ``uniform(0, bound)`` seconds later
   (``random.Random(--seed)``), and waits until no process of the group is left before the
   next start. A kill "mid-write" is one after which a temporary checkpoint file
   (``checkpoints/.*.tmp``, :func:`igniter.atomic_files.atomic_write`) of that attempt is left: the
   group died while a checkpoint was being written. After every kill every checkpoint on
   disk is checked. Each re-run of the same command resumes by itself (``resume=auto``) from
   the newest complete checkpoint; the iteration it says it resumed from is compared with
   the newest checkpoint on disk before it started.
3. The same command once more, let run to the end (exit status 0 expected).
4. Checks: every ``*.pt`` in ``killed/checkpoints`` loads with igniter's own checker
   (:func:`igniter.checkpoint.resume.check_checkpoint`: ``torch.load(weights_only=True)``, the entries a
   resume needs, the model's keys and shapes; a ``best_model_*`` file, which holds the model's
   state dict alone, with ``load_checkpoint`` and ``check_model_state``), no temporary file is left, ``metrics.json``
   says ``completed`` with every epoch, and the model of the newest checkpoint (the final
   weights, as ``tests/test_fault_tolerance.py``'s ``final_model`` reads them) is
   ``torch.equal`` to the reference's, tensor by tensor. Checkpoint files the uninterrupted run
   does not end with (older ones a kill kept from being rotated out) are listed in the JSON
   (``left_behind``) and in a note line; they are not counted as a failure.

Prints one line (kills, of which mid-write, unloadable checkpoints, max |dW| over the model's
tensors, seconds) and writes the figures and every attempt to ``bench/results/soak.json``
(``--out``). Exit status 1 when a checkpoint does not load, a resume fails or picks an older
checkpoint than the newest on disk, any weight differs, a temporary file is left at the end,
``metrics.json`` is incomplete, or a run finished before its kill (fewer kills than asked:
raise ``--epochs``); the work directory is then kept
(each attempt's output is in ``<workdir>/attempt_<i>.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from omegaconf import OmegaConf  # noqa: E402

import igniter  # noqa: E402,F401  (every built-in registered: the model factory below)
from igniter.build import build_model  # noqa: E402
from igniter.checkpoint.files import (
    CheckpointInvalid,
    check_checkpoint,
    check_model_state,
    checkpoint_files,
    load_checkpoint,
)  # noqa: E402

TRAINING_STARTED = re.compile(
    r"Trainer: Engine run (?:starting|resuming)"
)  # Ignite's line, after the build and any resume
RESUMED = re.compile(r"resumed from (\S+) \(epoch \d+, iteration (\d+)\)")
TRAINING_TOOK = re.compile(r"Trainer: Engine run finished\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")
STEP = re.compile(r"_(\d+)\.pt$")


def command(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The soaked command: 2 spawned processes, frequent checkpoints, fixed seed."""
    return [
        sys.executable, "-m", "igniter",
        "runner=spawn", "runner.nproc_per_node=2",
        f"trainer.max_epochs={args.epochs}",
        f"checkpoint.every_iterations={args.every_iterations}",
        f"trainer.seed={args.train_seed}",
        "logging.progress_bar=false",
        *args.extra,
        f"output_dir={output_dir}",
    ]  # fmt: skip


def environment() -> dict[str, str]:
    """One thread per process (as the tests run them), and the igniter next to this script
    first on the path (the one the checks below import): the same for every attempt."""
    path = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def source() -> dict[str, Any]:
    """Which igniter was soaked: its directory, the git commit and tracked files changed since."""
    root = Path(igniter.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "igniter", "configs")
    return {"path": str(root), "commit": git("rev-parse", "HEAD"), "changed": changed.splitlines() if changed else []}


def log_count(run: Path, pattern: re.Pattern[str]) -> int:
    """How many lines of the run's ``rank0.log`` (appended to by every attempt) match ``pattern``."""
    log = run / "rank0.log"
    return len(pattern.findall(log.read_text(errors="replace"))) if log.exists() else 0


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group, its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_training_started(proc: subprocess.Popen, run: Path, seen: int, timeout: float = 600.0) -> bool:
    """Poll until ``rank0.log`` holds more than ``seen`` trainer-start lines (a condition,
    however busy the host); ``False`` if the process exited first or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_count(run, TRAINING_STARTED) > seen:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` still running (zombies, already dead, are not counted)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL the process group led by ``proc`` and wait until none of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while group_alive(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {proc.pid} still has {group_alive(proc.pid)} after SIGKILL")
        time.sleep(0.01)


def temporary_files(run: Path) -> set[str]:
    directory = run / "checkpoints"
    return {p.name for p in directory.glob(".*.tmp")} if directory.is_dir() else set()


def newest_iteration(run: Path) -> int | None:
    files = checkpoint_files(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    return int(STEP.search(files[0].name).group(1)) if files else None  # type: ignore[union-attr]


def check_all(run: Path, model: torch.nn.Module, required: tuple[str, ...]) -> tuple[int, dict[str, str]]:
    """Every ``*.pt`` in the run's checkpoint directory through igniter's checker: how many,
    and ``{name: reason}`` for those that do not load. ``last_checkpoint_*`` must hold what a
    resume needs (``required``, :func:`check_checkpoint`); ``best_model_*`` is the model's state
    dict itself (:func:`load_checkpoint` and :func:`check_model_state`)."""
    directory = run / "checkpoints"
    files = sorted(directory.glob("*.pt")) if directory.is_dir() else []
    bad = {}
    for path in files:
        try:
            if path.name.startswith("best_"):  # the model's state dict alone (Ignite saves a single object unwrapped)
                check_model_state(load_checkpoint(path), model)
            else:
                check_checkpoint(path, model, required)
        except CheckpointInvalid as e:
            bad[path.name] = str(e)
        except FileNotFoundError:
            pass  # rotated out since the glob (only possible while a run is alive: never here)
    return len(files), bad


def final_model(run: Path) -> dict[str, torch.Tensor]:
    """The model of the newest ``last_checkpoint_*`` (as tests/test_fault_tolerance.py reads it)."""
    return torch.load(checkpoint_files(run / "checkpoints")[0], weights_only=True)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    """Largest |a - b| over every tensor, and the names of tensors that are not ``torch.equal``
    (a key in one only counts as different, with an infinite difference)."""
    worst, differ = 0.0, []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b or a[k].shape != b[k].shape:
            worst, differ = float("inf"), differ + [k]
            continue
        if not torch.equal(a[k], b[k]):
            differ.append(k)
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return worst, differ


def run_reference(args: argparse.Namespace, workdir: Path) -> float:
    """The uninterrupted run; returns its training time, s (Ignite's "Trainer: Engine run
    finished. Time taken: HH:MM:SS.mmm": the epochs with their handlers and validation,
    not the start-up nor the summary and plots after them)."""
    run = workdir / "reference"
    proc = start(command(args, run), workdir, workdir / "reference.log")
    if proc.wait() != 0:
        raise SystemExit(f"the reference run failed (rc {proc.returncode}); see {workdir / 'reference.log'}")
    taken = TRAINING_TOOK.findall((run / "rank0.log").read_text(errors="replace"))
    if not taken:
        raise SystemExit(f"the reference run's {run / 'rank0.log'} does not say how long training took")
    hours, minutes, secs = taken[-1]
    return 3600 * int(hours) + 60 * int(minutes) + float(secs)


def soak(
    args: argparse.Namespace, workdir: Path, bound: float, model: torch.nn.Module, required: tuple[str, ...]
) -> tuple[list[dict[str, Any]], list[str]]:
    """N kills and resumes of the run in ``workdir/killed``, then the last run to its end.
    Returns one record per attempt and the problems found on the way."""
    rng = random.Random(args.seed)
    run = workdir / "killed"
    cmd = command(args, run)
    attempts: list[dict[str, Any]] = []
    problems: list[str] = []
    for i in range(args.kills + 1):
        last = i == args.kills
        newest_before = newest_iteration(run)
        tmp_before = temporary_files(run)
        started_before, resumed_before = log_count(run, TRAINING_STARTED), log_count(run, RESUMED)
        log = workdir / f"attempt_{i:02d}.log"
        record: dict[str, Any] = {"attempt": i, "newest_checkpoint_at_start": newest_before}
        proc = start(cmd, workdir, log)
        if not wait_training_started(proc, run, started_before):
            rc = proc.wait()
            problems.append(f"attempt {i} exited with status {rc} before training started ({log})")
            record.update(outcome="failed before training", returncode=rc)
            attempts.append(record)
            break
        t0 = time.monotonic()
        resumed = RESUMED.findall((run / "rank0.log").read_text(errors="replace"))
        if log_count(run, RESUMED) > resumed_before:
            record["resumed_from_iteration"] = int(resumed[-1][1])
            if newest_before is not None and int(resumed[-1][1]) != newest_before:
                problems.append(
                    f"attempt {i} resumed from iteration {resumed[-1][1]}, the newest checkpoint was {newest_before}"
                )
        elif newest_before is not None:
            problems.append(f"attempt {i} did not resume although checkpoint {newest_before} was on disk")
        if last:
            rc = proc.wait()
            record.update(outcome="ran to the end", returncode=rc, seconds=round(time.monotonic() - t0, 3))
            if rc != 0:
                problems.append(f"the last attempt exited with status {rc} ({log})")
            attempts.append(record)
            break
        delay = rng.uniform(0.0, bound)
        try:
            rc = proc.wait(timeout=max(0.0, delay - (time.monotonic() - t0)))
            record.update(outcome="finished before its kill", delay=round(delay, 3), returncode=rc)
            problems.append(f"attempt {i} finished {delay:.2f} s after training started, before its kill: "
                            f"fewer kills than asked (more --epochs)")  # fmt: skip
            attempts.append(record)
            break
        except subprocess.TimeoutExpired:
            kill_group(proc)
        left = sorted(temporary_files(run) - tmp_before)
        count, bad = check_all(run, model, required)
        record.update(outcome="killed", delay=round(delay, 3), mid_write=bool(left), temporary_files=left,
                      newest_checkpoint_after_kill=newest_iteration(run), checkpoints=count, unloadable=bad,
                      files=sorted(p.name for p in (run / "checkpoints").glob("*.pt")))  # fmt: skip
        problems += [f"after kill {i + 1}: {name} {reason}" for name, reason in bad.items()]
        attempts.append(record)
        print(f"kill {i + 1:2d}/{args.kills}: {delay:5.2f} s after training started, newest checkpoint "
              f"{record['newest_checkpoint_after_kill']}, {count} files" + (f", mid-write ({', '.join(left)})" if left else ""),
              flush=True)  # fmt: skip
    return attempts, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs of the process group before the last run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--train-seed", type=int, default=3, help="trainer.seed of the soaked command")
    parser.add_argument("--every-iterations", type=int, default=5, help="checkpoint.every_iterations")
    parser.add_argument("--epochs", type=int, default=100, help="trainer.max_epochs (44 iterations each)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json", help="the results JSON")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to the soaked command, e.g. "
                        "data.loader.num_workers=2 'data.train.transforms=[{name:gaussian_noise}]'")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary "
                        "directory, removed unless something failed)")  # fmt: skip
    args = parser.parse_args()
    if args.kills < 0 or args.every_iterations < 1 or args.epochs < 1:
        parser.error("--kills >= 0, --every-iterations >= 1 and --epochs >= 1")

    begin = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="igniter-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("reference", "killed"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    print(f"soak: work directory {workdir}", flush=True)

    training = run_reference(args, workdir)
    bound = 1.5 * training / max(args.kills, 1)
    print(
        f"reference: training took {training:.1f} s; kills uniform in [0, {bound:.2f}] s after training starts",
        flush=True,
    )
    cfg = OmegaConf.load(workdir / "reference" / "config.yaml")
    model = build_model(cfg.model)
    required = ("model", "optimizer", "trainer", "checkpointer") + (
        ("lr_scheduler",) if cfg.solver.get("scheduler", {}).get("name") else ()
    )

    attempts, problems = soak(args, workdir, bound, model, required)
    run = workdir / "killed"
    kills = [a for a in attempts if a["outcome"] == "killed"]
    mid_write = sum(a["mid_write"] for a in kills)
    ever_unloadable = sorted({name for a in kills for name in a["unloadable"]})

    count, bad = check_all(run, model, required)
    problems += [f"at the end: {name} {reason}" for name, reason in bad.items()]
    left = sorted(temporary_files(run))
    if left:
        problems.append(f"temporary files left at the end: {left}")
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    epochs = [e["epoch"] for e in metrics.get("epochs", [])]
    if metrics.get("status") != "completed" or epochs != list(range(1, args.epochs + 1)):
        problems.append(f"metrics.json: status {metrics.get('status')}, epochs {epochs[:3]}...{epochs[-3:]}")
    dw, differ, tensors = float("inf"), ["(no final checkpoint)"], 0
    if checkpoint_files(run / "checkpoints"):
        reference = final_model(workdir / "reference")
        dw, differ = max_difference(reference, final_model(run))
        tensors = len(reference)
        if newest_iteration(run) != newest_iteration(workdir / "reference"):
            problems.append(
                f"newest checkpoint {newest_iteration(run)}, the reference's {newest_iteration(workdir / 'reference')}"
            )
    if differ:
        problems.append(f"final weights differ from the reference: {differ}")
    unloadable = sorted(set(ever_unloadable) | set(bad))
    # Files the uninterrupted run does not end with: rotated out by checkpoint.n_saved/n_best, yet
    # still on disk (not a failure here: they load, and a resume picks the newest file)
    names = {p.name for p in (workdir / "reference" / "checkpoints").glob("*.pt")}
    left_behind = sorted(p.name for p in (run / "checkpoints").glob("*.pt") if p.name not in names)
    seconds = time.monotonic() - begin

    line = (f"soak: {len(kills)} kills ({mid_write} mid-write), {len(unloadable)} unloadable checkpoints, "
            f"max |dW| = {dw} over {tensors} tensors, {seconds:.0f} s")  # fmt: skip
    result = {
        "benchmark": "soak",
        "workload": "digits + mlp, runner=spawn nproc_per_node=2 (gloo, 1 thread per process), SIGKILL of the whole process group",
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "igniter": source(),
        "command": " ".join(["python", *command(args, Path("<output_dir>"))[1:]]),
        "kills_asked": args.kills,
        "seed": args.seed,
        "epochs": args.epochs,
        "every_iterations": args.every_iterations,
        "reference_training_s": round(training, 3),
        "kill_window_s": [0.0, round(bound, 3)],
        "kills": len(kills),
        "mid_write": mid_write,
        "checkpoints_checked_at_end": count,
        "files_at_end": sorted(p.name for p in (run / "checkpoints").glob("*.pt")),
        "reference_files_at_end": sorted(names),
        "left_behind": left_behind,
        "unloadable": unloadable,
        "max_abs_dw": dw if dw != float("inf") else None,
        "tensors": tensors,
        "tensors_differing": differ,
        "seconds": round(seconds, 1),
        "problems": problems,
        "ok": not problems,
        "line": line,
        "attempts": attempts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for problem in problems:
        print(f"PROBLEM: {problem}", flush=True)
    if left_behind:
        print(f"note: {len(left_behind)} checkpoint file(s) the uninterrupted run does not keep still on disk: "
              f"{', '.join(left_behind)}", flush=True)  # fmt: skip
    print(line, flush=True)
    if problems:
        print(f"work directory kept: {workdir}")
        sys.exit(1)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
