"""Hungarian matching of Mask2Former's query predictions to the target masks of a semantic label map.

Targets: each class present in an image's labels is one mask (the ignore index belongs to none).
Cost of query q for the mask of class c, on ``num_points`` uniform random points drawn per prediction
and image (the same points for prediction and target):

    2 * (-softmax(class logits)_q[c]) + 5 * mean BCE(mask_q, mask_c) + 5 * dice(mask_q, mask_c; eps 1)

All predictions (the 10 of deep supervision) and images are costed in one batch on the device against
every class, and the cost tensor comes to the host once; ``scipy.optimize.linear_sum_assignment`` then
solves each (prediction, image) problem on the columns of its present classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .point_sample import point_sample, sample_label_onehot

__all__ = ["Assignment", "HungarianMatcher", "present_classes", "pairwise_mask_costs"]


@dataclass
class Assignment:
    """Matched (prediction, image, query, class) quadruples, on the predictions' device.

    Pairs are ordered by prediction, then image, then query; every prediction has ``num_masks`` pairs
    (sum over images of min(Q, number of classes present)).
    """

    prediction: torch.Tensor  # N, index into the list of predictions
    batch: torch.Tensor  # N
    query: torch.Tensor  # N
    target_class: torch.Tensor  # N
    num_masks: int  # pairs per prediction
    num_predictions: int


def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x H x W labels -> B x K boolean: which classes occur (the ignore index is none of them)."""
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1).long()
    flat = torch.where((flat >= 0) & (flat < num_classes), flat, num_classes)
    seen = torch.zeros(batch, num_classes + 1, device=labels.device)
    seen.scatter_(1, flat, 1.0)
    return seen[:, :num_classes] > 0


def pairwise_mask_costs(point_logits: torch.Tensor, point_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid BCE and dice (eps 1) between every prediction and every target, on shared points.

    Args:
        point_logits: B x Q x P mask logits.
        point_targets: B x P x K target values in [0, 1].

    Returns:
        (bce, dice), each B x Q x K.
    """
    num_points = point_logits.shape[-1]
    # BCE(x, t) = softplus(x) - x * t, summed over points as two matrix products.
    bce = (F.softplus(point_logits).sum(-1, keepdim=True) - point_logits @ point_targets) / num_points
    probs = point_logits.sigmoid()
    numerator = 2 * (probs @ point_targets)
    denominator = probs.sum(-1, keepdim=True) + point_targets.sum(1)[:, None, :]
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


class HungarianMatcher:
    """One-to-one assignment of queries to target masks minimising the weighted cost above."""

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544):
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def costs(self, pred_logits: Sequence[torch.Tensor], pred_masks: Sequence[torch.Tensor], labels: torch.Tensor,
              num_classes: int, point_coords: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cost of every query for every class' mask: L x B x Q x K (absent classes included).

        Args:
            pred_logits: L tensors B x Q x (K + 1); pred_masks: L tensors B x Q x h x w.
            labels: B x H x W.
            point_coords: optional L x B x P x 2 points (default: uniform random, fresh per
                prediction and image).
        """
        num_preds, batch = len(pred_logits), labels.shape[0]
        device = labels.device
        if point_coords is None:
            point_coords = torch.rand(num_preds, batch, self.num_points, 2, device=device)
        # Targets of all predictions at once: the L point sets of an image side by side.
        num_points = point_coords.shape[2]
        stacked = point_coords.permute(1, 0, 2, 3).reshape(batch, num_preds * num_points, 2)
        targets = sample_label_onehot(labels, stacked, num_classes)  # B x (L*P) x K
        targets = targets.view(batch, num_preds, num_points, num_classes)
        costs = []
        for i, (logits, masks) in enumerate(zip(pred_logits, pred_masks)):
            class_cost = -logits.float().softmax(-1)[..., :num_classes]  # B x Q x K
            point_logits = point_sample(masks.float(), point_coords[i])  # B x Q x P
            bce, dice = pairwise_mask_costs(point_logits, targets[:, i])
            costs.append(self.class_weight * class_cost + self.mask_weight * bce + self.dice_weight * dice)
        # A diverged model must still be matched (its loss becomes non-finite and the trainer decides).
        return torch.nan_to_num(torch.stack(costs), nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def __call__(self, pred_logits: Sequence[torch.Tensor], pred_masks: Sequence[torch.Tensor], labels: torch.Tensor,
                 num_classes: int, point_coords: Optional[torch.Tensor] = None) -> Assignment:
        """Match every prediction of the list (e.g. the 9 auxiliary and the final one) to the targets."""
        device = pred_logits[0].device
        costs = self.costs(pred_logits, pred_masks, labels, num_classes, point_coords)
        present = present_classes(labels, num_classes)
        # The only device -> host transfer of the loss (one sync).
        host = torch.cat([costs.flatten(), present.flatten().to(costs.dtype)]).cpu().numpy()
        costs_np = host[: costs.numel()].reshape(costs.shape)
        present_np = host[costs.numel():].reshape(present.shape) > 0.5
        columns = [np.flatnonzero(row) for row in present_np]
        pred_idx, batch_idx, query_idx, class_idx = [], [], [], []
        for p in range(costs_np.shape[0]):
            for b, cols in enumerate(columns):
                if cols.size == 0:
                    continue
                rows, picked = linear_sum_assignment(costs_np[p, b][:, cols])
                pred_idx.append(np.full(rows.size, p))
                batch_idx.append(np.full(rows.size, b))
                query_idx.append(rows)
                class_idx.append(cols[picked])
        num_masks = sum(min(costs_np.shape[2], cols.size) for cols in columns)

        def to_device(parts: list) -> torch.Tensor:
            array = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return torch.from_numpy(array.astype(np.int64)).to(device, non_blocking=True)

        return Assignment(to_device(pred_idx), to_device(batch_idx), to_device(query_idx), to_device(class_idx),
                          num_masks, costs_np.shape[0])
