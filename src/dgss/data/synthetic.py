"""Procedural multi-domain street scenes: labelled images for tests, the demo and CPU experiments.

``generate(domain, seed, size)`` returns an H x W x 3 uint8 image and its H x W uint8 train-id
label (all 19 Cityscapes classes occur across a handful of seeds). The layout (what is where) comes
from ``seed`` alone for every domain except "geometry", so the same seed gives the same label map in
"clean", "textured", "night", "fog", "rain" and "colorshift": domains differ only in appearance,
like a scene in daylight and at night, which makes them a controlled domain-generalisation testbed.

Domains:
    clean       flat colours, no texture or noise (the simplest synthetic look)
    textured    surface textures, lit windows off, sensor noise, exposure and tint changes
    night       dark, blue ambient light, street lamps, car lights, lit windows, strong noise
    fog         textured, blended into grey airlight with distance
    rain        textured, darker and desaturated, rain streaks
    colorshift  textured, through a different colour response (hue rotation, gains, gamma)
    geometry    textured, other layout statistics (lower camera, narrower street, taller
                facades, more and larger objects)

Speed: a few hundred 128 x 256 images per second on one CPU core (benchmarks/bench_synthetic.py).
Writers produce the GTAV and Cityscapes download layouts, so the real dataset classes can be tried
end to end; :class:`SyntheticDataset` renders on the fly (``type: synthetic``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import Sample, SegmentationDataset
from .image_io import DataError
from .labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, TRAIN_ID_TO_LABEL_ID
from .scene_layout import (BUILDING, ROAD, SKY, STREET, OBJECT_STYLES, WIDE_ANGLE, LayoutStats, Scene,
                           build_scene)

__all__ = ["DOMAINS", "ALL_DOMAINS", "DomainStyle", "DOMAIN_STYLES", "SEVERITY_STYLES", "generate", "write_gtav_layout",
           "write_cityscapes_layout", "SyntheticDataset",
           "TESTBED_CLASSES", "TESTBED_OF_TRAIN_ID", "LABEL_SETS"]


@dataclass(frozen=True)
class DomainStyle:
    """How a domain renders a scene. Ranges are drawn per image."""

    layout: LayoutStats = STREET
    texture: float = 1.0  # strength of the surface textures (0: flat colours)
    windows: bool = True
    grain: float = 4.0  # sensor noise standard deviation (0..255 scale)
    exposure: tuple[float, float] = (0.8, 1.15)
    night: bool = False
    fog_visibility: Optional[tuple[float, float]] = None  # in depth units (1 = the bottom row)
    rain: bool = False
    rain_strength: tuple[float, float] = (90.0, 150.0)  # brightness added by the streaks (0..255 scale)
    colour_shift: bool = False
    hue_angle: tuple[float, float] = (0.55 * np.pi, 1.45 * np.pi)  # radians of the colour shift's hue rotation
    blur: float = 0.0  # Gaussian blur sigma in pixels (defocus), before the sensor noise
    # snow: the DG testbed's unseen look (no pretraining pool renders it). Snow settles on the ground
    # surfaces (road, sidewalk, vegetation, terrain) in patches of ``snow_cover`` coverage, an overcast
    # haze pulls every colour towards white by ``snow_haze``, and ``snowfall`` of the pixels are flakes.
    # Labels are unchanged: a snowed-over road is still road (ACDC's snow labels are so).
    snow: bool = False
    snow_cover: tuple[float, float] = (0.3, 0.5)
    snow_haze: tuple[float, float] = (0.1, 0.2)
    snowfall: tuple[float, float] = (0.002, 0.004)


DOMAIN_STYLES: dict[str, DomainStyle] = {
    "clean": DomainStyle(texture=0.0, windows=False, grain=0.0, exposure=(0.97, 1.03)),
    "textured": DomainStyle(),
    "night": DomainStyle(grain=7.0, exposure=(0.10, 0.18), night=True),
    "fog": DomainStyle(grain=3.0, exposure=(0.9, 1.1), fog_visibility=(1.0, 3.0)),
    "rain": DomainStyle(grain=5.0, exposure=(0.5, 0.7), rain=True),
    "colorshift": DomainStyle(exposure=(0.85, 1.1), colour_shift=True),
    "geometry": DomainStyle(layout=WIDE_ANGLE),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_STYLES)

# The DG testbed's graded shifts (dgss.testbed): each target family at two severities, and the
# validation family ("blur") that alone may choose settings. Kept apart from DOMAINS, whose seven
# looks the old label-pretrained foundation's recipe enumerates.
SEVERITY_STYLES: dict[str, DomainStyle] = {
    "night-1": DomainStyle(grain=6.0, exposure=(0.22, 0.30), night=True),
    "night-2": DomainStyle(grain=8.0, exposure=(0.10, 0.16), night=True),
    "fog-1": DomainStyle(grain=3.0, exposure=(0.9, 1.1), fog_visibility=(3.0, 5.0)),
    "fog-2": DomainStyle(grain=3.0, exposure=(0.9, 1.1), fog_visibility=(0.8, 1.5)),
    "rain-1": DomainStyle(grain=4.0, exposure=(0.7, 0.85), rain=True, rain_strength=(50.0, 80.0)),
    "rain-2": DomainStyle(grain=6.0, exposure=(0.45, 0.6), rain=True, rain_strength=(120.0, 170.0)),
    "colorshift-1": DomainStyle(exposure=(0.85, 1.1), colour_shift=True, hue_angle=(0.2 * np.pi, 0.45 * np.pi)),
    "colorshift-2": DomainStyle(exposure=(0.85, 1.1), colour_shift=True),
    "blur-1": DomainStyle(grain=4.0, blur=1.0),
    "blur-2": DomainStyle(grain=10.0, blur=2.0),
    # candidate severities screened for the testbed (docs/figures/testbed_log.md, "Targets off the floor"); appended
    # last so that the draws of the styles above keep their indices
    "night-a": DomainStyle(grain=3.0, exposure=(0.55, 0.70), night=True),
    "night-b": DomainStyle(grain=4.0, exposure=(0.40, 0.50), night=True),
    "night-c": DomainStyle(grain=5.0, exposure=(0.30, 0.38), night=True),
    "colorshift-a": DomainStyle(exposure=(0.85, 1.1), colour_shift=True, hue_angle=(0.45 * np.pi, 0.65 * np.pi)),
    "colorshift-b": DomainStyle(exposure=(0.85, 1.1), colour_shift=True, hue_angle=(0.65 * np.pi, 0.85 * np.pi)),
    # wide nights: each image's exposure drawn over a broad range, as a real night set mixes lit and unlit
    # streets (docs/figures/testbed_log.md, "Wide nights")
    "night-w1": DomainStyle(grain=6.0, exposure=(0.15, 0.55), night=True),
    "night-w2": DomainStyle(grain=8.0, exposure=(0.06, 0.30), night=True),
    # the unseen look (pool version 3 renders every other look; snow never): appended, so every style above
    # keeps its index and its images
    "snow-1": DomainStyle(grain=3.0, exposure=(0.95, 1.1), snow=True),
    "snow-2": DomainStyle(grain=4.0, exposure=(0.9, 1.05), snow=True, snow_cover=(0.6, 0.9), snow_haze=(0.25, 0.4),
                          snowfall=(0.006, 0.01)),
}
_ALL_STYLES: dict[str, DomainStyle] = {**DOMAIN_STYLES, **SEVERITY_STYLES}
_STYLE_INDEX = {name: i for i, name in enumerate(DOMAINS)} | {name: 100 + i for i, name in enumerate(SEVERITY_STYLES)}
ALL_DOMAINS: tuple[str, ...] = tuple(_ALL_STYLES)

# where snow settles (train ids): road, sidewalk, vegetation, terrain
_SNOW_GROUND = np.array([0, 1, 8, 9], np.uint8)

# Per-class strength of the coarse (blotches, stains) and fine (grain, leaves) textures.
_COARSE = np.array([0.10, 0.12, 0.18, 0.15, 0.12, 0.06, 0.03, 0.03, 0.30, 0.28, 0.10, 0.08, 0.08,
                    0.04, 0.06, 0.05, 0.05, 0.04, 0.04], np.float32)
_FINE = np.array([0.16, 0.10, 0.10, 0.10, 0.22, 0.05, 0.02, 0.02, 0.40, 0.32, 0.02, 0.06, 0.06,
                  0.03, 0.04, 0.04, 0.04, 0.05, 0.05], np.float32)


@dataclass(frozen=True)
class _Fields:
    coarse: np.ndarray  # Hc x Wc, ~zero mean
    fine: np.ndarray  # Hc x Wc
    grain: np.ndarray  # 3 x Hc x Wc, standard normal
    streaks: np.ndarray  # Hc x Wc, 0..1 slanted rain streaks


@functools.lru_cache(maxsize=8)
def _fields(height: int, width: int) -> _Fields:
    """Noise fields 1.5x the image size, made once per size; images use random windows of them."""
    hc, wc = height + height // 2 + 1, width + width // 2 + 1
    rng = np.random.default_rng(20240611)

    def value_noise(cell: int) -> np.ndarray:
        grid = torch.from_numpy(rng.uniform(-1, 1, (1, 1, hc // cell + 2, wc // cell + 2)).astype(np.float32))
        return F.interpolate(grid, size=(hc, wc), mode="bicubic", align_corners=False)[0, 0].numpy()

    coarse = value_noise(max(height // 6, 4)) + 0.5 * value_noise(max(height // 16, 2))
    fine = value_noise(1) * 0.7 + 0.3 * rng.uniform(-1, 1, (hc, wc)).astype(np.float32)
    grain = rng.standard_normal((3, hc, wc)).astype(np.float32)
    drops = (rng.random((hc, wc)) < 0.004).astype(np.float32)
    streaks = np.zeros_like(drops)
    length = max(height // 10, 4)
    for step in range(length):  # smear each drop along a slightly slanted fall line
        streaks += np.roll(np.roll(drops, step, axis=0), step // 4, axis=1) * (1.0 - step / length)
    return _Fields(coarse=coarse.astype(np.float32), fine=fine.astype(np.float32), grain=grain,
                   streaks=np.clip(streaks, 0, 1))


def _glow(image: np.ndarray, y: float, x: float, radius: float, strength: Sequence[float]) -> None:
    """Add to a 3 x H x W image a Gaussian light of ``radius`` px and per-channel ``strength`` (x 255)."""
    h, w = image.shape[1:]
    reach = 3.0 * radius
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 1, h)
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 1, w)
    if y1 <= y0 or x1 <= x0:
        return
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - y) ** 2
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - x) ** 2
    weight = np.exp(-(yy + xx) / (2.0 * radius * radius))
    image[:, y0:y1, x0:x1] += weight[None] * (np.asarray(strength, np.float32) * 255.0)[:, None, None]


def _hue_rotation(angle: float) -> np.ndarray:
    """3 x 3 matrix rotating RGB colours by ``angle`` radians about the grey axis."""
    c, s = np.cos(angle), np.sin(angle)
    k = np.ones((3, 3)) / 3.0
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3.0)
    return (c * np.eye(3) + (1 - c) * k + s * cross).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """3 x H x W float32 blurred by a separable Gaussian of ``sigma`` px (edges replicated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float32) / sigma) ** 2)
    kernel = torch.from_numpy(taps / taps.sum())
    x = torch.from_numpy(np.ascontiguousarray(image))[:, None]  # 3 x 1 x H x W
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0].numpy()


def _render(scene: Scene, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Light a scene in a domain's style: H x W x 3 uint8. Works channel-first (3 x H x W), where
    per-pixel H x W factors broadcast cheaply."""
    label = scene.label
    h, w = label.shape
    image = scene.albedo()
    fields = _fields(h, w)
    oy, ox = int(rng.integers(0, h // 2 + 1)), int(rng.integers(0, w // 2 + 1))
    window = (slice(oy, oy + h), slice(ox, ox + w))
    rows = np.arange(h, dtype=np.float32)[:, None]

    shade = np.ones((h, w), np.float32)
    if style.texture > 0:
        shade += style.texture * (np.take(_COARSE, label) * fields.coarse[window]
                                  + np.take(_FINE, label) * fields.fine[window])
    # Sky brightens towards the horizon.
    sky_gradient = 0.3 * np.clip(rows / max(scene.horizon, 1), 0, 1) - 0.2
    shade += (label == SKY) * sky_gradient
    windows = None
    if style.windows:
        cols = np.arange(w)[None, :] + ox
        period_y, period_x = max(h // 24, 3), max(w // 40, 3)
        pane = (((rows + oy) % period_y) < period_y * 0.55) & ((cols % period_x) < period_x * 0.5)
        windows = pane & (label == BUILDING)
        shade -= windows * (shade * 0.55)
    image *= shade

    image *= (rng.uniform(*style.exposure) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)[:, None, None]
    if style.night:
        image *= np.float32([0.75, 0.85, 1.3])[:, None, None]  # moonlit, blue ambient
        if windows is not None:  # a quarter of the windows are lit
            grid = ((rows.astype(np.int64) + oy) // max(h // 24, 3)) * 7919 + (np.arange(w)[None, :] + ox) // max(w // 40, 3)
            lit = windows & ((grid * 104729 % 4) == 0)
            warm = rng.uniform(150, 220) * np.float32([1.0, 0.8, 0.5])
            for c in range(3):
                np.copyto(image[c], warm[c], where=lit)
        for y, x, radius, strength in scene.lights:
            _glow(image, y, x, radius * 1.2, strength)
            if strength[0] > 2.3 and strength[1] > 1.9:  # street lamp: a pool of light below
                _glow(image, y + radius * 10, x, radius * 4, (0.25, 0.22, 0.15))
    if style.fog_visibility is not None:
        visibility = rng.uniform(*style.fog_visibility)
        transmission = np.exp(-(scene.depth - 0.5) / np.float32(visibility))
        airlight = (rng.uniform(185, 225) * np.float32([0.97, 0.99, 1.0]))[:, None, None]
        image *= transmission
        image += airlight * (1.0 - transmission)
    if style.rain:
        grey = (image[0] + image[1] + image[2]) * np.float32(0.1)  # 0.3 x the mean
        image *= (0.7 - 0.15 * (label == ROAD)).astype(np.float32)  # wet asphalt is darker
        image += grey
        image += fields.streaks[window] * np.float32(rng.uniform(*style.rain_strength))
    if style.snow:
        # every draw is made here, after the other effects', so the styles without snow keep their images
        cover = np.float32(rng.uniform(*style.snow_cover))
        level = np.float32(rng.uniform(215, 245))
        ground = np.isin(label, _SNOW_GROUND)
        settled = np.clip(cover + 1.5 * fields.coarse[window], 0, 1) * ground  # patchy: tracks, bare spots
        white = level * np.float32([0.97, 0.99, 1.0])[:, None, None]
        image += (white - image) * settled
        haze = np.float32(rng.uniform(*style.snow_haze))
        image = image * (1 - haze) + white * haze
        flakes = int(rng.uniform(*style.snowfall) * h * w)
        ys, xs = rng.integers(0, h, flakes), rng.integers(0, w, flakes)
        image[:, ys, xs] = np.float32(min(level + 10.0, 255.0))
    if style.colour_shift:
        matrix = _hue_rotation(rng.uniform(*style.hue_angle)) * rng.uniform(0.8, 1.2, 3)[:, None]
        image = (matrix.astype(np.float32) @ image.reshape(3, -1)).reshape(3, h, w)
        np.clip(image, 0, 255, out=image)
        image = 255.0 * (image * np.float32(1 / 255.0)) ** np.float32(rng.uniform(0.7, 1.4))
    if style.blur > 0:
        image = _gaussian_blur(image, style.blur)
    if style.grain > 0:
        image += fields.grain[(slice(None),) + window] * np.float32(style.grain)
    np.clip(image, 0, 255, out=image)
    planes = image.astype(np.uint8)
    return np.dstack([planes[0], planes[1], planes[2]])


def generate(domain: str, seed: int, size: Sequence[int] = (128, 256), objects: str = "plain"
             ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H x W x 3 uint8 RGB image, H x W uint8 train ids), deterministic in (domain, seed, size,
    objects).

    Every domain but "geometry" shares the layout of a seed (same label map). ``objects``: "plain" (the
    demo world's and the SSL pool's) or "visible" (the DG testbed's: trucks, buses and trains each have
    their own shape, parts and liveries, and traffic signs are at least a token wide; see
    ``dgss.data.scene_layout.OBJECT_STYLES``).
    """
    if domain not in _ALL_STYLES:
        import difflib
        close = difflib.get_close_matches(str(domain), ALL_DOMAINS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown synthetic domain '{domain}'{hint} (valid: {', '.join(ALL_DOMAINS)})")
    height, width = int(size[0]), int(size[1])
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images need at least 16 x 16 pixels, got {height} x {width}")
    style = _ALL_STYLES[domain]
    layout_family = 1 if style.layout is WIDE_ANGLE else 0
    scene = build_scene(np.random.default_rng([seed, layout_family, 0]), (height, width), style.layout, objects)
    image = _render(scene, style, np.random.default_rng([seed, _STYLE_INDEX[domain], 1]))
    return image, scene.label


def _palette_png(label_ids: np.ndarray) -> Image.Image:
    """A palette PNG holding Cityscapes label ids as indices, coloured like the official files."""
    image = Image.fromarray(label_ids.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[TRAIN_ID_TO_LABEL_ID[:19]] = np.asarray(CITYSCAPES_PALETTE, np.uint8)
    image.putpalette(palette.ravel().tolist())
    return image


def write_gtav_layout(root: str | Path, domain: str = "clean", n: int = 8, seed: int = 0,
                      size: Sequence[int] = (128, 256)) -> Path:
    """Write ``n`` scenes as GTAV unpacks: ``images/00001.png`` and palette ``labels/00001.png``
    holding Cityscapes label ids. Scene i uses seed ``seed + i``. Returns the root."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = generate(domain, seed + i, size)
        Image.fromarray(image).save(root / "images" / f"{i + 1:05d}.png")
        _palette_png(TRAIN_ID_TO_LABEL_ID[label]).save(root / "labels" / f"{i + 1:05d}.png")
    return root


def write_cityscapes_layout(root: str | Path, domain: str = "textured", n: int = 8, seed: int = 0,
                            size: Sequence[int] = (128, 256), split: str = "val", city: str = "synthcity",
                            train_ids: bool = True) -> Path:
    """Write ``n`` scenes as Cityscapes unpacks: ``leftImg8bit/<split>/<city>/<city>_000000_<i>_leftImg8bit.png``
    with ``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (and ``..._gtFine_labelTrainIds.png`` if
    ``train_ids``, as the official conversion script makes). Returns the root."""
    root = Path(root)
    image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = generate(domain, seed + i, size)
        stem = f"{city}_000000_{i:06d}"
        Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(TRAIN_ID_TO_LABEL_ID[label]).save(label_dir / f"{stem}_gtFine_labelIds.png")
        if train_ids:
            Image.fromarray(label).save(label_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


_SPLIT_OFFSETS = {"train": 0, "all": 0, "val": 10_000_000, "test": 20_000_000}

# The DG testbed's classes (dgss.testbed): the 19 train ids merged to the 12 that are at least one
# 8-pixel token thick at the median (the thickest part of a class in an image, median over images, at
# 128 x 256, in the testbed's scenes: objects="visible"; measured in docs/testbed.md). wall and fence
# join building (Cityscapes' "construction"), rider joins person; pole, traffic light, motorcycle and
# bicycle (2-6 px) are ignored (255).
TESTBED_CLASSES = ("road", "sidewalk", "building", "vegetation", "terrain", "sky", "person", "car", "truck",
                   "bus", "train", "traffic sign")
TESTBED_OF_TRAIN_ID = np.full(256, 255, np.uint8)
TESTBED_OF_TRAIN_ID[:19] = [0, 1, 2, 2, 2, 255, 255, 11, 3, 4, 5, 6, 6, 7, 8, 9, 10, 255, 255]
LABEL_SETS = {"cityscapes": (CITYSCAPES_CLASSES, np.arange(256, dtype=np.uint8)),
              "testbed": (TESTBED_CLASSES, TESTBED_OF_TRAIN_ID)}


class SyntheticDataset(SegmentationDataset):
    """Scenes rendered on the fly (``type: synthetic``): sample i is ``generate(domain, seed + offset + i,
    size)`` with offset 0 for training and 10,000,000 / 20,000,000 for evaluation on split val / test
    (0 for an evaluation of split train), so training and evaluation never share a scene.

    Options: ``domain`` (default "clean"; any of ``ALL_DOMAINS``), ``num_images`` (64), ``size`` [H, W]
    ([128, 256]), ``seed`` (0), ``label_set`` ("cityscapes": the 19 train ids; "testbed": the DG
    testbed's 12 merged classes, ``TESTBED_CLASSES``), ``objects`` ("plain"; "visible": the testbed's
    objects, see :func:`generate`). ``root`` is not used.
    """

    layout = "synthetic"

    def __init__(self, root: str = "", split: str = "train", *, domain: str = "clean", num_images: int = 64,
                 size: Sequence[int] = (128, 256), seed: int = 0, with_labels: bool = True,
                 label_set: str = "cityscapes", objects: str = "plain", **common) -> None:
        if domain not in _ALL_STYLES:
            generate(domain, 0)  # raises the error that names the closest domain
        if label_set not in LABEL_SETS:
            raise DataError(f"synthetic dataset: unknown label_set {label_set!r} (valid: {', '.join(LABEL_SETS)})")
        classes, self._label_table = LABEL_SETS[label_set]
        if objects not in OBJECT_STYLES:
            raise DataError(f"synthetic dataset: unknown objects {objects!r} (valid: {', '.join(OBJECT_STYLES)})")
        self.objects = objects
        if num_images < 1 or len(size) != 2:
            raise DataError(f"synthetic dataset needs num_images >= 1 and size [H, W], got {num_images}, {size}")
        offset = 0 if common.get("train") else _SPLIT_OFFSETS.get(split)
        if offset is None:
            raise DataError(f"synthetic split must be one of {', '.join(_SPLIT_OFFSETS)}, got {split!r}")
        self.domain, self.size = domain, (int(size[0]), int(size[1]))
        samples = []
        for i in range(num_images):
            name = f"{domain}_{seed + offset + i:08d}"  # file-like identifiers; nothing is on disk
            samples.append(Sample(image=Path(name), label=Path(name) if with_labels else None, rel=name))
        super().__init__(samples, classes=classes, **common)

    def load(self, index: int):
        sample = self.samples[index]
        image, label = generate(self.domain, int(sample.rel.rsplit("_", 1)[1]), self.size, self.objects)
        if self.corruption is not None:
            image = self.corruption(image, index)
        return image, (self._label_table[label] if sample.label is not None else None)
