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

Samples a dataset skips (``on_bad_sample: skip``, e.g. an image that became unreadable mid-run) are
counted per file in :attr:`ResumableBatches.skipped`, also when DataLoader workers load them, and a
worker's data error is re-raised as the one line the dataset wrote, not a worker traceback.
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..data.image_io import DataError
from ..data.loader import TrainLoader, seed_worker
from .preemption import ignore_in_worker

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
            leaf.skip_events = []
        sample = self.dataset[index]
        # what was skipped to load it travels with the sample (a string, so batches collate as usual)
        sample["skipped"] = "\n".join(event for leaf in self.leaves for event in leaf.skip_events)
        return sample


def _worker_init(worker_id: int) -> None:
    """DataLoader workers: seeded as usual, and deaf to SIGTERM/SIGUSR1, which the trainer handles (so a
    worker leaves when :meth:`ResumableBatches.close` asks it to, or when its parent process is gone)."""
    seed_worker(worker_id)
    ignore_in_worker()


def _shut_down(iterator) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()


def _one_line(err: DataError) -> DataError:
    """A DataLoader worker's error as the dataset raised it: PyTorch re-raises it with the worker's
    traceback in the message; the last line holds the original one-line message."""
    text = str(err)
    if not text.startswith("Caught ") or "Traceback" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name, sep, message = last.partition(": ")
    return type(err)(message if sep and name.endswith(type(err).__name__) else last)


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
        self._finalizer: Optional[weakref.finalize] = None
        self.skipped: Counter = Counter()  # image path -> samples of it skipped by this process
        self._new_skips: list[str] = []

    def _start(self) -> Iterator:
        # batch_sampler-free: the positioned sampler is endless and batches are consecutive pairs
        positioned = _PositionedSampler(self._sampler, self.position, self._rank, self._world_size)
        loader = DataLoader(
            self._dataset, batch_size=self.batch_size, sampler=positioned, num_workers=self._num_workers,
            collate_fn=default_collate, pin_memory=torch.cuda.is_available(), drop_last=True,
            worker_init_fn=_worker_init, persistent_workers=self._num_workers > 0,
            # its own generator, so starting the loader never draws from the global torch RNG
            generator=torch.Generator().manual_seed(self._seed * 1000 + self._rank),
        )
        iterator = iter(loader)
        # workers ignore SIGTERM, so Python's exit must not be left to terminate() and join() them
        self._finalizer = weakref.finalize(self, _shut_down, iterator)
        return iterator

    def close(self) -> None:
        """Stop the DataLoader workers (the next batch starts new ones at the same position)."""
        self._iterator = None
        if self._finalizer is not None:
            self._finalizer()  # once; it lets go of the iterator
            self._finalizer = None

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except DataError as err:
            raise _one_line(err) from None
        self.position += self.batch_size
        for events in batch.pop("skipped", ()):
            for event in filter(None, events.split("\n")):
                path, _, reason = event.partition("\t")
                self.skipped[path] += 1
                self._new_skips.append(f"skipped {path}: {reason}")
        return batch

    def take_new_skips(self) -> list[str]:
        """One line per sample skipped since the last call (this process)."""
        new, self._new_skips = self._new_skips, []
        return new
