"""A full disk loses nothing (issue 19): a checkpoint write that fails for lack of space
keeps the previous checkpoint, removes its own partial file or directory and stops the run
with exit status 5 and one paragraph (the directory, the bytes needed and free); once space
is freed, the same command resumes and ends bit-identical to an uninterrupted run.

The end-to-end test puts the run's ``checkpoints/`` directory on a real size-limited tmpfs
(``mount -t tmpfs``: root only; skipped where mounting is not allowed) with room for one
checkpoint and a half, so the first checkpoint fits and the second does not (the first is
kept while its successor is written). The other tests need no mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_together
from test_fault_tolerance import assert_all_checkpoints_load, assert_bit_identical, final_model

from igniter.errors import EXIT_CHECKPOINT_WRITE, CheckpointWriteFailed, ConfigError, IgniterError, Problem

# 3 epochs of 44 iterations on digits, a checkpoint at every epoch's end (44, 88, 132), no best-model files.
ARGS = [
    "trainer.max_epochs=3",
    "checkpoint.min_interval_seconds=0",  # a checkpoint at every epoch's end: the disk fills at the second
    "checkpoint.n_best=0",
    "checkpoint.n_saved=2",
    "trainer.seed=3",
    "logging.progress_bar=false",
    "logging.loggers=[]",
]
FORMATS = {"torch": [], "dcp": ["checkpoint.format=dcp"]}
PAGE = 4096


# ---- a real full disk: tmpfs ------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: int) -> None:
    """Mount a tmpfs of ``size`` bytes at ``path``; skip the test where that is not allowed."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        pytest.skip("mounting a size-limited tmpfs needs Linux")
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (mount -t tmpfs)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command to make a size-limited tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not allowed here (exit {proc.returncode}: {proc.stderr.strip()})")


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A size-limited tmpfs at ``path``, unmounted on exit."""
    _mount_tmpfs(path, size)
    try:
        yield path
    finally:
        _unmount(path)


def bytes_on_tmpfs(path: Path) -> int:
    """What file (or directory of files) ``path`` takes on a tmpfs: whole pages."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def leave_free(directory: Path, free: int) -> Path:
    """Fill ``directory``'s file system with a filler file until ``free`` bytes are left."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(directory).free - free))
    assert abs(shutil.disk_usage(directory).free - free) < PAGE
    return filler


def test_a_full_disk_stops_the_run_with_exit_5_keeps_the_checkpoint_and_the_run_resumes_exactly(tmp_path):
    with tmpfs(tmp_path / "probe", PAGE):  # skips here, before any run, where mounting is not allowed
        pass
    # uninterrupted references, one per format: the final weights, and what one checkpoint takes
    references = {fmt: tmp_path / f"reference-{fmt}" for fmt in FORMATS}
    runs = [[*ARGS, *extra, f"output_dir={references[fmt]}"] for fmt, extra in FORMATS.items()]
    for proc in run_together(runs, tmp_path):
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = {
        fmt: next((references[fmt] / "checkpoints").glob("last_checkpoint_88.*")) for fmt in FORMATS
    }  # 44 is rotated out
    size = {fmt: bytes_on_tmpfs(one[fmt]) for fmt in FORMATS}
    first = {"torch": "last_checkpoint_44.pt", "dcp": "last_checkpoint_44.dcp"}  # what the full disk keeps

    runs = {fmt: tmp_path / f"run-{fmt}" for fmt in FORMATS}
    args = {fmt: [*ARGS, *extra, f"output_dir={runs[fmt]}"] for fmt, extra in FORMATS.items()}
    with contextlib.ExitStack() as mounts:
        fillers = {}
        for (
            fmt
        ) in FORMATS:  # room for the first checkpoint and half of the second (the first stays while it is written)
            directory = mounts.enter_context(tmpfs(runs[fmt] / "checkpoints", 8 * size[fmt]))
            fillers[fmt] = leave_free(directory, size[fmt] + size[fmt] // 2)

        for fmt, proc in zip(FORMATS, run_together([args[fmt] for fmt in FORMATS], tmp_path)):
            directory = runs[fmt] / "checkpoints"
            assert proc.returncode == EXIT_CHECKPOINT_WRITE, f"{fmt}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, proc.stderr
            messages = [line for line in proc.stderr.splitlines() if line.startswith("igniter:")]
            assert len(messages) == 1, proc.stderr
            message = messages[0]
            if fmt == "torch":
                assert proc.stderr.strip() == message, "one paragraph, nothing else on stderr"
            assert (
                f"last_checkpoint_88.{'pt' if fmt == 'torch' else 'dcp'} could not be written to {directory}: No space left on device"
                in message
            )
            found = re.search(r"it needs (about )?(\d+) bytes .*? and (\d+) bytes .*? are free there", message)
            assert found, message
            needed, free = int(found.group(2)), int(found.group(3))
            assert free == shutil.disk_usage(directory).free, "the bytes free once the partial checkpoint was removed"
            assert free < size[fmt] <= needed * 2, message  # needed: the serialized size, or (dcp) its tensors' sum
            if fmt == "torch":
                assert abs(needed - one[fmt].stat().st_size) < 1024, "the size of the serialized checkpoint"
            else:
                assert found.group(1) and "without file overhead" in message, "an estimate says so"
            assert f"{directory} are intact" in message and "run the same command again" in message

            # the previous checkpoint is intact and loads; no partial file or directory is left
            assert sorted(p.name for p in directory.iterdir()) == sorted(["filler", first[fmt]]), list(
                directory.iterdir()
            )
            assert assert_all_checkpoints_load(runs[fmt]) == 1
            assert read_metrics(runs[fmt])["status"] == "running", "the run did not complete"
            assert "could not be written:\nTraceback" in (runs[fmt] / "rank0.log").read_text(), (
                "the OS error's traceback: in the rank log only"
            )

        for fmt in FORMATS:  # space freed: the same command resumes from the kept checkpoint
            fillers[fmt].unlink()
        for fmt, proc in zip(FORMATS, run_together([args[fmt] for fmt in FORMATS], tmp_path)):
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert f"resumed from {runs[fmt] / 'checkpoints' / first[fmt]}" in proc.stdout, proc.stdout[-3000:]
            assert_bit_identical(final_model(references[fmt]), final_model(runs[fmt]))
            metrics = read_metrics(runs[fmt])
            assert metrics["status"] == "completed" and [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
            assert not list((runs[fmt] / "checkpoints").glob(".*")), "no temporary file is left"


# ---- the savers and the spawn launcher's error record, without a mount ------------------------


class Unrebuildable(IgniterError):
    """Pickles, but unpickling calls ``__init__`` with the message alone (as slurm's Preempted)."""

    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def test_a_failed_background_write_keeps_the_rotated_out_file_and_raises_exit_5(tmp_path):
    from igniter.checkpoint.saver import AtomicDiskSaver

    class FullDisk(AtomicDiskSaver):
        full = False

        def write_bytes(self, f, data):
            if self.full:
                f.write(data[: len(data) // 2])  # a partial file, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write(data)

    saver = FullDisk(tmp_path, create_dir=True)
    saver({"w": torch.ones(1000)}, "last_1.pt")
    saver.flush()
    saver.remove("last_1.pt")  # rotated out by the next save
    saver.full = True
    saver({"w": torch.zeros(1000)}, "last_2.pt")
    with pytest.raises(CheckpointWriteFailed) as raised:
        saver.flush()
    error = raised.value
    assert error.exit_status == EXIT_CHECKPOINT_WRITE and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert "\n" not in str(error) and f"could not be written to {tmp_path}" in str(error)
    assert f"it needs {error.needed} bytes" in str(error) and f"and {error.free} bytes" in str(error)
    assert error.needed > 4000, "the serialized checkpoint's size"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_1.pt"], "the old file stays, the partial one is gone"
    assert torch.equal(torch.load(tmp_path / "last_1.pt", weights_only=True)["w"], torch.ones(1000))


def test_a_failed_dcp_write_removes_its_directory_and_raises_exit_5(tmp_path):
    from igniter.checkpoint.dcp import DcpSaver, dcp_model_state

    class FullDisk(DcpSaver):
        full = False

        def write(self, sharded, tmp):
            if self.full:
                (tmp / "__0_0.distcp").write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().write(sharded, tmp)

    saver = FullDisk(tmp_path)
    state = {"model": {"w": torch.ones(1000)}, "trainer": {"iteration": 1}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        saver(state, "last_1.dcp")
    saver.remove("last_1.dcp")
    saver.full = True
    with pytest.raises(CheckpointWriteFailed) as raised:
        saver({**state, "trainer": {"iteration": 2}}, "last_2.dcp")
    message = str(raised.value)
    assert raised.value.exit_status == EXIT_CHECKPOINT_WRITE and "\n" not in message
    assert (
        f"last_2.dcp could not be written to {tmp_path}: No space left on device; it needs about 4000 bytes" in message
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_1.dcp"], (
        "the temporary directory is removed, the old one kept"
    )
    assert torch.equal(dcp_model_state(tmp_path / "last_1.dcp")["w"], torch.ones(1000))


def test_a_workers_igniter_error_reaches_the_launcher_as_itself(tmp_path):
    """runner=spawn records what a worker raised; any IgniterError comes back whole (its
    message and exit status)."""
    from igniter.errors import CheckpointWriteFailed
    from igniter.launch import worker_errors

    def fails(error):
        def fn():
            raise error

        return fn

    full = CheckpointWriteFailed(
        "checkpoint x could not be written to /ckpt: No space left on device", errno.ENOSPC, "/ckpt", 10, 5
    )
    for error in (full, ConfigError([Problem("data.root", "does not exist", "/x")])):
        with worker_errors.recorded_worker_errors() as directory:
            with pytest.raises(type(error)):
                worker_errors.RecordWorkerErrors(directory, fails(error))()
            again = worker_errors.first_worker_error(directory)
        assert type(again) is type(error) and str(again) == str(error) and again.exit_status == error.exit_status

    with worker_errors.recorded_worker_errors() as directory:
        with pytest.raises(Unrebuildable):
            worker_errors.RecordWorkerErrors(directory, fails(Unrebuildable(1, 2)))()
        assert worker_errors.first_worker_error(directory) is None, "left to the traceback text (RankFailed)"
