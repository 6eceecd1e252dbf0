"""Mask2Former's training loss for semantic segmentation, over all deep-supervision predictions.

For every prediction (before the first decoder layer and after each layer) and image, queries are
matched to the image's class masks (:class:`~.matcher.HungarianMatcher`). Then, summed over
predictions:

* classification: cross-entropy over K + 1 classes (unmatched queries -> "no object", weight 0.1),
  averaged with those class weights, times 2;
* mask: sigmoid BCE times 5 and dice (eps 1) times 5, on 12,544 points per matched mask chosen by
  uncertainty (oversample 3, importance 0.75), normalised by the number of target masks (averaged
  over processes under ``torch.distributed``, at least 1).

All predictions are handled in one batch; the matcher's cost transfer is the only host sync.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .matcher import Assignment, HungarianMatcher
from .point_sample import point_sample, sample_label_masks, uncertain_point_coords

__all__ = ["Mask2FormerCriterion", "dice_loss", "average_num_masks"]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask dice loss on points. logits, targets: N x P -> N."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def average_num_masks(num_masks: int, device: torch.device) -> torch.Tensor:
    """The number of target masks, averaged over processes when distributed, clamped at >= 1."""
    count = torch.tensor(float(num_masks), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class Mask2FormerCriterion(nn.Module):
    """Loss of a Mask2Former head's outputs against semantic labels (no parameters, no state).

    Args:
        num_classes: K.
        num_points: points per mask for matching and for the losses (12,544 = 112 x 112).
        oversample_ratio, importance_sample_ratio: uncertainty point sampling for the losses.
        class_weight, mask_weight, dice_weight: loss weights, also the matching cost weights.
        no_object_weight: cross-entropy weight of the "no object" class.
    """

    def __init__(self, num_classes: int, *, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.num_points = num_points
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.no_object_weight = no_object_weight
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)

    def class_weights(self, device) -> torch.Tensor:
        """K + 1 cross-entropy weights: 1 per class, ``no_object_weight`` for the last."""
        weights = torch.ones(self.num_classes + 1, device=device)
        weights[-1] = self.no_object_weight
        return weights

    @staticmethod
    def predictions(outputs: dict) -> list[dict]:
        """The deep-supervision predictions in order: the auxiliary ones, then the final one."""
        return list(outputs.get("aux_outputs", [])) + [outputs]

    def forward(self, outputs: dict, labels: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the head's output: "pred_logits" B x Q x (K + 1), "pred_masks" B x Q x h x w and
                "aux_outputs" (a list of such dicts).
            labels: B x H x W class indices; ``ignore_index`` and any value outside [0, K) belong to
                no target mask.

        Returns:
            "loss_cls", "loss_mask", "loss_dice" (weighted, summed over predictions).
        """
        labels = labels.long()
        if 0 <= ignore_index < self.num_classes:  # values outside [0, K) are void already
            labels = labels.masked_fill(labels == ignore_index, -1)
        preds = self.predictions(outputs)
        logits = [p["pred_logits"] for p in preds]
        masks = [p["pred_masks"] for p in preds]
        assignment = self.matcher(logits, masks, labels, self.num_classes)
        num_masks = average_num_masks(assignment.num_masks, labels.device)
        return {
            "loss_cls": self.class_weight * self.classification_loss(logits, assignment),
            **self.mask_losses(masks, labels, assignment, num_masks),
        }

    def classification_loss(self, logits: Sequence[torch.Tensor], assignment: Assignment) -> torch.Tensor:
        """Weighted cross-entropy of every query, a weighted mean per prediction, summed."""
        stacked = torch.stack([x.float() for x in logits])  # L x B x Q x (K + 1)
        targets = torch.full(stacked.shape[:3], self.num_classes, dtype=torch.long, device=stacked.device)
        targets[assignment.prediction, assignment.batch, assignment.query] = assignment.target_class
        weights = self.class_weights(stacked.device)
        per_query = F.cross_entropy(stacked.flatten(0, 2), targets.flatten(), weight=weights, reduction="none")
        per_prediction = per_query.view(len(logits), -1).sum(-1) / weights[targets].view(len(logits), -1).sum(-1)
        return per_prediction.sum()

    def mask_losses(self, masks: Sequence[torch.Tensor], labels: torch.Tensor, assignment: Assignment,
                    num_masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point-sampled BCE and dice of every matched mask, divided by the number of target masks."""
        if assignment.num_masks == 0:  # no labelled pixel in the batch: zero, but keep the graph
            zero = sum(m.sum() for m in masks) * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        split = [assignment.num_masks] * assignment.num_predictions
        matched = torch.cat([m[b, q] for m, b, q in zip(masks, assignment.batch.split(split),
                                                         assignment.query.split(split))]).float()  # N x h x w
        coords = uncertain_point_coords(matched, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        point_logits = point_sample(matched[:, None], coords)[:, 0]  # N x P
        with torch.no_grad():
            point_targets = sample_label_masks(labels, assignment.batch, assignment.target_class, coords)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(-1)
        dice = dice_loss(point_logits, point_targets)
        return {
            "loss_mask": self.mask_weight * bce.sum() / num_masks,
            "loss_dice": self.dice_weight * dice.sum() / num_masks,
        }
