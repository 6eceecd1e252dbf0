"""``build_dataset``: a :class:`~dgss.config.DatasetConfig` -> a dataset with the right transforms.

Dataset types are a plain dict (no registry). Subsets are applied in this order: ``list_file``
(keeps the list's order), ``first_n``, ``fraction`` (a seeded draw, written as a list next to the
run so the same images are used when the run resumes or is repeated elsewhere).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import ConfigError, DataConfig, DatasetConfig, check_name
from .base import Sample, SegmentationDataset
from .corruptions import ImageCorruption
from .folder import FolderDataset, read_list_file
from .image_io import DataError
from .layouts import (
    ACDCDataset,
    BDD100KDataset,
    CityscapesDataset,
    GTAVDataset,
    MapillaryDataset,
    SynthiaDataset,
    UrbanSynDataset,
)
from .synthetic import SyntheticDataset
from .transforms import EvalTransform, TrainTransform

__all__ = ["DATASET_TYPES", "build_dataset", "check_dataset_config", "check_dataset_types", "dataset_name", "select_fraction", "match_list"]

DATASET_TYPES: dict[str, type[SegmentationDataset]] = {
    "gtav": GTAVDataset,
    "synthia": SynthiaDataset,
    "cityscapes": CityscapesDataset,
    "bdd100k": BDD100KDataset,
    "mapillary": MapillaryDataset,
    "acdc": ACDCDataset,
    "urbansyn": UrbanSynDataset,
    "folder": FolderDataset,
    "synthetic": SyntheticDataset,
}
# Image-name endings that list files commonly leave out (Cityscapes and ACDC split lists).
_NAME_SUFFIXES = ("_leftImg8bit", "_rgb_anon")
_COMMON_KEYWORDS = {"name", "transform", "train", "on_bad_sample", "on_unknown_label", "corruption",
                    "mappings", "augment_seed", "with_labels", "condition"}


def check_dataset_types(data_cfg: DataConfig, where: str = "") -> None:
    """ConfigError (one line, the closest name) unless every dataset of the train, val and test lists has
    a registered type (data.<split>[i].type)."""
    for split in ("train", "val", "test"):
        for i, ds in enumerate(getattr(data_cfg, split)):
            check_name(f"data.{split}[{i}].type", ds.type, DATASET_TYPES, "dataset type", where)


def dataset_name(cfg: DatasetConfig) -> str:
    """Display name: ``name`` if set, else type (+ ``-condition``) (+ ``/corruption-severity``)."""
    if cfg.name:
        return cfg.name
    name = cfg.type + (f"-{cfg.condition}" if cfg.condition else "")
    if cfg.type == "synthetic" and "domain" in cfg.options:
        name += f"-{cfg.options['domain']}"
    return name + (f"/{cfg.corruption}-{cfg.severity}" if cfg.corruption else "")


def _dataset_class(type_name: str) -> type[SegmentationDataset]:
    if type_name in DATASET_TYPES:
        return DATASET_TYPES[type_name]
    close = difflib.get_close_matches(str(type_name), DATASET_TYPES, n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown dataset type '{type_name}'{hint} (valid: {', '.join(DATASET_TYPES)})")


def _check_options(cls: type, options: dict, type_name: str) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    valid = [p for p, v in parameters.items() if v.kind == v.KEYWORD_ONLY and p not in _COMMON_KEYWORDS]
    for key in options:
        if key in _COMMON_KEYWORDS:
            raise ConfigError(f"dataset option '{key}' of type {type_name} is a dataset field: set it next to "
                              "'options', not inside it")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '{key}' for dataset type {type_name}{hint} "
                              f"(valid: {', '.join(valid) or 'none'})")


def check_dataset_config(ds_cfg: DatasetConfig, *, train: bool) -> type[SegmentationDataset]:
    """The checks of one dataset entry that need no file (type, options, root given, condition, labels for
    training, corruption and severity together); returns its class. ``build_dataset`` and
    :func:`dgss.engine.config_check.check_config` (``dgss config``) both run them."""
    cls = _dataset_class(ds_cfg.type)
    _check_options(cls, dict(ds_cfg.options), ds_cfg.type)
    if not ds_cfg.root and ds_cfg.type != "synthetic":
        raise ConfigError(f"dataset type {ds_cfg.type} needs 'root' (the folder its download unpacks to)")
    if ds_cfg.condition is not None and cls is not ACDCDataset:
        raise ConfigError(f"'condition' is an ACDC option; dataset type {ds_cfg.type} has none")
    if train and not ds_cfg.with_labels:
        raise ConfigError(f"dataset {dataset_name(ds_cfg)}: training needs labels (with_labels is false)")
    if ds_cfg.corruption is not None and ds_cfg.severity is None:
        raise ConfigError(f"dataset {dataset_name(ds_cfg)}: corruption '{ds_cfg.corruption}' needs a severity (1..5)")
    if ds_cfg.severity is not None and ds_cfg.corruption is None:
        raise ConfigError(f"dataset {dataset_name(ds_cfg)}: severity is set but no corruption")
    return cls


def build_dataset(
    ds_cfg: DatasetConfig,
    data_cfg: DataConfig,
    *,
    train: bool,
    fraction_list_dir: Optional[str | os.PathLike] = None,
    write_fraction_list: bool = True,
    seed: int = 0,
) -> SegmentationDataset:
    """The dataset a config describes, with training or evaluation transforms.

    Args:
        train: training augmentation (samples of ``data_cfg.crop_size``) or evaluation resizing
            (image fitted into ``ds_cfg.resize``, label at its own resolution, ``ori_size`` set).
        fraction_list_dir: where the list of a ``fraction`` subset is written (and read back when it
            already exists), e.g. the run directory. None: computed, not written.
        write_fraction_list: False on all but one process of a distributed run.
        seed: seed of the augmentation generator when no DataLoader worker is used.
    """
    cls = check_dataset_config(ds_cfg, train=train)
    options = dict(ds_cfg.options)
    if train:
        transform = TrainTransform(crop_size=data_cfg.crop_size, scales=data_cfg.scales,
                                   max_long_side=data_cfg.max_long_side, cat_max_ratio=data_cfg.cat_max_ratio,
                                   mean=data_cfg.mean, std=data_cfg.std, flip_prob=data_cfg.flip_prob,
                                   photometric=data_cfg.photometric_distortion)
    else:
        transform = EvalTransform(resize=ds_cfg.resize, mean=data_cfg.mean, std=data_cfg.std)
    corruption = None
    if ds_cfg.corruption is not None:
        corruption = ImageCorruption(ds_cfg.corruption, ds_cfg.severity)
    if cls is ACDCDataset:
        options["condition"] = ds_cfg.condition
    dataset = cls(ds_cfg.root, ds_cfg.split, with_labels=ds_cfg.with_labels, name=dataset_name(ds_cfg),
                  transform=transform, train=train, on_bad_sample=ds_cfg.on_bad_sample,
                  on_unknown_label=ds_cfg.on_unknown_label, corruption=corruption, augment_seed=seed,
                  **options)
    _apply_subsets(dataset, ds_cfg, fraction_list_dir, write_fraction_list)
    return dataset


def _aliases(sample: Sample) -> set[str]:
    names = {sample.rel, os.path.splitext(sample.rel)[0], sample.name}
    for suffix in _NAME_SUFFIXES:
        if sample.name.endswith(suffix):
            names.add(sample.name[: -len(suffix)])
    return names


def match_list(samples: Sequence[Sample], lines: Sequence[str], source: str) -> list[int]:
    """Indices of the samples named by ``lines`` (file stems or root-relative paths), in list order."""
    index: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        for alias in _aliases(sample):
            index.setdefault(alias, []).append(i)
    chosen, seen, unknown = [], set(), []
    for line in lines:
        key = line.strip().lstrip("./")
        hits = index.get(key) or index.get(os.path.splitext(key)[0]) or index.get(Path(key).stem)
        if not hits:
            unknown.append(line)
            continue
        if len(hits) > 1:
            raise DataError(f"{source}: '{line}' names {len(hits)} images; use paths relative to the dataset root")
        if hits[0] not in seen:
            seen.add(hits[0])
            chosen.append(hits[0])
    if unknown:
        raise DataError(f"{source}: {len(unknown)} of {len(lines)} entries match no image of the dataset, "
                        f"e.g. {', '.join(unknown[:3])}")
    return chosen


def select_fraction(count: int, fraction: float, seed: int) -> list[int]:
    """A fixed random ``fraction`` of ``range(count)`` (at least one), sorted; the same for the same
    (count, fraction, seed) on every machine (NumPy's PCG64 stream is stable)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, int(round(count * fraction)))
    return sorted(np.random.default_rng(seed).permutation(count)[:keep].tolist())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _apply_subsets(dataset: SegmentationDataset, cfg: DatasetConfig, list_dir, write: bool) -> None:
    indices = list(range(len(dataset)))
    root = Path(cfg.root).expanduser()
    if cfg.list_file:
        path = Path(cfg.list_file).expanduser()
        path = path if path.is_absolute() or not cfg.root else root / path
        indices = match_list(dataset.samples, read_list_file(path), str(path))
    if cfg.first_n is not None:
        if cfg.first_n < 1:
            raise ConfigError(f"first_n must be at least 1, got {cfg.first_n}")
        indices = indices[: cfg.first_n]
    if cfg.fraction is not None:
        list_path = None
        if list_dir is not None:
            list_path = Path(list_dir) / f"fraction_{_slug(dataset.name)}.txt"
        if list_path is not None and list_path.is_file():  # a resumed or repeated run keeps its subset
            subset = [dataset.samples[i] for i in indices]
            indices = [indices[i] for i in match_list(subset, read_list_file(list_path), str(list_path))]
        else:
            indices = [indices[i] for i in select_fraction(len(indices), cfg.fraction, cfg.fraction_seed)]
            if list_path is not None and write:
                _write_list(list_path, [dataset.samples[i].rel for i in indices],
                            f"{len(indices)} images: fraction {cfg.fraction} of {dataset.name} (seed {cfg.fraction_seed})")
    if len(indices) != len(dataset) or indices != list(range(len(dataset))):
        dataset.restrict(indices)


def _write_list(path: Path, lines: Sequence[str], header: str) -> None:
    from ..fileio import atomic_write

    text = f"# {header}\n" + "".join(f"{line}\n" for line in lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # a concurrent reader sees the old or the whole new file
