"""Optuna studies (hydra-optuna-sweeper) through the real command: ``igniter -m hparams_search=digits_optuna``.

A trial returns the best ``evaluation.monitor`` of its run; a trial whose proposed point is
invalid fails alone (the usual one-line problems) and the study goes on; the results table
lists every trial and the best value and parameters are printed. The command exits 0 when
at least one trial completed, else with the first failed trial's status (2: invalid point).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, run_igniter

from igniter.cli import main
from igniter.compose import compose_config
from igniter.sweeps import swept_keys

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

#: Fast trials: one epoch of the embedded digits, no checkpoints.
FAST = ["trainer.max_epochs=1", "checkpoint.enabled=false"]


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the results table printed after the study (columns split on 2+ spaces)."""
    lines = stdout[stdout.index("igniter sweep results") :].splitlines()[1:]
    header, rows = re.split(r"\s{2,}", lines[0].strip()), []
    for line in lines[1:]:
        if not line.strip() or line.startswith(("every job:", "igniter study:")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows.append(dict(zip(header, cells)))
    return rows


def study(tmp_path: Path, *args: str) -> tuple[object, Path]:
    sweep_dir = tmp_path / "study"
    proc = run_igniter(
        ["-m", "hparams_search=digits_optuna", f"hydra.sweep.dir={sweep_dir}", *FAST, *args], tmp_path, timeout=300
    )
    return proc, sweep_dir


@pytest.mark.slow
def test_three_trial_study_returns_the_best_monitor_value(tmp_path):
    proc, sweep_dir = study(tmp_path, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Directions: ['maximize']" in proc.stdout  # evaluation.mode=max
    runs = [sweep_dir / str(n) for n in range(3)]
    best = {r.name: read_metrics(r)["best"]["accuracy"] for r in runs}
    rows = table_rows(proc.stdout)
    assert [r["job"] for r in rows] == ["0", "1", "2"] and all(r["state"] == "completed" for r in rows), rows
    assert all("solver.lr=" in r["overrides"] and "data.loader.batch_size=" in r["overrides"] for r in rows)
    assert [float(r["value"]) for r in rows] == pytest.approx([best[r["job"]] for r in rows], abs=1e-4)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(best.values())
    printed = re.search(r"igniter study: best value (\S+) \(job (\d+)\)", proc.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(max(best.values()), abs=1e-6)
    winner = read_metrics(sweep_dir / printed.group(2))["job"]["overrides"]
    assert all(f"{k}={v}" in winner for k, v in results["best_params"].items())
    params = " ".join(f"{k}={v}" for k, v in results["best_params"].items())
    assert f"igniter study: best parameters: {params}" in proc.stdout


@pytest.mark.slow
def test_an_invalid_point_fails_its_trial_and_the_study_goes_on(tmp_path):
    # seed 5 proposes lr=-1.0 first, then 0.01 twice (optuna 2.10's TPE, random start-up trials);
    # evaluation.mode=min: the study minimizes the validation loss, a failed trial returns +inf
    args = ["hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=5", "solver.lr=choice(0.01,-1.0)"]
    proc, sweep_dir = study(tmp_path, *args, "evaluation.monitor=loss", "evaluation.mode=min")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Directions: ['minimize']" in proc.stdout and "Traceback" not in proc.stderr
    rows = table_rows(proc.stdout)
    assert len(rows) == 3
    bad = [r for r in rows if "solver.lr=-1.0" in r["overrides"]]
    good = [r for r in rows if "solver.lr=0.01" in r["overrides"]]
    assert bad and good and len(bad) + len(good) == 3, rows
    for r in bad:
        assert r["state"] == "invalid config" and r["value"] == "inf", r
        assert f"igniter: trial {r['job']} (solver.lr=-1.0" in proc.stderr
        assert not (sweep_dir / r["job"] / "metrics.json").exists() and (sweep_dir / r["job"] / ".hydra").is_dir()
    assert "  solver.lr = -1.0: expected a positive number" in proc.stderr
    losses = [read_metrics(sweep_dir / r["job"])["best"]["loss"] for r in good]
    assert all(r["state"] == "completed" for r in good)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(losses) and results["best_params"]["solver.lr"] == 0.01
    assert f"{len(bad)} failed" in proc.stdout


@pytest.mark.slow
def test_a_study_without_a_completed_trial_exits_with_the_trials_status(tmp_path):
    proc, sweep_dir = study(tmp_path, "hydra.sweeper.n_trials=2", "solver.lr=choice(-1.0,-2.0)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("invalid configuration (1 problem)") == 2
    assert [r["state"] for r in table_rows(proc.stdout)] == ["invalid config"] * 2
    assert "igniter study: no trial completed" in proc.stdout
    assert "A new study created" in proc.stderr and "\x1b[" not in proc.stdout + proc.stderr  # no colours in a pipe


def test_study_config_is_checked_once_up_front(tmp_path, monkeypatch, capsys):
    """Before the study: what it needs (a monitor, a direction that follows evaluation.mode)
    and the fixed values; the swept keys are left to each trial."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["-m", "hparams_search=digits_optuna", "evaluation.monitor=null", "hydra.sweeper.direction=minimize"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "evaluation.monitor = None: a study optimizes evaluation.monitor" in err
    assert "hydra.sweeper.direction = 'minimize': expected maximize (evaluation.mode=max" in err
    with pytest.raises(SystemExit) as info:  # a fixed value wins over the search space: checked now
        main(["-m", "hparams_search=digits_optuna", "data.loader.batch_size=0", "solver.lr=interval(0.001,0.1)"])
    assert info.value.code == 2 and "data.loader.batch_size = 0: expected a positive number" in capsys.readouterr().err
    assert not (tmp_path / "multirun").exists()


def test_swept_keys_follow_the_sweeper():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config(["hparams_search=digits_optuna"], with_hydra=True)
    parse = OverridesParser.create().parse_overrides
    assert swept_keys(cfg, []) == {"solver.lr", "data.loader.batch_size"}
    assert swept_keys(cfg, parse(["data.loader.batch_size=8", "trainer.max_epochs=choice(1,2)"])) == {
        "solver.lr",
        "trainer.max_epochs",
    }
    assert cfg.hydra.sweeper.direction == "maximize"  # the shipped config follows evaluation.mode
    assert (
        compose_config(["hparams_search=digits_optuna", "evaluation.mode=min"], with_hydra=True).hydra.sweeper.direction
        == "minimize"
    )
