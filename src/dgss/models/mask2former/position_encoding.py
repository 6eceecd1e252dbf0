"""Sine positional encoding of a feature map (DETR style), as Mask2Former's pixel and transformer
decoders use it: 128 features per axis, coordinates normalised to (0, 2 pi].

The encoding depends only on the map size (no padding masks here: crops are never padded inside a
batch), so it is computed once per size and broadcast over the batch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sine_position_encoding"]


def sine_position_encoding(
    height: int,
    width: int,
    num_feats: int = 128,
    *,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    offset: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Positional encoding of an H x W grid -> (2 * num_feats) x H x W.

    Channels: the y encoding (num_feats) then the x encoding (num_feats); within each, sine and
    cosine alternate per frequency ([sin f0, cos f0, sin f1, cos f1, ...]), the layout mmdet's
    ``SinePositionalEncoding`` produces and official checkpoints were trained with. Row/column
    numbers count from 1; with ``normalize`` they are divided by the last one and scaled to
    ``scale`` (mmdet's default offset 0, i.e. ``(i + 1) / (n + eps) * scale``).
    """
    ys = torch.arange(1, height + 1, device=device, dtype=torch.float32)
    xs = torch.arange(1, width + 1, device=device, dtype=torch.float32)
    if normalize:
        ys = (ys + offset) / (height + eps) * scale
        xs = (xs + offset) / (width + eps) * scale
    # Frequencies come in pairs: channel 2k and 2k+1 share temperature^(2k / num_feats).
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(coords: torch.Tensor) -> torch.Tensor:  # n -> n x num_feats
        angles = coords[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(ys)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(xs)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)
