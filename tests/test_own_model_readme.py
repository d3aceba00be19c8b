"""The README's "Your own model, dataset and handlers" section, run as a new user would: every
file it shows is written from the README's text into an empty directory and its command is run
with the installed ``igniter`` (no test fixtures on the path)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO, read_metrics

SECTION = "## Your own model, dataset and handlers"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def _blocks(section: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", section, flags=re.S | re.M)


def _write_files_and_command(section: str, where: Path) -> list[str]:
    """Write each block whose first line is ``# <path>`` to ``where/<path>``; return the bash block's argv."""
    command = None
    for lang, body in _blocks(section):
        first = body.split("\n", 1)[0]
        if lang == "bash":
            assert command is None, "one command in the section"
            command = shlex.split(body.replace("\\\n", " "))
        elif first.startswith("# ") and "/" in first:
            path = where / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    assert command is not None and command[0] == "igniter", command
    return command


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not the tests' fixtures
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_the_readme_own_model_section_runs_as_written(tmp_path):
    command = _write_files_and_command(_section(), tmp_path)
    assert (tmp_path / "my_project" / "__init__.py").is_file()
    assert "import torch" in (tmp_path / "my_project" / "components.py").read_text()
    assert {p.name for p in (tmp_path / "my_configs").rglob("*.yaml")} == {"tiny_net.yaml", "blobs.yaml"}
    igniter = Path(sys.executable).parent / "igniter"
    proc = subprocess.run(
        [str(igniter), *command[1:], "output_dir=run", "logging.progress_bar=false"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    calls = (run / "count_a.txt").read_text().split("\n")
    assert "1 5" in calls and "2 60" in calls, calls  # every 5th iteration, and the end of epoch 2 (30 per epoch)


def test_an_import_that_registers_nothing_names_the_module_that_would(tmp_path):
    """The README's package without its ``__init__.py`` import: the names are missing, and the
    error says that ``my_project`` registered nothing while ``my_project.components`` would."""
    command = _write_files_and_command(_section(), tmp_path)
    (tmp_path / "my_project" / "__init__.py").write_text("")
    igniter = Path(sys.executable).parent / "igniter"
    proc = subprocess.run(
        [str(igniter), "check", *command[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "imported `my_project`, which registered nothing" in proc.stderr, proc.stderr
    assert "your registrations are in `my_project.components`?" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
