"""The ``wandb`` logger (igniter/wandb_tracker.py) in W&B's offline mode (no network): a
digits run then its resumed continuation log into one W&B run id, their history read back
from the ``.wandb`` files with W&B's own record reader; a W&B run that cannot start is
exit 2 before training; a failure mid-run is one warning."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import run_igniter

pytest.importorskip("wandb")

from igniter.trackers.wandb_tracker import read_records  # noqa: E402  (W&B's transaction-log format)

DIGITS = ["logging.log_every=5", "logging.loggers=[tensorboard,wandb]"]  # digits: 44 iterations per epoch


@pytest.fixture
def wandb_env(monkeypatch, tmp_path) -> None:
    """Offline and silent, W&B's config/cache/data directories under tmp_path (nothing in ~)."""
    for name in (
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_API_KEY",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_CONSOLE",
        "WANDB_INIT_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(wandb_env, tmp_path):
    """Epoch 1, then the same command with trainer.max_epochs=2 (resumes from iteration 44):
    both processes log to one W&B run id, steps go on from 44 without duplicates, the config
    is the resolved one, the summary holds the last values, the files are the run's."""
    run = tmp_path / "run"
    first = run_igniter([*DIGITS, "trainer.max_epochs=1", f"output_dir={run}"], tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text().strip()
    second = run_igniter([*DIGITS, "trainer.max_epochs=2", f"output_dir={run}"], tmp_path, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resumed from" in out and f"wandb: continuing run {run_id} from iteration 44" in out, out[-3000:]
    assert "Traceback" not in out and (run / "wandb_run_id").read_text().strip() == run_id

    offline = _offline_runs(run)  # offline, each process writes its own directory of the one run id
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    histories, configs, summaries = [], [], []
    for path in offline:
        records = list(read_records(path / f"run-{run_id}.wandb"))
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert [(r.run_id, r.project, r.display_name) for r in runs] == [(run_id, "igniter", "run")]
        histories.append([_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"])
        configs.append(_items(runs[0].config.update))
        summaries.append(
            {
                k: v
                for r in records
                if r.WhichOneof("record_type") == "summary"
                for k, v in _items(r.summary.update).items()
            }
        )
    rows = [row for history in histories for row in history]
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)), steps  # no step twice, across both processes
    assert max(row["_step"] for row in histories[0]) == 44 and min(row["_step"] for row in histories[1]) == 45

    def logged(key: str) -> list[int]:
        return [row["_step"] for row in rows if key in row]

    assert logged("train/loss") == list(range(5, 88, 5)) and logged("lr/group_0") == list(range(5, 88, 5))
    assert logged("val/accuracy") == [44, 88] and logged("train/samples_per_s") == [44, 88]
    local = json.loads((run / "metrics.json").read_text())
    assert rows[-1]["val/accuracy"] == pytest.approx(local["epochs"][-1]["accuracy"])
    assert (
        summaries[1]["val/accuracy"] == pytest.approx(local["epochs"][-1]["accuracy"]) and summaries[1]["_step"] == 88
    )

    config = configs[1]
    assert config["solver"]["lr"] == 0.001 and config["model"]["name"] == "mlp" and config["trainer"]["max_epochs"] == 2
    assert config["logging"]["loggers"] == ["tensorboard", "wandb"] and configs[0]["trainer"]["max_epochs"] == 1

    saved = offline[1] / "files" / "igniter"
    assert {"config.yaml", "metrics.json"} <= {p.name for p in saved.iterdir()}
    assert [e["epoch"] for e in json.loads((saved / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert [
        e["epoch"] for e in json.loads((offline[0] / "files" / "igniter" / "metrics.json").read_text())["epochs"]
    ] == [1]


@pytest.mark.slow
def test_wandb_that_cannot_start_is_exit_2_before_training(wandb_env, monkeypatch, tmp_path):
    """Online with no API key (and a server nobody listens on): one paragraph naming
    logging.loggers[1], exit 2, no traceback, no training, no run directory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")  # should a key be found after all: refused within seconds
    proc = run_igniter([*DIGITS, f"output_dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "igniter: cannot start the run (1 problem):\n  logging.loggers[1] = 'wandb': W&B cannot start a run (WANDB_MODE=online"
        in proc.stderr
    )
    assert "Traceback" not in proc.stdout + proc.stderr and "epoch 1" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_wandb_package_is_a_config_error(monkeypatch):
    from igniter.errors import ConfigError
    from igniter.trackers.wandb_tracker import package_problem, start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails as if it were not installed
    with pytest.raises(ConfigError) as e:
        start_wandb(None, "logging.loggers[1]")  # type: ignore[arg-type]
    assert e.value.exit_status == 2
    assert "logging.loggers[1] = 'wandb': the wandb package is not installed: pip install 'igniter[wandb]'" in str(
        e.value
    )
    monkeypatch.delitem(sys.modules, "wandb")
    assert package_problem(import_it=False) is None  # installed here: found without importing it


def test_failure_mid_run_is_one_warning_and_resumed_steps_are_skipped(caplog, tmp_path):
    """Steps below first_step are not sent; the first failing call is one warning, then the
    tracker is left alone (no more calls, no more warnings)."""
    from igniter.trackers.wandb_tracker import WandBTracker

    calls = []

    class Run:
        id, dir = "abc123", str(tmp_path)

        def log(self, data: dict, step: int | None = None) -> None:
            calls.append(step)
            if step == 60:
                raise ConnectionError("[Errno 111] Connection refused")

    tracker = WandBTracker(Run(), SimpleNamespace(output_dir=tmp_path), first_step=50)
    with caplog.at_level(logging.INFO, logger="igniter"):
        for step in (45, 50, 55, 60, 65):
            tracker.log({"train/loss": 1.0}, step=step)
    assert calls == [50, 55, 60]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "Connection refused" in warnings[0].getMessage()
        and "run abc123" in warnings[0].getMessage()
    )


def test_a_failed_start_leaves_the_run_directory_as_it_was(wandb_env, monkeypatch, tmp_path):
    """``wandb.init`` fails after making its run folder: exit-2 ConfigError naming the key and
    the reason; what it made is removed, older W&B runs and the run id file are kept."""
    import wandb
    from omegaconf import OmegaConf

    from igniter.errors import ConfigError
    from igniter.trackers.wandb_tracker import start_wandb

    (tmp_path / "wandb" / "offline-run-old-abc").mkdir(parents=True)
    (tmp_path / "wandb_run_id").write_text("abc\n")

    def init(**kwargs: Any) -> None:
        assert kwargs["id"] == "abc" and kwargs["resume"] == "allow" and kwargs["dir"] == str(tmp_path)
        (tmp_path / "wandb" / "run-new-abc" / "files").mkdir(parents=True)
        raise wandb.errors.CommError("project 'igniter' is not yours")

    monkeypatch.setattr(wandb, "init", init)
    ctx = SimpleNamespace(
        output_dir=tmp_path,
        trainer=SimpleNamespace(state=SimpleNamespace(iteration=44)),
        cfg=OmegaConf.create({"a": 1}),
    )
    with pytest.raises(ConfigError) as e:
        start_wandb(ctx, "logging.loggers[0]")  # type: ignore[arg-type]
    assert e.value.exit_status == 2 and "cannot start the run" in str(e.value)
    assert (
        "logging.loggers[0] = 'wandb': W&B cannot start a run (WANDB_MODE=offline, project 'igniter'): project 'igniter' is not yours."
        in str(e.value)
    )
    assert sorted(p.name for p in (tmp_path / "wandb").iterdir()) == ["offline-run-old-abc"]
    assert (tmp_path / "wandb_run_id").read_text() == "abc\n"
