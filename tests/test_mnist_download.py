"""``data.download=true``: MNIST's IDX files fetched from a mirror (here a local HTTP server serving
the shared copy: no internet), each file's SHA-256 checked; a wrong file is refused, nothing kept."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from conftest import run_igniter

from igniter.datasets import MNIST_SHA256


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on the test's stderr
        pass


@pytest.fixture
def mirror(tmp_path, mnist_root):
    """An HTTP server on 127.0.0.1 whose ``/good/`` serves the four gzipped IDX files and whose
    ``/bad/`` serves them with the test labels damaged; yields its base URL."""
    served = tmp_path / "served"
    (served / "good").mkdir(parents=True)
    (served / "bad").mkdir()
    for name in MNIST_SHA256:
        (served / "good" / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
        (served / "bad" / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    (served / "bad" / "t10k-labels-idx1-ubyte.gz").unlink()
    data = bytearray((mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[-20] ^= 0xFF
    (served / "bad" / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_shared_files_are_the_ones_whose_sha256_igniter_knows(mnist_root):
    for name, digest in MNIST_SHA256.items():
        assert hashlib.sha256((mnist_root / "MNIST" / "raw" / name).read_bytes()).hexdigest() == digest


def test_download_fetches_missing_files_from_the_first_mirror_that_has_them(tmp_path, mirror):
    """The first mirror answers 404; the second serves the files: check (which builds both
    splits) downloads all four into data.root/MNIST/raw with their SHA-256."""
    root = tmp_path / "data"
    mirrors = f"data.train.params.mirrors=[{mirror}/nowhere/,{mirror}/good/]"
    proc = run_igniter(["check", "experiment=mnist", f"data.root={root}", "data.download=true", mirrors], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train mnist: 60,000 samples | val mnist: 10,000 samples" in proc.stdout, proc.stdout
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_SHA256)  # no partial files
    for name, digest in MNIST_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest


def test_a_file_with_the_wrong_sha256_is_refused_and_nothing_is_left(tmp_path, mirror, capsys):
    """The damaged test labels come last: the three good files downloaded before them go too
    (``igniter check`` in this process: its exit status is the command's)."""
    from igniter.check import main

    root = tmp_path / "data"
    args = ["experiment=mnist", f"data.root={root}", "data.download=true", f"data.train.params.mirrors=[{mirror}/bad/]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data.download" in err, err
    assert "t10k-labels-idx1-ubyte.gz has SHA-256" in err and "expected 4baf84dd" in err, err
    assert not root.exists()


def test_without_download_a_missing_root_is_refused_and_the_error_says_how_to_fetch(tmp_path):
    from igniter.datasets import mnist

    shutil.rmtree(tmp_path / "nothing", ignore_errors=True)
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        mnist(str(tmp_path), split="test")
    assert not (Path(tmp_path) / "MNIST").exists()
