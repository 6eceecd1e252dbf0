"""Small building blocks shared by the pixel decoder and the transformer decoder.

Their child-module names follow mmcv's (``ConvModule``: ``conv`` + ``gn``; ``FFN``: ``layers.0.0`` and
``layers.1``), so that official mmseg/mmdet checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ConvGN", "FFN", "group_norm_groups"]


def group_norm_groups(channels: int, preferred: int = 32) -> int:
    """32 groups as specified; fewer (the largest common divisor) for the tiny test widths."""
    return math.gcd(preferred, channels)


class ConvGN(nn.Module):
    """Conv2d -> GroupNorm(32) -> optional ReLU (mmcv ``ConvModule`` with a GN norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, bias: bool, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(group_norm_groups(out_channels), out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C_in x H x W -> B x C_out x H x W."""
        x = self.gn(self.conv(x))
        return torch.relu(x) if self.relu else x


class FFN(nn.Module):
    """Linear -> ReLU -> Linear, without the residual (the caller adds it)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True)),
                                    nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x C -> ... x C."""
        return self.layers(x)
