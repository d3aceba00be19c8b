"""A model, dataset, step, custom event and handlers registered in a package outside igniter."""

from __future__ import annotations

from conftest import FIXTURES, read_metrics, run_igniter

from igniter.cli import main

# The user's own config groups live in their own directory (`--config-dir`).
USER = ["--config-dir", str(FIXTURES / "my_configs"), "imports=[my_project]", "model=tiny_net", "data=blobs"]


def test_user_components_train_through_imports(tmp_path):
    handlers = (
        "handlers=["
        "{name:count_calls,event:'ITERATION_COMPLETED(every=5) | EPOCH_COMPLETED(once=2)',params:{tag:combo}},"
        "{name:count_calls,event:BACKWARD_DONE,params:{tag:custom}},"
        "{name:count_calls,event:COMPLETED,engine:evaluator,params:{tag:evals}}"
        "]"
    )
    args = USER + [
        "trainer.step=step_with_event",
        "trainer.custom_events=[my_project.components.BackpropEvents]",
        "trainer.max_epochs=3",
        "trainer.epoch_length=10",
        "solver.lr=0.05",
        handlers,
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    combo = (run / "count_combo.txt").read_text().split("\n")[:-1]
    # iterations 5, 10, ..., 30 (every=5) and the end of epoch 2 (once=2): 6 + 1 calls
    assert len(combo) == 7, combo
    assert combo.count("2 20") == 2  # iteration 20 and epoch 2's end both fire
    assert len((run / "count_custom.txt").read_text().split("\n")[:-1]) == 30  # one per backward
    assert len((run / "count_evals.txt").read_text().split("\n")[:-1]) == 3  # one evaluation per epoch
    assert read_metrics(run)["final"]["accuracy"] > 0.9


def test_dict_of_losses_model(tmp_path):
    args = USER + [
        "model.name=dict_loss_net",
        "trainer.step=loss_dict",
        "solver.lr=0.02",
        "trainer.max_epochs=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "run")["final"]["accuracy"] > 0.9


def test_check_builds_everything_and_prints_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["check", *USER])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "tiny_net (TinyNet): 51 parameters" in out  # (2*8+8) + (8*3+3)
    assert "train blobs: 600 samples" in out
    assert "30 iterations/epoch" in out  # 600 / 20
    assert "world size 1" in out and "per process 20" in out
    assert list(tmp_path.iterdir()) == []


def test_check_reports_unknown_user_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["check", *USER, "model.name=tiny_nett"])
    assert info.value.code == 2
    assert "Did you mean 'tiny_net'" in capsys.readouterr().err
