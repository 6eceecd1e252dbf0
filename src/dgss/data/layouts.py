"""One dataset class per benchmark, reading the folders exactly as the official downloads unpack.

Labels become the 19 train ids on the fly (protocols.md), so no offline conversion is needed; files
already converted by the usual scripts (``*_labelTrainIds.png``) are used when present.

Every class takes ``root`` and ``split`` plus its own keyword options (``DatasetConfig.options``)
and the common keywords of :class:`~dgss.data.base.SegmentationDataset`.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image

from .base import SegmentationDataset, pair_labels, require_dir, scan_files
from .image_io import DataError, read_png_16bit
from .labels import (
    SYNTHIA_13_TRAIN_IDS,
    SYNTHIA_16_TRAIN_IDS,
    cityscapes_id_mapping,
    mapillary_mapping,
    synthia_mapping,
    train_id_mapping,
    urbansyn_mapping,
)

__all__ = [
    "GTAVDataset",
    "SynthiaDataset",
    "CityscapesDataset",
    "BDD100KDataset",
    "MapillaryDataset",
    "ACDCDataset",
    "UrbanSynDataset",
    "ACDC_CONDITIONS",
]

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
_BOTH_ENCODINGS = {"train_ids": train_id_mapping(), "label_ids": cityscapes_id_mapping()}


def _root(root: str | Path, dataset: str, expected: str) -> Path:
    return require_dir(Path(root).expanduser(), f"{dataset} root", f"expected {expected} under it")


class GTAVDataset(SegmentationDataset):
    """GTAV: ``images/*.png`` and ``labels/*.png`` holding Cityscapes label ids.

    There are no split folders; ``split`` is not used (pick subsets with ``list_file``,
    ``first_n`` or ``fraction``). A converted ``labels/<stem>_labelTrainIds.png`` is preferred.
    """

    layout = "gtav"

    def __init__(self, root: str | Path, split: str = "all", *, with_labels: bool = True, **common) -> None:
        root = _root(root, "GTAV", "images/ and labels/")
        images_dir = require_dir(root / "images", "GTAV images folder")
        labels_dir = require_dir(root / "labels", "GTAV labels folder") if with_labels else root / "labels"

        def candidates(image: Path):
            folder = labels_dir / image.parent.relative_to(images_dir)
            return [(folder / f"{image.stem}_labelTrainIds.png", "train_ids"), (folder / image.name, "label_ids")]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, ".png"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings=dict(_BOTH_ENCODINGS), **common)


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA RAND-CITYSCAPES: ``RGB/*.png`` and ``GT/LABELS/*.png``.

    Labels are 16-bit 3-channel PNGs with the class id in the first (R) channel (OpenCV users read
    it as the last channel, BGR). ``eval_classes``: 16 (default), 13 or 19 classes averaged in mIoU.
    """

    layout = "synthia"

    def __init__(self, root: str | Path, split: str = "all", *, eval_classes: int = 16,
                 with_labels: bool = True, **common) -> None:
        if eval_classes not in (13, 16, 19):
            raise DataError(f"SYNTHIA eval_classes must be 13, 16 or 19, got {eval_classes}")
        root = _root(root, "SYNTHIA", "RGB/ and GT/LABELS/")
        images_dir = require_dir(root / "RGB", "SYNTHIA RGB folder")
        labels_dir = require_dir(root / "GT" / "LABELS", "SYNTHIA label folder") if with_labels else root

        def candidates(image: Path):
            return [(labels_dir / image.relative_to(images_dir), "default")]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, ".png"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings={"default": synthia_mapping()}, **common)
        self.eval_class_ids = {13: SYNTHIA_13_TRAIN_IDS, 16: SYNTHIA_16_TRAIN_IDS, 19: None}[eval_classes]

    def read_raw_label(self, sample) -> np.ndarray:
        return read_png_16bit(sample.label)[..., 0]  # the class id channel, at full 16-bit depth


class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/<split>/<city>/``
    ``*_gtFine_labelTrainIds.png`` or, mapped on the fly, ``*_gtFine_labelIds.png``.

    ``label_type``: "auto" (train ids when present, else label ids), "train_ids" or "label_ids".
    """

    layout = "cityscapes"

    def __init__(self, root: str | Path, split: str = "val", *,
                 label_type: Literal["auto", "train_ids", "label_ids"] = "auto",
                 with_labels: bool = True, **common) -> None:
        if label_type not in ("auto", "train_ids", "label_ids"):
            raise DataError(f"Cityscapes label_type must be auto, train_ids or label_ids, got {label_type!r}")
        root = _root(root, "Cityscapes", "leftImg8bit/ and gtFine/")
        images_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes split folder '{split}'")
        labels_dir = root / "gtFine" / split
        if with_labels:
            require_dir(labels_dir, f"Cityscapes gtFine split folder '{split}'")
        suffixes = {"train_ids": "_gtFine_labelTrainIds.png", "label_ids": "_gtFine_labelIds.png"}
        kinds = ["train_ids", "label_ids"] if label_type == "auto" else [label_type]

        def candidates(image: Path):
            base = image.name[: -len("_leftImg8bit.png")]
            folder = labels_dir / image.parent.relative_to(images_dir)
            return [(folder / f"{base}{suffixes[kind]}", kind) for kind in kinds]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, "_leftImg8bit.png"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings=dict(_BOTH_ENCODINGS), **common)


class BDD100KDataset(SegmentationDataset):
    """BDD100K (10K semantic segmentation): ``images/10k/<split>/*.jpg`` and
    ``labels/sem_seg/masks/<split>/*.png`` (already train ids)."""

    layout = "bdd100k"

    def __init__(self, root: str | Path, split: str = "val", *, with_labels: bool = True, **common) -> None:
        root = _root(root, "BDD100K", "images/10k/ and labels/sem_seg/masks/")
        images_dir = require_dir(root / "images" / "10k" / split, f"BDD100K image split folder '{split}'")
        labels_dir = root / "labels" / "sem_seg" / "masks" / split
        if with_labels:
            require_dir(labels_dir, f"BDD100K mask split folder '{split}'")

        def candidates(image: Path):
            return [(labels_dir / image.parent.relative_to(images_dir) / f"{image.stem}.png", "default")]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, ".jpg"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, **common)


class MapillaryDataset(SegmentationDataset):
    """Mapillary Vistas: ``<split>/images/*.jpg`` and ``<split>/<version>/labels/*.png`` (palette
    PNGs of class indices), classes named in ``config_<version>.json`` at the root and mapped to
    train ids by name (protocols.md). ``split``: training | validation | testing (or train/val/test).

    ``half_resolution``: halve image (bicubic) and label (nearest) after loading, as the published
    evaluation does; default (None) is on for evaluation and off for training.
    """

    layout = "mapillary"
    _SPLITS = {"train": "training", "val": "validation", "test": "testing"}

    def __init__(self, root: str | Path, split: str = "validation", *, version: str = "v1.2",
                 half_resolution: Optional[bool] = None, with_labels: bool = True, **common) -> None:
        root = _root(root, "Mapillary Vistas", f"<split>/images/ and config_{version}.json")
        split = self._SPLITS.get(split, split)
        images_dir = require_dir(root / split / "images", f"Mapillary split folder '{split}'")
        labels_dir = root / split / version / "labels"
        mappings = None
        if with_labels:
            require_dir(labels_dir, f"Mapillary {version} label folder of '{split}'")
            mappings = {"default": self._read_mapping(root / f"config_{version}.json")}

        def candidates(image: Path):
            return [(labels_dir / image.parent.relative_to(images_dir) / f"{image.stem}.png", "default")]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, ".jpg"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings=mappings, **common)
        self.half_resolution = (not self.train) if half_resolution is None else half_resolution

    @staticmethod
    def _read_mapping(path: Path):
        if not path.is_file():
            raise DataError(f"Mapillary class list not found: {path} (it ships at the dataset root)")
        try:
            labels = json.loads(path.read_text())["labels"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot read the 'labels' list of {path}: {err}") from err
        return mapillary_mapping(labels, source=str(path))

    def postprocess(self, image, label):
        if not self.half_resolution:
            return image, label
        height, width = image.shape[:2]
        size = (width // 2, height // 2)  # PIL sizes are (W, H)
        image = np.array(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        if label is not None:
            label = np.array(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
        return image, label


class ACDCDataset(SegmentationDataset):
    """ACDC: ``rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png`` and
    ``gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png`` (or ``*_gt_labelIds.png``).

    ``condition``: fog | night | rain | snow, or None for all four. The test split has no public
    labels: use ``with_labels: false`` to predict on it.
    """

    layout = "acdc"

    def __init__(self, root: str | Path, split: str = "val", *, condition: Optional[str] = None,
                 with_labels: bool = True, **common) -> None:
        if condition is not None and condition not in ACDC_CONDITIONS:
            close = difflib.get_close_matches(str(condition), ACDC_CONDITIONS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"ACDC condition must be one of {', '.join(ACDC_CONDITIONS)}, got {condition!r}{hint}")
        root = _root(root, "ACDC", "rgb_anon/ and gt/")
        suffixes = {"train_ids": "_gt_labelTrainIds.png", "label_ids": "_gt_labelIds.png"}
        samples = []
        for cond in [condition] if condition else ACDC_CONDITIONS:
            images_dir = require_dir(root / "rgb_anon" / cond / split, f"ACDC folder for {cond}/{split}")
            labels_dir = root / "gt" / cond / split
            if with_labels:
                require_dir(labels_dir, f"ACDC label folder for {cond}/{split}")

            def candidates(image: Path, images_dir=images_dir, labels_dir=labels_dir):
                base = image.name[: -len("_rgb_anon.png")]
                folder = labels_dir / image.parent.relative_to(images_dir)
                return [(folder / f"{base}{suffixes[kind]}", kind) for kind in ("train_ids", "label_ids")]

            existing = set(scan_files(labels_dir, ".png")) if with_labels else None
            samples += pair_labels(scan_files(images_dir, "_rgb_anon.png"), root, candidates,
                                   with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings=dict(_BOTH_ENCODINGS), **common)


class UrbanSynDataset(SegmentationDataset):
    """UrbanSyn: ``rgb/*.png`` and ``ss/*.png`` holding train ids with 19 = void (-> 255).

    A label shares the image's name, or has its ``rgb`` prefix replaced by ``ss``
    (``rgb/rgb_0001.png`` -> ``ss/ss_0001.png``). There are no split folders; ``split`` is not used.
    """

    layout = "urbansyn"

    def __init__(self, root: str | Path, split: str = "all", *, with_labels: bool = True, **common) -> None:
        root = _root(root, "UrbanSyn", "rgb/ and ss/")
        images_dir = require_dir(root / "rgb", "UrbanSyn rgb folder")
        labels_dir = require_dir(root / "ss", "UrbanSyn ss folder") if with_labels else root / "ss"

        def candidates(image: Path):
            folder = labels_dir / image.parent.relative_to(images_dir)
            names = [image.name]
            if image.name.startswith("rgb"):
                names.append("ss" + image.name[3:])
            return [(folder / n, "default") for n in names]

        existing = set(scan_files(labels_dir, ".png")) if with_labels else None
        samples = pair_labels(scan_files(images_dir, ".png"), root, candidates,
                              with_labels=with_labels, existing=existing)
        super().__init__(samples, mappings={"default": urbansyn_mapping()}, **common)
