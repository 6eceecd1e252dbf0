"""The dataset base class shared by every on-disk layout, and the folder-scanning helpers.

A layout subclass only finds its (image, label) file pairs and says how its label values become
train ids; reading, size checks, the skip policy, corruptions, transforms and the per-worker random
generator live here once.

A sample is a dict: ``image`` 3 x h x w float32 (normalised), ``label`` h x w int64 train ids with
255 = ignore, ``name`` the image file stem, and for evaluation ``ori_size`` = (H, W) of the label.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_io import BadSampleError, DataError, read_image, read_label
from .labels import CITYSCAPES_CLASSES, LabelMapping, train_id_mapping

__all__ = ["Sample", "SegmentationDataset", "scan_files", "require_dir", "pair_labels"]


@dataclass(frozen=True)
class Sample:
    """One image and its label file. ``rel`` is the image path relative to the dataset root
    (POSIX separators): the identifier list files and fraction lists use."""

    image: Path
    label: Optional[Path]
    rel: str
    encoding: str = "default"  # which of the dataset's label mappings decodes this label

    @property
    def name(self) -> str:
        return self.image.stem


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a DataError naming it (and what is there instead)."""
    if path.is_dir():
        return path
    message = f"{what} not found: {path}"
    parent = path.parent
    if parent.is_dir():
        entries = sorted(p.name for p in parent.iterdir() if p.is_dir())[:12]
        message += f" ({parent} contains: {', '.join(entries) or 'no folders'})"
    else:
        message += f" ({parent} does not exist either)"
    raise DataError(message + (f"; {hint}" if hint else ""))


def scan_files(directory: Path, suffix: str) -> list[Path]:
    """All files under ``directory`` (recursively) whose name ends with ``suffix``, sorted."""
    found = []
    for folder, _, names in os.walk(directory, followlinks=True):
        found.extend(Path(folder) / n for n in names if n.endswith(suffix))
    return sorted(found)


def pair_labels(
    images: Sequence[Path],
    root: Path,
    candidates: Callable[[Path], Sequence[tuple[Path, str]]],
    *,
    with_labels: bool,
    existing: Optional[set[Path]] = None,
) -> list[Sample]:
    """Pair each image with the first existing label among ``candidates(image)`` ((path, encoding)).

    Images without any label are an error listing a few of them with the expected path.
    ``existing``: the set of label files found by one directory scan (faster than one stat per file).
    """
    samples, missing = [], []
    for image in images:
        rel = image.relative_to(root).as_posix()
        if not with_labels:
            samples.append(Sample(image=image, label=None, rel=rel))
            continue
        options = [(p, enc) for p, enc in candidates(image) if p != image]  # never the image itself
        found = next(((p, enc) for p, enc in options
                      if (p in existing if existing is not None else p.is_file())), None)
        if found is None:
            missing.append((image, options[0][0] if options else None))
        else:
            samples.append(Sample(image=image, label=found[0], rel=rel, encoding=found[1]))
    if missing:
        shown = "; ".join(f"{img} (expected {lab})" for img, lab in missing[:3])
        raise DataError(
            f"{len(missing)} of {len(images)} images have no label, e.g. {shown}; "
            "set with_labels: false to load images only"
        )
    return samples


class SegmentationDataset(Dataset):
    """Image/label pairs decoded to train ids on the fly.

    Args:
        samples: the pairs, in a fixed (sorted) order.
        name: display name (tables, warnings).
        transform: ``(image, label, rng) -> (image tensor, label tensor)``; None gives unnormalised
            float images.
        train: training samples (no ``ori_size``; a skipped bad sample is replaced by another one)
            or evaluation samples (a skipped sample yields None, which the eval loader drops).
        on_bad_sample: "error" stops at an unreadable/truncated file or an image/label size
            mismatch; "skip" warns once per file and skips it (a training dataset also appends
            "image path<TAB>reason" to ``skip_events`` at every skip, which the engine counts).
        on_unknown_label: "error" or "ignore" (map with a warning to 255) label values outside the
            dataset's mapping.
        corruption: ``(image, index) -> image`` applied to the loaded image (corrupted evaluation).
        classes: class names, in class-index order (default: the 19 Cityscapes classes).
        mappings: label decoders by ``Sample.encoding`` (default: class indices stored as is).
        augment_seed: seed of the augmentation generator in the main process; DataLoader workers
            use the worker seed PyTorch gives them.
    """

    layout: str = "generic"
    mappings: dict[str, LabelMapping]

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        name: str,
        transform: Optional[Callable] = None,
        train: bool = False,
        on_bad_sample: Literal["error", "skip"] = "error",
        on_unknown_label: Literal["error", "ignore"] = "error",
        corruption: Optional[Callable[[np.ndarray, int], np.ndarray]] = None,
        classes: Sequence[str] = CITYSCAPES_CLASSES,
        mappings: Optional[dict[str, LabelMapping]] = None,
        augment_seed: int = 0,
    ) -> None:
        if not samples:
            raise DataError(f"dataset {name} has no samples")
        self.samples = list(samples)
        self.name = name
        self.transform = transform
        self.train = train
        self.on_bad_sample = on_bad_sample
        self.on_unknown_label = on_unknown_label
        self.corruption = corruption
        self.classes = tuple(classes)
        self.mappings = mappings if mappings is not None else {"default": train_id_mapping(len(self.classes))}
        self.augment_seed = augment_seed
        self.rng_salt = 0  # set per source by the multi-source builder so sources draw differently
        self.eval_class_ids: Optional[tuple[int, ...]] = None  # classes averaged in mIoU (None: all)
        self._rng_state: tuple[Any, Optional[np.random.Generator]] = (None, None)
        self._skipped: set[str] = set()
        self.skip_events: list[str] = []  # training: one entry per skipped load, drained by the engine

    # -- what subclasses may override ----------------------------------------------------------

    def read_raw_label(self, sample: Sample) -> np.ndarray:
        """The label file's values before mapping (H x W integers)."""
        return read_label(sample.label)

    def postprocess(self, image: np.ndarray, label: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Hook for a layout-specific change after loading (e.g. Mapillary's half resolution)."""
        return image, label

    # -- loading -------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def decode_label(self, sample: Sample) -> np.ndarray:
        """H x W uint8 class indices (255 = ignore) of a sample's label file."""
        raw = self.read_raw_label(sample)
        return self.mappings[sample.encoding](raw, sample.label, on_unknown=self.on_unknown_label)

    def load(self, index: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Image (H x W x 3 uint8 RGB, corrupted if configured) and label (H x W uint8 or None)."""
        sample = self.samples[index]
        image = read_image(sample.image)
        label = self.decode_label(sample) if sample.label is not None else None
        if label is not None and label.shape != image.shape[:2]:
            raise BadSampleError(
                f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but image {sample.image} "
                f"is {image.shape[1]}x{image.shape[0]} (W x H)"
            )
        image, label = self.postprocess(image, label)
        if self.corruption is not None:
            image = self.corruption(image, index)
        return image, label

    def rng(self) -> np.random.Generator:
        """The augmentation generator of this process: per DataLoader worker, seeded from PyTorch's
        worker seed (so runs repeat), re-created after a fork."""
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else info.id)
        if self._rng_state[0] != key:
            seed = self.augment_seed if info is None else info.seed
            self._rng_state = (key, np.random.default_rng([seed % 2**63, self.rng_salt]))
        return self._rng_state[1]

    def __getitem__(self, index: int) -> Optional[dict]:
        try:
            image, label = self.load(index)
        except BadSampleError as err:
            if self.on_bad_sample != "skip":
                raise
            self._warn_skip(index, err)
            if not self.train:
                return None
            return self._replacement(index)
        return self._make_sample(index, image, label)

    def _warn_skip(self, index: int, err: Exception) -> None:
        rel = self.samples[index].rel
        if self.train:
            self.skip_events.append(f"{self.samples[index].image}\t{err}")
        if rel not in self._skipped:
            self._skipped.add(rel)
            warnings.warn(f"{self.name}: skipping {rel}: {err}", stacklevel=3)

    def _replacement(self, index: int) -> dict:
        """The next loadable sample after a skipped one (training only)."""
        for step in range(1, len(self)):
            other = (index + step) % len(self)
            try:
                image, label = self.load(other)
            except BadSampleError as err:
                self._warn_skip(other, err)
                continue
            return self._make_sample(other, image, label)
        raise DataError(f"{self.name}: every sample is unreadable")

    def _make_sample(self, index: int, image: np.ndarray, label: Optional[np.ndarray]) -> dict:
        sample: dict[str, Any] = {"name": self.samples[index].name}
        if self.train and label is None:
            raise DataError(f"{self.name}: training needs labels (with_labels is false)")
        if self.transform is None:
            sample["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
            tensor_label = None if label is None else torch.from_numpy(label).long()
        else:
            sample["image"], tensor_label = self.transform(image, label, self.rng())
        if tensor_label is not None:
            sample["label"] = tensor_label
        if not self.train:
            sample["ori_size"] = tuple(label.shape) if label is not None else tuple(image.shape[:2])
        return sample

    def restrict(self, keep: Iterable[int]) -> "SegmentationDataset":
        """Keep only the samples at the given indices (in that order); returns self."""
        self.samples = [self.samples[i] for i in keep]
        if not self.samples:
            raise DataError(f"dataset {self.name} has no samples left after selecting a subset")
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, train={self.train})"
