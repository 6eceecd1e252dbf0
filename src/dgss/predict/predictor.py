"""Predicting on plain images: input conversion, test-time augmentation and the :class:`Predictor`.

    model = dgss.load("runs/rein/model_final.safetensors")   # a Predictor
    result = model.predict("street.png")                      # path, PIL image, numpy array or tensor
    result.labels        # H x W int64 train ids (0..18), at the image's own resolution
    result.scores        # K x H x W float32 class scores
    result.colour()      # H x W x 3 uint8, Cityscapes palette
    model.predict("street.png", tta=TTA(flip=True, scales=(0.75, 1.0, 1.25)), mode="slide")
    model.predict("street.png", mode="coarse_to_fine", scale=2.0)   # eval.* modes (dgss.models.inference)

Images are RGB with values 0..255 (uint8 or float): numpy H x W x 3 (or H x W grey), tensors
3 x H x W (or H x W x 3 when the last axis has 3 entries and the first does not). 16-bit inputs
(uint16 arrays, 16-bit greyscale files and PIL images) are scaled to 0..255 by v / 257. They are
normalised with the config's ``data.mean``/``data.std``, optionally fitted into ``resize`` = (W, H)
as the evaluation datasets are, and the scores are resized back to the input resolution.

Sizes the network cannot take (not a multiple of 32 and of the patch size) are padded with the mean
colour and the scores cropped back, so any image size works in either mode.

Test-time augmentation averages the class scores of every (scale, flip) view, each resized back to
the input size first; a flipped view's scores are flipped back before averaging. The inference scale
(``eval.scale``) multiplies every view's; in ``coarse_to_fine`` mode each view is a whole pass at
``eval.coarse_scale`` and a sliding window at the view's scale, fused as the evaluation fuses them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.image_io import pil_to_rgb, read_image, uint16_to_uint8
from ..data.labels import TRAIN_ID_TO_LABEL_ID, colorize
from ..data.transforms import fit_resize_shape
from ..models.inference import INFERENCE_MODES, fuse_coarse_fine, resize_by, scale_box
from ..precision import apply_tf32

__all__ = ["TTA", "Prediction", "Predictor", "to_rgb_array", "parse_tta", "tta_inference", "train_ids_to_label_ids"]

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, "PIL.Image.Image"]  # noqa: F821


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: horizontal flip and/or image scales (1.0 = the input size)."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def views(self) -> list[tuple[float, bool]]:
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]


def parse_tta(text: Optional[str]) -> TTA:
    """``"flip,scales=0.75,1.0,1.25"`` -> TTA(flip=True, scales=(0.75, 1.0, 1.25)); None or "" -> none."""
    if not text:
        return TTA()
    flip, scales = False, [1.0]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "flip":
            flip = True
        elif part.startswith("scales="):
            values = [part[len("scales="):]]
            while i + 1 < len(parts) and not parts[i + 1].startswith("scales=") and parts[i + 1] != "flip":
                i += 1
                values.append(parts[i])
            try:
                scales = [float(v) for v in values]
            except ValueError:
                raise ValueError(f"--tta scales must be numbers, got {','.join(values)!r}") from None
            if any(s <= 0 for s in scales):
                raise ValueError(f"--tta scales must be positive, got {scales}")
        else:
            raise ValueError(f"unknown --tta item {part!r} (expected 'flip' and/or 'scales=0.75,1.0,1.25')")
        i += 1
    return TTA(flip=flip, scales=tuple(scales))


def train_ids_to_label_ids(train_ids: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Train ids (0..18, 255 ignore) -> Cityscapes label ids (road 7, ..., car 26; ignore -> 0, "unlabeled"),
    the format of the Cityscapes and ACDC test servers. Returns uint8."""
    ids = train_ids.cpu().numpy() if torch.is_tensor(train_ids) else np.asarray(train_ids)
    return TRAIN_ID_TO_LABEL_ID[ids.astype(np.uint8)]  # a 256-entry table; unknown ids -> 0


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Any supported image input -> H x W x 3 uint8 RGB numpy (see the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL here
        return pil_to_rgb(image, getattr(image, "filename", "") or "image")
    if torch.is_tensor(image):
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"cannot predict on a {type(image).__name__}: give a path, PIL image, numpy array or tensor")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be H x W x 3 (or 3 x H x W for tensors), got shape {tuple(array.shape)}")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint16:  # a 16-bit image (OpenCV's IMREAD_UNCHANGED, tifffile): by its bit depth
        array = uint16_to_uint8(array)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


@dataclass
class Prediction:
    """One image's result: ``labels`` H x W int64 train ids, ``scores`` K x H x W float32 (CPU)."""

    labels: torch.Tensor
    scores: torch.Tensor

    def colour(self) -> np.ndarray:
        """H x W x 3 uint8 colours (Cityscapes palette)."""
        return colorize(self.labels.numpy())

    def label_ids(self) -> np.ndarray:
        """H x W uint8 Cityscapes label ids (test-server format)."""
        return train_ids_to_label_ids(self.labels)


def _size_divisor(model) -> int:
    """Sizes the network accepts are multiples of this: the coarsest pyramid stride (32) and the patch."""
    patch = getattr(getattr(model, "backbone", None), "patch_size", 1)
    return math.lcm(32, int(patch))


def _padded_inference(model, images: torch.Tensor, mode: str, crop, stride) -> torch.Tensor:
    """Whole or sliding-window scores of any image size. The network needs multiples of the size divisor:
    a whole image, or a side shorter than the window in slide mode (its windows shrink to the image),
    is padded bottom/right with zeros (the mean colour after normalisation) and the scores cropped back.
    Sizes the evaluation uses (multiples already, or larger than the window) are not padded at all."""
    height, width = images.shape[-2:]
    divisor = _size_divisor(model)
    window = tuple(crop if crop is not None else model.eval_cfg.crop_size) if mode == "slide" else (0, 0)

    def padded(size: int, window_side: int) -> int:
        if mode == "slide" and size >= window_side:
            return size  # full windows of the crop size: nothing to pad
        return -(-size // divisor) * divisor

    pad_h, pad_w = padded(height, window[0]) - height, padded(width, window[1]) - width
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    if mode == "slide":
        scores = model.slide_inference(images, crop=crop, stride=stride)
    else:
        scores = model.whole_inference(images)
    return scores[..., :height, :width]


@torch.no_grad()
def tta_inference(model, images: torch.Tensor, tta: TTA = TTA(), *, mode: Optional[str] = None,
                  crop: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                  out_size: Optional[Sequence[int]] = None, scale: Optional[float] = None,
                  coarse_scale: Optional[float] = None) -> torch.Tensor:
    """Class scores of normalised images (B x 3 x H x W) averaged over the TTA views: B x K x h x w.

    Args:
        model: a :class:`~dgss.models.segmentor.Segmentor` (uses ``whole_inference``/``slide_inference``).
        mode: "slide", "whole" or "coarse_to_fine"; default ``model.eval_cfg.mode``.
        crop, stride: sliding-window size and step (h, w); default ``model.eval_cfg``.
        out_size: (h, w) of the returned scores; default the images' size.
        scale: the inference scale, multiplying each view's; default ``model.eval_cfg.scale``.
        coarse_scale: coarse_to_fine's whole-pass factor; default ``model.eval_cfg.coarse_scale``.
    """
    cfg = model.eval_cfg
    mode = mode or cfg.mode
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode '{mode}' ({' | '.join(INFERENCE_MODES)})")
    scale = cfg.scale if scale is None else scale
    coarse_scale = cfg.coarse_scale if coarse_scale is None else coarse_scale
    if not scale > 0:
        raise ValueError(f"the inference scale must be above 0, got {scale}")
    height, width = images.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (height, width)

    def scores_at(view_scale: float, flipped: bool, view_mode: str, antialias: bool = False) -> torch.Tensor:
        view = resize_by(images, view_scale, antialias=antialias)
        if flipped:
            view = view.flip(-1)
        scores = _padded_inference(model, view, view_mode, crop, stride)
        if flipped:
            scores = scores.flip(-1)
        if tuple(scores.shape[-2:]) != out_size:
            scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
        return scores

    total = None
    for view_scale, flipped in tta.views():
        if mode == "coarse_to_fine":
            scores = fuse_coarse_fine(scores_at(view_scale * coarse_scale, flipped, "whole", antialias=True),
                                      scores_at(view_scale * scale, flipped, "slide"), cfg.coarse_weight)
        else:
            scores = scores_at(view_scale * scale, flipped, mode)
        total = scores if total is None else total + scores
    return total / len(tta.views())


class Predictor:
    """A trained segmentor with image-level input handling (what :func:`dgss.load` returns).

    Attributes:
        model: the :class:`~dgss.models.segmentor.Segmentor` (eval mode); its own
            ``predict(images)`` on normalised B x 3 x H x W tensors is unchanged.
        cfg: the :class:`~dgss.config.ExperimentConfig` that built it.
        source: the checkpoint file it was loaded from (None when wrapped directly).
    """

    def __init__(self, model, cfg, source: Optional[Path] = None):
        self.model = model.eval()
        self.cfg = cfg
        self.source = source
        self.mean = torch.tensor(cfg.data.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.data.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        m = self.cfg.model
        return (f"Predictor(backbone={m.backbone}, method={self.cfg.method.name}, head={m.head.type}, "
                f"classes={self.num_classes}, device={self.device}, source={self.source})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def to(self, device) -> "Predictor":
        self.model.to(device)
        return self

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W RGB 0..255 -> normalised float32 on the model's device."""
        batch = batch.to(self.device, torch.float32)
        return (batch - self.mean.to(batch.device)) / self.std.to(batch.device)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray], *, tta: TTA = TTA(), mode: Optional[str] = None,
                      resize: Optional[Sequence[int]] = None, crop: Optional[Sequence[int]] = None,
                      stride: Optional[Sequence[int]] = None, scale: Optional[float] = None) -> list[Prediction]:
        """Predictions for H x W x 3 uint8 images of one size, in one batch (see :meth:`predict`)."""
        sizes = {img.shape[:2] for img in images}
        if len(sizes) != 1:
            raise ValueError(f"predict_batch needs images of one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        apply_tf32(self.cfg.train.tf32, self.device)  # train.tf32 holds for predict too (issue 38)
        batch = self.normalize(batch)
        scale = self.model.eval_cfg.scale if scale is None else scale
        coarse_scale = self.model.eval_cfg.coarse_scale
        if resize is not None:  # as the evaluation datasets: fit into a (W, H) box, predict at the input size
            if scale != 1.0:  # the scale goes into the box: one resampling of the input (dgss.models.inference)
                resize, coarse_scale, scale = scale_box(resize, scale), coarse_scale / scale, 1.0
            batch = F.interpolate(batch, size=fit_resize_shape(height, width, resize), mode="bilinear",
                                  align_corners=False)
        scores = tta_inference(self.model, batch, tta, mode=mode, crop=crop, stride=stride,
                               out_size=(height, width), scale=scale, coarse_scale=coarse_scale).cpu()
        labels = scores.argmax(1)
        return [Prediction(labels=labels[i], scores=scores[i]) for i in range(len(images))]

    def predict(self, image: Union[ImageLike, Iterable[ImageLike]], *, tta: Union[TTA, str, None] = None,
                mode: Optional[str] = None, resize: Optional[Sequence[int]] = None,
                crop: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                scale: Optional[float] = None):
        """Train-id map and scores of one image, or a list of them for a list of images.

        Args:
            image: a path, PIL image, numpy array or tensor (RGB, 0..255), or a list of them.
            tta: a :class:`TTA` or its text form ("flip,scales=0.75,1.0,1.25"); default none.
            mode: "slide", "whole" or "coarse_to_fine" (default: the config's ``eval.mode``).
            resize: fit the image into this (W, H) box before inference (e.g. (1024, 512) for Cityscapes,
                as ``data.test`` does); results are at the input resolution either way.
            crop, stride: sliding-window size and step (h, w); default the config's ``eval``.
            scale: resize factor of the (fitted) image before inference (default: the config's ``eval.scale``).

        Returns:
            :class:`Prediction` (or a list of them): ``labels`` H x W int64, ``scores`` K x H x W float32.
        """
        tta = parse_tta(tta) if isinstance(tta, str) or tta is None else tta
        options = dict(tta=tta, mode=mode, resize=resize, crop=crop, stride=stride, scale=scale)
        if isinstance(image, (list, tuple)):
            return [self.predict_batch([to_rgb_array(img)], **options)[0] for img in image]
        return self.predict_batch([to_rgb_array(image)], **options)[0]
