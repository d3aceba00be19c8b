"""Token shards: flat token arrays on disk, memory-mapped, and the built-in ``token_shards`` dataset.

A token-shard directory (written by ``igniter prepare-text``, :mod:`igniter.prepare_text`) holds,
per split (``train``, ``val``), one or more shards ``<split>_<index:06d>.bin``: the tokens of that
split in order, a flat little-endian ``uint16`` (vocabulary <= 65,536) or ``uint32`` array with no
header, and ``meta.json``::

    {"format": "igniter.token_shards/1",
     "dtype": "uint16", "vocab_size": 65,
     "tokenizer": {"kind": "char", "chars": [...]} | {"kind": "bpe", "file": "tokenizer.json", "sha256": ...},
     "source": {"files": [{"path", "bytes", "sha256"}], "val_fraction": 0.1},
     "splits": {"train": {"tokens": N, "shards": [{"file", "tokens", "sha256"}]}, "val": {...}}}

The shards of a split are one stream: a window may cross a shard boundary. Nothing is loaded
whole: every shard is opened with ``numpy.memmap`` and a sample reads ``seq_len + 1`` tokens.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from igniter.atomic_files import atomic_write
from igniter.checkpoint.remote import DigestMismatch, cached_copy, fetch, fetched, is_url, open_store
from igniter.errors import ConfigError
from igniter.registry import dataset_registry

__all__ = [
    "FORMAT",
    "META_FILE",
    "ShardError",
    "token_dtype",
    "file_sha256",
    "write_split",
    "write_meta",
    "read_meta",
    "TokenShards",
    "token_shards",
    "tokens_per_sample",
]

#: ``meta.json``'s ``format``: the layout this module reads and writes.
FORMAT = "igniter.token_shards/1"
#: The metadata file of a token-shard directory.
META_FILE = "meta.json"
_CHUNK = 1 << 20


class ShardError(ValueError):
    """A token-shard directory that cannot be read: no or bad ``meta.json``, a missing shard,
    or a shard whose size or SHA-256 is not the one ``meta.json`` records (the message names
    the file). Raised while the dataset is built, so a run stops before training (exit 2)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for a vocabulary of at most 65,536 tokens, else ``uint32`` (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_split(directory: Path, split: str, tokens: np.ndarray, dtype: np.dtype, shard_tokens: int) -> dict[str, Any]:
    """Write ``tokens`` (a 1-D integer array) as shards of at most ``shard_tokens`` tokens.

    Each shard is written atomically (:func:`igniter.atomic_files.atomic_write`) and named
    ``<split>_<index:06d>.bin``. Returns the split's ``meta.json`` entry:
    ``{"tokens": N, "shards": [{"file", "tokens", "sha256"}]}``.
    """
    entry: dict[str, Any] = {"tokens": int(len(tokens)), "shards": []}
    for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        part = np.ascontiguousarray(tokens[start : start + shard_tokens], dtype=dtype)
        name = f"{split}_{index:06d}.bin"
        data = part.tobytes()
        atomic_write(directory / name, lambda f, data=data: f.write(data))
        entry["shards"].append({"file": name, "tokens": int(len(part)), "sha256": hashlib.sha256(data).hexdigest()})
    return entry


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (sorted keys, 2-space indent: the same metadata, the same bytes)."""
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / META_FILE, lambda f: f.write(text), binary=False)


def read_meta(root: str | Path, path: Path | None = None) -> dict[str, Any]:
    """``<root>/meta.json`` (or the file ``path`` holding it) as a dict.

    Raises:
        ShardError: the file is missing, not JSON, or not of :data:`FORMAT`.
    """
    path = path or Path(root) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(
            f"{path} not found: '{root}' is not a token-shard directory (make one with `igniter prepare-text`)"
        )
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} cannot be read ({e}): prepare the shards again (`igniter prepare-text`)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError(
            f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected '{FORMAT}'"
        )
    return meta


class TokenShards(Dataset):
    """Windows of a token stream stored as memory-mapped shards (a map-style dataset).

    Sample ``i`` is the ``seq_len + 1`` tokens starting at token ``i * stride`` of the split,
    returned as ``(input [seq_len], target [seq_len])`` int64 tensors, ``target`` being
    ``input`` shifted by one token (next-token prediction). There are
    ``(N - seq_len - 1) // stride + 1`` samples for ``N`` tokens.

    ``stride=1`` (every offset) is nanoGPT's training distribution: nanoGPT draws random
    offsets; every offset in an order the sampler shuffles is that draw without replacement,
    and map-style keeps ``ShardedSampler``'s world-size-invariant batches and exact resume.
    ``stride=seq_len`` (non-overlapping, the default) predicts every token of the split once
    (but the first), in contexts of 1 to ``seq_len`` tokens like a random window's: the
    exact validation loss that nanoGPT estimates from 200 random batches.

    Args:
        root: the token-shard directory (``meta.json`` and the shards), or an fsspec URL of one
            (``s3://bucket/shards``): its ``meta.json`` is read and the shards' sizes listed when
            the dataset is built; a shard is downloaded when a sample first reads it, into the
            download cache (:func:`igniter.checkpoint.remote.fetch`: kept, SHA-256 checked
            against ``meta.json``, downloaded again when the cached copy is not intact; one
            process per host downloads, the others wait for its copy), and the next shard is
            downloaded in a background thread meanwhile (read-ahead: a pass in order does not
            wait for downloads). ``paths`` are the cached copies' paths.
        split: a split of ``meta.json`` (``train``, ``val``).
        seq_len: tokens per input, e.g. the model's block size.
        stride: tokens between the starts of consecutive windows; ``None``: ``seq_len``.
        verify: check every shard's SHA-256 against ``meta.json`` when the dataset is built
            (about 1 s per GB); sizes are always checked.

    Raises:
        ShardError: a bad directory, an unknown split, a missing or damaged shard (named), or a
            split shorter than one window; behind a URL, a shard whose download is damaged
            raises it from the first sample that reads it.
        ValueError: ``seq_len`` or ``stride`` below 1.
    """

    def __init__(
        self, root: str | Path, split: str = "train", seq_len: int = 64, stride: int | None = None, verify: bool = True
    ) -> None:
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise ValueError(f"token_shards: seq_len and stride must be >= 1, got {seq_len}, {stride}")
        self.root, self.split, self.seq_len, self.stride = root, split, int(seq_len), int(stride)
        remote = is_url(root)
        base = str(root).rstrip("/")
        if remote:
            with _store_errors(), fetched(f"{base}/{META_FILE}", f"token_shards root {base}") as path:
                meta = read_meta(root, path)
        else:
            meta = read_meta(root)
        splits = meta.get("splits", {})
        if split not in splits:
            raise ShardError(
                f"token_shards: {base}/{META_FILE} has no split '{split}' (has: {', '.join(sorted(splits))})"
            )
        self.meta = meta
        self.vocab_size = int(meta["vocab_size"])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.shards = splits[split]["shards"]
        self.urls: list[str] | None = [f"{base}/{s['file']}" for s in self.shards] if remote else None
        if self.urls is not None:  # downloaded on first use (_shard); sizes checked now
            self.paths = [cached_copy(url) for url in self.urls]
            _check_remote_sizes(base, self.shards, self.dtype)
        else:
            self.paths = [Path(root) / shard["file"] for shard in self.shards]
            for path, shard in zip(self.paths, self.shards):
                _check_shard(path, shard, self.dtype, verify)
        self.starts = np.cumsum([0] + [int(s["tokens"]) for s in self.shards])
        self.total = int(self.starts[-1])
        if self.total < self.seq_len + 1:
            raise ShardError(
                f"token_shards: split '{split}' of {self.root} has {self.total} tokens, fewer than one window of "
                f"seq_len + 1 = {self.seq_len + 1}"
            )
        self._maps: list[np.memmap | None] | None = None  # opened on first use, in the process that reads
        self._downloads: dict[int, Future] = {}  # shard -> its download (URLs), in this process
        self._lock: threading.Lock | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    @property
    def tokens_per_sample(self) -> int:
        """Tokens a sample trains on (its targets): ``seq_len``."""
        return self.seq_len

    def __len__(self) -> int:
        return (self.total - self.seq_len - 1) // self.stride + 1

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker maps (and downloads) the files itself
        return {**self.__dict__, "_maps": None, "_downloads": {}, "_lock": None, "_pool": None}

    def _shard(self, k: int) -> np.memmap:
        """Shard ``k`` memory-mapped: behind a URL, downloaded first (or its read-ahead waited
        for), and shard ``k + 1``'s download started in the background."""
        if self._maps is None:
            self._maps = [None] * len(self.shards)
        tokens = self._maps[k]
        if tokens is None:
            if self.urls is not None:
                self._download(k).result()  # a damaged shard's ShardError is raised here
            tokens = np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(int(self.shards[k]["tokens"]),))
            self._maps[k] = tokens
            if self.urls is not None and k + 1 < len(self.shards):
                self._download(k + 1)  # read-ahead: not waited for
        return tokens

    def _download(self, k: int) -> Future:
        """Shard ``k``'s download in this process (started once, in a background thread)."""
        if self._lock is None or self._pid != os.getpid():  # none yet, or a forked copy's (no threads)
            self._lock, self._pool, self._downloads, self._pid = threading.Lock(), None, {}, os.getpid()
        with self._lock:
            if k not in self._downloads:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="token-shards")
                self._downloads[k] = self._pool.submit(_fetch_shard, self.urls[k], self.shards[k], self.dtype)
            return self._downloads[k]

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split (across shards), as an int64 array."""
        out, pos = [], start
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < start + length:
            lo = pos - int(self.starts[shard])
            hi = min(int(self.starts[shard + 1]), start + length) - int(self.starts[shard])
            out.append(self._shard(shard)[lo:hi])
            pos += hi - lo
            shard += 1
        return np.concatenate(out).astype(np.int64) if len(out) > 1 else out[0].astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"token_shards: index {index} out of range for {len(self)} windows")
        tokens = torch.from_numpy(self.window(index * self.stride, self.seq_len + 1))
        return tokens[:-1], tokens[1:]


@contextmanager
def _store_errors() -> Iterator[None]:
    """A download's :class:`~igniter.errors.ConfigError` (unreadable store, damaged object) as a :class:`ShardError`."""
    try:
        yield
    except ConfigError as e:
        raise ShardError("token_shards: " + "; ".join(str(p) for p in e.problems)) from None


def _check_remote_sizes(base: str, shards: list[dict[str, Any]], dtype: np.dtype) -> None:
    """Every shard listed under ``base`` with the size ``meta.json`` gives it (one listing; a web
    server lists nothing: its shards are checked when downloaded)."""
    if base.split("://", 1)[0].lower() in ("http", "https"):
        return
    with _store_errors():
        fs, root = open_store(base, f"token_shards root {base}")
    try:
        sizes = {Path(str(e["name"])).name: int(e["size"]) for e in fs.ls(root, detail=True)}
    except Exception as e:  # noqa: BLE001  (any client error: the store cannot be listed)
        raise ShardError(f"token_shards: cannot list {base}: {type(e).__name__}: {e}") from None
    for shard in shards:
        url, expected = f"{base}/{shard['file']}", int(shard["tokens"]) * dtype.itemsize
        if shard["file"] not in sizes:
            raise ShardError(f"token_shards: shard {url} is missing; prepare the shards again (`igniter prepare-text`)")
        if sizes[shard["file"]] != expected:
            raise ShardError(
                f"token_shards: shard {url} is damaged: {sizes[shard['file']]} bytes, meta.json says {expected} "
                f"({shard['tokens']} tokens of {dtype.name}); prepare the shards again (`igniter prepare-text`)"
            )


def _fetch_shard(url: str, shard: dict[str, Any], dtype: np.dtype) -> Path:
    """Download ``url`` into the cache (SHA-256 checked by :func:`fetch`), once per host: the
    processes of a host take a lock beside the cached copy, and those that waited reuse it."""
    target = cached_copy(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = fetch(url, "token_shards", shard["sha256"])
        except ConfigError as e:  # its problems name the URL
            advice = "; upload the shards again" if isinstance(e, DigestMismatch) else ""
            raise ShardError("token_shards: " + "; ".join(p.expected for p in e.problems) + advice) from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _check_shard(path, shard, dtype, False)
    return path


def _check_shard(path: Path, shard: dict[str, Any], dtype: np.dtype, verify: bool) -> None:
    expected = int(shard["tokens"]) * dtype.itemsize
    if not path.is_file():
        raise ShardError(f"token_shards: shard {path} is missing; prepare the shards again (`igniter prepare-text`)")
    size = path.stat().st_size
    if size != expected:
        raise ShardError(
            f"token_shards: shard {path} is damaged: {size} bytes, meta.json says {expected} "
            f"({shard['tokens']} tokens of {dtype.name}); prepare the shards again (`igniter prepare-text`)"
        )
    if verify and file_sha256(path) != shard["sha256"]:
        raise ShardError(
            f"token_shards: shard {path} is damaged: its SHA-256 is not the one meta.json records "
            f"({shard['sha256']}); prepare the shards again (`igniter prepare-text`)"
        )


@dataset_registry("token_shards")
def token_shards(
    root: str, split: str = "train", seq_len: int = 64, stride: int | None = None, verify: bool = True
) -> TokenShards:
    """Windows of ``seq_len + 1`` tokens from a token-shard directory (:class:`TokenShards`):
    ``(input [seq_len], target [seq_len])`` int64 tensors, ``stride`` tokens apart
    (``None``: ``seq_len``, non-overlapping).

    Raises:
        ShardError: a bad directory or a missing or damaged shard (the message names it).
    """
    return TokenShards(root, split, seq_len, stride, verify)


def tokens_per_sample(dataset: Any) -> int | None:
    """Tokens each sample of ``dataset`` trains on (``dataset.tokens_per_sample``, looking
    through ``Subset``-like wrappers' ``.dataset``), ``None`` for a dataset that is not tokens."""
    for _ in range(8):
        value = getattr(dataset, "tokens_per_sample", None)
        if isinstance(value, int):
            return value
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None
