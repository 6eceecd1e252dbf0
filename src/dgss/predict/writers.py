"""What ``dgss predict`` writes, one folder per format under ``--out``:

=========  ============================================================================
colour     the train-id map in the Cityscapes palette (RGB PNG)
overlay    the image blended with the colours (``opacity`` of the colours, default 0.5)
panel      the image and the colour map side by side
trainids   raw train ids 0..18 as an 8-bit grey PNG (255: ignore)
labelids   Cityscapes label ids (road 7 ... bicycle 33) as an 8-bit PNG: the test-server format
=========  ============================================================================

For a video, the three visual formats become one ``.mp4`` each; ids are written per frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data.labels import colorize
from .predictor import Prediction, train_ids_to_label_ids

__all__ = ["FORMATS", "VISUAL_FORMATS", "parse_formats", "render", "write_image", "output_path"]

FORMATS = ("colour", "overlay", "panel", "trainids", "labelids")
VISUAL_FORMATS = ("colour", "overlay", "panel")  # RGB pictures (videos for video inputs)
_ALIASES = {"color": "colour", "train_ids": "trainids", "label_ids": "labelids", "side-by-side": "panel"}


def parse_formats(text: str) -> list[str]:
    """``"colour,labelids"`` -> ["colour", "labelids"]; unknown names raise ValueError naming the valid ones."""
    formats = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        part = _ALIASES.get(part, part)
        if part not in FORMATS:
            raise ValueError(f"unknown --format '{part}' (choose from {', '.join(FORMATS)})")
        if part not in formats:
            formats.append(part)
    if not formats:
        raise ValueError(f"--format names no format (choose from {', '.join(FORMATS)})")
    return formats


def render(fmt: str, image: np.ndarray, prediction: Prediction, *, opacity: float = 0.5) -> np.ndarray:
    """The array of one format: H x W x 3 uint8 (visual formats, panel: H x 2W x 3) or H x W uint8 (ids)."""
    labels = prediction.labels.numpy()
    if fmt == "trainids":
        return labels.astype(np.uint8)
    if fmt == "labelids":
        return train_ids_to_label_ids(labels)
    colours = colorize(labels)
    if fmt == "colour":
        return colours
    if fmt == "overlay":
        blend = image.astype(np.float32) * (1.0 - opacity) + colours.astype(np.float32) * opacity
        return np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if fmt == "panel":
        return np.concatenate([image, colours], axis=1)
    raise ValueError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")


def output_path(out_dir: Path, fmt: str, name: Path, suffix: str = ".png") -> Path:
    """``out_dir/fmt/name.suffix``."""
    return Path(out_dir) / fmt / name.with_name(name.name + suffix)


def write_image(out_dir: Path, name: Path, image: np.ndarray, prediction: Prediction, formats: Sequence[str],
                *, opacity: float = 0.5) -> list[Path]:
    """Write every format of one image as PNG; returns the paths written."""
    written = []
    for fmt in formats:
        path = output_path(out_dir, fmt, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(fmt, image, prediction, opacity=opacity)).save(path)
        written.append(path)
    return written
