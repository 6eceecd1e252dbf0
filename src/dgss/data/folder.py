"""A dataset from any folder of images and masks: the user's own data and the adverse-condition test
sets (Dark Zurich, Nighttime Driving, Foggy Zurich, Foggy Driving; see configs/datasets/).

Which images (``images``: a folder or a glob pattern, relative to the root), how each finds its mask
(one of: ``labels`` folder + suffixes, ``label_rules`` substitutions, ``label_list`` file), and what
the mask values mean (``label_format``, ``classes``, ``id_map``) are options::

    type: folder
    root: /data/my_set
    options:
      images: images            # or "images/**/*.jpg"
      labels: masks             # masks/<same relative path>/<stem>.png
      classes: [background, crack]
      label_format: binary      # 0 -> 0, anything above binary_threshold -> 1

``label_rules`` is a list of alternatives, each an ordered mapping of substring replacements applied
to the image path relative to the root; the first alternative whose result exists is the label::

      label_rules:
        - {"leftImg8bit/test/": "gtFine/test/", "_leftImg8bit.png": "_gtFine_labelTrainIds.png"}
        - {"leftImg8bit/test_extra/": "gtCoarse/test_extra/", "_leftImg8bit.png": "_gtCoarse_labelTrainIds.png"}
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import numpy as np

from .base import Sample, SegmentationDataset, pair_labels, require_dir, scan_files
from .image_io import IMAGE_EXTENSIONS, DataError
from .labels import CITYSCAPES_CLASSES, IGNORE_INDEX, LabelMapping, cityscapes_id_mapping, train_id_mapping

__all__ = ["FolderDataset", "read_list_file"]


def read_list_file(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a list file (first whitespace-separated field of each)."""
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    lines = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line.split()[0])
    return lines


def _resolve(root: Path, relative: str) -> Path:
    path = Path(relative).expanduser()
    return path if path.is_absolute() else root / path


class FolderDataset(SegmentationDataset):
    """Images and masks found by folder, glob, substitution rules or list files; see the module doc."""

    layout = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "",
        *,
        images: Optional[str] = None,
        labels: Optional[str] = None,
        image_suffix: Optional[str] = None,
        label_suffix: str = ".png",
        label_rules: Optional[Sequence[Mapping[str, str]]] = None,
        image_list: Optional[str] = None,
        label_list: Optional[str] = None,
        classes: Optional[Sequence[str]] = None,
        label_format: Literal["train_ids", "cityscapes_ids", "binary"] = "train_ids",
        id_map: Optional[Mapping] = None,
        ignore_values: Sequence[int] = (),
        binary_threshold: int = 0,
        with_labels: bool = True,
        **common,
    ) -> None:
        root = require_dir(Path(root).expanduser(), "folder dataset root")
        if (images is None) == (image_list is None):
            raise DataError(f"folder dataset {root}: set exactly one of the options 'images' (a folder or "
                            "glob pattern under the root) or 'image_list' (a list file)")
        pairing = [k for k, v in (("labels", labels), ("label_rules", label_rules), ("label_list", label_list)) if v]
        if with_labels and len(pairing) != 1:
            raise DataError(f"folder dataset {root}: set exactly one of the options labels, label_rules, "
                            f"label_list to pair images with masks (got {', '.join(pairing) or 'none'}), "
                            "or with_labels: false")
        image_paths = self._find_images(root, images, image_list)
        samples = self._pair(root, image_paths, images, labels, image_suffix, label_suffix, label_rules,
                             label_list, with_labels)
        if label_format == "binary" and classes is None:
            classes = ("background", "foreground")
        classes = tuple(classes) if classes is not None else CITYSCAPES_CLASSES
        mapping = self._mapping(label_format, classes, id_map, ignore_values, binary_threshold)
        super().__init__(samples, classes=classes, mappings={"default": mapping}, **common)

    @staticmethod
    def _find_images(root: Path, images: Optional[str], image_list: Optional[str]) -> list[Path]:
        if image_list is not None:
            paths = [_resolve(root, line) for line in read_list_file(_resolve(root, image_list))]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"{len(missing)} images named in {image_list} do not exist, e.g. {missing[0]}")
        elif glob.has_magic(images):
            paths = sorted(Path(p) for p in glob.glob(str(root / images), recursive=True) if os.path.isfile(p))
        else:
            folder = require_dir(_resolve(root, images), "folder dataset image folder")
            paths = [p for p in scan_files(folder, "") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not paths:
            raise DataError(f"no images found for folder dataset {root} (images={images!r}, image_list={image_list!r})")
        return paths

    @staticmethod
    def _pair(root, image_paths, images, labels, image_suffix, label_suffix, label_rules, label_list,
              with_labels) -> list[Sample]:
        if with_labels and label_list is not None:
            label_paths = [_resolve(root, line) for line in read_list_file(_resolve(root, label_list))]
            if len(label_paths) != len(image_paths):
                raise DataError(f"{label_list} lists {len(label_paths)} labels for {len(image_paths)} images")
            samples = []
            for image, label in zip(image_paths, label_paths):
                if not label.is_file():
                    raise DataError(f"label of image {image} not found: {label} (from {label_list})")
                samples.append(Sample(image=image, label=label, rel=_relative(image, root)))
            return samples
        if with_labels and labels is not None:
            label_dir = require_dir(_resolve(root, labels), "folder dataset label folder")
            image_dir = _pattern_base(root, images)

            def candidates(image: Path):
                rel = image.relative_to(image_dir) if image.is_relative_to(image_dir) else Path(image.name)
                name = rel.name
                if image_suffix and name.endswith(image_suffix):
                    name = name[: -len(image_suffix)]
                else:
                    name = rel.stem
                return [(label_dir / rel.parent / f"{name}{label_suffix}", "default")]
        else:
            def candidates(image: Path):
                rel = _relative(image, root)
                out = []
                for rule in label_rules or ():
                    target = rel
                    for old, new in rule.items():
                        target = target.replace(old, new)
                    out.append((root / target, "default"))
                return out

        samples = pair_labels(image_paths, root, candidates, with_labels=with_labels)
        return [Sample(image=s.image, label=s.label, rel=_relative(s.image, root)) for s in samples]

    @staticmethod
    def _mapping(label_format, classes, id_map, ignore_values, binary_threshold) -> LabelMapping:
        if id_map:
            pairs = {int(k): int(v) for k, v in id_map.items()}
            bad = {v for v in pairs.values() if not (0 <= v < len(classes) or v == IGNORE_INDEX)}
            if bad:
                raise DataError(f"id_map targets {sorted(bad)} are not class indices 0..{len(classes) - 1} or 255")
            size = max(256, max(pairs) + 1, max(ignore_values, default=0) + 1)
            table = np.full(size, IGNORE_INDEX, np.uint8)
            valid = np.zeros(size, bool)
            for raw, target in pairs.items():
                table[raw], valid[raw] = target, True
            valid[list(ignore_values) + [IGNORE_INDEX]] = True
            return LabelMapping(table, valid, f"id_map ({len(pairs)} values)")
        if label_format == "cityscapes_ids":
            return cityscapes_id_mapping()
        if label_format == "binary":
            table = np.where(np.arange(256) > binary_threshold, 1, 0).astype(np.uint8)
            table[list(ignore_values)] = IGNORE_INDEX
            return LabelMapping(table, np.ones(256, bool), f"binary masks (> {binary_threshold} is class 1)")
        if label_format != "train_ids":
            raise DataError(f"label_format must be train_ids, cityscapes_ids or binary, got {label_format!r}")
        return train_id_mapping(len(classes), extra_ignore=tuple(ignore_values))


def _pattern_base(root: Path, images: Optional[str]) -> Path:
    """The folder an image pattern starts from: its leading components without wildcards."""
    if images is None:
        return root
    fixed = []
    for part in Path(images).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return _resolve(root, str(Path(*fixed))) if fixed else root


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
