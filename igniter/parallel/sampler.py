"""Data sharding whose global batches do not depend on the world size."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ShardedSampler", "RANDPERM_MAX", "feistel_permutation"]

#: Datasets of up to this many samples are permuted by ``torch.randperm`` (8 bytes per sample);
#: larger ones (a token set read at every offset) by :func:`feistel_permutation` (no memory per sample).
RANDPERM_MAX = 1 << 24
_CHUNK = 1 << 14  # positions turned into sample indices at a time
_MASK32 = 0xFFFFFFFF


def feistel_permutation(n: int, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pseudo-random permutation of ``[0, n)`` that costs no memory per element: the function
    mapping positions (an int64 tensor of values in ``[0, n)``) to their permuted values.

    A 4-round Feistel network on ``2h``-bit integers (``4^h >= n``; round keys drawn from
    ``generator``, round function an integer hash of the right half and the key) is a
    bijection of ``[0, 4^h)``; values landing at ``n`` or beyond are permuted again until they
    fall inside (cycle walking), which restricts it to a bijection of ``[0, n)``.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    keys = torch.randint(0, 1 << 31, (4,), generator=generator).tolist()

    def rounds(x: torch.Tensor) -> torch.Tensor:
        left, right = x >> half, x & mask
        for key in keys:
            h = ((right ^ key) * 0x45D9F3B) & _MASK32
            h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
            left, right = right, left ^ ((h ^ (h >> 16)) & mask)
        return (left << half) | right

    def permute(positions: torch.Tensor) -> torch.Tensor:
        out = rounds(positions)
        outside = out >= n
        while bool(outside.any()):
            out[outside] = rounds(out[outside])
            outside = out >= n
        return out

    return permute


class ShardedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose global batch at step ``t`` is the same set of
    samples at every world size.

    Every rank draws the permutation ``DistributedSampler`` draws
    (``torch.randperm(N)`` seeded with ``seed + epoch``; call :meth:`set_epoch`
    every epoch) and rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W...``.
    Above :data:`RANDPERM_MAX` samples the permutation is :func:`feistel_permutation`
    (seeded the same way): the sampler's memory does not grow with ``N`` (``randperm``
    holds 8 bytes per sample). Indices are produced as they are consumed, a chunk at a time.
    With a per-process batch of ``B / W`` samples, the union over ranks of
    batch ``t`` is positions ``[tB, (t+1)B)`` of the permutation: exactly the
    batch a single process draws.

    The tail (``N mod B`` samples) is handled by ``tail``:

    * ``"drop"``: each epoch uses the first ``floor(N / B) * B`` samples of the
      permutation; invariant across world sizes (the training default).
    * ``"pad"``: repeat samples from the start until ``W`` divides the total,
      as ``DistributedSampler`` does (every rank has equal batch counts; the
      last global batch is not invariant).
    * ``"none"``: no padding; shards may differ in length by one sample. For
      evaluation, where Ignite metrics reduce over ranks once per run and
      every sample must count exactly once.

    With ``"pad"`` a rank's padding (at most one sample) is its last sample:
    :attr:`real_samples` of its :attr:`num_samples` are real. A sharded evaluation pads
    so that every rank runs the same number of forward passes (their collectives line
    up) and drops the padding from the outputs (:func:`igniter.steps.without_padding`).

    Args:
        dataset: a map-style dataset of ``N`` samples.
        num_replicas: world size ``W``.
        rank: this process's rank.
        global_batch_size: ``B``, samples per step over all ranks (for ``"drop"``).
        shuffle: permute every epoch (else the natural order).
        seed: base seed of the permutation (``trainer.seed``).
        tail: ``"drop"``, ``"pad"`` or ``"none"``.
        with_epoch: yield ``(epoch, index)`` pairs instead of indices, the epoch being the
            one :meth:`set_epoch` set when the iteration began (the pass the permutation
            belongs to): :class:`igniter.loading.SeededSamples` seeds each sample's
            randomness with it, in whatever process loads the sample.

    Raises:
        ValueError: unknown ``tail``, or ``"drop"`` with ``N < B`` (no full batch).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        global_batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        tail: str = "drop",
        with_epoch: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        if tail == "drop":
            self.total_size = self.dataset_size // global_batch_size * global_batch_size
            if self.total_size == 0:
                raise ValueError(
                    f"the dataset has {self.dataset_size} samples, fewer than one global batch of "
                    f"{global_batch_size}: lower the batch size or set data.loader.drop_last=false"
                )
        elif tail == "pad":
            self.total_size = -(-self.dataset_size // num_replicas) * num_replicas
        elif tail == "none":
            self.total_size = self.dataset_size
        else:
            raise ValueError(f"tail must be 'drop', 'pad' or 'none', got '{tail}'")
        self.num_samples = len(range(rank, self.total_size, num_replicas))
        # positions >= N are padding; a rank's come last (positions rank, rank + W, ...)
        self.real_samples = min(self.num_samples, len(range(rank, self.dataset_size, num_replicas)))
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[Any]:
        n, epoch = self.dataset_size, self.epoch
        if not self.shuffle:
            order: Callable[[torch.Tensor], torch.Tensor] | None = None
        else:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            if n <= RANDPERM_MAX:
                perm = torch.randperm(n, generator=g)
                order = perm.__getitem__
            else:
                order = feistel_permutation(n, g)
        # positions of the padded order (>= n: the order's start again, as DistributedSampler pads)
        step = self.num_replicas * _CHUNK

        def indices() -> Iterator[Any]:
            for start in range(self.rank, self.total_size, step):
                positions = torch.arange(start, min(start + step, self.total_size), self.num_replicas) % n
                chunk = (order(positions) if order is not None else positions).tolist()
                if self.with_epoch:
                    yield from ((epoch, i) for i in chunk)
                else:
                    yield from chunk

        return indices()

    def __len__(self) -> int:
        return self.num_samples
