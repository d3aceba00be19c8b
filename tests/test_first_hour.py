"""What a new user meets in the first hour: help, check, a model that does not fit the
data, a run that cannot start, the printed config. Each test runs the real command."""

from __future__ import annotations

import os
import re
import resource
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_igniter, run_together

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
    # the activations estimated from a 2-sample step before the real one, x 32, against those measured on it
    measured, estimated = (_bytes(proc.stdout, label) for label in ("activations ", "headroom   about "))
    assert abs(estimated - measured) <= 0.05 * measured, proc.stdout


def _bytes(out: str, label: str) -> float:
    """The first figure in bytes after ``label`` at the start of a line of ``igniter check``'s plan."""
    value, unit = re.search(rf"^  {label}([\d.]+) (B|kB|MB|GB)\b", out, re.M).groups()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


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


@pytest.mark.parametrize("where", ["output_dir", "hydra_default"])
def test_a_run_that_cannot_start_leaves_no_run_directory(where, tmp_path):
    """Also with Hydra's default run directory: outputs/<date>/<time> goes with outputs/<date>/
    and outputs/, which the run created (they were empty), not only the run's own directory."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    out = [f"output_dir={tmp_path / 'run'}"] if where == "output_dir" else []
    proc = run_igniter([*SHORT, f"resume={garbage}", *out], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a PyTorch checkpoint" in proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["garbage.pt"], f"left behind: {left}"


def test_a_missing_data_file_leaves_no_run_directory(tmp_path):
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    run = tmp_path / "run"
    proc = run_igniter(["experiment=mnist", f"data.root={tmp_path / 'data'}", *SHORT, f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MNIST" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists(), f"left behind: {sorted(p.name for p in run.rglob('*'))}"


def test_a_global_batch_larger_than_the_dataset_is_one_paragraph_naming_the_batch_size(tmp_path):
    """256 training digits (SHORT) and a global batch of 4,096 with drop_last (the default): no full
    batch. Was a ValueError traceback from the sampler (exit 1) and a run directory."""
    run = tmp_path / "run"
    proc = run_igniter([*SHORT, "data.loader.batch_size=4096", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data.loader.batch_size = 4096: data.train (digits): the dataset has 256 samples" in proc.stderr
    assert "Traceback" not in proc.stderr
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
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    step, run = tmp_path / "step", tmp_path / "resume"
    wrong_model, proc = run_together(  # both at once: the suite's time
        [[*spawn, "model=lenet", f"output_dir={step}"], [*spawn, f"resume={garbage}", f"output_dir={run}"]], tmp_path
    )
    assert wrong_model.returncode == 2, wrong_model.stdout + wrong_model.stderr
    assert "Traceback" not in wrong_model.stdout + wrong_model.stderr
    assert "float32[16, 64]" in wrong_model.stderr, wrong_model.stderr  # the per-process batch: 32 / 2
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a PyTorch checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert "NO_VALUE" not in proc.stderr and "object at 0x" not in proc.stderr
    assert not run.exists()


# A model whose activations are large for its 651 parameters (tests/fixtures/my_project), on a
# per-process batch of 1024 digits, in processes whose address space is limited to 8 GiB.
WIDE = ["imports=[my_project]", "model.name=wide_activations", "data.loader.batch_size=1024"]
# its products of every pair of samples: 525 MB of activations estimated from 2 samples, a
# first allocation of 268 GB in the real step (quadratic in the batch size)
PAIRWISE = ["model.params.hidden=[1000]", "+model.params.pairwise=true"]


def _address_space_8_gib() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))


@pytest.fixture(scope="module")
def too_large(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Three commands run together, each limited to 8 GiB of address space (RLIMIT_AS): a check
    whose activations (25.6 MB per sample x 1024 = 26 GB) exceed it, a check and a real run of
    :data:`PAIRWISE`. Returns each one's process and its working directory (the run's directory
    is elsewhere)."""
    cwd, run = tmp_path_factory.mktemp("too_large"), tmp_path_factory.mktemp("too_large_run") / "run"
    commands = {
        "refused": ["check", *WIDE, "model.params.hidden=[100000]"],
        "check_oom": ["check", *WIDE, *PAIRWISE],
        "run_oom": [*WIDE, *PAIRWISE, "trainer.max_epochs=1", "logging.progress_bar=false", f"output_dir={run}"],
    }
    procs = run_together(list(commands.values()), cwd, preexec_fn=_address_space_8_gib)
    return {name: (proc, cwd if name != "run_oom" else run) for name, proc in zip(commands, procs)}


def test_check_refuses_a_step_whose_activations_do_not_fit_and_names_the_batch_size(too_large):
    """The step is not run (without the limit it could have been OOM-killed without a word)."""
    proc, cwd = too_large["refused"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    _one_paragraph(err)
    for needle in (
        "data.loader.batch_size = 1024", "26.2 GB of activations", "RLIMIT_AS", "the step was not run",
        "trainer.activation_checkpointing", "trainer.accumulate_grad_batches", "runner.nproc_per_node",
    ):  # fmt: skip
        assert needle in err, f"{needle!r} not in:\n{err}"
    fits = int(re.search(r"About data.loader.batch_size=(\d+) fits here", err).group(1))
    assert 0 < fits < (8 << 30) / 25.6e6, err
    # the plan it has: parameters, gradients and optimizer state, and the estimate
    assert "per rank 2.6 kB parameters, 2.6 kB gradients, 5.22 kB optimizer state" in proc.stdout, proc.stdout
    assert "activations about 26.2 GB" in proc.stdout and "linear in the batch size" in proc.stdout, proc.stdout
    assert "one training step and one evaluation batch ran" not in proc.stdout
    assert not any(cwd.iterdir())


def test_check_reports_a_step_that_runs_out_of_memory_all_the_same(too_large):
    """The estimate fits, the real step's allocation fails: the same paragraph, not a traceback
    and not 'the model cannot take the data'."""
    proc, cwd = too_large["check_oom"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    _one_paragraph(err)
    for needle in (
        "data.loader.batch_size = 1024",
        "training step of 1024 samples",
        "ran out of memory",
        "estimated at",
    ):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "cannot take" not in err
    assert not any(cwd.iterdir())


def test_a_run_whose_first_step_runs_out_of_memory_names_the_batch_size(too_large):
    proc, run = too_large["run_oom"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.split("igniter: the batch does not fit", 1)[-1]
    _one_paragraph(err)
    for needle in ("data.loader.batch_size = 1024", "first training step ran out of memory", "float32[1024, 64]"):
        assert needle in err, f"{needle!r} not in:\n{proc.stderr}"
    assert "cannot take" not in err
    assert "Traceback" in (run / "rank0.log").read_text(), "the full traceback goes to the rank log"


def test_the_memory_left_under_a_cgroup_limit_is_read_from_v2_and_v1_files(tmp_path):
    """The headroom ``igniter check`` compares with (igniter.activation_memory): limit less usage,
    inactive file cache (reclaimable) not counted as used, the smallest where several are set."""
    from igniter.activation_memory import _cgroup_headroom

    assert _cgroup_headroom(tmp_path) is None  # no files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("500\n")
    assert _cgroup_headroom(tmp_path) is None  # v2 without a limit
    (tmp_path / "memory.max").write_text("2000\n")
    (tmp_path / "memory.stat").write_text("anon 300\ninactive_file 100\nactive_file 100\n")
    assert _cgroup_headroom(tmp_path) == 2000 - 500 + 100
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("100\n")
    assert _cgroup_headroom(tmp_path) == 1600
    (v1 / "memory.limit_in_bytes").write_text("1100\n")
    (v1 / "memory.stat").write_text("total_inactive_file 50\n")
    assert _cgroup_headroom(tmp_path) == 1100 - 100 + 50
