"""Inference modes on top of a segmentor's two passes (whole image, sliding window): the evaluation
resolution and the coarse-to-fine fusion (``cfg.eval``; docs/inference.md has their cost and which
resolution each published figure used).

    scores = run_inference(model.whole_inference, model.slide_inference, images, cfg.eval, out_size)

* ``slide`` / ``whole`` at ``scale``: the image is resized by ``scale`` (bilinear, half-pixel centres,
  as mmseg's ``Resize``; the normalisation is per-channel affine, so resizing the normalised tensor
  equals resizing the pixels), scored, and the scores resized bilinearly to the label's size before the
  argmax. ``scale: 2.0`` runs Rein's 1024 x 512 Cityscapes protocol at 2048 x 1024. At ``scale: 1.0``
  nothing is resized: the scores are the unscaled path's, bit for bit. Where the images are first
  fitted into a box (``data.test[].resize``, ``dgss predict --resize``), the evaluation and the
  predictor scale the box instead (:func:`scale_box`, :func:`scale_folded`): one resampling from the
  original image, as mmseg's ``Resize(scale=box * s)``, not a 1024 x 512 image blown up to 2048 x 1024.
* ``coarse_to_fine``: a whole-image pass at ``coarse_scale`` (global context at low resolution) and the
  sliding window at ``scale`` (detail at high resolution), both resized to the label's size and fused as
  ``coarse_weight * coarse + (1 - coarse_weight) * fine``. At 0.5 this is mmseg's multi-scale test-time
  merge (``SegTTAModel.merge_preds``: the mean of the per-scale score maps) over these two passes; a
  fixed weight stands in for HRDA's learned scale attention (Hoyer et al., ECCV 2022), which needs a
  trained attention head that no DGSS method here has. The coarse image is downsampled with
  antialiasing (a choice: a plain bilinear 4x reduction would skip three of four pixels).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import EvalConfig

__all__ = ["INFERENCE_MODES", "scaled_size", "resize_by", "fuse_coarse_fine", "padded_pass", "run_inference",
           "scale_box", "scale_folded"]

INFERENCE_MODES = ("slide", "whole", "coarse_to_fine")

Pass = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x H x W -> B x K x H x W scores


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image resized by ``scale``, rounded to the nearest pixel (mmseg's rescale rounds so)."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_by(images: torch.Tensor, scale: float, *, antialias: bool = False) -> torch.Tensor:
    """B x C x H x W resized by ``scale`` (bilinear, align_corners=False); the same tensor at 1.0.
    ``antialias``: low-pass first when shrinking (the coarse pass; mmseg's cv2 resize does not)."""
    if scale == 1.0:
        return images
    size = scaled_size(*images.shape[-2:], scale)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias and scale < 1)


def scale_box(box_wh: Sequence[int], scale: float) -> list[int]:
    """A resize-to-fit box (W, H) scaled by ``scale``: [1024, 512] at 2.0 -> [2048, 1024]."""
    return [max(1, int(side * scale + 0.5)) for side in box_wh]


def scale_folded(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` once its scale has gone into the images' resize box: scale 1, and the coarse pass's
    factor relative to the scaled images (coarse_scale / scale), so it sees the same resolution."""
    return dataclasses.replace(cfg, scale=1.0, coarse_scale=cfg.coarse_scale / cfg.scale)


def _to_size(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def fuse_coarse_fine(coarse: torch.Tensor, fine: torch.Tensor, coarse_weight: float) -> torch.Tensor:
    """The coarse-to-fine rule: ``coarse_weight * coarse + (1 - coarse_weight) * fine`` (same sizes)."""
    return coarse_weight * coarse + (1.0 - coarse_weight) * fine


def padded_pass(run: Pass, images: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """``run`` on ``images`` padded bottom/right with zeros (the mean colour after normalisation) to
    multiples of ``size_divisor``, the scores cropped back: a whole pass of any size (a coarse image of
    720 x 1280 at 0.5 is 360 x 640, and a ViT takes only multiples of its patch). Unpadded when it fits."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % size_divisor, -width % size_divisor
    if not (pad_h or pad_w):
        return run(images)
    return run(F.pad(images, (0, pad_w, 0, pad_h)))[..., :height, :width]


def run_inference(whole: Pass, slide: Pass, images: torch.Tensor, cfg: EvalConfig,
                  out_size: Optional[Sequence[int]] = None, *, size_divisor: int = 1) -> torch.Tensor:
    """Scores of ``images`` in ``cfg.mode`` at ``cfg.scale``, resized to ``out_size`` (default the
    images' size): B x K x h x w. ``whole`` and ``slide`` are the segmentor's two passes; the coarse pass
    and a rescaled whole pass are padded to multiples of ``size_divisor`` (:func:`padded_pass`)."""
    target = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])

    def padded_whole(x: torch.Tensor) -> torch.Tensor:
        return padded_pass(whole, x, size_divisor)

    if cfg.mode in ("slide", "whole"):
        if cfg.mode == "slide":
            run = slide
        else:  # at scale 1 the whole pass is today's, unpadded, bit for bit; rescaled sizes are arbitrary
            run = whole if cfg.scale == 1.0 else padded_whole
        return _to_size(run(resize_by(images, cfg.scale)), target)
    if cfg.mode == "coarse_to_fine":
        coarse = _to_size(padded_whole(resize_by(images, cfg.coarse_scale, antialias=True)), target)
        fine = _to_size(slide(resize_by(images, cfg.scale)), target)
        return fuse_coarse_fine(coarse, fine, cfg.coarse_weight)
    raise ValueError(f"unknown eval mode '{cfg.mode}' ({' | '.join(INFERENCE_MODES)})")
