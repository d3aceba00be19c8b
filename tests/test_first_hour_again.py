"""Issue 27's smaller first-hour frictions, each as the user met it: a misspelled subcommand,
a missing --config-dir, solver=adamw, a data root the dataset ignores, export of a run directory,
what the summary says, and the console noise of an ordinary run."""

from __future__ import annotations

import re

import pytest
import tomllib
from conftest import REPO


def _main(argv, monkeypatch, tmp_path, capsys) -> tuple[int, str, str]:
    """``igniter <argv>`` in this process (the CLI's own main), in ``tmp_path``."""
    from igniter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("word, meant", [("evaluate", "eval"), ("exprot", "export"), ("stauts", "status")])
def test_a_misspelled_subcommand_gets_did_you_mean(word, meant, monkeypatch, tmp_path, capsys):
    code, _, err = _main([word, "runs/x"], monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert f"Did you mean `{meant}`?" in err and "check, doctor, summary, eval, export, status" in err, err
    assert "missing EQUAL" not in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra", [["model=tiny_net"], ["--cfg", "job"]])
def test_a_missing_config_dir_is_its_own_paragraph(extra, monkeypatch, tmp_path, capsys):
    code, out, err = _main(["--config-dir", "my_config", *extra], monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert f"--config-dir = 'my_config': {tmp_path / 'my_config'} does not exist" in err, err
    assert "no such option" not in err and "UserWarning" not in err and err.count("\n") <= 3, err
    assert out == "" and not any(tmp_path.iterdir())


def test_the_readme_first_command_installs_what_draws_curves_png():
    """The first README command's extra has scikit-learn (digits) and matplotlib (curves.png)."""
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, flags=re.S).group(1)
    extras = re.search(r"pip install -e '\.\[([\w,]+)\]' && igniter$", first).group(1).split(",")
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {re.split(r"[<>=\[ ]", r)[0] for extra in extras for r in optional[extra]}
    assert {"scikit-learn", "matplotlib"} <= wanted, wanted


@pytest.mark.parametrize("choice, name", [("adamw", "AdamW"), ("RMSPROP", "RMSprop")])
def test_a_solver_choice_that_is_a_torch_optim_class_says_solver_name(choice, name):
    from igniter.compose import config_problems

    cfg, problems = config_problems([f"solver={choice}"])
    assert cfg is None and len(problems) == 1, problems
    assert problems[0].key == "solver" and f"write solver.name={name}" in problems[0].expected, problems
    cfg, problems = config_problems([f"solver.name={name}"])  # and that works
    assert problems == [], problems


def test_a_data_root_no_dataset_reads_is_refused_and_one_that_is_read_must_exist(tmp_path):
    from igniter.compose import config_problems

    _, problems = config_problems(["data.root=/nonexistent", "data.download=true"])  # digits reads no files
    assert {p.key for p in problems} == {"data.root", "data.download"}, problems
    assert "no dataset reads it: data.train ('digits') and data.val ('digits')" in str(problems[0]), problems
    _, problems = config_problems(["data.train.root=/nonexistent"])
    assert [p.key for p in problems] == ["data.train.root"] and "takes no 'root'" in problems[0].expected, problems
    _, problems = config_problems(["experiment=mnist", f"data.root={tmp_path / 'missing'}"])
    assert {(p.key, p.expected) for p in problems} == {
        ("data.train.root", "directory does not exist"),
        ("data.val.root", "directory does not exist"),
    }, problems
    _, problems = config_problems(["experiment=mnist", f"data.root={tmp_path}"])
    assert problems == [], problems


def test_the_summary_says_the_strategy_and_where_the_precision_comes_from():
    from igniter.summary import summary_table

    base = {"global_batch_size": 32, "backend": "gloo"}
    rows = {
        "world size 2 (fsdp, backend gloo), global batch 32, per process 16, precision bf16-mixed "
        "(trainer.precision: torch.autocast and FSDP's MixedPrecisionPolicy)": {
            "world_size": 2,
            "per_process_batch_size": 16,
            "strategy": "fsdp",
            "precision": "bf16-mixed",
        },
        "world size 2 (ddp, backend gloo), global batch 32, per process 16, precision 32 (trainer.precision: float32)": {
            "world_size": 2,
            "per_process_batch_size": 16,
            "strategy": "ddp",
            "precision": "32",
        },
        "world size 1 (one process: no strategy), global batch 32, per process 32, precision 16-mixed "
        "(trainer.precision: torch.autocast and GradScaler)": {
            "world_size": 1,
            "per_process_batch_size": 32,
            "strategy": "ddp",
            "precision": "16-mixed",
        },
    }
    for line, m in rows.items():
        table = summary_table({**base, **m})
        assert f"processes   {line}" in table, table


def test_an_ordinary_cpu_run_logs_each_epoch_end_and_keeps_set_up_noise_off_the_console(tmp_path, monkeypatch):
    """log_every 4 with 10 iterations per epoch: lines at 4, 8, 10 (epoch end), 12, 16, 20; an
    interrupted run's summary says how many epochs completed and how far the next one got. The
    console has no NVML line on a machine without GPUs (rank0.log keeps it) and no MLflow
    table-creation lines; with MLFLOW_TRACKING_URI unset the MLflow store is outputs/mlflow.db, and
    the run says so with the `mlflow ui` command."""
    import torch
    from conftest import read_metrics, run_igniter

    from igniter.summary import summary_table

    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["trainer.max_epochs=2", "data.train.subset=320", "logging.log_every=4", "logging.progress_bar=false"]
    proc = run_igniter([*args, "logging.loggers=[mlflow]", "checkpoint.enabled=false", f"output_dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "rank0.log").read_text()
    lines = re.findall(r"epoch (\d)/2 iteration (\d+)/10 loss", log)
    assert lines == [("1", "4"), ("1", "8"), ("1", "10"), ("2", "2"), ("2", "6"), ("2", "10")], lines
    m = read_metrics(run)
    assert m["epoch_length"] == 10 and "  epochs      2 (20 iterations)" in summary_table(m)
    interrupted = {**m, "status": "interrupted", "epochs_completed": 23, "iterations": 980, "epoch_length": 44}
    assert "  epochs      22 complete + 12 of 44 iterations (980 iterations)" in summary_table(interrupted)
    console = proc.stdout + proc.stderr
    if not torch.cuda.is_available():
        assert "GPU telemetry off" in log and "GPU telemetry off" not in console, console
    assert "database tables" not in console and "alembic" not in console, console
    # MLFLOW_TRACKING_URI unset (run_igniter passes this environment): the store under outputs/, said where
    store = tmp_path / "outputs" / "mlflow.db"
    assert store.is_file() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in proc.stdout, proc.stdout
    assert list((tmp_path / "outputs" / "mlruns").rglob("metrics.json")), "the run's artifacts under outputs/mlruns"


def test_launchers_torchrun_sh_keeps_torchrun_s_omp_banner_away_and_igniter_chooses(tmp_path, monkeypatch):
    """torchrun prints its 4-line OMP_NUM_THREADS banner when the variable is absent: the
    launcher script hands it a placeholder (a fake torchrun on PATH shows what it gets), which
    igniter's thread choice does not take for the user's; an exported value stays the user's."""
    import os
    import subprocess

    import igniter.launch.cpu_threads as threads
    from igniter.launch.cpu_threads import ThreadPlan, choose_threads

    (tmp_path / "torchrun").write_text(
        '#!/bin/sh\necho "OMP=${OMP_NUM_THREADS-unset} MARK=${IGNITER_OMP_PLACEHOLDER-} $*"\n'
    )
    (tmp_path / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "IGNITER_OMP_PLACEHOLDER")}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    script = str(REPO / "launchers" / "torchrun.sh")
    out = subprocess.run(["bash", script, "2", "a=b"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "OMP=1 MARK=1 --standalone --nproc-per-node 2 -m igniter runner=torchrun a=b", out
    out = subprocess.run(
        ["bash", script, "2"], env={**env, "OMP_NUM_THREADS": "3"}, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("OMP=3 MARK= "), out

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(threads, "_initial_environ", lambda pid: {"OMP_NUM_THREADS": "1"})  # the agent had it
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("IGNITER_OMP_PLACEHOLDER", "1")
    assert (choose_threads(ThreadPlan(), 2).source, choose_threads(ThreadPlan(), 2).threads) == ("rule", 4)
    monkeypatch.delenv("IGNITER_OMP_PLACEHOLDER")
    assert choose_threads(ThreadPlan(), 2).source == "OMP_NUM_THREADS"
