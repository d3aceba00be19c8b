"""What a new user meets in the first hour: help, check, a model that does not fit the
data, a run that cannot start, the printed config. Each test runs the real command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_igniter

SHORT = ["trainer.max_epochs=1", "data.train.subset=256", "logging.progress_bar=false"]


def _one_paragraph(err: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") <= 4, f"expected one short paragraph, got:\n{err}"


@pytest.mark.parametrize("argv", [["--help"], ["help"]])
def test_igniter_help_lists_the_subcommands_first(argv, tmp_path):
    proc = run_igniter(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.split("subcommands:", 1)
    assert len(head) == 2, proc.stdout
    for name in ("check", "doctor", "summary", "eval", "export"):
        assert f"\n  {name} " in head[1], proc.stdout
    if argv == ["--help"]:  # Hydra's own help follows the list
        assert head[1].index("export") < proc.stdout.index("Configuration groups") - len(head[0]) - 12


@pytest.mark.parametrize("name", ["check", "doctor", "summary", "eval", "export", "status", "prepare-text"])
def test_every_subcommand_answers_help_without_running(name, tmp_path, monkeypatch, capsys):
    # in this process (the CLI's own main(): a process start per subcommand cost the suite 30 s;
    # test_igniter_help_lists_the_subcommands_first runs the real command)
    from igniter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None), out
    assert out.startswith(f"usage: igniter {name}"), out
    assert not any(tmp_path.iterdir()), "--help must not run anything"


def test_check_runs_a_real_batch_and_names_the_mismatch(tmp_path):
    """lenet wants images [N, 1, 28, 28]; digits gives [N, 64]: check must say so, exit 2."""
    proc = run_igniter(["check", "model=lenet"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    _one_paragraph(err)
    for needle in ("model.name", "'lenet'", "dataset 'digits'", "float32[32, 64]", "int64[32]", "conv2d"):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not any(tmp_path.iterdir())


def test_check_uses_the_per_process_batch_and_lists_the_builtin_handlers(tmp_path):
    proc = run_igniter(["check", "runner=spawn", "runner.nproc_per_node=2", "data.loader.batch_size=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "global 64, per process 32" in proc.stdout
    # the MLP 64-128-10 on 32 samples: 6 x 32 x (64 x 128 + 128 x 10), less the input gradient never computed
    assert "FLOPs      1,294,336 per optimizer step and process, 2,588,672 for all 2" in proc.stdout
    assert "MFU        against the dense fp32 peak of the run's GPU" in proc.stdout
    handlers = proc.stdout.split("handlers", 1)[1]
    for name in ("checkpoint", "tensorboard", "nan guard", "progress bar"):
        assert name in handlers, proc.stdout


def test_check_reports_an_evaluation_batch_that_fails(tmp_path):
    """A training step that works but an evaluation step that cannot take the batch."""
    proc = run_igniter(["check", "imports=[my_project]", "evaluation.step=eval_needs_dict"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _one_paragraph(proc.stderr)
    assert "evaluation" in proc.stderr and "data.val" in proc.stderr


def test_a_run_whose_first_step_fails_prints_one_paragraph_and_exits_2(tmp_path):
    run = tmp_path / "run"
    proc = run_igniter(["model=lenet", *SHORT, f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _one_paragraph(proc.stderr)
    assert "model.name" in proc.stderr and "float32[32, 64]" in proc.stderr
    assert "terminating due to exception" not in proc.stdout + proc.stderr
    log = (run / "rank0.log").read_text()
    assert "Traceback" in log and "conv2d" in log, "the full traceback goes to the rank log"


def test_a_run_that_cannot_start_leaves_no_run_directory(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    run = tmp_path / "run"
    proc = run_igniter([*SHORT, f"resume={garbage}", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a PyTorch checkpoint" in proc.stderr
    assert not run.exists(), f"left behind: {sorted(p.name for p in run.rglob('*'))}"


def test_a_missing_data_file_leaves_no_run_directory(tmp_path):
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    run = tmp_path / "run"
    proc = run_igniter(["experiment=mnist", f"data.root={tmp_path / 'data'}", *SHORT, f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MNIST" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists(), f"left behind: {sorted(p.name for p in run.rglob('*'))}"


def test_a_failed_start_in_an_existing_run_changes_none_of_its_files(tmp_path):
    run = tmp_path / "run"
    assert run_igniter([*SHORT, f"output_dir={run}"], tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    proc = run_igniter([*SHORT, "trainer.max_epochs=2", f"resume={garbage}", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    changed = [str(p.relative_to(run)) for p in before if before[p] != after[p]]
    assert not changed, f"changed by a start that failed: {changed}"
    assert read_metrics(run)["status"] == "completed"
    assert torch.load(next((run / "checkpoints").glob("last_*.pt")), weights_only=True)


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = run_igniter(["--cfg", "job", "experiment=mnist", "data.root=/some/where"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "${" not in proc.stdout, proc.stdout
    assert proc.stdout.count("root: /some/where") == 3


def test_missing_data_root_says_how_to_set_it(tmp_path):
    proc = run_igniter(["check", "experiment=mnist"], tmp_path)
    assert proc.returncode == 2
    assert "data.root=/dir/containing/MNIST" in proc.stderr, proc.stderr


def test_imports_find_a_package_in_the_working_directory(tmp_path):
    package = tmp_path / "my_lab"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\nfrom igniter.registry import model_registry\n\n"
        "@model_registry('lab_mlp')\ndef lab_mlp(in_features=64, hidden=(), num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))\n"
    )
    env_path = os.environ.get("PYTHONPATH", "")
    assert str(tmp_path) not in env_path
    proc = run_igniter(["check", "imports=[my_lab]", "model.name=lab_mlp"], tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_an_import_that_fails_says_where_igniter_looked(tmp_path):
    proc = run_igniter(["check", "imports=[no_such_lab_package]"], tmp_path)
    assert proc.returncode == 2
    assert str(Path(tmp_path).resolve()) in proc.stderr and "pip install -e ." in proc.stderr, proc.stderr


@pytest.mark.slow
def test_spawned_workers_report_bad_input_as_one_paragraph(tmp_path):
    """Under runner=spawn the error is raised in a worker: it still reaches the user as
    the same paragraph and exit 2 (not 'rank 1 failed' with a traceback, exit 1)."""
    spawn = ["runner=spawn", "runner.nproc_per_node=2", *SHORT]
    run = tmp_path / "step"
    proc = run_igniter([*spawn, "model=lenet", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "float32[16, 64]" in proc.stderr, proc.stderr  # the per-process batch: 32 / 2
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    run = tmp_path / "resume"
    proc = run_igniter([*spawn, f"resume={garbage}", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a PyTorch checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert "NO_VALUE" not in proc.stderr and "object at 0x" not in proc.stderr
    assert not run.exists()
