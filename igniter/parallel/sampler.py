"""Data sharding whose global batches do not depend on the world size."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ShardedSampler"]


class ShardedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose global batch at step ``t`` is the same set of
    samples at every world size.

    Every rank draws the permutation ``DistributedSampler`` draws
    (``torch.randperm(N)`` seeded with ``seed + epoch``; call :meth:`set_epoch`
    every epoch) and rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W...``.
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
        self.with_epoch = with_epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if self.with_epoch:
            epoch = self.epoch
            return iter([(epoch, i) for i in mine])
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples
