"""Checkpoints and weights in object storage, against a real S3-compatible server (moto's
server mode, a separate process on 127.0.0.1 started here) with s3fs as the client."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import BUCKET, igniter_env, read_metrics, run_igniter, run_together

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from igniter.checkpoint.object_store import complete_checkpoints  # noqa: E402
from igniter.checkpoint.remote import MANIFEST_SUFFIX, fetch, open_store  # noqa: E402
from igniter.errors import ConfigError  # noqa: E402
from igniter.launch.runners import free_port  # noqa: E402

BASE = [
    "trainer.max_epochs=1",
    "checkpoint.every_iterations=10",
    "checkpoint.n_saved=2",
    "trainer.seed=3",
    "logging.progress_bar=false",
    "logging.loggers=[]",
]


def igniter(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_igniter(args, cwd, timeout=600, env=env)


def store_model(url: str) -> dict[str, torch.Tensor]:
    """The model of the newest complete checkpoint under ``url``."""
    fs, root = open_store(url)
    name, _ = complete_checkpoints(fs, root)[0]
    with fs.open(f"{root}/{name}", "rb") as f:
        return torch.load(f, weights_only=True)["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def test_killed_mid_upload_resumes_from_the_newest_complete_checkpoint_bit_identically(s3, tmp_path):
    """A run checkpointing to s3:// every 10 iterations is SIGKILLed after iteration 30's
    object is uploaded and before its manifest: the store then holds 30's object without a
    manifest and 20 as the newest complete checkpoint; the same command resumes from 20,
    deletes the orphan, and ends with the weights of an uninterrupted run on local disk."""
    reference = tmp_path / "reference"
    assert igniter([*BASE, f"output_dir={reference}"], tmp_path, {}).returncode == 0
    url = f"s3://{BUCKET}/killed"
    args = [
        *BASE,
        "imports=[my_project]",
        "checkpoint.saver=stall_upload",
        f"checkpoint.dir={url}",
        f"output_dir={tmp_path / 'run'}",
    ]
    marker = tmp_path / "stalled"
    env = {**igniter_env(), **s3, "STALL_UPLOAD_AT": "30", "STALL_UPLOAD_MARKER": str(marker)}
    first = subprocess.Popen(
        [sys.executable, "-m", "igniter", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():  # the object of iteration 30 is uploaded, its manifest not
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the upload of iteration 30 never started"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    fs, root = open_store(url)
    objects = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False))
    assert "last_checkpoint_30.pt" in objects and f"last_checkpoint_30.pt{MANIFEST_SUFFIX}" not in objects, objects
    assert [name for name, _ in complete_checkpoints(fs, root)] == ["last_checkpoint_20.pt", "last_checkpoint_10.pt"]

    second = igniter(args, tmp_path, s3)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (tmp_path / "run" / "rank0.log").read_text()
    assert f"resumed from {url}/last_checkpoint_20.pt (epoch 0, iteration 20)" in log
    assert "last_checkpoint_30.pt: an upload that never completed" in log
    fs.invalidate_cache()
    names = [p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)]
    pts = sorted(n for n in names if n.endswith(".pt"))
    assert all(f"{n}{MANIFEST_SUFFIX}" in names for n in pts), names  # no object without its manifest
    assert [name for name, _ in complete_checkpoints(fs, root)] == [
        "last_checkpoint_44.pt",
        "last_checkpoint_40.pt",
    ]  # n_saved=2
    assert_bit_identical(
        torch.load(sorted((reference / "checkpoints").glob("last_checkpoint_44.pt"))[0], weights_only=True)["model"],
        store_model(url),
    )


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on the test's stderr
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields ``(directory, base URL)``."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_weights_from_s3_and_https_are_cached_with_their_checksum(s3, http_dir, tmp_path, monkeypatch):
    """``model.weights`` from a local file and from s3:// (all-zero weights: the first loss is
    exactly ln 10, which no initialisation gives) give the same run; downloads are cached with
    their SHA-256 (a damaged cache file is downloaded again; a wrong expected digest is an
    error naming the key, nothing kept)."""
    from igniter.registry import model_registry

    model = model_registry.get("mlp")(in_features=64, hidden=[128], num_classes=10)
    weights = tmp_path / "weights.pt"
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    fs, _ = open_store(f"s3://{BUCKET}")
    fs.put(str(weights), f"{BUCKET}/models/weights.pt")
    cache = tmp_path / "cache"
    short = [
        "trainer.max_epochs=1",
        "trainer.epoch_length=2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.loggers=[]",
    ]
    finals = {}
    for name, source in (("local", str(weights)), ("s3", f"s3://{BUCKET}/models/weights.pt")):
        proc = igniter(
            [*short, f"model.weights={source}", f"model.weights_sha256={digest}", f"output_dir={tmp_path / name}"],
            tmp_path,
            {**s3, "IGNITER_CACHE_DIR": str(cache)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        first_loss = json.loads((tmp_path / name / "metrics.json").read_text())["train_loss_history"][0]
        assert first_loss[0] == 1 and first_loss[1] == pytest.approx(math.log(10), abs=1e-6), first_loss
        finals[name] = torch.load(tmp_path / name / "checkpoints" / "last_checkpoint_2.pt", weights_only=True)["model"]
    assert_bit_identical(finals["local"], finals["s3"])
    (cached,) = (cache / "downloads").glob("*-weights.pt")
    assert Path(f"{cached}.sha256").read_text().strip() == digest

    monkeypatch.setenv("IGNITER_CACHE_DIR", str(cache))
    cached.write_bytes(b"damaged")
    assert fetch(f"s3://{BUCKET}/models/weights.pt", "model.weights") == cached
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest  # downloaded again
    served, base = http_dir
    (served / "w.pt").write_bytes(weights.read_bytes())
    assert fetch(f"{base}/w.pt", "model.weights", digest).read_bytes() == weights.read_bytes()
    with pytest.raises(ConfigError, match=r"model.weights.*has SHA-256 .*expected 0{64}"):
        fetch(f"{base}/w.pt", "model.weights", "0" * 64, cached=False)
    with pytest.raises(ConfigError, match="model.weights.*cannot read"):
        fetch(f"{base}/missing.pt", "model.weights")
    assert not list((cache / "downloads").glob(".download-*"))  # no partial download left


def test_bad_storage_input_is_one_error_before_training(s3, tmp_path):
    """Credentials in a URL, a missing weights file and a malformed digest are config errors
    (exit 2, all named at once, no run directory); an unreachable endpoint is exit 2 naming
    checkpoint.dir and AWS_ENDPOINT_URL, before training, without a traceback; so is a
    bucket that does not exist."""
    run = tmp_path / "run"
    proc = igniter(
        [
            "checkpoint.dir=s3://key:secret@bucket/x",
            f"model.weights={tmp_path / 'nope.pt'}",
            "model.weights_sha256=abc",
            f"output_dir={run}",
        ],
        tmp_path,
        s3,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    for key in ("checkpoint.dir", "model.weights", "model.weights_sha256"):
        assert key in proc.stderr
    assert "secret" not in proc.stderr + proc.stdout and not run.exists()
    down = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    proc = igniter([f"checkpoint.dir=s3://{BUCKET}/x", f"output_dir={run}"], tmp_path, down)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"checkpoint.dir = 's3://{BUCKET}/x': cannot reach" in proc.stderr
        and "AWS_ENDPOINT_URL" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not list(run.glob("checkpoints/*")) and "epoch 1" not in proc.stdout  # stopped before training
    with pytest.raises(ConfigError, match="checkpoint.dir.*cannot reach s3://no-such-bucket/x"):
        open_store("s3://no-such-bucket/x")  # the same check, in this process: a bucket that does not exist


def test_resume_from_a_url_and_a_damaged_newest_checkpoint_in_the_store(s3):
    """``resume=<URL>`` reads that checkpoint (its SHA-256 checked against its manifest);
    ``resume=auto`` on a store whose newest checkpoint was damaged after its manifest was
    written skips it, naming it, and takes the one before."""
    import io

    from igniter.checkpoint.object_store import write_checkpoint
    from igniter.checkpoint.resume import select_checkpoint

    model = torch.nn.Linear(3, 2)
    url = f"s3://{BUCKET}/selected"
    fs, root = open_store(url)
    for iteration in (10, 20):
        buffer = io.BytesIO()
        torch.save({"model": {k: v + iteration for k, v in model.state_dict().items()}}, buffer)
        write_checkpoint(fs, root, f"last_checkpoint_{iteration}.pt", buffer.getbuffer())
    chosen, ckpt = select_checkpoint(f"{url}/last_checkpoint_10.pt", url, model, ("model",))
    assert chosen == f"{url}/last_checkpoint_10.pt" and torch.equal(ckpt["model"]["bias"], model.bias.detach() + 10)
    assert select_checkpoint("auto", url, model, ("model",))[0] == f"{url}/last_checkpoint_20.pt"

    data = bytearray(fs.cat(f"{root}/last_checkpoint_20.pt"))
    data[-30] ^= 0xFF  # same size, other bytes: only the digest tells
    fs.pipe(f"{root}/last_checkpoint_20.pt", bytes(data))
    assert select_checkpoint("auto", url, model, ("model",))[0] == f"{url}/last_checkpoint_10.pt"
    with pytest.raises(ConfigError, match=r"resume.*last_checkpoint_20.pt.*SHA-256"):
        select_checkpoint(f"{url}/last_checkpoint_20.pt", url, model, ("model",))


def test_a_run_in_object_storage_is_evaluated_and_resumed_with_one_download_per_host(s3, tmp_path):
    """``igniter eval <run dir>`` of a run whose checkpoints are in s3:// reads its newest
    checkpoint from the store; the run resumed by 2 processes on this host downloads that
    checkpoint once (rank 0 while choosing it; rank 1 reads the same copy), and the copy is
    deleted once both ranks have loaded it."""
    url, run, cache = f"s3://{BUCKET}/evaluated", tmp_path / "run", tmp_path / "cache"
    env = {**s3, "IGNITER_CACHE_DIR": str(cache)}
    args = [*BASE, f"checkpoint.dir={url}", f"output_dir={run}"]
    assert (first := igniter(args, tmp_path, env)).returncode == 0, first.stderr[-3000:]

    evaluated = igniter(["eval", str(run)], tmp_path, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy" in evaluated.stdout + evaluated.stderr
    assert (run / "eval_metrics.json").is_file()

    two = ["runner=spawn", "runner.nproc_per_node=2", "trainer.max_epochs=2"]
    resumed = igniter([*args, *two], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = [(run / f"rank{r}.log").read_text() for r in (0, 1)]
    assert f"resumed from {url}/last_checkpoint_44.pt" in logs[0]
    downloads = [line for log in logs for line in log.splitlines() if "downloaded s3://" in line]
    assert len(downloads) == 1 and "last_checkpoint_44.pt" in downloads[0], downloads
    assert not any((cache / "resume").rglob("*.pt")), "the per-host copy is deleted after loading"
    assert read_metrics(run)["status"] == "completed"


@pytest.mark.slow
def test_fsdp_checkpoints_to_s3_killed_mid_save_resume_by_one_and_by_three_processes(s3, tmp_path):
    """``checkpoint.format=dcp`` (fsdp's default) to s3://: 2 processes write every checkpoint's
    shards and rank 0 its manifest last. The whole job is SIGKILLed inside the save of
    iteration 16, after every rank's shards are on the store and before the manifest. From
    that state (the store and the run directory copied once), the same command with
    ``runner=single`` and no format key, and the same with 3 processes, each resume from the
    newest complete checkpoint (iteration 13, read in place from the store), delete the
    orphan, keep writing dcp there, and every global batch after the resume is the
    uninterrupted run's, sample by sample; ``igniter eval`` of the run reads its newest dcp
    checkpoint from the store without downloading it."""
    from test_sharding import BASE as SHARDING
    from test_sharding import FSDP, LAST, TWO, global_batches

    cache, die_marker, stalled = tmp_path / "cache", tmp_path / "died", tmp_path / "stalled"
    die_marker.touch()  # SHARDING's die_once step never fires here: the kill comes from outside
    saver = ["imports=[my_project]", "checkpoint.saver=stall_dcp_upload", "checkpoint.min_interval_seconds=0"]

    def env(tag: str) -> dict[str, str]:
        return {
            **igniter_env(),
            **s3,
            "DIE_ONCE_MARKER": str(die_marker),
            "RUN_TAG": tag,
            "IGNITER_CACHE_DIR": str(cache),
        }

    (reference := tmp_path / "reference").mkdir()  # the uninterrupted run, side by side with the killed one
    with open(tmp_path / "reference.err", "w") as err:  # a file: a pipe nobody reads can fill up
        ref = subprocess.Popen(
            [sys.executable, "-m", "igniter", *SHARDING, "runner=single", f"output_dir={reference}"],
            cwd=tmp_path, env=env("reference"), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    url, out = f"s3://{BUCKET}/sharded", tmp_path / "run"
    args = [*SHARDING, *saver, f"checkpoint.dir={url}", f"output_dir={out}"]
    killed_env = {**env("killed"), "STALL_UPLOAD_AT": "16", "STALL_UPLOAD_MARKER": str(stalled)}
    job = subprocess.Popen(
        [sys.executable, "-m", "igniter", *args, *TWO, *FSDP],
        cwd=tmp_path, env=killed_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not stalled.exists():  # every shard of iteration 16 is on the store, its manifest not
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the save of iteration 16 never started"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks
    job.wait(timeout=60)
    assert ref.wait(timeout=600) == 0, (tmp_path / "reference.err").read_text()[-3000:]
    fs, root = open_store(url)
    fs.invalidate_cache()
    assert any(p.endswith("last_checkpoint_16.dcp/.metadata") for p in fs.find(root)), "killed after the shards"
    assert [name for name, _ in complete_checkpoints(fs, root)] == ["last_checkpoint_13.dcp", "last_checkpoint_12.dcp"]
    url3, out3 = f"s3://{BUCKET}/sharded3", tmp_path / "run3"  # the same state, for the 3-process resume
    for path in fs.find(root):
        fs.copy(path, f"{BUCKET}/sharded3/{path[len(root) + 1 :]}")
    shutil.copytree(out, out3)

    three = [*SHARDING, *saver, f"checkpoint.dir={url3}", f"output_dir={out3}", *TWO, "runner.nproc_per_node=3", *FSDP]
    for proc in run_together([[*args, "runner=single"], three], tmp_path, 600, [env("resumed"), env("resumed3")]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected = global_batches(reference, "reference")
    for where, run_dir, tag in ((url, out, "resumed"), (url3, out3, "resumed3")):
        log = (run_dir / "rank0.log").read_text()
        assert f"resumed from {where}/last_checkpoint_13.dcp (epoch 1, iteration 13)" in log
        assert "last_checkpoint_16.dcp: a checkpoint a killed run left without its manifest; deleting it" in log
        got = global_batches(run_dir, tag)
        assert sorted(got) == list(range(14, LAST + 1))
        assert all(got[i] == expected[i] for i in got), f"other samples or order after the resume ({tag})"
        fs.invalidate_cache()
        store_root = open_store(where)[1]
        assert [n for n, _ in complete_checkpoints(fs, store_root)] == [
            "last_checkpoint_26.dcp",
            "last_checkpoint_24.dcp",
        ]
        assert not any("last_checkpoint_16" in p for p in fs.find(store_root)), "the orphan is gone"
    evaluated = igniter(["eval", str(out)], tmp_path, {**s3, "IGNITER_CACHE_DIR": str(cache)})
    assert not cache.exists() or not any(cache.rglob("*.dcp*")), "a dcp checkpoint is read in place, not downloaded"
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"{url}/last_checkpoint_26.dcp" in evaluated.stdout and (out / "eval_metrics.json").is_file()
