"""Inference modes on top of a segmentor's two passes (whole image, sliding window): the evaluation
resolution and the coarse-to-fine fusion (``cfg.eval``; docs/inference.md has their cost and which
resolution each published figure used).

    scores = run_inference(model.whole_inference, model.slide_inference, images, cfg.eval, out_size)

* ``slide`` / ``whole`` at ``scale``: the image is resized by ``scale`` (bilinear, half-pixel centres,
  as mmseg's ``Resize``; the normalisation is per-channel affine, so resizing the normalised tensor
  equals resizing the pixels), scored, and the scores resized bilinearly to the label's size before the
  argmax. ``scale: 2.0`` runs Rein's 1024 x 512 Cityscapes protocol at 2048 x 1024. At ``scale: 1.0``
  nothing is resized: the scores are the unscaled path's, bit for bit.
* ``coarse_to_fine``: a whole-image pass at ``coarse_scale`` (global context at low resolution) and the
  sliding window at ``scale`` (detail at high resolution), both resized to the label's size and fused as
  ``coarse_weight * coarse + (1 - coarse_weight) * fine``. At 0.5 this is mmseg's multi-scale test-time
  merge (``SegTTAModel.merge_preds``: the mean of the per-scale score maps) over these two passes; a
  fixed weight stands in for HRDA's learned scale attention (Hoyer et al., ECCV 2022), which needs a
  trained attention head that no DGSS method here has.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import EvalConfig

__all__ = ["INFERENCE_MODES", "scaled_size", "resize_by", "fuse_coarse_fine", "run_inference"]

INFERENCE_MODES = ("slide", "whole", "coarse_to_fine")

Pass = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x H x W -> B x K x H x W scores


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image resized by ``scale``, rounded to the nearest pixel (mmseg's rescale rounds so)."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_by(images: torch.Tensor, scale: float) -> torch.Tensor:
    """B x C x H x W resized by ``scale`` (bilinear, align_corners=False); the same tensor at 1.0."""
    if scale == 1.0:
        return images
    size = scaled_size(*images.shape[-2:], scale)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _to_size(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def fuse_coarse_fine(coarse: torch.Tensor, fine: torch.Tensor, coarse_weight: float) -> torch.Tensor:
    """The coarse-to-fine rule: ``coarse_weight * coarse + (1 - coarse_weight) * fine`` (same sizes)."""
    return coarse_weight * coarse + (1.0 - coarse_weight) * fine


def run_inference(whole: Pass, slide: Pass, images: torch.Tensor, cfg: EvalConfig,
                  out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Scores of ``images`` in ``cfg.mode`` at ``cfg.scale``, resized to ``out_size`` (default the
    images' size): B x K x h x w. ``whole`` and ``slide`` are the segmentor's two passes."""
    target = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
    if cfg.mode in ("slide", "whole"):
        run = slide if cfg.mode == "slide" else whole
        return _to_size(run(resize_by(images, cfg.scale)), target)
    if cfg.mode == "coarse_to_fine":
        coarse = _to_size(whole(resize_by(images, cfg.coarse_scale)), target)
        fine = _to_size(slide(resize_by(images, cfg.scale)), target)
        return fuse_coarse_fine(coarse, fine, cfg.coarse_weight)
    raise ValueError(f"unknown eval mode '{cfg.mode}' ({' | '.join(INFERENCE_MODES)})")
