"""Where a run's checkpoints live and in which format (igniter.checkpoint.location): decided
once, from the config and, when a ddp run resumes, from the checkpoint it resumes from."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_igniter
from omegaconf import OmegaConf

from igniter.checkpoint.location import CheckpointLocation, config_problems, resolve_location


def _cfg(**overrides) -> OmegaConf:
    base = {
        "checkpoint": {"dir": None, "format": None, "async_save": False},
        "runner": {"strategy": "ddp"},
        "resume": "auto",
    }
    cfg = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


@pytest.mark.parametrize(
    "on_disk, overrides, expected",
    [
        ([], {}, "torch"),
        ([], {"runner__strategy": "fsdp"}, "dcp"),
        (["last_checkpoint_8.dcp/"], {}, "dcp"),  # an fsdp run resumed by one ddp process continues in dcp
        (["last_checkpoint_8.pt", "last_checkpoint_4.dcp/"], {}, "torch"),  # the newest decides
        (["last_checkpoint_8.dcp/"], {"resume": False}, "torch"),  # not resuming: the strategy's default
        (["last_checkpoint_8.dcp/"], {"checkpoint__format": "torch"}, "torch"),  # as set (resume refuses it)
        (["last_checkpoint_8.pt"], {"runner__strategy": "fsdp"}, "dcp"),  # fsdp writes shards whatever was there
    ],
)
def test_the_format_follows_the_config_then_the_checkpoint_resumed_from(tmp_path, on_disk, overrides, expected):
    (tmp_path / "checkpoints").mkdir()
    for name in on_disk:  # "<name>/" is a directory (a dcp checkpoint), else a file
        path = tmp_path / "checkpoints" / name
        path.mkdir() if name.endswith("/") else path.write_bytes(b"")
    location = resolve_location(_cfg(**overrides), tmp_path)
    assert location == CheckpointLocation(tmp_path / "checkpoints", expected)
    assert location.sharded is (expected == "dcp") and not location.in_object_store


def test_a_url_is_an_object_store_location(tmp_path):
    location = resolve_location(_cfg(checkpoint__dir="s3://bucket/run/", resume=False), tmp_path)
    assert location.in_object_store and location.root == "s3://bucket/run" and location.format == "torch"
    sharded = resolve_location(_cfg(checkpoint__dir="s3://bucket/run", runner__strategy="fsdp"), tmp_path)
    assert sharded.in_object_store and sharded.sharded
    assert config_problems(_cfg(checkpoint__dir="s3://bucket/run", runner__strategy="fsdp")) == []


def test_an_explicit_format_that_contradicts_the_checkpoints_is_an_error_naming_both(tmp_path):
    """A run with torch-format checkpoints resumed with checkpoint.format=dcp: exit 2 naming both
    formats and the checkpoint, nothing trained (its checkpoints unchanged)."""
    run = tmp_path / "run"
    args = ["trainer.max_epochs=1", "logging.loggers=[]", "logging.progress_bar=false", f"output_dir={run}"]
    assert (first := run_igniter(args, tmp_path)).returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = run_igniter([*args, "trainer.max_epochs=2", "checkpoint.format=dcp"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint.format=torch" in proc.stderr and "checkpoint.format=dcp" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert Path(run / "checkpoints" / before[-1]).is_file()


def test_resume_names_a_pt_file_or_a_dcp_directory(tmp_path):
    """``resume=<path>`` accepts a ``.pt`` file and a ``.dcp`` directory (a dcp checkpoint is a
    directory); a missing path or another directory is a problem naming ``resume``."""
    (tmp_path / "last_checkpoint_4.pt").write_bytes(b"x")
    (tmp_path / "last_checkpoint_8.dcp").mkdir()
    (tmp_path / "other").mkdir()
    assert config_problems(_cfg(resume=str(tmp_path / "last_checkpoint_4.pt"))) == []
    assert config_problems(_cfg(resume=str(tmp_path / "last_checkpoint_8.dcp"))) == []
    for bad in ("missing.pt", "other"):
        (problem,) = config_problems(_cfg(resume=str(tmp_path / bad)))
        assert problem.key == "resume" and ".dcp directory" in problem.expected
