"""Class names, colours and the maps from each dataset's label encoding to the 19 Cityscapes train ids.

Every dataset is evaluated in the 19 Cityscapes train classes with 255 = ignore (protocols.md). The
maps here are plain numpy lookup tables, applied with one fancy-indexing call per label image, plus a
``valid`` mask so that a value the dataset should never contain is reported instead of being
silently mapped to "ignore".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "LABEL_ID_TO_TRAIN_ID",
    "TRAIN_ID_TO_LABEL_ID",
    "SYNTHIA_16_TRAIN_IDS",
    "SYNTHIA_13_TRAIN_IDS",
    "LabelMapping",
    "LabelValueError",
    "train_id_mapping",
    "cityscapes_id_mapping",
    "synthia_mapping",
    "urbansyn_mapping",
    "mapillary_train_id",
    "mapillary_mapping",
    "colorize",
]

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Official Cityscapes colours, in train-id order (RGB).
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Cityscapes label id of each train id (GTAV labels use the same ids).
_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _table(pairs: Mapping[int, int], size: int = 256, fill: int = IGNORE_INDEX) -> np.ndarray:
    table = np.full(size, fill, dtype=np.uint8)
    for src, dst in pairs.items():
        table[src] = dst
    return table


#: 256-entry uint8 table: Cityscapes/GTAV label id -> train id (255 for every non-evaluated id).
LABEL_ID_TO_TRAIN_ID: np.ndarray = _table({lid: tid for tid, lid in enumerate(_TRAIN_LABEL_IDS)})
#: 256-entry uint8 table: train id -> Cityscapes label id; 255 (ignore) and unused entries -> 0
#: ("unlabeled"), the encoding the Cityscapes test server expects.
TRAIN_ID_TO_LABEL_ID: np.ndarray = _table(dict(enumerate(_TRAIN_LABEL_IDS)), fill=0)

#: SYNTHIA is reported on 16 classes (no terrain, truck, train) or 13 (also no wall, fence, pole).
SYNTHIA_16_TRAIN_IDS: tuple[int, ...] = tuple(i for i in range(19) if i not in (9, 14, 16))
SYNTHIA_13_TRAIN_IDS: tuple[int, ...] = tuple(i for i in SYNTHIA_16_TRAIN_IDS if i not in (3, 4, 5))


class LabelValueError(ValueError):
    """A label image holds values its dataset's mapping does not define."""


@dataclass(frozen=True)
class LabelMapping:
    """Raw label value -> class index, as a lookup table with a mask of the values that may occur.

    ``table[v]`` is the class index (or 255) of raw value ``v``; ``valid[v]`` says whether ``v`` is a
    value the dataset defines. Values at or beyond ``len(table)`` are never valid.
    """

    table: np.ndarray  # (N,) uint8
    valid: np.ndarray  # (N,) bool
    description: str  # what the raw values are, for error messages

    def __call__(self, raw: np.ndarray, path: str | Path = "", *, on_unknown: str = "error") -> np.ndarray:
        """Map an integer array ``raw`` (H x W) to uint8 class indices (H x W).

        ``on_unknown="error"`` raises :class:`LabelValueError` naming ``path`` and the offending
        values; ``"ignore"`` maps them to 255 with a warning.
        """
        size = len(self.table)
        if raw.dtype == np.uint8 and size >= 256:
            index = raw  # the common case: no range check needed, no copy
            bad = ~self.valid[index]
        else:
            raw = raw.astype(np.int64, copy=False)
            inside = (raw >= 0) & (raw < size)
            index = np.where(inside, raw, 0)
            bad = ~inside | ~self.valid[index]
        out = self.table[index]
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:12]) + (" ..." if len(values) > 12 else "")
            message = (f"label {path} contains values outside the mapping of {self.description}: "
                       f"{shown} ({int(bad.sum())} pixels)")
            if on_unknown == "error":
                raise LabelValueError(message + "; set on_unknown_label: ignore to map them to 255")
            warnings.warn(message + "; mapped to 255 (ignore)", stacklevel=2)
            out = out.copy()
            out[bad] = IGNORE_INDEX
        return out


def _mapping(pairs: Mapping[int, int], valid_values: Sequence[int], size: int, description: str) -> LabelMapping:
    valid = np.zeros(size, dtype=bool)
    valid[list(valid_values)] = True
    return LabelMapping(table=_table(pairs, size=size), valid=valid, description=description)


def train_id_mapping(num_classes: int = 19, *, extra_ignore: Sequence[int] = ()) -> LabelMapping:
    """Labels already stored as class indices 0..num_classes-1 plus 255 (and ``extra_ignore`` -> 255)."""
    pairs = {i: i for i in range(num_classes)}
    valid = list(range(num_classes)) + [IGNORE_INDEX] + list(extra_ignore)
    return _mapping(pairs, valid, 256, f"train ids 0..{num_classes - 1} and 255")


def cityscapes_id_mapping() -> LabelMapping:
    """Cityscapes/GTAV label ids 0..33 (255 for the license plate's -1) -> train ids."""
    pairs = {label_id: train_id for train_id, label_id in enumerate(_TRAIN_LABEL_IDS)}
    return _mapping(pairs, list(range(34)) + [IGNORE_INDEX], 256, "Cityscapes label ids 0..33")


# SYNTHIA RAND-CITYSCAPES class id -> train id (protocols.md); ids 0..22 exist.
_SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                     17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def synthia_mapping() -> LabelMapping:
    """SYNTHIA class ids 0..22 (first channel of its 16-bit label PNGs) -> train ids."""
    return _mapping(_SYNTHIA_TO_TRAIN, range(23), 256, "SYNTHIA class ids 0..22")


def urbansyn_mapping() -> LabelMapping:
    """UrbanSyn stores train ids with 19 = void."""
    return train_id_mapping(19, extra_ignore=(19,))


# Mapillary classes that are not an exact Cityscapes name, matched by a fragment of the compacted
# readable name (lower case, no spaces or hyphens), in this order (protocols.md).
_MAPILLARY_FRAGMENT_RULES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("trafficsign", "front", "back"), 7),
    (("onrail",), 16),
    (("cyclist", "rider"), 12),
    (("pole", "streetlight"), 5),
    (("curb", "pedestrianarea"), 1),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), 0),
)


def _compact(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "").replace("_", "")


def mapillary_train_id(readable_name: str) -> int:
    """Train id of a Mapillary Vistas class given its readable name (e.g. "Lane Marking - General")."""
    key = _compact(readable_name)
    exact = {_compact(name): train_id for train_id, name in enumerate(CITYSCAPES_CLASSES)}
    if key in exact:
        return exact[key]
    for fragments, train_id in _MAPILLARY_FRAGMENT_RULES:
        if any(fragment in key for fragment in fragments):
            return train_id
    return IGNORE_INDEX


def mapillary_mapping(labels: Sequence[Mapping], source: str = "config") -> LabelMapping:
    """Mapping for Mapillary label PNGs (palette indices) from the ``labels`` list of its config json."""
    pairs = {}
    for index, entry in enumerate(labels):
        name = entry.get("readable") or entry.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{source}: label entry {index} has neither 'readable' nor 'name'")
        pairs[index] = mapillary_train_id(name)
    return _mapping(pairs, range(len(labels)), 256, f"the {len(labels)} classes of {source}")


def colorize(train_ids: np.ndarray, palette: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """H x W class indices -> H x W x 3 uint8 colours (Cityscapes palette; ignore is black)."""
    palette = CITYSCAPES_PALETTE if palette is None else palette
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(train_ids, dtype=np.uint8)]
