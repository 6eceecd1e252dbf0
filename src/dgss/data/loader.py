"""DataLoader plumbing: endless training batches (one or several sources, any number of processes)
and sharded batch-1 evaluation loaders.

Randomness: the sampler's order comes from (seed, epoch); each DataLoader worker gets a seed from a
generator seeded with (seed, rank), and each dataset derives its augmentation generator from that
worker seed (see :meth:`SegmentationDataset.rng`), so a run repeats exactly for a given number of
processes and workers.
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from ..config import ConfigError, DataConfig, DatasetConfig, ExperimentConfig
from .base import SegmentationDataset
from .builder import build_dataset

__all__ = [
    "InfiniteSampler",
    "UniformSourceSampler",
    "TrainLoader",
    "EvalLoader",
    "build_train_loader",
    "build_eval_loader",
    "seed_worker",
]


def _global_stream(size: int, seed: int, salt: int, shuffle: bool) -> Iterator[int]:
    for epoch in itertools.count():
        order = np.random.default_rng([seed, salt, epoch]).permutation(size) if shuffle else range(size)
        yield from (int(i) for i in order)


class InfiniteSampler(Sampler[int]):
    """Endless indices of ``range(size)``: a new permutation every epoch. With several processes,
    rank r takes elements r, r + W, r + 2W, ... of one global stream, so ranks never overlap within
    an epoch and the union is the same for any W."""

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(_global_stream(self.size, self.seed, 0, self.shuffle), self.rank, None, self.world_size)


class UniformSourceSampler(Sampler[int]):
    """Endless indices into the concatenation of sources of ``sizes``, each source drawn equally
    often: every draw picks a source uniformly, then the next index of that source's own shuffled
    stream (so small sources repeat more often, large ones are subsampled). Ranks split the global
    stream as in :class:`InfiniteSampler`."""

    def __init__(self, sizes: Sequence[int], *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every source needs at least one sample, got sizes {list(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.sizes, self.seed, self.rank, self.world_size = list(sizes), seed, rank, world_size
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).tolist()

    def _stream(self) -> Iterator[int]:
        streams = [_global_stream(size, self.seed, source + 1, True) for source, size in enumerate(self.sizes)]
        rng = np.random.default_rng([self.seed, 0x5EED])
        while True:
            for source in rng.integers(len(self.sizes), size=4096).tolist():
                yield self.offsets[source] + next(streams[source])

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._stream(), self.rank, None, self.world_size)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global generators from the worker's
    PyTorch seed, for code that uses them (dgss's own transforms use per-dataset generators)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class TrainLoader:
    """Endless training batches ``{"image": B x 3 x h x w, "label": B x h x w, "name": [B]}``.

    Iterate it (``for batch in loader``) or call ``next(loader)``; both go on forever.
    """

    def __init__(self, loader: DataLoader, datasets: Sequence[SegmentationDataset]) -> None:
        self.loader = loader
        self.datasets = list(datasets)
        self._iterator: Optional[Iterator] = None

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return next(self._iterator)


def build_train_loader(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    num_workers: Optional[int] = None,
) -> TrainLoader:
    """Endless training batches from ``cfg.data.train`` for process ``rank`` of ``world_size``.

    ``batch_size`` is per process (default ``cfg.train.batch_size``); several sources are mixed as
    ``cfg.data.sampling`` says. A ``fraction`` subset's list is written to ``cfg.run_dir`` by rank 0.
    """
    if not cfg.data.train:
        raise ConfigError("data.train lists no dataset to train on")
    seed = cfg.train.seed if seed is None else seed
    batch_size = cfg.train.batch_size if batch_size is None else batch_size
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    datasets = []
    for source, ds_cfg in enumerate(cfg.data.train):
        dataset = build_dataset(ds_cfg, cfg.data, train=True, fraction_list_dir=cfg.run_dir,
                                write_fraction_list=rank == 0, seed=seed * 1000 + rank)
        dataset.rng_salt = source
        datasets.append(dataset)
    if len(datasets) == 1:
        dataset, sampler = datasets[0], InfiniteSampler(len(datasets[0]), seed=seed, rank=rank, world_size=world_size)
    else:
        dataset = ConcatDataset(datasets)
        if cfg.data.sampling == "uniform":
            sampler = UniformSourceSampler([len(d) for d in datasets], seed=seed, rank=rank, world_size=world_size)
        else:  # proportional: one permutation over the concatenation
            sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=default_collate,
        pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed * 1000 + rank), persistent_workers=num_workers > 0,
    )
    return TrainLoader(loader, datasets)


def _collate_eval(batch: list) -> Optional[dict]:
    batch = [sample for sample in batch if sample is not None]  # skipped (unreadable) samples
    if not batch:
        return None
    out = {"image": torch.stack([s["image"] for s in batch]), "name": [s["name"] for s in batch],
           "ori_size": [s["ori_size"] for s in batch]}
    if all("label" in s for s in batch):
        out["label"] = torch.stack([s["label"] for s in batch])
    return out


class EvalLoader:
    """Batches of one evaluation image: ``{"image": 1 x 3 x h x w, "label": 1 x H x W, "name": [str],
    "ori_size": [(H, W)]}`` (no "label" when the dataset has none). Skipped samples are left out."""

    def __init__(self, loader: DataLoader, dataset: SegmentationDataset) -> None:
        self.loader, self.dataset = loader, dataset

    @property
    def name(self) -> str:
        return self.dataset.name

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        return (batch for batch in self.loader if batch is not None)


class _ShardSampler(Sampler[int]):
    """Indices rank, rank + W, ... in order: each process evaluates a disjoint share, no padding."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(
    ds_cfg: DatasetConfig,
    data_cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: Optional[int] = None,
) -> EvalLoader:
    """Evaluation batches of one image (images differ in size) for process ``rank`` of ``world_size``."""
    dataset = build_dataset(ds_cfg, data_cfg, train=False)
    num_workers = data_cfg.num_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=1, sampler=_ShardSampler(len(dataset), rank, world_size),
                        num_workers=num_workers, collate_fn=_collate_eval, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=seed_worker)
    return EvalLoader(loader, dataset)
