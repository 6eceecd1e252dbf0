"""Mask2Former's transformer decoder: masked cross-attention -> self-attention -> FFN, post-norm.

Parameter names follow mmdet's ``Mask2FormerTransformerDecoder``: ``layers.{i}.cross_attn.attn``,
``layers.{i}.self_attn.attn`` (laid out as ``torch.nn.MultiheadAttention``: ``in_proj_weight``,
``in_proj_bias``, ``out_proj``), ``layers.{i}.ffn``, ``layers.{i}.norms.{0,1,2}`` and ``post_norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FFN

__all__ = ["MultiheadAttention", "AttentionWithPosition", "MaskedDecoderLayer", "Mask2FormerTransformerDecoder"]


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s parameter layout, computed with
    ``F.scaled_dot_product_attention`` so that a boolean mask broadcasts over heads instead of
    being repeated per head. No dropout (Mask2Former uses none)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            query: B x N_q x C; key, value: B x N_k x C.
            allowed: optional B x N_q x N_k boolean, True where a query may attend (note: the opposite
                of ``nn.MultiheadAttention``'s ``attn_mask``). Every row must allow something.

        Returns:
            B x N_q x C.
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch, num_q, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # B x N x C -> B x M x N x C/M
            return x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        q = heads(F.linear(query, w_q, b_q))
        k = heads(F.linear(key, w_k, b_k))
        v = heads(F.linear(value, w_v, b_v))
        mask = allowed[:, None] if allowed is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_q, self.dim))


class AttentionWithPosition(nn.Module):
    """Residual attention block: ``query + attn(query + query_pos, key + key_pos, value)``
    (positional embeddings enter queries and keys, not values; mmcv's ``MultiheadAttention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn = MultiheadAttention(dim, num_heads)

    def forward(self, query, key, value, query_pos, key_pos, allowed=None):
        return query + self.attn(query + query_pos, key + key_pos, value, allowed)


class MaskedDecoderLayer(nn.Module):
    """x = LN(x + masked cross-attention to the level); x = LN(x + self-attention); x = LN(x + FFN)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.cross_attn = AttentionWithPosition(dim, num_heads)
        self.self_attn = AttentionWithPosition(dim, num_heads)
        self.ffn = FFN(dim, ffn_dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            queries, query_pos: B x Q x C (query_pos may be 1 x Q x C).
            memory: B x N x C (one level of the pixel decoder, level embedding added),
            memory_pos: 1 x N x C (sine encoding).
            allowed: B x Q x N, True where the previous mask prediction is foreground.

        Returns:
            B x Q x C.
        """
        x = self.norms[0](self.cross_attn(queries, memory, memory, query_pos, memory_pos, allowed))
        x = self.norms[1](self.self_attn(x, x, x, query_pos, query_pos))
        return self.norms[2](x + self.ffn(x))


class Mask2FormerTransformerDecoder(nn.Module):
    """The decoder's layers and the LayerNorm applied before every prediction (``post_norm``).
    The prediction loop lives in the head, which owns the prediction MLPs."""

    def __init__(self, dim: int = 256, num_layers: int = 9, num_heads: int = 8, ffn_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(dim)
        # mmdet's Mask2FormerHead.init_weights: xavier-normal for every matrix of the decoder.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
