"""Decode heads and their factory.

Every head has the same small surface, which is all the segmentor uses:

    outputs = head(features, queries)          # features: 4 maps at strides 4/8/16/32
    losses = head.loss(outputs, labels, ignore_index=255)         # dict of weighted loss terms
    scores = head.segmentation_scores(outputs, (H, W))            # B x K x H x W
    head.accepts_queries                                          # takes a tuning method's queries

* ``"mask2former"``: :class:`dgss.models.mask2former.Mask2FormerHead`, the head of the papers.
* ``"fpn"``: :class:`FPNHead`, a light per-pixel head for quick experiments and CPU demos.
* ``"linear"``: :class:`LinearHead`, a linear classifier of the token features (DINOv2's linear
  segmentation probe, multi-layer form): the head of the DG testbed, whose frozen row converges within
  a CPU budget (docs/testbed.md, P1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig, check_name
from .mask2former.layers import ConvGN

__all__ = ["FPNHead", "LinearHead", "HEADS", "build_head", "check_head_type"]


class FPNHead(nn.Module):
    """A small FPN with a per-pixel classifier, trained with cross-entropy.

    Each input map gets a 1 x 1 lateral conv to ``hidden_dim`` channels; a top-down pass adds every
    coarser level (upsampled) to the next finer one; each level goes through 3 x 3 conv + GN + ReLU,
    is upsampled to stride 4, and the sum feeds a 1 x 1 classifier. Output: B x K x H/4 x W/4 logits.
    """

    accepts_queries = False

    def __init__(self, in_channels: Sequence[int], cfg: Optional[HeadConfig] = None):
        super().__init__()
        cfg = cfg if cfg is not None else HeadConfig(type="fpn")
        dim = cfg.hidden_dim
        self.num_classes = cfg.num_classes
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(ConvGN(dim, dim, 3, bias=False, relu=True) for _ in in_channels)
        self.classifier = nn.Conv2d(dim, cfg.num_classes, 1)
        if cfg.classifier_init == "zeros":  # drawn, then zeroed: the run's other random numbers stay
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[torch.Tensor], queries: Optional[torch.Tensor] = None) -> dict:
        """features: maps B x C_i x H_i x W_i, finest first -> {"logits": B x K x H_0 x W_0}."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="bilinear", align_corners=False)
        size = laterals[0].shape[-2:]
        fused = sum(F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False) if i else conv(x)
                    for i, (conv, x) in enumerate(zip(self.output_convs, laterals)))
        return {"logits": self.classifier(fused)}

    def loss(self, outputs: dict, labels: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
        """Per-pixel cross-entropy at the label resolution (logits upsampled bilinearly)."""
        logits = F.interpolate(outputs["logits"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
        labels = labels.long()
        keep = (labels >= 0) & (labels < self.num_classes) & (labels != ignore_index)
        labels = torch.where(keep, labels, -100)
        # Sum / count instead of a mean: no nan (and no host sync) when nothing is labelled.
        total = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        return {"loss_ce": total / keep.sum().clamp(min=1)}

    def segmentation_scores(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """B x K x H x W class probabilities (softmax of the upsampled logits)."""
        logits = F.interpolate(outputs["logits"].float(), size=tuple(size), mode="bilinear", align_corners=False)
        return logits.softmax(1)


class LinearHead(nn.Module):
    """A linear classifier of the backbone's features at the token grid, trained with cross-entropy.

    DINOv2's linear segmentation probe in its multi-layer form (Oquab et al., 2023, "+ms" without the
    test-time scales): the four maps are brought to the grid of the third (stride 16: the token grid of a
    ViT with bilinear_pyramid), concatenated, batch-normalised and classified by one 1 x 1 conv; the
    logits are upsampled bilinearly to the labels. Every class is then an affine function of the tokens,
    so what a frozen backbone does not encode the head cannot add, and its training is nearly convex. In
    the DG testbed it converges within 1,920 iterations (0.6 points gained at twice that), where
    Mask2Former and the FPN head still gain 4-11 points at twice 960 (docs/testbed.md).
    """

    accepts_queries = False
    grid_level = 2  # the map whose size the others are resized to

    def __init__(self, in_channels: Sequence[int], cfg: Optional[HeadConfig] = None):
        super().__init__()
        cfg = cfg if cfg is not None else HeadConfig(type="linear")
        self.num_classes = cfg.num_classes
        total = sum(in_channels)
        self.norm = nn.BatchNorm2d(total)
        self.classifier = nn.Conv2d(total, cfg.num_classes, 1)
        # DINO's linear probe (eval_linear.py): weights N(0, 0.01), bias 0. A small start matters when the
        # head trains by SGD (train.head_optim): what the source does not constrain stays near it.
        # classifier_init "zeros": the head ViT (Dosovitskiy et al., 2021) and BiT attach for fine-tuning.
        # Its features' gradient is zero at step 0, so the backbone's first updates follow a head the data
        # made, not a random one (in the DG testbed the random start carries part of Full's out-of-domain
        # result by seed, yet a zero start did not narrow its spread: docs/figures/testbed_log.md, "The head's
        # start"). The N(0, 0.01) draw is made either way, so the rest of a run's random numbers do not
        # depend on the choice.
        nn.init.normal_(self.classifier.weight, std=0.01)
        if cfg.classifier_init == "zeros":
            nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[torch.Tensor], queries: Optional[torch.Tensor] = None) -> dict:
        """features: maps B x C_i x H_i x W_i -> {"logits": B x K x H_g x W_g} at the grid level's size."""
        size = features[min(self.grid_level, len(features) - 1)].shape[-2:]
        maps = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in features]
        return {"logits": self.classifier(self.norm(torch.cat(maps, 1)))}

    # the same per-pixel loss and scores as the FPN head
    loss = FPNHead.loss
    segmentation_scores = FPNHead.segmentation_scores


def _mask2former(in_channels, cfg, external_queries, query_content):
    from .mask2former import Mask2FormerHead

    return Mask2FormerHead(in_channels, cfg, external_queries=external_queries, query_content=query_content)


def _fpn(in_channels, cfg, external_queries, query_content):
    return FPNHead(in_channels, cfg)


def _linear(in_channels, cfg, external_queries, query_content):
    return LinearHead(in_channels, cfg)


HEADS = {"mask2former": _mask2former, "fpn": _fpn, "linear": _linear}


def check_head_type(name: str, where: str = "") -> None:
    """ConfigError (one line, the closest name) unless ``name`` is a registered head (model.head.type)."""
    check_name("model.head.type", name, HEADS, "head type", where)


def build_head(cfg: HeadConfig, in_channels: Sequence[int], *, external_queries: bool = False,
               query_content: str = "querys2feat") -> nn.Module:
    """Build the head named ``cfg.type`` for input maps of ``in_channels`` channels."""
    if cfg.type not in HEADS:
        import difflib

        close = difflib.get_close_matches(cfg.type, HEADS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model.head.type '{cfg.type}'{hint} (available: {', '.join(sorted(HEADS))})")
    if cfg.classifier_init != "normal" and cfg.type not in ("linear", "fpn"):
        raise ValueError(f"model.head.classifier_init '{cfg.classifier_init}' is the per-pixel heads' option "
                         f"(linear, fpn); model.head.type '{cfg.type}' starts its classifiers its own way "
                         f"(leave it 'normal')")
    return HEADS[cfg.type](list(in_channels), cfg, external_queries, query_content)
