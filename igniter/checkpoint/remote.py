"""Files behind URLs: fsspec URLs checked without contacting them, stores opened with a clear
error, and downloads cached locally with their SHA-256 checked (``model.weights``, resuming
from object storage).

Credentials and endpoints come from the environment the client library reads (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``),
never from the config: a URL carrying ``user:password@`` is a config error
(:func:`url_problems`), since the config is written to the run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from igniter.errors import ConfigError, Problem

logger = logging.getLogger("igniter")

__all__ = [
    "MANIFEST_SUFFIX",
    "DigestMismatch",
    "is_url",
    "url_problems",
    "storage_problems",
    "open_store",
    "storage_options",
    "one_line",
    "sha256_of",
    "cache_dir",
    "cached_copy",
    "discard_copy",
    "fetch",
    "resume_cache",
    "local_file",
    "fetched",
]

MANIFEST_SUFFIX = (
    ".manifest.json"  # beside an object igniter wrote: its size and SHA-256 (igniter.checkpoint.object_store)
)


class DigestMismatch(ConfigError):
    """A download whose SHA-256 is not the expected one (a damaged or replaced object): the
    one failure of :func:`fetch` after which an older checkpoint may be tried."""


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CREDENTIALS = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@")
_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
_CHUNK = 1 << 20  # bytes per read while hashing or copying
_WEB_TIMEOUT_S = 60  # an http(s) download whose socket stays silent this long fails


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return bool(_URL.match(str(path)))


def url_problems(key: str, url: Any) -> list[Problem]:
    """What is wrong with ``url`` as the value of config ``key`` without contacting it: an
    unknown scheme, a client package not installed (naming ``pip install 'igniter[s3]'``), or
    credentials in the URL. Empty for local paths and usable URLs."""
    if not is_url(url):
        return []
    text = str(url)
    if _CREDENTIALS.match(text):
        return [
            Problem(
                key,
                "credentials do not belong in the config (it is saved with the run): set them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)",
                "<redacted>",
            )
        ]
    import fsspec

    protocol = text.split("://", 1)[0]
    if protocol not in fsspec.available_protocols():
        return [
            Problem(
                key,
                f"unknown storage scheme {protocol!r}: expected a local path or one of s3://, gs://, https://, file://",
                text,
            )
        ]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = _EXTRAS.get(protocol, f"the fsspec implementation of {protocol}://")
        return [
            Problem(key, f"{protocol}:// needs {package}: pip install 'igniter[s3]' (or pip install {package})", text)
        ]
    return []


def storage_problems(cfg: Any) -> list[Problem]:
    """``checkpoint.dir``, ``resume`` and ``model.weights``/``weights_sha256`` checked without
    contacting any store (:func:`url_problems`; a local weights file must exist)."""
    directory, weights, digest = cfg.checkpoint.get("dir"), cfg.model.get("weights"), cfg.model.get("weights_sha256")
    problems = url_problems("checkpoint.dir", directory) + url_problems("resume", cfg.resume)
    if weights and not is_url(weights) and not os.path.isfile(os.path.expanduser(str(weights))):
        problems.append(Problem("model.weights", "file does not exist (expected a weights file or its URL)", weights))
    problems += url_problems("model.weights", weights)
    if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", str(digest)):
        problems.append(Problem("model.weights_sha256", "expected 64 hexadecimal digits (sha256sum's output)", digest))
    return problems


def storage_options(url: str) -> dict[str, Any]:
    """The client settings igniter uses for ``url`` (botocore's retries for S3), for fsspec
    users outside this module (DCP's ``FsspecWriter``/``FsspecReader``)."""
    return _storage_options(str(url).split("://", 1)[0])


def _storage_options(protocol: str, probe: bool = False) -> dict[str, Any]:
    """Client settings. ``probe`` (the check at start): one try, a 3 s connect timeout, so a
    store that is down is an error in seconds (s3fs x botocore retries took 19 s). Otherwise
    botocore's standard retry mode with 5 attempts: an upload during training rides out a blip."""
    if protocol not in ("s3", "s3a"):
        return {}
    if probe:
        return {"config_kwargs": {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1}}}
    return {
        "config_kwargs": {
            "connect_timeout": 10,
            "read_timeout": 120,
            "retries": {"max_attempts": 5, "mode": "standard"},
        }
    }


def open_store(url: str, key: str = "checkpoint.dir", create: bool = False) -> tuple[Any, str]:
    """``(filesystem, root path)`` for ``url``, checked to be reachable.

    Args:
        url: an fsspec URL (``s3://bucket/prefix``).
        key: the config key that named it (for the error).
        create: create the prefix when missing (on stores with directories).

    Raises:
        ConfigError: the package is missing, the endpoint cannot be reached, the bucket does
            not exist or access is denied (exit status 2, before training).
    """
    problems = url_problems(key, url)
    if problems:
        raise ConfigError(problems, "cannot use the store")
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        probe, root = fsspec.core.url_to_fs(url, **_storage_options(protocol, probe=True))
        root = root.rstrip("/")
        probe.retries = 1  # s3fs's own retries (5, with back-off) on top of botocore's
        if create and protocol in (
            "file",
            "local",
        ):  # object stores have no directories (and makedirs would create a bucket)
            probe.makedirs(root, exist_ok=True)
        if not protocol.startswith("http"):  # a web server lists nothing: a missing file is found on reading
            probe.ls(root, detail=False) if probe.exists(root) else probe.ls(root.split("/", 1)[0], detail=False)
        fs = fsspec.core.url_to_fs(url, **_storage_options(protocol))[0]
    except Exception as e:  # botocore/aiohttp/OS errors alike: the store cannot be used
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if protocol.startswith("s3") else ""
        where = f" (endpoint {endpoint} from AWS_ENDPOINT_URL)" if endpoint else ""
        raise ConfigError(
            [Problem(key, f"cannot reach {url}{where}: {type(e).__name__}: {one_line(e)}", url)], "cannot use the store"
        ) from None
    return fs, root


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def sha256_of(chunks: Iterator[bytes] | list[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$IGNITER_CACHE_DIR``, else ``$XDG_CACHE_HOME/igniter``
    (``~/.cache/igniter``)."""
    explicit = os.environ.get("IGNITER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "igniter"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(iter(lambda: f.read(_CHUNK), b""))[0]


def _expected_sha256(fs: Any, path: str) -> str | None:
    """The SHA-256 a manifest beside ``path`` gives for it, if there is one."""
    try:
        manifest = json.loads(fs.cat(path + MANIFEST_SUFFIX))
        return manifest["objects"][Path(path).name]["sha256"]
    except Exception:
        return None


def resume_cache() -> Path:
    """Where a checkpoint being resumed from object storage is downloaded: one copy per host
    (:func:`cache_dir` ``/resume/<host name>``: a cache directory on a shared file system
    still gets one copy per host), read by every rank of that host, then deleted."""
    return cache_dir() / "resume" / socket.gethostname()


def cached_copy(url: str, into: Path | None = None) -> Path:
    """Where :func:`fetch` keeps its copy of ``url`` under ``into`` (default: the downloads cache)."""
    folder = into if into is not None else cache_dir() / "downloads"
    return folder / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{url.rstrip('/').rsplit('/', 1)[-1]}"


def _is_web(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


def _web_expected_sha256(url: str) -> str | None:
    """:func:`_expected_sha256` for a web URL: the manifest beside it, if the server has one."""
    try:
        with urllib.request.urlopen(url + MANIFEST_SUFFIX, timeout=_WEB_TIMEOUT_S) as f:
            return json.loads(f.read())["objects"][Path(urllib.parse.urlsplit(url).path).name]["sha256"]
    except Exception:
        return None


def discard_copy(url: str, into: Path | None = None) -> None:
    """Remove :func:`fetch`'s copy of ``url`` under ``into`` and the digest recorded beside it."""
    target = cached_copy(url, into)
    for path in (target, target.with_name(target.name + ".sha256")):
        path.unlink(missing_ok=True)


def fetch(
    url: str, key: str, sha256: str | None = None, cached: bool = True, into: Path | None = None, reuse: bool = True
) -> Path:
    """A local copy of ``url``, its SHA-256 checked.

    The expected digest is ``sha256`` when given, else the one in a manifest beside the object
    (igniter's checkpoints); the digest of a download is recorded beside the cached file and
    checked again each time the cache is used (a damaged cache file is downloaded again).
    ``http(s)://`` URLs are read with the standard library (``urllib``; a socket that stays
    silent for 60 s is an error), every other scheme through fsspec (:func:`open_store`).
    With ``cached``, the copy is kept under ``into`` (default :func:`cache_dir` ``/downloads``),
    named after the URL, and reused while its recorded digest holds (``reuse=False``: always
    downloaded again); without, it is a temporary file the caller deletes. Each download is
    logged (``downloaded <url> (<bytes> bytes)``).

    Args:
        url: an fsspec URL (``s3://``, ``https://``, ...).
        key: the config key that named it (for errors).
        sha256: the expected hex digest, or ``None``.

    Raises:
        DigestMismatch: its digest is not the expected one (the download is removed).
        ConfigError: the object cannot be read (the partial download is removed).
    """
    if _is_web(url):  # the standard library reads http(s): no fsspec client (aiohttp) to install
        if _CREDENTIALS.match(url):
            raise ConfigError(url_problems(key, url), "cannot use the download")
        path = urllib.parse.urlsplit(url).path

        def source() -> BinaryIO:
            return urllib.request.urlopen(url, timeout=_WEB_TIMEOUT_S)

        expected = (sha256 or _web_expected_sha256(url) or "").lower() or None
    else:
        fs, path = open_store(url, key)

        def source() -> BinaryIO:
            return fs.open(path, "rb")

        expected = (sha256 or _expected_sha256(fs, path) or "").lower() or None
    if cached:
        target = cached_copy(url, into)
        record = target.with_name(target.name + ".sha256")
        if reuse and target.is_file() and record.is_file():
            recorded = record.read_text().strip()
            if recorded == _file_sha256(target) and expected in (None, recorded):
                return target
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent if cached else None, prefix=".download-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source() as src:
            digest = _copy(src, out)
        logger.info("downloaded %s (%d bytes)", url, os.path.getsize(tmp))
        if expected is not None and digest != expected:
            raise DigestMismatch(
                [
                    Problem(
                        key,
                        f"{url} has SHA-256 {digest}, expected {expected}: the object changed or the download is damaged",
                        url,
                    )
                ],
                "cannot use the download",
            )
        if not cached:
            return Path(tmp)
        os.replace(tmp, target)
        record.write_text(digest + "\n")
        return target
    except ConfigError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(
            [Problem(key, f"cannot read {url}: {type(e).__name__}: {one_line(e)}", url)], "cannot use the download"
        ) from None


def _copy(src: BinaryIO, out: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def local_file(source: str | Path, key: str, sha256: str | None = None) -> Path:
    """``source`` as a local path: a URL downloaded once into the cache (:func:`fetch`), a
    local path with ``~`` expanded (not checked)."""
    return fetch(str(source), key, sha256) if is_url(source) else Path(str(source)).expanduser()


@contextmanager
def fetched(url: str, key: str, sha256: str | None = None) -> Iterator[Path]:
    """A temporary local copy of ``url`` (see :func:`fetch`), deleted on leaving."""
    path = fetch(url, key, sha256, cached=False)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
