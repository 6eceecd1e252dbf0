"""The unlabeled pretraining pool of the label-free foundation ViT: synthetic streets, appearance randomised.

    image = pool_image(index)                        # H x W x 3 uint8, deterministic in index
    family = pool_family(index)                      # which appearance family rendered it
    image = pool_image(index, version=2)             # the pool of version 2 (dim exposures added)

DINOv2 learned from LVD-142M: a broad, curated, unlabeled stream in which the domains a segmenter is
later asked about are a small and uneven part. This pool plays that role for the testbed
(:mod:`dgss.testbed`). Every image is a fresh street scene (layout statistics drawn per image,
both camera geometries) rendered by one of ``POOL_FAMILIES``, each of which draws its appearance
from ranges far wider than the benchmark's domains: palettes, surface textures, exposure and tint,
fog and rain of any strength, blur, sensor noise, colour responses.

What the pool never holds, by construction and by test:

* **night** (``HELD_OUT_FAMILIES``): no family renders below ``MIN_EXPOSURE`` or lights lamps, lit
  windows or car lights; an image whose mean brightness is under ``MIN_BRIGHTNESS`` (70 of 255; the
  night targets' lie under 40) is brightened to it, and the self-supervised augmentations
  (:mod:`dgss.testbed.ssl`) dim by at most 0.75 x. The night target family is therefore a shift the
  foundation never saw, as Cityscapes-at-night is for a model pretrained on daytime photographs.
* **the benchmark's scenes**: pool scene seeds start at ``POOL_SEED_OFFSET`` (90,000,000), past every
  benchmark split (training 0.., validation 10,000,000.., test 20,000,000..) and past the old
  label-pretrained foundation's 50,000,000...
* **labels**: :func:`pool_image` returns no label; the pretraining objective never sees one.

The source style of the benchmark, ``clean`` (flat colours, no texture, no noise), is rare: 3% of the
pool (``POOL_WEIGHTS``), as synthetic game frames are a sliver of a web-scale pool.

Versions (``POOL_VERSIONS``; the pretraining recipe's ``pool_version`` picks one, and each stays
remakeable bit for bit):

* **1**: the families above; nothing is darker than ``MIN_EXPOSURE`` and ``MIN_BRIGHTNESS``.
* **2**: version 1 plus the ``dark`` family (``DARK_EXPOSURE``: exposure 0.08-0.45, 12% of the pool
  before renormalising): dim, noisy scenes under neutral or warm light, with no floor on their
  brightness. Night's *look* stays held out: no dark image is tinted blue (the ambient light of the
  night family: blue 1.7 x red), and no lamp, lit window or car light is drawn in any image, at any
  exposure. A web-scale pool such as DINOv2's holds many underexposed photographs, so a foundation
  that has never seen a dim image is less faithful than one that has. Version 1's foundation scored
  3-6 mIoU frozen on night-1, whatever the head (docs/figures/testbed_log.md, "A pool with dim scenes").
  Every image of version 2 differs from version 1's (the family draw is renormalised).
* **3**: version 2 plus the ``night`` family (night's look: blue ambient light, lamps, lit windows, car
  lights, exposure ``NIGHT_EXPOSURE``): a web-scale pool holds night photographs, and the DG rule
  concerns labels and target scenes, not looks. What version 3 never renders is **snow**
  (``UNSEEN_FAMILIES``): the testbed's unseen look, a target column that measures generalization beyond
  anything the foundation saw. :func:`pool_views` renders one pool scene in two looks (the image's own
  family and a second one drawn from the same table), the two-look views of the SSL recipe.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scene_layout import STREET, WIDE_ANGLE, LayoutStats, build_scene
from ..data.synthetic import DomainStyle, _render

__all__ = ["POOL_FAMILIES", "POOL_WEIGHTS", "POOL_VERSIONS", "DEFAULT_POOL_VERSION", "HELD_OUT_FAMILIES",
           "UNSEEN_FAMILIES", "held_out_families", "POOL_SEED_OFFSET", "MIN_EXPOSURE", "MIN_BRIGHTNESS",
           "DARK_EXPOSURE", "NIGHT_EXPOSURE", "POOL_SIZE", "pool_weights", "pool_family", "pool_image", "pool_views",
           "pool_style"]

POOL_SEED_OFFSET = 90_000_000  # scene seeds of the pool: disjoint from every benchmark split and the old pool
POOL_SIZE = (128, 256)  # H, W of a pool image (the benchmark renders at the same size)
MIN_EXPOSURE = 0.45  # no pool family renders with a lower exposure (night: 0.10-0.30)
# no pool image's mean brightness (0..255) is below this: a darker one is brightened to it. The night
# targets' means lie below 40, and the SSL augmentations dim by at most 0.75 x (to >= 52).
MIN_BRIGHTNESS = 70.0

# family -> share of the pool. "clean" is the benchmark's source look and is rare on purpose.
POOL_WEIGHTS: dict[str, float] = {
    "clean": 0.03,
    "textured": 0.12,  # the benchmark's textured look with its exposure and noise drawn wider
    "palette": 0.15,  # every surface recoloured: a random colour transform plus large per-surface jitter
    "texture": 0.12,  # textures from none to three times the usual strength
    "lighting": 0.12,  # exposure 0.45-1.6 with warm, cold or green tints (daylight to overcast, never dark)
    "weather": 0.14,  # fog of any visibility, or rain, over a randomised look
    "sensor": 0.12,  # blur, strong grain, low contrast
    "colour": 0.10,  # colour responses: hue rotations, channel gains, gamma (the colour-shift kind)
    "geometry": 0.10,  # other layout statistics under a randomised look
}
POOL_FAMILIES: tuple[str, ...] = tuple(POOL_WEIGHTS)  # version 1's
HELD_OUT_FAMILIES: tuple[str, ...] = ("night",)  # versions 1 and 2
UNSEEN_FAMILIES: tuple[str, ...] = ("snow",)  # version 3 (and every version): no pool image is snowy
POOL_VERSIONS = (1, 2, 3)
DEFAULT_POOL_VERSION = 1
DARK_EXPOSURE = (0.08, 0.45)  # version 2's dark family: the night targets' exposures (0.10-0.30) and around
NIGHT_EXPOSURE = (0.06, 0.6)  # version 3's night family: the night targets' 0.10-0.30 and far around them
_WEIGHTS = {1: POOL_WEIGHTS, 2: {**POOL_WEIGHTS, "dark": 0.12}, 3: {**POOL_WEIGHTS, "dark": 0.12, "night": 0.12}}
# per version: its families and their cumulative weights, the table pool_family draws from
_DRAW = {v: (tuple(w), np.cumsum(list(w.values()))) for v, w in _WEIGHTS.items()}


def pool_weights(version: int = DEFAULT_POOL_VERSION) -> dict[str, float]:
    """family -> share (not normalised) of the pool of ``version``."""
    if version not in _WEIGHTS:
        raise ValueError(f"unknown pool version {version!r} (available: {', '.join(map(str, POOL_VERSIONS))})")
    return _WEIGHTS[version]


def held_out_families(version: int = DEFAULT_POOL_VERSION) -> tuple[str, ...]:
    """The look held out of ``version``'s pool (its manifest's ``held_out_families``): night's in versions 1
    and 2 (snow did not exist then; no version renders it), snow's from version 3."""
    pool_weights(version)
    return UNSEEN_FAMILIES if version >= 3 else HELD_OUT_FAMILIES


def pool_family(index: int, version: int = DEFAULT_POOL_VERSION) -> str:
    """The family of pool image ``index`` (drawn with ``pool_weights(version)``; deterministic)."""
    pool_weights(version)  # a clear error for an unknown version
    families, cumulative = _DRAW[version]
    u = np.random.default_rng([POOL_SEED_OFFSET + index, 7]).random() * cumulative[-1]
    return families[int(np.searchsorted(cumulative, u, side="right"))]


def _layout(rng: np.random.Generator, family: str) -> LayoutStats:
    """Layout statistics drawn around the two cameras (the benchmark's street and wide-angle ones)."""
    base = WIDE_ANGLE if family == "geometry" or rng.random() < 0.15 else STREET
    jitter = lambda lo_hi, s: (lo_hi[0] * s, lo_hi[1] * s)  # noqa: E731
    return dataclasses.replace(base, building_height=jitter(base.building_height, rng.uniform(0.7, 1.3)),
                               block_width=jitter(base.block_width, rng.uniform(0.6, 1.6)),
                               object_scale=base.object_scale * rng.uniform(0.8, 1.3))


def pool_style(rng: np.random.Generator, family: str) -> DomainStyle:
    """The rendering style of one pool image of ``family`` (never night: ``night`` is always False, so
    no lamp, lit window or blue ambient light is drawn; exposure never below ``MIN_EXPOSURE`` but in
    version 2's ``dark`` family)."""
    if family == "clean":
        return DomainStyle(texture=0.0, windows=False, grain=0.0, exposure=(0.97, 1.03))
    texture = rng.uniform(0.3, 1.5)
    grain = rng.uniform(0.0, 6.0)
    low = rng.uniform(MIN_EXPOSURE, 1.0)
    style = DomainStyle(texture=texture, windows=rng.random() < 0.7, grain=grain, exposure=(low, low + 0.15))
    if family == "texture":
        style = dataclasses.replace(style, texture=rng.uniform(0.0, 3.0))
    elif family == "lighting":
        low = rng.uniform(MIN_EXPOSURE, 1.45)
        style = dataclasses.replace(style, exposure=(low, low + 0.15))
    elif family == "weather":
        if rng.random() < 0.5:
            near = rng.uniform(0.6, 6.0)
            style = dataclasses.replace(style, fog_visibility=(near, near * 1.5))
        else:
            style = dataclasses.replace(style, rain=True, exposure=(max(MIN_EXPOSURE, low * 0.8), max(MIN_EXPOSURE, low * 0.8) + 0.1))
    elif family == "sensor":
        style = dataclasses.replace(style, grain=rng.uniform(4.0, 16.0))
    elif family == "colour":
        style = dataclasses.replace(style, colour_shift=True)
    elif family == "dark":  # dim light, a noisier sensor; night=False: no lamps, no lit windows, no blue
        low = rng.uniform(*DARK_EXPOSURE)
        style = dataclasses.replace(style, exposure=(low, low + 0.05), grain=rng.uniform(2.0, 10.0))
    elif family == "night":  # version 3: night's look, at exposures from moonless to a lit avenue
        low = rng.uniform(*NIGHT_EXPOSURE)
        style = dataclasses.replace(style, night=True, exposure=(low, low + 0.05), grain=rng.uniform(3.0, 10.0))
    return style


def _post(image: np.ndarray, rng: np.random.Generator, family: str) -> np.ndarray:
    """Family-specific effects the renderer does not have: tints, blur, contrast (H x W x 3 uint8)."""
    x = image.astype(np.float32)
    if family == "lighting":  # a coloured illuminant (warm, cold, green); never the dark blue of night
        x *= rng.uniform(0.8, 1.2, 3).astype(np.float32)
    if family == "dark":  # neutral to warm (tungsten, sodium): blue never above red, as night's 1.7 x is
        x *= np.float32([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.6, 1.0)])
    if family == "sensor":
        if rng.random() < 0.7:  # defocus or motion blur by a separable box of 2-5 px
            k = int(rng.integers(2, 6))
            t = torch.from_numpy(x).permute(2, 0, 1)[None]
            kernel = torch.ones(3, 1, 1, k) / k
            t = F.conv2d(F.pad(t, (k // 2, (k - 1) // 2, 0, 0), mode="replicate"), kernel, groups=3)
            if rng.random() < 0.6:
                t = F.conv2d(F.pad(t, (0, 0, k // 2, (k - 1) // 2), mode="replicate"), kernel.transpose(2, 3), groups=3)
            x = t[0].permute(1, 2, 0).numpy()
        contrast = rng.uniform(0.5, 1.0)
        x = (x - x.mean()) * contrast + x.mean()
    x = np.clip(x, 0, 255)
    mean = float(x.mean())
    if mean < MIN_BRIGHTNESS and family not in ("dark", "night"):  # else never dark (a dark palette or rain at low exposure)
        x = np.clip(x * (MIN_BRIGHTNESS / max(mean, 1.0)), 0, 255)
    return x.astype(np.uint8)


def _scene(index: int, size, family: str):
    """The scene of pool image ``index`` and the generator its looks draw from next."""
    seed = POOL_SEED_OFFSET + index
    rng = np.random.default_rng([seed, 11])
    scene = build_scene(np.random.default_rng([seed, 0, 0]), (int(size[0]), int(size[1])), _layout(rng, family))
    return scene, rng


def _look(scene, family: str, rng: np.random.Generator, render_seed) -> np.ndarray:
    """``scene`` rendered in ``family``'s look (H x W x 3 uint8); ``rng`` draws the look, ``render_seed``
    seeds the renderer."""
    if family == "palette":  # recolour every surface: one random colour transform, then large per-row jitter
        matrix = rng.uniform(-0.4, 0.4, (3, 3)) + np.eye(3) * rng.uniform(0.4, 1.2)
        palette = scene.palette @ matrix.T.astype(np.float32) + rng.uniform(-30, 30, 3).astype(np.float32)
        palette += rng.uniform(-60, 60, palette.shape).astype(np.float32)
        scene.palette = np.clip(palette, 0, 255).astype(np.float32)
    image = _render(scene, pool_style(rng, family), np.random.default_rng(render_seed))
    return _post(image, rng, family)


def pool_image(index: int, size=POOL_SIZE, version: int = DEFAULT_POOL_VERSION) -> np.ndarray:
    """Pool image ``index``: H x W x 3 uint8, deterministic in (``index``, ``size``, ``version``); no label."""
    family = pool_family(index, version)
    scene, rng = _scene(index, size, family)
    return _look(scene, family, rng, [POOL_SEED_OFFSET + index, 12])


def pool_views(index: int, size=POOL_SIZE, version: int = DEFAULT_POOL_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """Pool image ``index`` (as :func:`pool_image` renders it) and the same scene in a second look: a
    family drawn from the same table by another stream ("geometry", a layout family, renders as
    "textured" there, since the scene's layout is already fixed). Two looks of one scene are the
    two-look views of the SSL recipe: an unlabeled pair that shows which differences are appearance only.
    """
    first = pool_image(index, size, version)
    family = pool_family(index, version)
    scene, _ = _scene(index, size, family)
    families, cumulative = _DRAW[version]
    u = np.random.default_rng([POOL_SEED_OFFSET + index, 13]).random() * cumulative[-1]
    second = families[int(np.searchsorted(cumulative, u, side="right"))]
    second = "textured" if second == "geometry" else second
    rng = np.random.default_rng([POOL_SEED_OFFSET + index, 14])
    return first, _look(scene, second, rng, [POOL_SEED_OFFSET + index, 15])
