"""Training augmentation and evaluation resizing (the recipe of protocols.md).

Training: random short side from a list with a long-side cap -> random crop whose dominant class
covers at most ``cat_max_ratio`` of the labelled pixels (up to 10 draws) -> horizontal flip ->
photometric distortion -> normalisation -> padding to the crop size (image 0, label 255).
Evaluation: the image is resized to fit a (W, H) box keeping its aspect ratio; the label keeps its
resolution (the segmentor resizes scores back to it).

Images are resized bilinearly without antialiasing, like the OpenCV resize of the reference
pipeline; labels only ever with nearest-neighbour, so they stay integer class indices. Images and
labels are cropped and flipped with the same box and decision.

Shapes: ``image`` H x W x 3 uint8 RGB numpy in, 3 x h x w float32 tensor out; ``label`` H x W uint8
numpy in, h x w int64 tensor out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX

__all__ = [
    "short_side_resize_shape",
    "fit_resize_shape",
    "resize_image",
    "resize_label",
    "random_crop_box",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "photometric_distortion",
    "TrainTransform",
    "EvalTransform",
]


def short_side_resize_shape(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to ``short_side`` unless the long side would exceed the cap."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_long_side:
        scale = max_long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def fit_resize_shape(height: int, width: int, box_wh: Sequence[int]) -> tuple[int, int]:
    """(h, w) of an image rescaled, aspect ratio kept, to fit a box given as (W, H).

    As mmseg's ``Resize(keep_ratio=True)``: the long side may be at most the box's long side and the
    short side at most the box's short side (so a portrait image fits a landscape box turned), and
    the image is scaled up when it is smaller than the box.
    """
    long_edge, short_edge = max(box_wh), min(box_wh)
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a C x H x W image (uint8 or float) to ``size`` = (h, w), same dtype."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an H x W uint8 label map to ``size`` = (h, w).

    Each output pixel takes the input pixel under its centre ("nearest-exact"), the same sampling
    grid as the bilinear image resize, so labels stay aligned with the image to within a pixel
    (OpenCV's nearest, used by the reference, is shifted by half an input pixel).
    """
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[None, None], size=size, mode="nearest-exact")[0, 0]


def random_crop_box(
    label: np.ndarray,
    crop_hw: Sequence[int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    *,
    attempts: int = 10,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) crop box for an H x W label map.

    With ``cat_max_ratio < 1`` a box is redrawn (up to ``attempts`` checks) while a single class
    covers ``cat_max_ratio`` or more of the box's labelled pixels, or the box holds fewer than two
    classes; the box drawn after the last failed check is used as is.
    """
    height, width = label.shape
    crop_h, crop_w = min(crop_hw[0], height), min(crop_hw[1], width)

    def draw() -> tuple[int, int, int, int]:
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        return top, left, crop_h, crop_w

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(attempts):
        top, left, h, w = box
        counts = np.bincount(label[top: top + h, left: left + w].ravel(), minlength=256)
        counts = np.delete(counts, ignore_index)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """3 x H x W RGB in [0, 1] -> 3 x H x W HSV, hue as a fraction of a full turn in [0, 1)."""
    r, g, b = rgb.unbind(0)
    value, _ = rgb.max(dim=0)
    chroma = value - rgb.min(dim=0).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6.0,
                      torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (3 x H x W)."""
    hue, saturation, value = hsv.unbind(0)
    # Each channel n (r=5, g=3, b=1) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6 * hue) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype).view(3, 1, 1)
    k = (offsets + hue[None] * 6.0) % 6.0
    weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value[None] * (1.0 - saturation[None] * weight)


def photometric_distortion(
    image: torch.Tensor,
    rng: np.random.Generator,
    *,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue changes of a 3 x H x W float RGB image in [0, 255].

    Each change happens with probability 0.5; contrast comes either first or last (coin flip), as
    in the reference recipe. ``hue_delta`` is in OpenCV's 8-bit hue unit (180 per turn), so 18 is
    +-36 degrees. Values are clipped to [0, 255] after every step.
    """
    image = image.float()
    if rng.integers(2):
        image = (image + float(rng.uniform(-brightness_delta, brightness_delta))).clamp_(0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(img: torch.Tensor) -> torch.Tensor:
        if rng.integers(2):
            img = (img * float(rng.uniform(*contrast_range))).clamp_(0, 255)
        return img

    if contrast_first:
        image = contrast(image)
    change_saturation, change_hue = bool(rng.integers(2)), bool(rng.integers(2))
    saturation_scale = float(rng.uniform(*saturation_range)) if change_saturation else 1.0
    hue_shift = int(rng.integers(-hue_delta, hue_delta + 1)) if change_hue else 0
    if change_saturation or change_hue:
        hsv = rgb_to_hsv(image / 255.0)
        if change_saturation:
            hsv[1].mul_(saturation_scale).clamp_(0, 1)
        if change_hue:
            hsv[0].add_(hue_shift / 180.0).remainder_(1.0)
        image = (hsv_to_rgb(hsv) * 255.0).clamp_(0, 255)
    if not contrast_first:
        image = contrast(image)
    return image


def _normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (image.float() - mean) / std


class TrainTransform:
    """The training augmentation of the 512 recipe, parametrised by the data config.

    ``crop_size`` is (h, w). Outputs are padded to exactly the crop size, so samples stack.
    """

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        scales: Sequence[int],
        max_long_side: int,
        cat_max_ratio: float,
        mean: Sequence[float],
        std: Sequence[float],
        flip_prob: float = 0.5,
        photometric: bool = True,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be [h, w] with positive sizes, got {list(crop_size)}")
        if not scales:
            raise ValueError("scales must list at least one short-side length")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scales = [int(s) for s in scales]
        self.max_long_side = int(max_long_side)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = photometric
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """H x W x 3 uint8 image and H x W uint8 label -> (3 x h x w float32, h x w int64), (h, w) = crop."""
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # 3 x H x W uint8
        lab = torch.from_numpy(np.ascontiguousarray(label))
        short_side = self.scales[int(rng.integers(len(self.scales)))]
        size = short_side_resize_shape(img.shape[1], img.shape[2], short_side, self.max_long_side)
        img, lab = resize_image(img, size), resize_label(lab, size)

        top, left, h, w = random_crop_box(lab.numpy(), self.crop_size, self.cat_max_ratio, rng)
        img, lab = img[:, top: top + h, left: left + w], lab[top: top + h, left: left + w]
        if rng.random() < self.flip_prob:
            img, lab = img.flip(-1), lab.flip(-1)

        img = photometric_distortion(img, rng) if self.photometric else img.float()
        img = _normalize(img, self.mean, self.std)
        pad_h, pad_w = self.crop_size[0] - h, self.crop_size[1] - w
        if pad_h or pad_w:  # bottom/right, after normalisation, as the reference's batch padding
            img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return img.contiguous(), lab.long().contiguous()


class EvalTransform:
    """Evaluation: resize the image to fit ``resize`` = (W, H) (or keep it), normalise; label untouched."""

    def __init__(self, *, resize: Optional[Sequence[int]], mean: Sequence[float], std: Sequence[float]) -> None:
        if resize is not None and (len(resize) != 2 or min(resize) <= 0):
            raise ValueError(f"resize must be [W, H] with positive sizes, got {list(resize)}")
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(
        self, image: np.ndarray, label: Optional[np.ndarray], rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """H x W x 3 uint8 image -> 3 x h x w float32 (fitted); H x W uint8 label -> H x W int64."""
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if self.resize is not None:
            img = resize_image(img, fit_resize_shape(img.shape[1], img.shape[2], self.resize))
        img = _normalize(img, self.mean, self.std).contiguous()
        lab = None if label is None else torch.from_numpy(np.ascontiguousarray(label)).long()
        return img, lab

