"""``igniter eval`` / ``igniter export`` and checkpoint errors: what a bad file is called,
config-group overrides in eval, and the permissions of an exported file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import igniter_env, run_igniter, run_together

from igniter.checkpoint.files import CheckpointInvalid, check_checkpoint, checkpoint_files
from igniter.models import MLP

NOT_A_CHECKPOINT = "is not a PyTorch checkpoint (cannot be read as one: "
PICKLED = "contains pickled Python objects"


class Thing:
    """An arbitrary Python object: torch.save pickles it by reference to this class."""


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A finished one-epoch digits run (8 iterations): config.yaml and last_checkpoint_8.pt."""
    cwd = tmp_path_factory.mktemp("eval_export")
    run = cwd / "run"
    proc = run_igniter(
        ["trainer.max_epochs=1", "data.train.subset=256", "logging.progress_bar=false", f"output_dir={run}"], cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def last_checkpoint(run: Path) -> Path:
    return checkpoint_files(run / "checkpoints")[0]


def bad_files(directory: Path, real: Path) -> dict[str, Path]:
    """One file of each kind, next to nothing else: name -> path."""
    rng = torch.Generator().manual_seed(0)
    data = real.read_bytes()
    contents = {
        "random": bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "truncated_head": data[:100],
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = directory / f"{name}.pt"
        paths[name].write_bytes(content)
    ckpt = torch.load(real, weights_only=True)
    paths["object"] = directory / "object.pt"
    torch.save({**ckpt, "extra": Thing()}, paths["object"])
    paths["exploit"] = directory / "exploit.pt"
    torch.save({**ckpt, "extra": Exploit()}, paths["exploit"])
    return paths


def assert_no_unsafe_advice(text: str) -> None:
    assert "weights_only=False" not in text and "`weights_only` set to `False`" not in text, text
    assert "Traceback" not in text and "arbitrary code execution" not in text, text


#: what each kind of bad file is called (the start of check_checkpoint's message)
EXPECTED = {
    "random": NOT_A_CHECKPOINT,
    "empty": NOT_A_CHECKPOINT + "the file is empty)",
    "truncated": NOT_A_CHECKPOINT + "damaged or truncated zip archive",
    "truncated_head": NOT_A_CHECKPOINT + "damaged or truncated zip archive",
    "object": PICKLED + f", not only tensors and plain containers (it references {Thing.__module__}.Thing)",
    "exploit": PICKLED + ", not only tensors and plain containers (it references posix.system)",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_checkpoint_error_says_what_is_wrong(digits_run, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    path = bad_files(tmp_path, last_checkpoint(digits_run))[kind]
    with pytest.raises(CheckpointInvalid) as info:
        check_checkpoint(path, MLP(64, [128], 10), ("model",))
    message = str(info.value)
    assert message.startswith(EXPECTED[kind]), message
    assert "\n" not in message and len(message) < 300, message
    assert_no_unsafe_advice(message)
    if kind in ("object", "exploit"):
        assert "nothing from it was run" in message
    else:
        assert "pickled" not in message and "refused" not in message
    assert not (tmp_path / "PWNED").exists()


def test_resume_from_random_bytes_and_auto_resume_name_the_file(digits_run, tmp_path):
    garbage = bad_files(tmp_path, last_checkpoint(digits_run))["random"]
    proc = run_igniter([f"resume={garbage}", "trainer.max_epochs=2", f"output_dir={tmp_path / 'other'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{garbage} {NOT_A_CHECKPOINT}" in proc.stderr and "pickled" not in proc.stderr
    assert_no_unsafe_advice(proc.stderr)
    # resume=auto finds a damaged newest checkpoint: skipped with the same words
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    newest = last_checkpoint(run)
    newest.write_bytes(garbage.read_bytes())
    proc = run_igniter(["trainer.max_epochs=2", f"output_dir={run}"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"skipping checkpoint {newest}: it {NOT_A_CHECKPOINT}" in out and "no valid checkpoint in" in proc.stderr
    assert_no_unsafe_advice(out)


def test_resume_from_pickled_object_keeps_the_pickled_code_message(digits_run, tmp_path):
    path = bad_files(tmp_path, last_checkpoint(digits_run))["exploit"]
    proc = run_igniter([f"resume={path}", "trainer.max_epochs=2", f"output_dir={tmp_path / 'other'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{path} {PICKLED}" in proc.stderr and "nothing from it was run" in proc.stderr
    assert_no_unsafe_advice(proc.stderr)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "other" / "PWNED").exists()


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "exploit"])
def test_export_of_a_bad_file_is_one_paragraph_and_writes_nothing(digits_run, tmp_path, kind):
    path = bad_files(tmp_path, last_checkpoint(digits_run))[kind]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_igniter(["export", str(path), "--format", "safetensors"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("igniter: cannot export") and str(path) in proc.stderr
    assert (PICKLED if kind == "exploit" else NOT_A_CHECKPOINT) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2 and proc.stdout == "", proc.stderr
    assert_no_unsafe_advice(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written (no .safetensors, no temporary file)"


def test_eval_of_a_bad_file_reports_the_checkpoint_before_the_config(digits_run, tmp_path):
    path = bad_files(tmp_path, last_checkpoint(digits_run))["random"]
    # a lone file: its "run directory" (two levels up) has no config.yaml
    proc = run_igniter(["eval", str(path)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"checkpoint: {path} {NOT_A_CHECKPOINT}" in proc.stderr and "config.yaml" not in proc.stderr
    assert_no_unsafe_advice(proc.stderr)
    # the newest checkpoint of a real run is damaged: named, nothing written
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    newest = last_checkpoint(run)
    newest.write_bytes(path.read_bytes())
    (run / "eval_metrics.json").unlink(missing_ok=True)
    proc = run_igniter(["eval", str(run)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{newest} {NOT_A_CHECKPOINT}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    assert not (run / "eval_metrics.json").exists()


@pytest.mark.slow  # two spawned processes
def test_eval_with_a_config_group_choice_runs_two_processes(digits_run, tmp_path):
    """The same checkpoint evaluated by one process and, through a group choice or a dotted key,
    by two (the three evaluations run at once, each in its own copy of the run)."""
    choices = {
        "single": [],
        "group": ["runner=spawn", "runner.nproc_per_node=2"],
        "dotted": ["runner.name=spawn", "runner.nproc_per_node=2"],
    }
    for name in choices:
        shutil.copytree(digits_run, tmp_path / name)
        (tmp_path / name / "eval_metrics.json").unlink(missing_ok=True)
    procs = run_together([["eval", str(tmp_path / name), *overrides] for name, overrides in choices.items()], tmp_path)
    results = {}
    for name, proc in zip(choices, procs):
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        results[name] = json.loads((tmp_path / name / "eval_metrics.json").read_text())
    assert results["single"]["world_size"] == 1
    for name in ("group", "dotted"):
        assert results[name]["world_size"] == 2, results[name]
        assert results[name]["samples"] == results["single"]["samples"] == 359
        assert results[name]["metrics"]["accuracy"] == results["single"]["metrics"]["accuracy"]
        assert results[name]["metrics"]["loss"] == pytest.approx(results["single"]["metrics"]["loss"], rel=1e-6)


def test_eval_rejects_an_unknown_group_option_and_weights_that_do_not_fit(digits_run, tmp_path):
    proc = run_igniter(["eval", str(digits_run), "runner=spwn"], tmp_path)
    assert (
        proc.returncode == 2
        and "no such option in config group 'runner'" in proc.stderr
        and "Did you mean 'spawn'" in proc.stderr
    )
    proc = run_igniter(["eval", str(digits_run), "model=lenet"], tmp_path)  # an MLP's weights, LeNet asked for
    assert proc.returncode == 2 and f"{last_checkpoint(digits_run)} does not fit the model" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_export_follows_the_umask_like_checkpoints(digits_run, tmp_path, umask, mode):
    ckpt = last_checkpoint(digits_run)
    out = tmp_path / "weights.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "export", str(ckpt), "--output", str(out)],
        cwd=tmp_path,
        env=igniter_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == mode, oct(out.stat().st_mode)
    from safetensors.torch import load_file

    saved = torch.load(ckpt, weights_only=True)["model"]
    loaded = load_file(str(out))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"], "no temporary file left"


def test_export_takes_a_run_directory_as_eval_does(digits_run, tmp_path, capsys):
    """``igniter export <run dir>``: its newest checkpoint's weights; a directory that holds no
    run says so (not 'an interrupted write')."""
    from safetensors.torch import load_file

    from igniter.evaluate import export_main

    out = tmp_path / "w.safetensors"
    assert export_main([str(digits_run), "--output", str(out)]) == 0, capsys.readouterr().err
    saved = torch.load(last_checkpoint(digits_run), weights_only=True)["model"]
    exported = load_file(out)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    (tmp_path / "not_a_run").mkdir()
    assert export_main([str(tmp_path / "not_a_run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("igniter: cannot export") and "no last_checkpoint_*.pt or .dcp in" in err, err
    assert "interrupted" not in err
