"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, via ``grid_sample``.

Each query looks at ``P`` learned sampling points around its reference point on each of ``L`` feature
levels, per head, and returns the attention-weighted sum of the bilinearly sampled values. No compiled
extension: sampling is ``F.grid_sample`` (bilinear, zero padding, align_corners=False), which is
exactly the sampling rule of the CUDA kernel in mmcv/Deformable-DETR.

Two equivalent implementations:

* :func:`multi_scale_deformable_attention_per_level`: one ``grid_sample`` per level (the plain form).
* :func:`multi_scale_deformable_attention` (used by default): every level is placed in one zero-padded
  "canvas" image, so all heads, levels and points are sampled by a single ``grid_sample`` call and the
  result is already laid out for the weighted sum (no per-level outputs to stack).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_per_level",
]

Shapes = Sequence[tuple[int, int]]


def _check(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor) -> None:
    if value.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {value.shape[1]} positions, spatial shapes {list(shapes)} need "
                         f"{sum(h * w for h, w in shapes)}")
    if locations.shape[3] != len(shapes):
        raise ValueError(f"sampling locations have {locations.shape[3]} levels, expected {len(shapes)}")


def multi_scale_deformable_attention_per_level(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention with one ``grid_sample`` per level.

    Args:
        value: B x N_v x M x D (M heads of D channels; N_v = sum of H_l * W_l, levels concatenated).
        spatial_shapes: (H_l, W_l) of each level, as Python ints.
        sampling_locations: B x N_q x M x L x P x 2, (x, y) normalised so that [0, 1] spans the map.
        attention_weights: B x N_q x M x L x P (already normalised over L x P).

    Returns:
        B x N_q x (M * D).
    """
    _check(value, spatial_shapes, sampling_locations)
    batch, _, heads, dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B*M) x D x H x W maps, sampled at N_q x P points each -> (B*M) x D x N_q x P.
        maps = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, points, 2)
        sampled.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.cat(sampled, dim=-1)  # (B*M) x D x N_q x (L*P), level-major like the weights
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (sampled * weights.to(sampled.dtype)).sum(-1)  # (B*M) x D x N_q
    return out.view(batch, heads * dim, num_queries).transpose(1, 2)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention with a single ``grid_sample`` over all heads, levels and points.

    Same arguments and result as :func:`multi_scale_deformable_attention_per_level`. The levels are
    stacked vertically in one canvas, separated by a zero row and zero-filled to the widest level.
    A point is first clamped to the band [-1, W_l] x [-1, H_l] (pixel units) of its own level: outside
    it every bilinear tap of the original level is zero padding, and at the clamped position every tap
    that can carry weight falls in a zero row/column or outside the canvas, so the result (and its
    gradient with respect to the values) equals per-level zero-padded sampling exactly.
    """
    _check(value, spatial_shapes, sampling_locations)
    batch, _, heads, dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    widths = [w for _, w in spatial_shapes]
    canvas_w = max(widths)
    # Band of level l starts at row `tops[l]`; one zero row separates consecutive bands.
    tops, row = [], 0
    for h, _ in spatial_shapes:
        tops.append(row)
        row += h + 1
    canvas_h = row - 1

    bands = []
    for level, ((h, w), part) in enumerate(zip(spatial_shapes, value.split([h * w for h, w in spatial_shapes], 1))):
        band = part.permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)
        pad_bottom = 1 if level < levels - 1 else 0
        bands.append(F.pad(band, (0, canvas_w - w, 0, pad_bottom)))
    # Sample in (at least) float32: in half precision a coordinate on a 128-pixel map is off by up
    # to half a pixel.
    canvas = torch.cat(bands, dim=2)  # (B*M) x D x canvas_h x canvas_w
    canvas = canvas.to(torch.promote_types(canvas.dtype, torch.float32))

    loc = sampling_locations.to(canvas.dtype)
    size_wh = loc.new_tensor([[w, h] for h, w in spatial_shapes])  # L x 2
    top = loc.new_tensor(tops)  # L
    # Pixel coordinates of the level (pixel centres at integers), clamped to its band.
    pix = loc * size_wh[:, None, :] - 0.5  # ... x L x P x 2
    pix = torch.maximum(pix, pix.new_tensor(-1.0))
    pix = torch.minimum(pix, size_wh[:, None, :])
    canvas_x = pix[..., 0]
    canvas_y = pix[..., 1] + top[:, None]
    grid = torch.stack(((canvas_x + 0.5) * (2.0 / canvas_w) - 1, (canvas_y + 0.5) * (2.0 / canvas_h) - 1), dim=-1)
    grid = grid.permute(0, 2, 1, 3, 4, 5).reshape(batch * heads, num_queries, levels * points, 2)
    sampled = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (sampled * weights.to(sampled.dtype)).sum(-1)  # (B*M) x D x N_q
    return out.view(batch, heads * dim, num_queries).transpose(1, 2).to(value.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention layer; parameter names are mmcv's ``MultiScaleDeformableAttention``.

    ``sampling_offsets`` predicts M x L x P (x, y) offsets in units of each level's size,
    ``attention_weights`` M x (L x P) logits (softmax over levels and points together).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, and biases that start head h's points on a ray
        at angle 2 pi h / M, at distances 1..P (in level-size units scaled by the max-norm)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * distances[None, None, :, None]  # M x 1 x P x 2
        self.sampling_offsets.bias.copy_(bias.expand(-1, self.num_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Shapes,
    ) -> torch.Tensor:
        """
        Args:
            query: B x N_q x C (with its positional embedding already added).
            value: B x N_v x C, the levels' positions concatenated.
            reference_points: (B or 1) x N_q x (L or 1) x 2, normalised (x, y) in [0, 1].
            spatial_shapes: (H_l, W_l) per level.

        Returns:
            B x N_q x C (the residual is added by the caller).
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(batch, value.shape[1], heads, -1)
        # Locations and weights in float32 even under autocast (see multi_scale_deformable_attention).
        offsets = self.sampling_offsets(query).float().view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).float().view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Offsets are in pixels of each level: divide by (W_l, H_l) to get normalised units.
        normalizer = offsets.new_tensor([[w, h] for h, w in spatial_shapes])  # L x 2
        offsets = offsets / normalizer[None, None, None, :, None, :]
        locations = reference_points.float()[:, :, None, :, None, :] + offsets
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
