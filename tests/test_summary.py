"""The end-of-run summary: start-up time from the interpreter's start, the panels of
curves.png, and ``igniter summary``."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import igniter_env, read_metrics

import igniter
from igniter.summary import curve_panels, curves_figure, draw_curves, main, summary_table
from igniter.timing import interpreter_age_s, process_age_s

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed (igniter[plot])"
)
PNG = b"\x89PNG\r\n\x1a\n"


def _log_time(log: str, marker: str) -> float:
    """Wall-clock time (s since the epoch) of the first ``rank0.log`` line containing ``marker``."""
    line = next(line for line in log.splitlines() if marker in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_start_up_counts_from_the_interpreter_not_from_a_shell_that_exec_d_it(tmp_path):
    # `sh -c 'pip install ...; exec igniter'`: exec keeps the process and its creation time, so
    # the process's age counts the shell's 3 s; the interpreter started when `date` printed.
    run = tmp_path / "run"
    igniter_cmd = shlex.join(
        [sys.executable, "-m", "igniter", "trainer.max_epochs=1", "data.train.subset=256", f"output_dir={run}"]
    )
    script = f"sleep 3; date +%s.%N > {shlex.quote(str(tmp_path / 'exec_time'))}; exec {igniter_cmd}"
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=igniter_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exec_time = float((tmp_path / "exec_time").read_text())
    log = (run / "rank0.log").read_text()
    # The first iteration ends after the run's first line and before epoch 1's validation.
    earliest = _log_time(log, "run dir") - exec_time
    latest = _log_time(log, "epoch 1 validation") - exec_time
    first = read_metrics(run)["first_iteration_s"]
    assert earliest - 0.3 < first < latest + 0.1, (earliest, first, latest)
    assert "s after the interpreter started" in proc.stdout


def test_interpreter_age_reads_the_stamp_of_igniter_s_import(monkeypatch):
    # stamped 5 s ago, after 0.04 s of interpreter start-up (CPU)
    monkeypatch.setattr(igniter, "_T0", (time.monotonic() - 5.0, 0.04), raising=False)
    age = interpreter_age_s()
    assert age is not None and 5.04 <= age < 5.5
    monkeypatch.delattr(igniter, "_T0", raising=False)
    fallback, process = interpreter_age_s(), process_age_s()
    assert fallback is not None and process is not None and abs(fallback - process) < 0.1, "no stamp: the process's age"


def test_summary_table_says_what_the_start_up_time_counts():
    assert "first iteration done 4.20 s after the interpreter started" in summary_table({"first_iteration_s": 4.2})


def test_a_slow_run_s_throughput_is_not_rounded_to_zero():
    """A GPT-2-sized model on CPU trains 0.2 samples/s: shown as such, not as 0."""
    assert "0.24 samples/s, 246 tokens/s" in summary_table({"samples_per_s": 0.24, "tokens_per_s": 246.0})
    assert "1234 samples/s" in summary_table({"samples_per_s": 1234.4})


def _record(accuracy: list[float], losses: list[float], status: str = "completed") -> dict:
    epochs = [
        {"epoch": i + 1, "iteration": 44 * (i + 1), "accuracy": a, "loss": loss}
        for i, (a, loss) in enumerate(zip(accuracy, losses))
    ]
    train = [[10 * i, 2.0 / i] for i in range(1, 14)]
    return {
        "status": status,
        "train_loss_history": train,
        "epochs": epochs,
        "epochs_completed": len(epochs),
        "iterations": 130,
    }


def _axis_of(fig, label: str):
    (ax,) = [ax for ax in fig.axes if label in [line.get_label() for line in ax.get_lines()]]
    return ax


@needs_matplotlib
def test_accuracy_and_loss_are_drawn_on_their_own_axes():
    fig = curves_figure(_record([0.976, 0.983, 0.989], [0.20, 0.15, 0.12]))
    assert len(fig.axes) == 2
    accuracy, loss = _axis_of(fig, "accuracy"), _axis_of(fig, "training")
    assert accuracy is not loss and _axis_of(fig, "validation loss") is loss, "losses together, accuracy apart"
    bottom, top = accuracy.get_ylim()
    assert 0.976 >= bottom and 0.989 <= top <= 1.0
    assert (0.989 - 0.976) / (top - bottom) > 0.6, "the accuracy change spans most of its axis"
    assert loss.get_xlabel() == "iteration" and accuracy.get_xlabel() == "epoch"
    assert fig._suptitle.get_text() == "run completed: 3 epochs, 130 iterations"


@needs_matplotlib
def test_an_interrupted_run_before_its_first_validation_has_no_empty_panel():
    m = _record([], [], status="interrupted")
    fig = curves_figure(m)
    assert len(fig.axes) == len(curve_panels(m)) == 1
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["training"]
    assert "INTERRUPTED" in fig._suptitle.get_text() and "partial" in fig._suptitle.get_text()


@needs_matplotlib
def test_an_interrupted_run_with_some_epochs_draws_what_it_has():
    m = _record([0.9, 0.95], [0.4, 0.3], status="interrupted")
    fig = curves_figure(m)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "validation accuracy"]
    assert fig._suptitle.get_text() == "run INTERRUPTED after 2 epochs, 130 iterations: partial curves"


@needs_matplotlib
def test_a_metrics_json_without_a_summary_or_iterations_still_gets_every_panel():
    # a killed run's metrics.json ("running"), epochs without "iteration": validation losses per epoch
    m = {"status": "running", "epochs": [{"epoch": 1, "nll": 0.5, "top5": 0.9}, {"epoch": 2, "nll": 0.4, "top5": 0.95}]}
    panels = curve_panels(m)
    assert [(p.title, p.xlabel, [s.label for s in p.series]) for p in panels] == [
        ("validation loss", "epoch", ["nll"]),
        ("validation top5", "epoch", ["top5"]),
    ]
    assert panels[1].fraction and not panels[0].fraction
    assert curves_figure(m)._suptitle.get_text() == "run RUNNING after 2 validated epochs: partial curves"


@needs_matplotlib
def test_draw_curves_writes_a_png_and_skips_an_empty_record(tmp_path):
    path = tmp_path / "curves.png"
    assert draw_curves(_record([0.976, 0.989], [0.2, 0.12]), path)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert not draw_curves({"status": "interrupted", "epochs": [], "train_loss_history": []}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_summary_help_prints_the_usage_and_exits_0(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: igniter summary")
    proc = subprocess.run(
        [sys.executable, "-m", "igniter", "summary", "--help"],
        capture_output=True,
        text=True,
        env=igniter_env(),
        timeout=120,
    )
    assert (
        proc.returncode == 0
        and proc.stdout.startswith("usage: igniter summary")
        and "no metrics.json" not in proc.stdout + proc.stderr
    )


def test_summary_of_a_directory_without_metrics_json_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert main([]) == 2


@needs_matplotlib
def test_summary_redraws_the_curves_of_a_run_directory(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(_record([0.976, 0.989], [0.2, 0.12])))
    assert main([str(tmp_path)]) == 0
    assert "curves" in capsys.readouterr().out and (tmp_path / "curves.png").read_bytes()[:8] == PNG
