"""The ``mlflow`` logger (igniter/trackers.py) against a real MLflow server started here:
parameters, metric histories and artifacts read back with ``MlflowClient``; a run killed
and resumed continues the same MLflow run without duplicate steps; an unreachable
tracker is exit 2 before training; one that goes away mid-run costs a warning, not the run."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_igniter

pytest.importorskip("mlflow")

MLFLOW = Path(sys.executable).with_name("mlflow")
DIGITS = ["logging.log_every=5", "logging.loggers=[tensorboard,mlflow]"]  # digits: 44 iterations per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> tuple[subprocess.Popen, str, Path]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts served from a temp
    directory, no job runner), started and not waited for (it takes ~6-10 s: the first test
    that asks for it runs meanwhile); its process group SIGKILLed at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield server, f"http://127.0.0.1:{port}", root
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture
def mlflow_uri(mlflow_server) -> str:
    """The server's URI once its /health answers (60 s deadline, polled every 0.1 s)."""
    server, uri, root = mlflow_server
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (
            "mlflow server not up in 60 s:\n" + (root / "server.log").read_text()[-3000:]
        )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                if r.status == 200:
                    return uri
        except OSError:
            time.sleep(0.1)


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_igniter(args, cwd, timeout=120, env=env)


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_unreachable_tracker_is_exit_2_before_training(mlflow_server, tmp_path):
    """Nobody listens on the port: one paragraph naming logging.loggers and the URI, exit 2,
    no traceback, no run directory, in seconds (no retries). (``mlflow_server``: started
    now, for the next tests, while this one runs.)"""
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    proc = _run([*DIGITS, f"output_dir={tmp_path / 'run'}"], tmp_path, MLFLOW_TRACKING_URI=uri)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "igniter: cannot start the run (1 problem):\n  logging.loggers[1] = 'mlflow': " in proc.stderr
    assert f"the MLflow tracker at {uri} (MLFLOW_TRACKING_URI) cannot be used: Connection refused" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "epoch 1" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()
    assert elapsed < 30, elapsed


@pytest.mark.slow
def test_killed_run_resumes_the_same_mlflow_run(mlflow_uri, tmp_path):
    """Epoch 1's checkpoint at iteration 44, the process SIGKILLs itself at iteration 58 (after
    logging steps 45, 50, 55); the same command resumes from 44 and logs into the same MLflow
    run: every step once, the killed run's and the resumed run's, and the artifacts."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = [
        *DIGITS,
        "trainer.max_epochs=2",
        "checkpoint.min_interval_seconds=0",  # epoch 1's checkpoint, however short the epoch
        "imports=[my_project]",
        "trainer.step=die_once",
        "+trainer.step_params.rank=0",
        "+trainer.step_params.iteration=58",
        f"output_dir={run}",
    ]
    env = {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_EXPERIMENT_NAME": "resume",
        "DIE_ONCE_MARKER": str(tmp_path / "died"),
    }
    died = _run(args, tmp_path, **env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = MlflowClient(mlflow_uri)
    assert _steps(client, run_id, "train/loss")[-1] == 55 and client.get_run(run_id).info.status == "RUNNING"

    proc = _run(args, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and f"mlflow: continuing run {run_id} from iteration 44" in out
    experiment = client.get_experiment_by_name("resume")
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    params = only.data.params
    assert params["solver.lr"] == "0.001" and params["model.name"] == "mlp" and params["trainer.max_epochs"] == "2"
    assert params["logging.loggers"] == "['tensorboard', 'mlflow']" and params["data.loader.batch_size"] == "32"
    assert _steps(client, run_id, "train/loss") == list(range(5, 88, 5))  # 5..85: 45-55 once, though logged by both
    assert _steps(client, run_id, "lr/group_0") == list(range(5, 88, 5))
    assert _steps(client, run_id, "val/accuracy") == [44, 88] and _steps(client, run_id, "train/samples_per_s") == [
        44,
        88,
    ]
    local = json.loads((run / "metrics.json").read_text())
    assert client.get_metric_history(run_id, "val/accuracy")[-1].value == pytest.approx(local["epochs"][-1]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json"} <= artifacts
    uploaded = json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path))).read_text())
    assert [e["epoch"] for e in uploaded["epochs"]] == [1, 2]
    if uploaded["status"] != "running" and (run / "curves.png").exists():  # loggers closed after the summary (run.py)
        assert "curves.png" in artifacts


class _Proxy(ThreadingHTTPServer):
    """Forwards HTTP/1.0 requests to ``target``; the request after the first ``serve``
    ones finds it gone: that connection is dropped and the port closed (connection refused)."""

    daemon_threads = True

    def __init__(self, target: str, serve: int) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.target, self.left, self.lock = target.removeprefix("http://"), serve, threading.Lock()
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def go_away(self) -> None:
        threading.Thread(target=lambda: (self.shutdown(), self.server_close()), daemon=True).start()


class _Forward(BaseHTTPRequestHandler):
    def forward(self) -> None:
        proxy: _Proxy = self.server  # type: ignore[assignment]
        with proxy.lock:
            proxy.left -= 1
            gone = proxy.left < 0
        if gone:
            proxy.go_away()
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(proxy.target, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body, headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_tracker_gone_mid_run_is_one_warning_and_the_run_completes(mlflow_uri, tmp_path):
    """The tracker answers the start-up and the first logging calls, then goes away in epoch 1:
    one warning, exit 0, metrics.json and TensorBoard complete, the MLflow run kept its early steps."""
    from mlflow.tracking import MlflowClient

    proxy = _Proxy(mlflow_uri, serve=8)  # get experiment, create run, parameters, then metrics
    run = tmp_path / "run"
    no_backoff = {
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    }  # igniter's 2 retries, at once
    proc = _run(
        [*DIGITS, "trainer.max_epochs=2", f"output_dir={run}"],
        tmp_path,
        MLFLOW_TRACKING_URI=proxy.uri,
        MLFLOW_EXPERIMENT_NAME="gone",
        **no_backoff,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    warnings = [line for line in out.splitlines() if "the run goes on without MLflow" in line]
    assert len(warnings) == 1 and f"tracking URI {proxy.uri}" in warnings[0], out[-3000:]
    assert "Traceback" not in out
    assert [e["epoch"] for e in json.loads((run / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    run_id = (run / "mlflow_run_id").read_text().strip()
    kept = _steps(MlflowClient(mlflow_uri), run_id, "train/loss")
    assert kept and kept[-1] < 44, kept


def test_params_are_flat_dotted_and_truncated():
    from igniter.trackers.mlflow_tracker import flatten_params

    tree = {
        "solver": {"lr": 0.1, "params": {}},
        "loggers": ["tensorboard", "mlflow"],
        "handlers": [{"name": "a", "params": {"x": 1}}],
        "s": None,
    }
    assert flatten_params(tree) == {
        "solver.lr": "0.1",
        "solver.params": "{}",
        "loggers": "['tensorboard', 'mlflow']",
        "handlers.0.name": "a",
        "handlers.0.params.x": "1",
        "s": "None",
    }
    long = flatten_params({"k": "x" * 7000}, max_length=6000)["k"]
    assert len(long) == 6000 and long.endswith("...[truncated]")


def test_missing_mlflow_package_is_a_config_error(monkeypatch):
    from igniter.errors import ConfigError
    from igniter.trackers.mlflow_tracker import package_problem, start_mlflow

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails as if it were not installed
    with pytest.raises(ConfigError) as e:
        start_mlflow(None, "logging.loggers[1]")  # type: ignore[arg-type]
    assert e.value.exit_status == 2
    assert "logging.loggers[1] = 'mlflow': the mlflow package is not installed: pip install 'igniter[mlflow]'" in str(
        e.value
    )
    monkeypatch.delitem(sys.modules, "mlflow")
    assert package_problem(import_it=False) is None  # installed here: found without importing it
