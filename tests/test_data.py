"""Datasets, transforms and the sharded sampler."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch
from conftest import read_metrics, run_igniter

from igniter.datasets import digits, mnist, read_idx
from igniter.parallel.sampler import ShardedSampler
from igniter.transforms import normalize, random_shift


def test_digits_split_is_fixed_and_disjoint():
    train, val = digits("train"), digits("val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    x, y = train[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    assert torch.equal(digits("train").x, train.x)  # same split every time
    train_rows = {tuple(r.tolist()) for r in train.x}
    assert sum(tuple(r.tolist()) in train_rows for r in val.x) < 5  # (digits has a few duplicate images)


def test_mnist_reads_idx_in_torchvision_layout(mnist_root):
    test = mnist(str(mnist_root), "test")
    assert len(test) == 10_000
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y) == 7  # the first MNIST test image is a 7
    counts = torch.bincount(mnist(str(mnist_root), "train").y, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_uncompressed_and_missing_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8).numpy()
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, 3, 28, 28) + images.tobytes())
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 2, 3]))
    ds = mnist(str(tmp_path), "test")
    assert len(ds) == 3 and torch.equal(ds.y, torch.tensor([1, 2, 3]))
    assert torch.allclose(ds[0][0][0], torch.from_numpy(images[0]).float() / 255)
    with pytest.raises(FileNotFoundError) as info:
        mnist(str(tmp_path), "train")
    assert "train-images-idx3-ubyte.gz" in str(info.value) and str(raw) in str(info.value)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(struct.pack(">HBBI", 0, 8, 1, 10) + bytes(5))
    with pytest.raises(ValueError, match="expected 10 bytes"):
        read_idx(path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_read_idx_names_a_damaged_gzip_file(damage, tmp_path):
    blob = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 1000) + bytes(range(250)) * 4)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(
        blob[: len(blob) // 2] if damage == "truncated" else blob[:10] + b"\xff" * (len(blob) - 18) + blob[-8:]
    )
    with pytest.raises(ValueError, match="damaged gzip file") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_transforms():
    x = torch.full((1, 4, 4), 0.5)
    assert torch.allclose(normalize([0.5], [0.25])(x), torch.zeros_like(x))
    shifted = random_shift(2)(torch.ones(1, 6, 6))
    assert shifted.shape == (1, 6, 6) and 16 <= int(shifted.sum()) <= 36


@pytest.mark.parametrize("permutation", ["randperm", "feistel"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharded_sampler_global_batches_do_not_depend_on_world_size(world_size, permutation, monkeypatch):
    """With torch.randperm and (above RANDPERM_MAX samples, lowered here) the Feistel permutation."""
    if permutation == "feistel":
        monkeypatch.setattr("igniter.parallel.sampler.RANDPERM_MAX", 50)
    n, global_batch = 103, 8
    data = list(range(n))
    reference = list(ShardedSampler(data, 1, 0, global_batch, shuffle=True, seed=3))
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            s = ShardedSampler(data, world_size, rank, global_batch, shuffle=True, seed=3)
            s.set_epoch(epoch)
            per_rank.append(list(s))
        single = ShardedSampler(data, 1, 0, global_batch, shuffle=True, seed=3)
        single.set_epoch(epoch)
        single = list(single)
        b = global_batch // world_size
        steps = len(single) // global_batch
        assert steps == n // global_batch and all(len(r) == steps * b for r in per_rank)
        for t in range(steps):
            union = sorted(i for r in per_rank for i in r[t * b : (t + 1) * b])
            assert union == sorted(single[t * global_batch : (t + 1) * global_batch])
    s = ShardedSampler(data, 1, 0, global_batch, shuffle=True, seed=3)
    s.set_epoch(1)
    assert list(s) != reference  # reshuffled every epoch


def test_feistel_permutation_is_a_permutation_and_shuffles():
    from igniter.parallel.sampler import feistel_permutation

    for n in (1, 2, 3, 17, 1024, 1025, 10_007):
        out = feistel_permutation(n, torch.Generator().manual_seed(n))(torch.arange(n))
        assert sorted(out.tolist()) == list(range(n)), n
    a = feistel_permutation(10_007, torch.Generator().manual_seed(1))(torch.arange(10_007))
    b = feistel_permutation(10_007, torch.Generator().manual_seed(2))(torch.arange(10_007))
    assert (a != b).float().mean() > 0.99  # another seed, another order
    assert abs(float(torch.corrcoef(torch.stack([torch.arange(10_007.0), a.double()]))[0, 1])) < 0.05


def test_a_sampler_over_half_a_billion_samples_costs_no_memory_per_sample():
    """536 million windows (every offset of 1 GB of uint16 tokens): the first batches come at
    once and the process grows by a few MB (torch.randperm would hold 4.3 GB, its list 60 GB)."""
    import resource

    class Windows:
        def __len__(self) -> int:
            return 536_000_000

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = ShardedSampler(Windows(), 2, 1, 12, shuffle=True, seed=0, with_epoch=True)
    first = [i for _, (_, i) in zip(range(1000), sampler)]
    assert len(set(first)) == 1000 and all(0 <= i < 536_000_000 for i in first)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 64 << 20


def test_lazy_reproducible_batches_skip_as_ignites_list_does():
    from ignite.engine.deterministic import ReproducibleBatchSampler
    from torch.utils.data import BatchSampler

    from igniter.loading import LazyReproducibleBatchSampler

    def batches(cls, start):
        sampler = cls(BatchSampler(ShardedSampler(list(range(50)), 1, 0, 4, seed=1), 4, drop_last=False))
        sampler.start_iteration = start
        iter(sampler)  # a DataLoader with workers calls iter() twice and draws from the second
        return list(iter(sampler))

    for start in (None, 0, 5, 12):
        assert batches(LazyReproducibleBatchSampler, start) == batches(ReproducibleBatchSampler, start)


def test_sharded_sampler_eval_counts_every_sample_once():
    data = list(range(11))
    shards = [list(ShardedSampler(data, 3, r, 3, shuffle=False, tail="none")) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data


def test_a_padded_evaluation_shard_ends_with_its_padding_and_the_step_drops_it():
    """``tail="pad"`` gives every rank of 3 the same 4 positions over 10 samples; the padding
    (position 10, 11: sample 0 and 1 again) is the last sample of ranks 1 and 2, and
    ``without_padding`` cuts it from the outputs: a batch of padding only gives None."""
    from types import SimpleNamespace

    from igniter.steps import without_padding

    data = list(range(10))
    samplers = [ShardedSampler(data, 3, r, 3, shuffle=False, tail="pad") for r in range(3)]
    assert [list(s) for s in samplers] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert [(len(s), s.real_samples) for s in samplers] == [(4, 4), (4, 3), (4, 3)]

    def step(engine, batch):
        return {"logits": batch * 10, "y": batch, "total": batch.sum()}

    masked = without_padding(step, real_samples=3, batch_size=3)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=1))
    assert masked(engine, torch.tensor([1, 4, 7]))["y"].tolist() == [1, 4, 7]
    engine.state.iteration = 2
    assert masked(engine, torch.tensor([0])) is None
    masked = without_padding(step, real_samples=3, batch_size=2)  # a last batch of [real, padding]
    out = masked(engine, torch.tensor([7, 1]))
    assert out["y"].tolist() == [7] and out["logits"].tolist() == [70]
    assert out["total"].item() == 8  # not per sample (no first dimension): left as it is


def test_mnist_subset_trains_lenet(tmp_path, mnist_root):
    args = [
        "experiment=mnist",
        f"data.root={mnist_root}",
        "data.train.subset=6000",
        "data.val.subset=2000",
        "trainer.max_epochs=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["final"]["accuracy"] > 0.9, metrics["final"]


def test_mnist_tests_find_their_data_where_the_environment_says(tmp_path):
    """IGNITER_TEST_MNIST_ROOT points the MNIST tests at another data directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = "import conftest; print(conftest.MNIST_ROOT)"
    env = {**os.environ, "IGNITER_TEST_MNIST_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path.resolve())
