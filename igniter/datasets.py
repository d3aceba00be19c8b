"""Built-in datasets: ``digits`` (bundled with scikit-learn) and ``mnist`` (IDX files).

Both return ``(x, y)`` pairs: ``x`` a float32 tensor, ``y`` an int64 scalar
tensor, and apply an optional per-sample ``transform`` to ``x``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from igniter.checkpoint.remote import fetch
from igniter.errors import ConfigError, Problem
from igniter.registry import dataset_registry

__all__ = [
    "TensorPairDataset",
    "digits",
    "mnist",
    "download_mnist",
    "read_idx",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "MNIST_SHA256",
]

Transform = Optional[Callable[[torch.Tensor], torch.Tensor]]


class TensorPairDataset(Dataset):
    """In-memory ``(x[i], y[i])`` pairs with a per-sample transform on ``x``.

    Args:
        x: inputs, shape ``[N, ...]``, float32.
        y: labels, shape ``[N]``, int64.
        transform: applied to each ``x[i]`` on access.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Transform = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[index]
        return (self.transform(x) if self.transform else x), self.y[index]


@dataset_registry("digits")
def digits(
    split: str = "train", val_fraction: float = 0.2, split_seed: int = 0, transform: Transform = None
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 samples; UCI optdigits test set).

    Returns ``x`` of shape ``[64]`` scaled to ``[0, 1]`` (pixel / 16) and ``y`` in 0-9.
    The split is a fixed permutation drawn with ``split_seed``: ``val`` holds
    ``round(1797 * val_fraction)`` samples (359 by default), ``train`` the rest.

    Raises:
        ValueError: ``split`` is not ``train`` or ``val``.
        ImportError: scikit-learn is not installed (``pip install igniter[examples]``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"digits: split must be 'train' or 'val', got '{split}'")
    x, y = _digits_arrays()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_val = round(len(y) * val_fraction)
    index = order[:n_val] if split == "val" else order[n_val:]
    return TensorPairDataset(x[index], y[index], transform)


def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as ``x [1797, 64]`` in [0, 1] and ``y [1797]``.

    Reads the CSV that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``:
    64 pixel values 0-16 and the label per row) without importing scikit-learn,
    which costs about a second of start-up; falls back to ``load_digits``.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'igniter[examples]'")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = data[:, :-1], data[:, -1]
    else:  # pragma: no cover - a scikit-learn that moved its data file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data.astype(np.float32), bunch.target
    return torch.from_numpy(pixels / 16.0), torch.from_numpy(labels.astype(np.int64))


#: IDX file stems per split, as torchvision names them.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Where ``mnist(download=True)`` looks, in order: torchvision's mirrors (``<mirror><stem>.gz``).
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: The SHA-256 of each gzipped IDX file (the files torchvision's mirrors serve, whose MD5s torchvision lists).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b09d8b89df4ad239afc76a323dbe9559169cd8cca365467dfe8aa1f7ca54109b",
    "train-labels-idx1-ubyte.gz": "c51906e7929bbf7c824fbd16019b56297269ca82cba449c5b5d59c0a02147fed",
    "t10k-images-idx3-ubyte.gz": "f72c2dff3457595ec2fe452d25d97b7f974a74ad5b006687704212bedd1486d8",
    "t10k-labels-idx1-ubyte.gz": "4baf84ddd60ae342cfdd282ec3fba3249a201a4459782165496a7cbebbe49a2e",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a uint8 array.

    Format (LeCun et al., the MNIST database): big-endian magic ``0x00000803``
    (images, 3 dims) or ``0x00000801`` (labels, 1 dim), one uint32 per
    dimension, then the raw bytes.

    Raises:
        ValueError: the header is not a uint8 IDX header, the payload is short, or the
            gzip stream is truncated or corrupt (the message names the file).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: damaged gzip file ({e}); download it again") from None
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not a uint8 IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, found {payload.size}"
        )
    return payload.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def mnist_candidates(root: str | Path, split: str) -> list[Path]:
    """Every path :func:`mnist` looks at for ``split``, for error messages."""
    root = Path(root)
    return [
        folder / name
        for stem in MNIST_FILES[split]
        for folder in (root / "MNIST" / "raw", root / "raw", root)
        for name in (stem, stem + ".gz")
    ]


def download_mnist(root: str | Path, mirrors: Sequence[str] = MNIST_MIRRORS) -> None:
    """Download the gzipped IDX files (both splits, as torchvision does) missing under ``root`` into
    ``root/MNIST/raw/``, each from the first of ``mirrors`` that serves it with its SHA-256
    (:data:`MNIST_SHA256`), through :func:`igniter.checkpoint.remote.fetch`.

    Raises:
        ConfigError: (key ``data.download``) no mirror served a file with the right SHA-256, or
            ``root`` cannot be written; the reason of every mirror. Nothing is left behind: the
            files this call downloaded and the directories it created are removed.
    """
    raw = Path(root) / "MNIST" / "raw"
    created = [d for d in (raw, raw.parent, Path(root)) if not d.exists()]
    written: list[Path] = []
    try:
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError([Problem("data.download", f"cannot create {raw}: {e}", True)], "cannot download MNIST")
        for stem in (stem for stems in MNIST_FILES.values() for stem in stems):
            if _find_idx(Path(root), stem) is not None:
                continue
            name = stem + ".gz"
            reasons = []
            for mirror in mirrors:
                url = mirror if mirror.endswith(name) else mirror.rstrip("/") + "/" + name
                try:
                    tmp = fetch(url, "data.download", MNIST_SHA256[name], cached=False)
                except ConfigError as e:
                    reasons.append("; ".join(p.expected for p in e.problems))
                    continue
                part = raw / f".{name}.part"
                shutil.move(tmp, part)  # the temporary file may be on another file system
                os.replace(part, raw / name)
                written.append(raw / name)
                break
            else:
                raise ConfigError(
                    [Problem("data.download", f"no mirror served {name}: " + " | ".join(reasons), list(mirrors))],
                    "cannot download MNIST",
                )
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for d in created:  # innermost first; only if still empty
            try:
                d.rmdir()
            except OSError:
                pass
        raise


@dataset_registry("mnist")
def mnist(
    root: str,
    split: str = "train",
    transform: Transform = None,
    download: bool = False,
    mirrors: Sequence[str] = MNIST_MIRRORS,
) -> Dataset:
    """MNIST read from IDX files, without torchvision.

    Looks for torchvision's layout ``root/MNIST/raw/<stem>[.gz]`` (also
    ``root/raw`` and ``root`` itself). Returns ``x`` of shape ``[1, 28, 28]``
    scaled to ``[0, 1]`` and ``y`` in 0-9; ``train`` has 60,000 samples,
    ``test`` 10,000. With ``download``, missing files are first fetched from
    ``mirrors`` (:func:`download_mnist`).

    Raises:
        ValueError: unknown ``split``.
        FileNotFoundError: a file is missing; the message lists every path tried.
        ConfigError: ``download`` and no mirror served a file with its SHA-256.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"mnist: split must be one of {sorted(MNIST_FILES)}, got '{split}'")
    paths = [_find_idx(Path(root), stem) for stem in MNIST_FILES[split]]
    if None in paths and download:
        download_mnist(root, [mirrors] if isinstance(mirrors, str) else list(mirrors))
        paths = [_find_idx(Path(root), stem) for stem in MNIST_FILES[split]]
    if None in paths:
        tried = "\n  ".join(str(p) for p in mnist_candidates(root, split))
        raise FileNotFoundError(
            f"mnist: {split} IDX files not found under '{root}' (data.download=true fetches them). Looked for:\n  {tried}"
        )
    images, labels = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorPairDataset(x, y, transform)
