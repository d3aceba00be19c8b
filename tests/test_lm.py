"""A language model end to end: ``igniter prepare-text``, the ``token_shards`` dataset, the
``causal_lm`` model (Hugging Face transformers), its loss and metrics, AdamW on matrices, FLOPs
per step, exact resume. Tiny: a 2-layer, 32-wide GPT on a few KB of Shakespeare.

The reference recipe (``experiment=shakespeare_char``, 2000 iterations) is a documented command
in the README, not a test.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUCKET, REPO, read_metrics, run_igniter, run_together

from igniter.checkpoint.resume import checkpoint_files
from igniter.prepare_text import main as prepare_main
from igniter.prepare_text import prepare_text
from igniter.token_shards import ShardError, TokenShards

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
if not SHAKESPEARE.is_file():
    pytest.skip(f"the Shakespeare text is not at {SHAKESPEARE}", allow_module_level=True)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first 8,000 characters of the Shakespeare text."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(SHAKESPEARE.read_text()[:8000])
    return path


@pytest.fixture(scope="module")
def shards(small_text, tmp_path_factory) -> Path:
    """Character shards of ``small_text``, 1,000 tokens per shard (windows cross shard boundaries)."""
    out = tmp_path_factory.mktemp("shards") / "char"
    prepare_text(small_text, out, shard_tokens=1000)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_prepare_text_char_reproduces_nanogpt_split_and_is_idempotent(tmp_path, capsys):
    """nanoGPT's shakespeare_char: 65 characters, 1,003,854 train and 111,540 val tokens; the
    same command twice gives the same files, byte for byte."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert prepare_main([str(SHAKESPEARE), str(a)]) == 0
    assert prepare_main([str(SHAKESPEARE), str(b)]) == 0
    assert "train 1,003,854 tokens" in capsys.readouterr().out
    assert _files(a) == _files(b)
    meta = json.loads((a / "meta.json").read_text())
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer"]["kind"]) == (65, "uint16", "char")
    assert meta["splits"]["train"]["tokens"] == 1_003_854 and meta["splits"]["val"]["tokens"] == 111_540
    chars = meta["tokenizer"]["chars"]
    text = SHAKESPEARE.read_text()
    assert chars == sorted(set(text))
    val = np.fromfile(a / "val_000000.bin", dtype="<u2")
    assert "".join(chars[i] for i in val[:200]) == text[1_003_854 : 1_003_854 + 200]


def test_prepare_text_bpe_trained_then_read_from_its_tokenizer_json(small_text, tmp_path):
    """A byte-level BPE trained here, then the same tokenizer.json given back: the same shards;
    training twice gives the same bytes."""
    trained, again, given = tmp_path / "trained", tmp_path / "again", tmp_path / "given"
    meta = prepare_text(small_text, trained, tokenizer="bpe", vocab_size=300)
    prepare_text(small_text, again, tokenizer="bpe", vocab_size=300)
    assert _files(trained) == _files(again)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == 300
    assert meta["splits"]["train"]["tokens"] < 7200  # merges: fewer tokens than characters
    copy = tmp_path / "tokenizer.json"
    shutil.copy(trained / "tokenizer.json", copy)
    meta_given = prepare_text(small_text, given, tokenizer_file=copy)
    assert meta_given["tokenizer"]["kind"] == "tokenizer.json"
    for split in ("train", "val"):
        assert meta_given["splits"][split] == meta["splits"][split]
    from tokenizers import Tokenizer

    ids = np.fromfile(given / "train_000000.bin", dtype="<u2").tolist()
    assert Tokenizer.from_file(str(copy)).decode(ids) == small_text.read_text()[:7200]


@pytest.mark.parametrize("case", ["missing", "empty", "not utf-8"])
def test_prepare_text_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    source = tmp_path / "input.txt"
    if case == "empty":
        source.write_text("")
    elif case == "not utf-8":
        source.write_bytes(b"caf\xe9\n")
    out = tmp_path / "out"
    assert prepare_main([str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "Nothing was written" in err and err.count("\n") == 1
    assert not out.exists()


def test_token_shards_windows_cross_shards_and_strides(shards):
    meta = json.loads((shards / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) == 8  # 7,200 tokens in shards of 1,000
    stream = np.concatenate([np.fromfile(shards / s["file"], dtype="<u2") for s in meta["splits"]["train"]["shards"]])
    every = TokenShards(shards, "train", seq_len=16, stride=1)
    assert len(every) == 7200 - 16
    for i in (0, 983, 984, 999, 1000, len(every) - 1):  # 984..999 cross the first shard boundary
        x, y = every[i]
        assert x.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert x.tolist() == stream[i : i + 16].tolist() and y.tolist() == stream[i + 1 : i + 17].tolist()
    apart = TokenShards(shards, "train", seq_len=16)  # stride = seq_len: non-overlapping
    assert len(apart) == (7200 - 17) // 16 + 1
    assert apart[2][0].tolist() == stream[32:48].tolist()
    with pytest.raises(IndexError):
        apart[len(apart)]


def test_a_damaged_shard_is_named(shards, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    shard = damaged / "train_000003.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train_000003.bin is damaged: its SHA-256"):
        TokenShards(damaged, "train", seq_len=16)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="train_000003.bin is damaged: 1998 bytes"):
        TokenShards(damaged, "train", seq_len=16, verify=False)


def test_token_shards_behind_a_url_are_downloaded_checked_and_cached(shards, tmp_path, monkeypatch):
    """An fsspec URL (file:// here; s3:// goes through the same fetch as model.weights): the
    shards land in the download cache when first read, SHA-256 checked, and give the local
    samples; a damaged object is named when a sample reads it, a shard of the wrong size
    or a missing one when the dataset is built."""
    monkeypatch.setenv("IGNITER_CACHE_DIR", str(tmp_path / "cache"))
    remote = TokenShards(f"file://{shards}", "train", seq_len=16, stride=1)
    local = TokenShards(shards, "train", seq_len=16, stride=1)
    assert len(remote) == len(local) and all(str(p).startswith(str(tmp_path / "cache")) for p in remote.paths)
    for i in (0, 990, len(local) - 1):
        assert torch.equal(remote[i][0], local[i][0]) and torch.equal(remote[i][1], local[i][1])
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    data = bytearray((damaged / "train_000002.bin").read_bytes())
    data[7] ^= 1
    (damaged / "train_000002.bin").write_bytes(bytes(data))
    dataset = TokenShards(f"file://{damaged}", "train", seq_len=16)
    assert dataset[0][0].tolist() == local[0][0].tolist()  # shards 0 and 1 are intact
    with pytest.raises(ShardError, match=f"file://{damaged}/train_000002.bin has SHA-256"):
        dataset[2000 // 16]
    (damaged / "train_000002.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match=f"shard file://{damaged}/train_000002.bin is damaged: 1998 bytes"):
        TokenShards(f"file://{damaged}", "train", seq_len=16)
    (damaged / "train_000002.bin").unlink()
    with pytest.raises(ShardError, match=f"shard file://{damaged}/train_000002.bin is missing"):
        TokenShards(f"file://{damaged}", "train", seq_len=16)


def test_reading_a_shard_behind_a_url_downloads_the_next_one_in_the_background(shards, tmp_path, monkeypatch):
    """Read-ahead: a sample of shard 0 downloads shard 0 and starts shard 1's download in a
    background thread; shard 1 lands in the cache without any sample reading it (waited for
    with a deadline), shard 2 is not downloaded; a pass in order downloads each shard once."""
    import time

    monkeypatch.setenv("IGNITER_CACHE_DIR", str(tmp_path / "cache"))
    dataset = TokenShards(f"file://{shards}", "train", seq_len=16)
    assert not any(p.exists() for p in dataset.paths), "nothing is downloaded when the dataset is built"
    dataset[0]
    assert dataset.paths[0].is_file() and dataset._maps[1] is None
    deadline = time.monotonic() + 30
    while not (dataset.paths[1].is_file() and Path(f"{dataset.paths[1]}.sha256").is_file()):
        assert time.monotonic() < deadline, "shard 1 was not read ahead within 30 s"
        time.sleep(0.01)
    assert dataset._maps[1] is None and not dataset.paths[2].exists()
    assert dataset._downloads[1].result() == dataset.paths[1]
    local = TokenShards(shards, "train", seq_len=16)
    assert all(torch.equal(dataset[i][0], local[i][0]) for i in range(len(local)))
    assert sorted(dataset._downloads) == list(range(8)) and all(p.is_file() for p in dataset.paths)


def test_the_processes_of_a_host_download_a_shard_once(shards, tmp_path, monkeypatch, caplog):
    """Two readers of the same shard URL at once (two processes of a host: a lock file beside
    the cached copy): the first downloads, held until the second has asked for the shard too;
    the second waits for the lock and reuses the copy (one ``downloaded`` line)."""
    import logging
    import threading

    import igniter.token_shards as ts

    monkeypatch.setenv("IGNITER_CACHE_DIR", str(tmp_path / "cache"))
    real_copy, real_fetch = ts.cached_copy, ts.fetch
    calls, both_asked = [], threading.Event()

    def cached_copy(url, *args):
        calls.append(url)
        if len(calls) == 2:
            both_asked.set()
        return real_copy(url, *args)

    def fetch(url, *args):
        assert both_asked.wait(30), "the second reader asked for the shard"
        return real_fetch(url, *args)

    monkeypatch.setattr(ts, "cached_copy", cached_copy)
    monkeypatch.setattr(ts, "fetch", fetch)
    meta = json.loads((shards / "meta.json").read_text())
    shard, url = meta["splits"]["train"]["shards"][0], f"file://{shards}/train_000000.bin"
    paths = []
    with caplog.at_level(logging.INFO, logger="igniter"):
        readers = [
            threading.Thread(target=lambda: paths.append(ts._fetch_shard(url, shard, np.dtype("<u2"))))
            for _ in range(2)
        ]
        for r in readers:
            r.start()
        for r in readers:
            r.join(60)
    assert (
        len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == (shards / "train_000000.bin").read_bytes()
    )
    assert [r.getMessage() for r in caplog.records].count(f"downloaded {url} (2000 bytes)") == 1


# A 2-layer, 32-wide GPT on windows of 16 characters: 2 epochs of 15 iterations (global batch 12),
# a checkpoint every 10 iterations and at each epoch's end. die_once (tests/fixtures/my_project)
# is the supervised step that SIGKILLs rank 0 at iterations 13, 17 and 24, once each, after the
# checkpoints of 10, 15 and 20 are on disk: the file $DIE_ONCE_MARKER.<iteration> records that it
# did (a run whose markers exist never dies).
# record_windows logs the samples of every batch (tests/test_sharding.py's format), record_peak_rss
# the process's memory at the end.
KILLS = (13, 17, 24)
AFTER = (10, 15, 20)  # the checkpoint each kill waits for (on disk) before it happens
SPAWN2 = ["runner=spawn", "runner.nproc_per_node=2"]
BIG = ["trainer.max_epochs=1", "trainer.epoch_length=8"]
S3_URL = f"s3://{BUCKET}/lm/char"


def _tiny(shards: Path, run: Path, root: str | None = None) -> list[str]:
    """The tiny run of ``shards`` (or of the same shards at ``root``, a URL) into ``run``."""
    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    return [
        "experiment=shakespeare_char",
        f"data.root={root or shards}",
        f"model.params.vocab_size={vocab}",
        "model.params.block_size=16",
        "model.params.n_layer=2",
        "model.params.n_head=2",
        "model.params.n_embd=32",
        "trainer.max_epochs=2",
        "trainer.epoch_length=15",
        "trainer.grad_clip_norm=null",
        "evaluation.every=1",
        "solver.scheduler.params.warmup_steps=5",
        "solver.scheduler.params.total_steps=30",
        "checkpoint.every_iterations=10",
        "checkpoint.min_interval_seconds=0",  # also at iteration 15, the end of a short epoch
        "checkpoint.n_saved=3",
        "logging.progress_bar=false",
        "imports=[my_project]",
        "+handlers=[{name: record_windows, event: ITERATION_COMPLETED}, {name: record_peak_rss, event: COMPLETED}]",
        "trainer.step=die_once",
        "+trainer.step_params.rank=0",
        f"+trainer.step_params.iteration=[{','.join(map(str, KILLS))}]",
        f"+trainer.step_params.after=[{','.join(map(str, AFTER))}]",
        f"+trainer.step_params.checkpoints={run / 'checkpoints'}",
        f"output_dir={run}",
    ]


def _env(marker: Path, tag: str, never: tuple[int, ...] = (), **extra: str) -> dict[str, str]:
    """The variables of one run: its die_once marker base (``never``: iterations whose marker
    is made now, so that the run does not die there) and its record_windows tag."""
    for i in never:
        Path(f"{marker}.{i}").touch()
    return {"DIE_ONCE_MARKER": str(marker), "RUN_TAG": tag, **extra}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_igniter(args, cwd, env=env)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_files(run / "checkpoints")[0], weights_only=True)["model"]


def _newest(run: Path) -> int:
    return int(checkpoint_files(run / "checkpoints")[0].stem.rsplit("_", 1)[1])


@pytest.fixture(scope="module")
def tiny_run(shards, tmp_path_factory) -> Path:
    """The uninterrupted tiny run, one process (tag ``one``; its markers exist: it never dies)."""
    run = tmp_path_factory.mktemp("one") / "run"
    proc = _run(_tiny(shards, run), run.parent, _env(run.parent / "marker", "one", KILLS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _big_shards(shards: Path, big: Path) -> None:
    """1 GiB of uint16 tokens at ``big``: the character stream of ``shards`` tiled, 2 train
    shards of 512 MiB written through numpy.memmap 32 MiB at a time (hashed as they are
    written), their SHA-256 in meta.json; the val split is ``shards``'."""
    import hashlib

    from igniter.token_shards import write_meta

    big.mkdir()
    meta = json.loads((shards / "meta.json").read_text())
    stream = np.concatenate([np.fromfile(shards / s["file"], dtype="<u2") for s in meta["splits"]["train"]["shards"]])
    block = np.resize(stream, 16 << 20)  # 32 MiB of tokens, written 16 times per shard
    entries = []
    for index in range(2):
        name, digest = f"train_{index:06d}.bin", hashlib.sha256()
        tokens = np.memmap(big / name, dtype="<u2", mode="w+", shape=(16 * len(block),))
        for i in range(16):
            tokens[i * len(block) : (i + 1) * len(block)] = block
            digest.update(block.data)
        tokens.flush()
        del tokens
        entries.append({"file": name, "tokens": 16 * len(block), "sha256": digest.hexdigest()})
    shutil.copy(shards / "val_000000.bin", big / "val_000000.bin")
    splits = {"train": {"tokens": sum(e["tokens"] for e in entries), "shards": entries}, "val": meta["splits"]["val"]}
    write_meta(big, {**{k: v for k, v in meta.items() if k not in ("format", "splits")}, "splits": splits})
    assert sum(p.stat().st_size for p in big.glob("train_*.bin")) == 1 << 30


@pytest.fixture(scope="module")
def runs(shards, tiny_run, s3, tmp_path_factory) -> dict[str, Path]:
    """The tiny runs compared with ``tiny_run`` (``one``), started two or three at a time (the
    host has cores to spare while each one starts up; the suite's time budget):

    - ``two``: the same with ``runner=spawn runner.nproc_per_node=2`` (tag ``two``);
    - ``killed``: the same command as ``one`` run until it completes: SIGKILLed at iterations
      13, 17 and 24 (tags ``killed1`` to ``killed4``);
    - ``moved``: a copy of ``killed`` after its first kill, resumed with 2 processes and
      SIGKILLed at iteration 17 (tag ``moved2``), then with one process to the end (tag ``moved1``);
    - ``s3``: the same as ``one`` from the shards on the moto S3 server (``s3_url``);
    - ``big``: 8 iterations on 1 GiB of tokens (:func:`_big_shards`, deleted afterwards).
    """
    from igniter.checkpoint.remote import open_store

    root = tmp_path_factory.mktemp("runs")
    two, killed, moved, on_s3, big = (root / name for name in ("two", "killed", "moved", "s3", "big"))
    m = root / "markers"
    m.mkdir()
    first = run_together(
        [[*_tiny(shards, two), *SPAWN2], _tiny(shards, killed)],
        root,
        envs=[_env(m / "two", "two", KILLS), _env(m / "killed", "killed1")],
    )
    assert first[0].returncode == 0, first[0].stderr[-3000:]
    assert first[1].returncode == -signal.SIGKILL and Path(f"{m / 'killed'}.13").exists(), first[1].stderr[-3000:]
    shutil.copytree(killed, moved)
    second = run_together(
        [_tiny(shards, killed), [*_tiny(shards, moved), *SPAWN2]],
        root,
        envs=[_env(m / "killed", "killed2"), _env(m / "moved", "moved2", (13, 24))],
    )
    assert second[0].returncode == -signal.SIGKILL and Path(f"{m / 'killed'}.17").exists(), second[0].stderr[-3000:]
    assert second[1].returncode != 0 and Path(f"{m / 'moved'}.17").exists(), second[1].stderr[-3000:]
    fs, _ = open_store(f"s3://{BUCKET}")
    fs.put([str(f) for f in sorted(shards.iterdir())], f"{BUCKET}/lm/char/")
    cache = {**s3, "IGNITER_CACHE_DIR": str(root / "cache")}
    third = run_together(
        [_tiny(shards, killed), _tiny(shards, moved), _tiny(shards, on_s3, S3_URL)],
        root,
        envs=[_env(m / "killed", "killed3"), _env(m / "moved", "moved1"), _env(m / "s3", "s3", KILLS, **cache)],
    )
    assert third[0].returncode == -signal.SIGKILL and Path(f"{m / 'killed'}.24").exists(), third[0].stderr[-3000:]
    assert third[1].returncode == 0, third[1].stderr[-3000:]
    assert third[2].returncode == 0, third[2].stderr[-3000:]
    try:
        _big_shards(shards, root / "big_shards")
        last = run_together(
            [_tiny(shards, killed), [*_tiny(shards, big, str(root / "big_shards")), *BIG]],
            root,
            envs=[_env(m / "killed", "killed4"), _env(m / "big", "big", KILLS)],
        )
    finally:
        shutil.rmtree(root / "big_shards")
    assert last[0].returncode == 0, last[0].stderr[-3000:]
    assert last[1].returncode == 0, last[1].stderr[-3000:]
    return {"one": tiny_run, "two": two, "killed": killed, "moved": moved, "s3": on_s3, "big": big}


def test_tiny_gpt_trains_with_exact_validation_loss_perplexity_tokens_and_flops(tiny_run):
    m = read_metrics(tiny_run)
    assert m["status"] == "completed" and m["iterations"] == 30
    first, final = m["epochs"][0], m["final"]
    assert final["token_loss"] < first["token_loss"] < math.log(60)  # learning, and better than uniform
    assert final["perplexity"] == pytest.approx(math.exp(final["token_loss"]))
    assert m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * 16)
    # (6 N + 12 L T d) x 12 x 16 with N ~ 2 x 12 x 32^2 + 60 x 32 (the tied output layer): 3.3e7
    assert 3.0e7 < m["model_flops_per_step"] < 3.6e7
    assert m["mfu"] is None  # on CPU only with logging.peak_tflops
    assert 0 <= m["data_wait_fraction"] <= 1 and m["peak_memory_bytes"]["0"] > 0
    summary = (tiny_run / "rank0.log").read_text()
    assert "tokens/s" in summary and "GFLOP/step" in summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/tokens_per_s")] == [15, 30]


def test_validation_loss_is_the_mean_over_every_validation_token(tiny_run, shards):
    """The recorded token_loss is the cross-entropy of the final model averaged over every
    target token of the val split's non-overlapping windows (recomputed here in one batch)."""
    from igniter.lm import causal_lm

    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    model = causal_lm(vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, activation="gelu")
    newest = checkpoint_files(tiny_run / "checkpoints")[0]
    model.load_state_dict(torch.load(newest, weights_only=True)["model"])
    model.eval()
    val = TokenShards(shards, "val", seq_len=16)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert read_metrics(tiny_run)["final"]["token_loss"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.slow
def test_two_processes_end_allclose_to_one_with_the_same_global_batches(runs):
    """``runner=spawn runner.nproc_per_node=2`` (global batch 12 as 2 x 6): every global batch
    holds the samples of the one-process run's, in the same order, and the run ends allclose
    to it (DDP averages the two halves' gradients: equal up to float summation order)."""
    from test_sharding import global_batches

    one, two = global_batches(runs["one"], "one"), global_batches(runs["two"], "two")
    assert sorted(one) == list(range(1, 31)) and one == two
    assert all(len(batch) == 12 for batch in two.values())
    a, b = _final(runs["one"]), _final(runs["two"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    m1, m2 = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert m2["final"]["token_loss"] == pytest.approx(m1["final"]["token_loss"], rel=1e-4)


@pytest.mark.slow
def test_three_sigkills_then_the_same_command_is_bit_identical(runs):
    """The same command SIGKILLed at iterations 13, 17 and 24 (each resumed from the newest
    checkpoint: 10, 15 (the end of epoch 1), 20; each kill waits for it to be on disk), then
    run to the end: every global batch after each resume is the
    uninterrupted run's, and the final weights and metrics equal it, bit for bit."""
    from test_fault_tolerance import assert_bit_identical
    from test_sharding import global_batches

    killed, reference = runs["killed"], global_batches(runs["one"], "one")
    assert (killed / "rank0.log").read_text().count("resumed from") == 3
    for tag, died in (("killed1", 13), ("killed2", 17), ("killed3", 24), ("killed4", None)):
        batches = global_batches(killed, tag)
        assert max(batches) == (died - 1 if died else 30), tag
        assert all(batches[i] == reference[i] for i in batches), f"{tag}: other samples or order"
    assert_bit_identical(_final(runs["one"]), _final(killed))
    assert read_metrics(killed)["final"] == read_metrics(runs["one"])["final"]
    assert read_metrics(killed)["status"] == "completed"


@pytest.mark.slow
def test_resumed_with_two_processes_after_one_and_back_continues_the_same_global_batches(runs):
    """One process killed at 13, resumed by 2 processes (killed at 17), resumed by one to the
    end: every global batch after each resume holds the uninterrupted run's samples in its
    order, and the run ends allclose to it."""
    from test_sharding import global_batches

    moved, reference = runs["moved"], global_batches(runs["one"], "one")
    log = (moved / "rank0.log").read_text()
    assert "world size changed: the checkpoint was written by 1 processes, this run has 2" in log
    assert "world size changed: the checkpoint was written by 2 processes, this run has 1" in log
    two, back = global_batches(moved, "moved2"), global_batches(moved, "moved1")
    assert min(two) <= 11 and max(two) == 16 and min(back) <= 16 and max(back) == 30, (sorted(two), sorted(back))
    assert all(len(two[i]) == 12 and two[i] == reference[i] for i in two), "2 processes: other samples or order"
    assert all(back[i] == reference[i] for i in back), "back to 1 process: other samples or order"
    a, b = _final(runs["one"]), _final(moved)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
def test_shards_from_s3_train_the_same_weights_and_a_damaged_one_is_named(runs, shards, tmp_path, monkeypatch):
    """The shard set served by a moto S3 server: the tiny run from ``s3://`` downloads each
    shard once into the cache (SHA-256 checked) and ends bit-identical to the run from local
    disk. The same set with one train shard damaged (same size, one bit flipped): the first
    sample read from it raises the error naming it (a run stops there with exit status 2,
    as for any sample that cannot be loaded: ``SampleFailed``)."""
    from test_fault_tolerance import assert_bit_identical

    from igniter.checkpoint.remote import open_store

    assert_bit_identical(_final(runs["one"]), _final(runs["s3"]))
    log = (runs["s3"] / "rank0.log").read_text().splitlines()
    names = sorted(line.split(f"{S3_URL}/")[1].split(" ")[0] for line in log if f"downloaded {S3_URL}/" in line)
    assert [n for n in names if n.endswith(".bin")] == sorted(p.name for p in shards.glob("*.bin")), names

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    data = bytearray((damaged / "train_000003.bin").read_bytes())
    data[100] ^= 1
    (damaged / "train_000003.bin").write_bytes(bytes(data))
    fs, _ = open_store(f"s3://{BUCKET}")
    fs.put([str(f) for f in sorted(damaged.iterdir())], f"{BUCKET}/lm/damaged/")
    monkeypatch.setenv("IGNITER_CACHE_DIR", str(tmp_path / "cache"))
    dataset = TokenShards(f"s3://{BUCKET}/lm/damaged", "train", seq_len=16)
    dataset[0]
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/lm/damaged/train_000003.bin has SHA-256"):
        dataset[3000 // 16]


@pytest.mark.slow
def test_a_token_set_of_1_gb_trains_memory_mapped_under_1_gb_of_resident_memory(runs):
    """1 GiB of uint16 tokens (:func:`_big_shards`; SHA-256 checked when the run builds its
    dataset) trains 8 iterations over every offset (536 million windows, shuffled) with a
    peak resident set under 1 GB as the training process measures it (VmHWM), and with the
    same memory of its own (RssAnon) as the tiny run on 8 KB of text: what grows is mapped
    shard pages (RssFile: page cache)."""
    assert read_metrics(runs["big"])["iterations"] == 8
    memory = json.loads((runs["big"] / "memory_rank0.json").read_text())
    small = json.loads((runs["one"] / "memory_rank0.json").read_text())
    print({k: f"{v / 2**20:.0f} MiB" for k, v in memory.items()}, {k: f"{v / 2**20:.0f} MiB" for k, v in small.items()})
    assert memory["peak_rss"] < 1e9, memory
    assert memory["anon"] < small["anon"] + (64 << 20), (memory, small)


def test_a_run_on_a_damaged_shard_stops_with_a_config_error_naming_it(shards, tmp_path):
    """Building the run's dataset from a damaged shard is a ConfigError (exit status 2, one
    paragraph, nothing run) that names the file (in this process: a run's start-up costs seconds)."""
    from omegaconf import OmegaConf

    from igniter.build import build_dataset
    from igniter.errors import ConfigError

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    shard = damaged / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    cfg = OmegaConf.create(
        {
            "name": "token_shards",
            "split": "val",
            "root": str(damaged),
            "subset": None,
            "transforms": [],
            "params": {"seq_len": 16},
        }
    )
    with pytest.raises(ConfigError) as error:
        build_dataset(cfg, "data.val")
    assert error.value.exit_status == 2 and f"shard {shard} is damaged" in str(error.value)
    assert "data.val" in str(error.value)


def test_counted_flops_of_a_gpt_match_palm_and_of_an_mlp_exactly():
    """PaLM appendix B: 6 N + 12 L T d FLOPs per token (N: parameters without the position
    embeddings; the tied embedding is the output layer's matrix), within 5%; an MLP's count is
    exact: 6 B sum(in x out) less the input gradient the first layer does not compute."""
    from igniter.flops import count_flops
    from igniter.lm import causal_lm
    from igniter.models import MLP

    L, d, T, B, V = 2, 64, 32, 4, 100
    for attention in ("sdpa", "eager"):
        model = causal_lm(V, block_size=T, n_layer=L, n_head=2, n_embd=d, attn_implementation=attention)
        x = torch.randint(0, V, (B, T))
        _, flops = count_flops(lambda m=model, x=x: m(x).float().mean().backward())
        n = sum(p.numel() for p in model.parameters()) - T * d
        expected = (6 * n + 12 * L * T * d) * B * T
        assert abs(flops - expected) / expected < 0.05, (attention, flops, expected)

    mlp = MLP(64, (32,), 10)
    _, flops = count_flops(lambda: mlp(torch.randn(8, 64)).sum().backward())
    assert flops == 6 * 8 * (64 * 32 + 32 * 10) - 2 * 8 * 64 * 32


def test_flops_per_optimizer_step_do_not_change_with_accumulation():
    from ignite.engine import Engine

    from igniter.flops import FirstStepFlops
    from igniter.models import MLP
    from igniter.steps import supervised

    counts = []
    batch = (torch.randn(8, 64), torch.randint(0, 10, (8,)))
    for k in (1, 2, 4):
        model = MLP(64, (32,), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        counter = FirstStepFlops()
        step = counter.wrap(
            supervised(model, opt, torch.nn.functional.cross_entropy, torch.device("cpu"), accumulate_grad_batches=k)
        )
        step(Engine(lambda e, b: None), batch)
        counts.append(counter.flops)
    assert counts[0] == counts[1] == counts[2] > 0


def test_adamw_matrices_decays_matrices_only():
    from igniter.lm import causal_lm
    from igniter.solver import adamw_matrices

    model = causal_lm(50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    opt = adamw_matrices(model.parameters(), lr=1e-3, weight_decay=0.1, betas=[0.9, 0.99])
    decay, other = opt.param_groups
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.99)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_a_llama_is_built_from_the_same_keys():
    from igniter.lm import causal_lm

    model = causal_lm(50, block_size=8, n_layer=1, n_head=4, n_embd=16, arch="llama", n_kv_head=2)
    config = model.lm.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (1, 4, 2)
    assert (config.hidden_size, config.intermediate_size, config.max_position_embeddings) == (16, 64, 8)
    assert model(torch.randint(0, 50, (2, 8))).shape == (2, 8, 50)


def test_without_transformers_the_model_is_a_config_error_naming_the_extra(monkeypatch):
    from igniter.build import build_model
    from igniter.errors import ConfigError

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "causal_lm", "params": {"vocab_size": 65}})
    with pytest.raises(ConfigError, match=r"pip install 'igniter\[lm\]'"):
        build_model(cfg)
