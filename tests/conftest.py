"""Shared helpers: run the real ``igniter`` command in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
REPO = TESTS.parent
#: The directory holding ``MNIST/raw/`` (torchvision's layout): ``$IGNITER_TEST_MNIST_ROOT`` when set,
#: else the shared data directory beside the checkout. MNIST tests are skipped when it has no MNIST.
#: The bucket the ``s3`` fixture's server holds.
BUCKET = "checkpoints"
MNIST_ROOT = Path(os.environ.get("IGNITER_TEST_MNIST_ROOT") or REPO.parent / "shared" / "data").resolve()


def igniter_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("HYDRA_FULL_ERROR", "0")
    return env


def run_igniter(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m igniter *args`` in ``cwd``; returns the completed process (text output).
    ``env``: variables added to the test environment (:func:`igniter_env`); ``preexec_fn``: run
    in the child before it starts Python (e.g. ``resource.setrlimit``)."""
    return subprocess.run(
        [sys.executable, "-m", "igniter", *args],
        cwd=cwd,
        env={**igniter_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def run_together(
    arg_lists: list[list[str]],
    cwd: Path,
    timeout: float = 300,
    envs: list[dict[str, str]] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``python -m igniter`` once per argument list, all at once (the host has cores to spare
    while each start-up imports); returns their completed processes in order. A run still going
    after ``timeout`` seconds fails the test (every run is killed first). ``envs``: variables
    added to each run's environment (one dict per argument list); ``preexec_fn``: as for
    :func:`run_igniter`, in every child."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "igniter", *args],
            cwd=cwd,
            env={**igniter_env(), **(envs[i] if envs else {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        for i, args in enumerate(arg_lists)
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(autouse=True)
def _fixture_package_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(
            f"MNIST not found at {MNIST_ROOT}/MNIST/raw (set IGNITER_TEST_MNIST_ROOT to the directory holding MNIST/raw)"
        )
    return MNIST_ROOT


@pytest.fixture
def restore_datasets():
    """Import tests/fixtures/original_igniter_example afresh (it replaces the built-in ``mnist``
    and ``digits``), and put igniter's datasets back after the test."""
    import igniter  # noqa: F401  (every built-in registered)
    from igniter.registry import dataset_registry

    saved = {n: dataset_registry.entry(n) for n in dataset_registry.names()}
    sys.modules.pop("original_igniter_example", None)
    yield
    sys.modules.pop("original_igniter_example", None)
    for name in dataset_registry.names():  # only the fixture's own: other user modules stay imported
        if name not in saved and dataset_registry.entry(name).module == "original_igniter_example":
            dataset_registry.remove(name)
    for name, entry in saved.items():
        dataset_registry.register(entry.obj, name, override=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port with bucket ``checkpoints``; yields the environment
    (endpoint and dummy credentials) a client needs. Its log (a line per request) goes to a
    file: a pipe nobody reads fills up after a few thousand requests and blocks the server."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from igniter.launch.runners import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115  (the server's, closed when it exits)
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # until it answers (or has died)
        assert server.poll() is None, log.read_text()[-2000:]
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "moto server did not answer in 120 s"
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the in-process clients below
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.terminate()
    server.wait(timeout=30)
