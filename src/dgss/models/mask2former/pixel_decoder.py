"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the three coarsest
backbone maps, then an FPN step to 1/4 resolution for the mask features.

Module and parameter names follow mmdet's ``MSDeformAttnPixelDecoder`` (``input_convs``,
``encoder.layers.{i}.self_attn``/``ffn``/``norms``, ``level_encoding``, ``lateral_convs``,
``output_convs``, ``mask_feature``) so official checkpoints load by name.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .deformable_attention import MultiScaleDeformableAttention
from .layers import FFN, ConvGN
from .position_encoding import sine_position_encoding

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "MSDeformAttnPixelDecoder"]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + MSDeformAttn(x + pos, x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.ffn = FFN(dim, ffn_dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """x: B x N x C, pos: (B or 1) x N x C, reference_points: 1 x N x 1 x 2 -> B x N x C."""
        x = self.norms[0](x + self.self_attn(x + pos, x, reference_points, spatial_shapes))
        return self.norms[1](x + self.ffn(x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, x, pos, reference_points, spatial_shapes):
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes)
        return x


def grid_reference_points(spatial_shapes: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """Pixel centres of every level, normalised: ((x + 0.5) / W_l, (y + 0.5) / H_l), row-major,
    levels concatenated -> N x 2. Each query's reference point is its own pixel centre, which is the
    same normalised position on every level (no padding, so valid ratios are 1)."""
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)


class MSDeformAttnPixelDecoder(nn.Module):
    """Input: backbone maps at strides 4, 8, 16, 32 (B x C_i x H/s x W/s).

    Output: ``mask_features`` (B x D x H/4 x W/4) and ``multi_scale_features``: the encoder outputs for
    the ``num_levels`` coarsest inputs, lowest resolution first (B x D x H/32 x W/32, then /16, /8).

    Args:
        in_channels: channels of the 4 inputs (fine to coarse).
        dim: D, the hidden width (256).
        num_levels: inputs that go through the deformable encoder (3: strides 32, 16, 8).
        num_layers, num_heads, num_points, ffn_dim: encoder sizes (6, 8, 4, 1024).
        mask_dim: channels of the mask features (256).
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, *, num_levels: int = 3, num_layers: int = 6,
                 num_heads: int = 8, num_points: int = 4, ffn_dim: int = 1024, mask_dim: int = 256):
        super().__init__()
        in_channels = list(in_channels)
        if not 1 <= num_levels <= len(in_channels):
            raise ValueError(f"num_levels must be in 1..{len(in_channels)}, got {num_levels}")
        self.num_inputs, self.num_levels, self.dim = len(in_channels), num_levels, dim
        # Coarsest first: input_convs[0] projects the stride-32 map.
        coarse_to_fine = range(self.num_inputs - 1, self.num_inputs - num_levels - 1, -1)
        self.input_convs = nn.ModuleList(ConvGN(in_channels[i], dim, 1, bias=True) for i in coarse_to_fine)
        self.encoder = DeformableEncoder(num_layers, dim=dim, num_heads=num_heads, num_levels=num_levels,
                                         num_points=num_points, ffn_dim=ffn_dim)
        self.level_encoding = nn.Embedding(num_levels, dim)
        # FPN over the inputs the encoder does not see (only the stride-4 map with 4 inputs and 3 levels);
        # lateral_convs[i] takes input i. Convs before a GroupNorm carry no bias (mmcv's convention).
        num_fpn = self.num_inputs - num_levels
        self.lateral_convs = nn.ModuleList(ConvGN(in_channels[i], dim, 1, bias=False) for i in range(num_fpn))
        self.output_convs = nn.ModuleList(ConvGN(dim, dim, 3, bias=False, relu=True) for _ in range(num_fpn))
        self.mask_feature = nn.Conv2d(dim, mask_dim, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mmdet's init: xavier-uniform input projections, caffe2-xavier (kaiming-uniform, a=1) FPN
        and mask convs, N(0, 1) level encoding, xavier-normal encoder matrices, then the deformable
        attention's own init."""
        for conv_gn in self.input_convs:
            nn.init.xavier_uniform_(conv_gn.conv.weight)
            nn.init.zeros_(conv_gn.conv.bias)
        for conv in [m.conv for m in (*self.lateral_convs, *self.output_convs)] + [self.mask_feature]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight, 0.0, 1.0)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for module in self.encoder.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(features) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} feature maps, got {len(features)}")
        batch = features[0].shape[0]
        tokens, positions, shapes = [], [], []
        for i in range(self.num_levels):
            feat = features[self.num_inputs - 1 - i]
            h, w = feat.shape[-2:]
            shapes.append((int(h), int(w)))
            tokens.append(self.input_convs[i](feat).flatten(2).transpose(1, 2))  # B x hw x D
            pos = sine_position_encoding(h, w, self.dim // 2, device=feat.device, dtype=feat.dtype)
            pos = pos + self.level_encoding.weight[i].to(feat.dtype)[:, None, None]
            positions.append(pos.flatten(1).transpose(0, 1))  # hw x D, the same for every image
        x = torch.cat(tokens, dim=1)
        pos = torch.cat(positions, dim=0)[None]
        reference_points = grid_reference_points(shapes, device=x.device)[None, :, None, :]  # 1 x N x 1 x 2
        x = self.encoder(x, pos, reference_points, shapes)

        outs = [part.transpose(1, 2).reshape(batch, self.dim, h, w)
                for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)]
        for i in range(self.num_inputs - self.num_levels - 1, -1, -1):  # coarse to fine
            lateral = self.lateral_convs[i](features[i])
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + up))
        return self.mask_feature(outs[-1]), outs[: self.num_levels]
