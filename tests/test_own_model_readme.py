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


def test_an_import_that_registers_nothing_names_the_module_that_would(tmp_path, monkeypatch):
    """A package whose ``__init__.py`` imports nothing (the README's mistake before issue 27): the
    names are missing, and one more problem says that the package registered nothing while its
    ``components`` would (found by reading the source, not by importing it)."""
    from igniter.compose import config_problems

    package = tmp_path / "lab27_project"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "components.py").write_text(
        "import torch\nfrom igniter.registry import model_registry\n\n\n"
        '@model_registry("lab27_net")\ndef lab27_net():\n    return torch.nn.Linear(64, 10)\n'
    )
    (package / "helpers.py").write_text("def unrelated(): ...\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, problems = config_problems(["imports=[lab27_project]", "model.name=lab27_net"])
    by_key = {p.key: p.expected for p in problems}
    assert set(by_key) == {"model.name", "imports[0]"}, problems
    assert by_key["imports[0]"].startswith(
        "imported `lab27_project`, which registered nothing; your registrations are in `lab27_project.components`?"
    ), by_key
    assert "lab27_project.components" not in __import__("sys").modules, "found by reading, not importing"
