"""Loaders, samplers and subsets: multi-source proportions, rank partitions, the fraction list,
list files, endless training batches and sharded evaluation."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from dgss.config import ConfigError, DataConfig, DatasetConfig, load_config
from dgss.data import (
    DataError,
    InfiniteSampler,
    UniformSourceSampler,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    write_cityscapes_layout,
)

SIZE = [32, 64]


def synthetic(domain: str, n: int, **fields) -> dict:
    return {"type": "synthetic", "options": {"domain": domain, "num_images": n, "size": SIZE}, **fields}


def experiment(tmp_path, train: list, **data):
    overrides = {"crop_size": [32, 32], "scales": [32, 40], "max_long_side": 256, "num_workers": 0, **data}
    cfg = load_config(overrides=[f"output_dir={tmp_path}", "name=run", "train.batch_size=4"])
    cfg.data.train = [DatasetConfig(**d) for d in train]
    for key, value in overrides.items():
        setattr(cfg.data, key, value)
    return cfg


def test_infinite_sampler_covers_each_epoch_and_ranks_partition_it():
    stream = list(itertools.islice(InfiniteSampler(10, seed=3), 30))
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled every epoch
    ranks = [list(itertools.islice(InfiniteSampler(10, seed=3, rank=r, world_size=2), 5)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10)) and ranks[0] == stream[0:10:2]


@pytest.mark.parametrize("world_size", [1, 3])
def test_multi_source_sampling_proportions(world_size):
    sizes = [300, 30, 70]
    draws = []
    for rank in range(world_size):
        sampler = UniformSourceSampler(sizes, seed=1, rank=rank, world_size=world_size)
        draws += list(itertools.islice(sampler, 6000 // world_size))
    source = np.searchsorted(np.cumsum(sizes), np.array(draws), side="right")
    share = np.bincount(source, minlength=3) / len(draws)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)  # uniform: equal shares despite sizes
    small = [d - 300 for d in draws if 300 <= d < 330]
    assert set(small) == set(range(30))  # the small source cycles through all its images
    proportional = list(itertools.islice(InfiniteSampler(sum(sizes), seed=1), 4000))
    share = np.bincount(np.searchsorted(np.cumsum(sizes), proportional, side="right"), minlength=3) / 4000
    np.testing.assert_allclose(share, np.array(sizes) / sum(sizes), atol=0.02)


def test_train_loader_mixes_sources_and_repeats_with_the_seed(tmp_path):
    cfg = experiment(tmp_path, [synthetic("clean", 40), synthetic("night", 4)], sampling="uniform")
    loader = build_train_loader(cfg, seed=5)
    batches = [next(loader) for _ in range(10)]
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["label"].shape == (4, 32, 32)
    assert batches[0]["label"].dtype == torch.int64
    names = Counter(n.split("_")[0] for b in batches for n in b["name"])
    assert 12 <= names["night"] <= 28  # ~half the draws, though night has 1/11 of the images
    again = build_train_loader(cfg, seed=5)
    for first, second in zip(batches[:3], (next(again) for _ in range(3))):
        assert first["name"] == second["name"] and torch.equal(first["image"], second["image"])
    other = next(iter(build_train_loader(cfg, seed=6)))
    assert other["name"] != batches[0]["name"] or not torch.equal(other["image"], batches[0]["image"])


def test_train_loader_with_workers_is_reproducible(tmp_path):
    cfg = experiment(tmp_path, [synthetic("fog", 12)], num_workers=2)
    first = [b["image"] for b in itertools.islice(build_train_loader(cfg, seed=2), 3)]
    second = [b["image"] for b in itertools.islice(build_train_loader(cfg, seed=2), 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ranks = [next(iter(build_train_loader(cfg, seed=2, rank=r, world_size=2, num_workers=0)))["name"] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_fraction_list_is_written_next_to_the_run_and_stable(tmp_path):
    root = write_cityscapes_layout(tmp_path / "cs", "clean", n=32, size=(16, 32), split="train")
    train = [{"type": "cityscapes", "root": str(root), "split": "train", "fraction": 0.125}]
    cfg = experiment(tmp_path, train)
    loader = build_train_loader(cfg)
    list_file = cfg.run_dir / "fraction_cityscapes.txt"
    lines = [line for line in list_file.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 4 and len(loader.datasets[0]) == 4
    assert all(line.startswith("leftImg8bit/train/synthcity/") for line in lines)
    assert [s.rel for s in loader.datasets[0].samples] == lines
    assert build_train_loader(cfg).datasets[0].samples == loader.datasets[0].samples
    # Stable across machines: the draw depends only on (count, fraction, seed), and an existing
    # list wins over a new draw (a resumed run keeps its images even if the seed changes).
    cfg.data.train[0].fraction_seed = 1
    assert [s.rel for s in build_train_loader(cfg).datasets[0].samples] == lines
    fresh = build_dataset(cfg.data.train[0], cfg.data, train=True)
    assert [s.rel for s in fresh.samples] != lines and len(fresh) == 4
    # The written list reproduces the subset through list_file.
    by_list = build_dataset(DatasetConfig(type="cityscapes", root=str(root), split="train", list_file=str(list_file)),
                            cfg.data, train=True)
    assert [s.rel for s in by_list.samples] == lines


def test_list_file_and_first_n(tmp_path):
    root = write_cityscapes_layout(tmp_path, "clean", n=6, size=(16, 32), split="val")
    (root / "val.txt").write_text("synthcity_000000_000004\n# a comment\n"
                                  "leftImg8bit/val/synthcity/synthcity_000000_000001_leftImg8bit.png\n"
                                  "synthcity/synthcity_000000_000002_leftImg8bit\n")
    ds = build_dataset(DatasetConfig(type="cityscapes", root=str(root), list_file="val.txt"), DataConfig(), train=False)
    assert [s.name[-18:-12] for s in ds.samples] == ["000004", "000001", "000002"]
    first = build_dataset(DatasetConfig(type="cityscapes", root=str(root), first_n=2), DataConfig(), train=False)
    assert [s.name for s in first.samples] == ["synthcity_000000_000000_leftImg8bit", "synthcity_000000_000001_leftImg8bit"]
    (root / "bad.txt").write_text("synthcity_000000_000099\n")
    with pytest.raises(DataError, match=r"bad\.txt: 1 of 1 entries match no image.*000099"):
        build_dataset(DatasetConfig(type="cityscapes", root=str(root), list_file="bad.txt"), DataConfig(), train=False)
    with pytest.raises(ConfigError, match="fraction must be in"):
        build_dataset(DatasetConfig(type="cityscapes", root=str(root), fraction=1.5), DataConfig(), train=False)


def test_eval_loader_shards_and_keeps_label_resolution(tmp_path):
    ds_cfg = DatasetConfig(type="synthetic", split="val", resize=[32, 16], options={"num_images": 5, "size": SIZE})
    shards = [list(build_eval_loader(ds_cfg, DataConfig(num_workers=0), rank=r, world_size=2)) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 2]
    names = [b["name"][0] for shard in shards for b in shard]
    assert len(set(names)) == 5
    batch = shards[0][0]
    assert batch["image"].shape == (1, 3, 16, 32) and batch["label"].shape == (1, *SIZE)
    assert batch["ori_size"] == [tuple(SIZE)]


def test_eval_loader_drops_skipped_samples(tmp_path):
    root = write_cityscapes_layout(tmp_path, "clean", n=3, size=(16, 32), split="val")
    broken = root / "leftImg8bit" / "val" / "synthcity" / "synthcity_000000_000001_leftImg8bit.png"
    broken.write_bytes(broken.read_bytes()[:40])
    cfg = DatasetConfig(type="cityscapes", root=str(root), on_bad_sample="skip")
    with pytest.warns(UserWarning, match="000001"):
        names = [b["name"][0] for b in build_eval_loader(cfg, DataConfig(num_workers=0))]
    assert names == ["synthcity_000000_000000_leftImg8bit", "synthcity_000000_000002_leftImg8bit"]
