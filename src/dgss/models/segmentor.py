"""The segmentor: backbone + tuning method + decode head; training loss and inference.

    model = build_segmentor(cfg)                      # dgss.tuning.model: from an ExperimentConfig
    losses = model.loss(images, labels)               # {"loss": total, "loss_cls": ..., ...}
    losses = ddp_model(images, labels, iteration=it)  # the same, through DistributedDataParallel
    scores = model.inference(images, out_size=(H, W)) # B x K x H x W, as cfg.eval says (dgss.models.inference)
    pred = scores.argmax(1)

Images are normalised B x 3 x H x W tensors, labels B x H x W class indices (255 ignored). The
segmentor never tests a method's or a head's name: it asks the method for queries
(``head_queries()``) and whether the backbone needs gradients, and the head for its loss and scores.
Loss terms beyond the head's (``cfg.loss``: GeCo's consistency, dgss.models.geco) apply to any method.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from ..config import EvalConfig
from .backbones import Backbone
from .geco import GeCoLoss
from .inference import run_inference
from .param_groups import decay_groups

if TYPE_CHECKING:  # tuning sits on models: the segmentor holds a method, it never imports the package
    from ..tuning.base import TuningMethod

__all__ = ["Segmentor", "sliding_windows"]


def sliding_windows(height: int, width: int, crop: Sequence[int],
                    stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) covering an H x W image, placed as mmseg does: a grid of
    ceil((size - crop) / stride) + 1 windows per axis, the last shifted back to end at the border, and
    windows clipped to the image when it is smaller than the crop (so all windows have one size)."""
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


class Segmentor(nn.Module):
    """Backbone, tuning method (attached to the backbone) and head.

    Args:
        backbone: a :class:`~dgss.models.backbones.Backbone`.
        method: the :class:`~dgss.tuning.base.TuningMethod` attached to it.
        head: a decode head (see :mod:`dgss.models.heads`).
        num_classes: K (must equal the head's).
        ignore_index: label value that is not supervised.
        eval_cfg: inference mode, window and stride (crop and stride as (h, w)).
        geco: GeCo's consistency loss (``cfg.loss.geco``), added to the head's as ``loss_geco``; None: off.
    """

    def __init__(self, backbone: Backbone, method: TuningMethod, head: nn.Module, *, num_classes: int,
                 ignore_index: int = 255, eval_cfg: Optional[EvalConfig] = None, geco: Optional[GeCoLoss] = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.head = head
        self.geco = geco
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
        head_classes = getattr(head, "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"the head predicts {head_classes} classes, the segmentor expects {num_classes}")
        with torch.no_grad():
            supplies = method.head_queries() is not None
        takes = bool(getattr(head, "external_queries", False))
        if takes and not supplies:
            raise ValueError(f"the head expects external queries but method '{method.name}' supplies none")
        if supplies and getattr(head, "accepts_queries", False) and not takes:
            raise ValueError(f"method '{method.name}' supplies queries: build the head with external_queries=True")

    def train(self, mode: bool = True) -> "Segmentor":
        super().train(mode)
        self.method.train(mode)  # last, so that a frozen backbone stays in eval mode
        return self

    # ------------------------------------------------------------------ forward and loss

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x H x W -> the backbone's 4 maps (strides 4/8/16/32), after the method's changes."""
        if not self.method.backbone_requires_grad and self.backbone.neck is None:
            with torch.no_grad():  # nothing before the head trains: keep no activations
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                iteration: Optional[int] = None) -> dict:
        """The head's raw outputs for a batch of images, or with ``labels`` the training losses (the
        form to call through ``DistributedDataParallel``: ``ddp_model(images, labels, iteration=it)``).
        ``iteration``: the 0-based training iteration, for scheduled terms (GeCo's start); None: all on."""
        features = self.forward_features(images)
        queries = self.method.head_queries() if getattr(self.head, "accepts_queries", False) else None
        outputs = self.head(features, queries)
        if labels is None:
            return outputs
        losses = self.head.loss(outputs, labels, ignore_index=self.ignore_index)
        if self.geco is not None and self.training:  # a training term, as the public code's (not in eval mode)
            losses["loss_geco"] = self._geco_term(features, queries, outputs, images.shape[-2:], iteration)
        return {"loss": sum(losses.values()), **losses}

    def _geco_term(self, features, queries, outputs: dict, size, iteration: Optional[int]) -> torch.Tensor:
        """GeCo's weighted consistency between the head's scores on the clean maps (this pass's outputs:
        the public code's separate no-grad pass gives the same, the head being deterministic) and on the
        perturbed ones, at the input size as mmseg's ``decode_head.predict`` returns them; 0 before its start."""
        if not self.geco.active(iteration):
            return features[-1].new_zeros((), dtype=torch.float32)
        perturbed_outputs = self.head(self.geco.perturb(features), queries)
        clean = self.head.segmentation_scores(outputs, size)
        perturbed = self.head.segmentation_scores(perturbed_outputs, size)
        return self.geco.weight_at(iteration) * self.geco.consistency(clean, perturbed)

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             iteration: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Training losses of a batch: the head's weighted terms (and ``cfg.loss``'s) and their sum under "loss"."""
        return self(images, labels, iteration=iteration)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups: the method's (method, trainable backbone, neck) and the head's."""
        groups = self.method.parameter_groups(lr, weight_decay, backbone_lr_mult)
        head = decay_groups(self.head.named_parameters(), lr, weight_decay)
        for group in head:
            group["head"] = True  # train.head_optim may give the head its own rule (dgss.engine.optim)
        return groups + head

    # ------------------------------------------------------------------ inference

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x K x H x W class scores (for Mask2Former sum_q p_q,c * sigmoid(m_q),
        with the mask logits upsampled to H x W first)."""
        return self.head.segmentation_scores(self(images), images.shape[-2:]).float()

    @torch.no_grad()
    def whole_inference(self, images: torch.Tensor) -> torch.Tensor:
        """Scores of the whole image in one pass: B x K x H x W."""
        return self.predict(images)

    @torch.no_grad()
    def slide_inference(self, images: torch.Tensor, crop: Optional[Sequence[int]] = None,
                        stride: Optional[Sequence[int]] = None, batch_windows: Optional[int] = None) -> torch.Tensor:
        """Scores from overlapping windows, averaged where they overlap: B x K x H x W.

        Args:
            crop, stride: (h, w) window size and step; default ``eval_cfg`` (512 / 341).
            batch_windows: windows (of all images) per forward pass; default ``eval_cfg``.
        """
        crop = tuple(crop if crop is not None else self.eval_cfg.crop_size)
        stride = tuple(stride if stride is not None else self.eval_cfg.stride)
        batch_windows = batch_windows or self.eval_cfg.batch_windows
        batch, _, height, width = images.shape
        boxes = sliding_windows(height, width, crop, stride)
        scores = images.new_zeros(batch, self.num_classes, height, width, dtype=torch.float32)
        count = images.new_zeros(1, 1, height, width, dtype=torch.float32)
        for y1, y2, x1, x2 in boxes:
            count[..., y1:y2, x1:x2] += 1
        jobs = [(b, box) for b in range(batch) for box in boxes]
        for start in range(0, len(jobs), batch_windows):
            chunk = jobs[start:start + batch_windows]
            windows = torch.stack([images[b, :, y1:y2, x1:x2] for b, (y1, y2, x1, x2) in chunk])
            for window_scores, (b, (y1, y2, x1, x2)) in zip(self.predict(windows), chunk):
                scores[b, :, y1:y2, x1:x2] += window_scores
        return scores / count

    @torch.no_grad()
    def inference(self, images: torch.Tensor, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Scores in ``eval_cfg.mode`` ("slide", "whole" or "coarse_to_fine") at ``eval_cfg.scale``,
        bilinearly resized to ``out_size`` (the label resolution, (H, W); default the images') so that the
        caller's argmax is taken there: B x K x H x W (:func:`dgss.models.inference.run_inference`)."""
        return run_inference(self.whole_inference, self.slide_inference, images, self.eval_cfg, out_size,
                             size_divisor=self.size_divisor)

    @property
    def size_divisor(self) -> int:
        """Whole images must be multiples of this: the coarsest pyramid stride (32) and the patch."""
        return math.lcm(32, int(getattr(self.backbone, "patch_size", 1) or 1))

    @torch.no_grad()
    def segment(self, images: torch.Tensor, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Predicted class per pixel: B x H x W (argmax of :meth:`inference`)."""
        return self.inference(images, out_size).argmax(1)
