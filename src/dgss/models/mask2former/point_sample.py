"""Point sampling for the Mask2Former losses: predictions at points, targets at points straight from the
semantic label map, and the uncertainty-based point selection of PointRend/Mask2Former.

Coordinates are (x, y) in [0, 1] over the whole map, sampled bilinearly with align_corners=False and
zero padding (``grid_sample``'s rule), for predictions (1/4 resolution) and targets (full resolution)
alike, so a point refers to the same image location in both.

Targets are never materialised as full-resolution masks: the bilinear interpolation of the indicator
mask ``labels == c`` at a point is the sum of the weights of the four neighbouring pixels whose label is
``c``. This is exactly ``grid_sample`` of the one-hot mask, at the cost of four gathers per point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "sample_label_onehot", "sample_label_masks", "uncertain_point_coords"]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps at points.

    Args:
        maps: N x C x H x W.
        coords: N x P x 2, (x, y) in [0, 1].

    Returns:
        N x C x P.
    """
    out = F.grid_sample(maps, (2 * coords - 1).unsqueeze(1).to(maps.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.squeeze(2)


def _bilinear_taps(coords: torch.Tensor, height: int, width: int):
    """The four pixels (flat indices into H*W) around each point and their weights, zero outside the
    map (zero padding). coords: ... x 2 -> (index, weight) pairs, each ... shaped, for the 4 taps."""
    x = coords[..., 0].float() * width - 0.5
    y = coords[..., 1].float() * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    taps = []
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        index = yi.clamp(0, height - 1).long() * width + xi.clamp(0, width - 1).long()
        taps.append((index, weight * inside))
    return taps


def sample_label_onehot(labels: torch.Tensor, coords: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bilinear samples of every class's indicator mask.

    Args:
        labels: B x H x W integer labels; values outside [0, num_classes) (the ignore index) belong to
            no class.
        coords: B x P x 2, (x, y) in [0, 1].

    Returns:
        B x P x K, equal to ``point_sample(one_hot(labels), coords)``.
    """
    batch, height, width = labels.shape
    flat = labels.reshape(batch, -1)
    out = coords.new_zeros(batch, coords.shape[1], num_classes + 1, dtype=torch.float32)
    for index, weight in _bilinear_taps(coords, height, width):
        lab = flat.gather(1, index).long()
        lab = torch.where((lab >= 0) & (lab < num_classes), lab, num_classes)  # void -> extra bin
        out.scatter_add_(2, lab.unsqueeze(-1), weight.unsqueeze(-1))
    return out[..., :num_classes]


def sample_label_masks(labels: torch.Tensor, batch_index: torch.Tensor, classes: torch.Tensor,
                       coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of the indicator mask ``labels[batch_index[n]] == classes[n]``.

    Args:
        labels: B x H x W integer labels.
        batch_index, classes: N (image and class of each target mask).
        coords: N x P x 2, (x, y) in [0, 1].

    Returns:
        N x P.
    """
    _, height, width = labels.shape
    flat = labels.reshape(labels.shape[0], -1)
    out = coords.new_zeros(coords.shape[:2], dtype=torch.float32)
    for index, weight in _bilinear_taps(coords, height, width):
        out += weight * (flat[batch_index[:, None], index] == classes[:, None])
    return out


@torch.no_grad()
def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> torch.Tensor:
    """PointRend's training points: draw ``oversample_ratio * num_points`` uniform points, keep the
    ``importance_sample_ratio * num_points`` most uncertain (logit closest to 0), fill up with fresh
    uniform points.

    Args:
        mask_logits: N x H x W.

    Returns:
        N x num_points x 2, (x, y) in [0, 1].
    """
    num = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(num, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits[:, None].float(), candidates)[:, 0].abs()
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    coords = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    extra = torch.rand(num, num_points - num_uncertain, 2, device=mask_logits.device)
    return torch.cat([coords, extra], dim=1)
