"""Resumable training batches: the k-th sample of a run is a pure function of (seed, k).

``dgss.data.build_train_loader`` gives the datasets and the endless sampler (its order comes from
the seed; rank r takes elements r, r + W, ... of one global stream). Its DataLoader, however, draws
augmentations from per-worker generators whose state lives in the worker processes, so a restarted
run could only reach the same point by loading and augmenting every consumed sample again.

:class:`ResumableBatches` keeps the datasets and the sampler, and gives every sample its own
augmentation generator seeded with (seed, global position in the stream). Then

* resuming needs only the number of samples consumed: the sampler's index stream is skipped (cheap
  integers) and nothing is loaded twice;
* batches do not depend on ``num_workers``;
* W processes with batch B see exactly the samples one process with batch W x B sees (the DDP
  equivalence the tests check).
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..data.loader import TrainLoader, seed_worker

__all__ = ["ResumableBatches"]

# keeps these generators apart from any other use of the run seed
_AUGMENT_SALT = 0xA06


class _PositionedSampler(Sampler):
    """(global position, dataset index) pairs of this rank's share of ``sampler``, from local position
    ``start`` on. Local position j of rank r is global position j * W + r."""

    def __init__(self, sampler: Sampler, start: int, rank: int, world_size: int) -> None:
        self.sampler, self.start, self.rank, self.world_size = sampler, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = itertools.islice(iter(self.sampler), self.start, None)
        for local, index in enumerate(indices, start=self.start):
            yield local * self.world_size + self.rank, int(index)


class _PositionSeededDataset(Dataset):
    """Loads ``dataset[index]`` with the augmentation generator of the sample's global position.

    The training datasets draw augmentations from ``SegmentationDataset.rng()``; for each sample
    that method is shadowed (on this process's copy of the dataset) by one that returns the sample's
    own generator.
    """

    def __init__(self, dataset: Dataset, leaves: Sequence[Dataset], seed: int) -> None:
        self.dataset, self.leaves, self.seed = dataset, list(leaves), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, index = item
        generator = np.random.default_rng([self.seed, _AUGMENT_SALT, position])
        for leaf in self.leaves:
            leaf.rng = lambda generator=generator: generator
        return self.dataset[index]


class ResumableBatches:
    """Endless training batches of this process that can restart at any sample position.

    Args:
        train_loader: what ``build_train_loader(cfg, rank=..., world_size=...)`` returned (its
            datasets and sampler are reused, its DataLoader is not).
        seed: the run seed.
        start: samples of this rank's stream already consumed (0 for a new run).
    """

    def __init__(self, train_loader: TrainLoader, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, num_workers: Optional[int] = None) -> None:
        source = train_loader.loader
        self.batch_size = source.batch_size
        self.position = start
        self._dataset = _PositionSeededDataset(source.dataset, train_loader.datasets, seed)
        self._sampler = source.sampler
        self._rank, self._world_size = rank, world_size
        self._num_workers = source.num_workers if num_workers is None else num_workers
        self._seed = seed
        self._iterator: Optional[Iterator] = None

    def _start(self) -> Iterator:
        # batch_sampler-free: the positioned sampler is endless and batches are consecutive pairs
        positioned = _PositionedSampler(self._sampler, self.position, self._rank, self._world_size)
        loader = DataLoader(
            self._dataset, batch_size=self.batch_size, sampler=positioned, num_workers=self._num_workers,
            collate_fn=default_collate, pin_memory=torch.cuda.is_available(), drop_last=True,
            worker_init_fn=seed_worker, persistent_workers=self._num_workers > 0,
            # its own generator, so starting the loader never draws from the global torch RNG
            generator=torch.Generator().manual_seed(self._seed * 1000 + self._rank),
        )
        return iter(loader)

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.position += self.batch_size
        return batch
