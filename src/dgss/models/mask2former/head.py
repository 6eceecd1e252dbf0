"""The Mask2Former head as Rein and FisherTune use it (protocols.md), with Rein's external queries.

    head = Mask2FormerHead(backbone.channels, HeadConfig())
    out = head(features)                        # features: 4 maps at strides 4/8/16/32
    out["pred_logits"]   # B x Q x (K + 1)
    out["pred_masks"]    # B x Q x H/4 x W/4
    out["aux_outputs"]   # the 9 earlier predictions (before layer 1, after layers 1..8)

Queries: without external queries the head learns ``query_embed`` (positional) and ``query_feat``
(content). With external queries (Rein, rein.md), the supplied M x Q queries, expanded over the batch,
are the positional query embedding of every decoder layer, and the content queries are
``querys2feat(queries)`` (``query_content="querys2feat"``) or the head's own ``query_feat``
(``query_content="learned"``, Rein on SAM-H). Names follow mmdet/mmseg so official checkpoints load
by name (see :mod:`.checkpoint`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import HeadConfig
from .criterion import Mask2FormerCriterion
from .pixel_decoder import MSDeformAttnPixelDecoder
from .position_encoding import sine_position_encoding
from .transformer_decoder import Mask2FormerTransformerDecoder

__all__ = ["Mask2FormerHead", "semantic_scores"]

QUERY_CONTENT = ("querys2feat", "learned")


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Mask2Former's semantic inference: score_c = sum_q softmax(class logits)_q,c * sigmoid(mask)_q.

    Args:
        pred_logits: B x Q x (K + 1); pred_masks: B x Q x h x w (logits).
        size: (H, W) the mask logits are bilinearly upsampled to before the sigmoid.

    Returns:
        B x K x H x W (the "no object" class dropped).
    """
    # float32: a sum of Q products in half precision would blur close scores.
    masks = F.interpolate(pred_masks.float(), size=tuple(size), mode="bilinear", align_corners=False).sigmoid_()
    probs = pred_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, masks)


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention transformer decoder + class/mask predictions.

    Args:
        in_channels: channels of the 4 input maps (strides 4, 8, 16, 32).
        cfg: sizes and loss options (:class:`dgss.config.HeadConfig`).
        external_queries: take the positional queries from outside (Rein) instead of ``query_embed``.
        query_content: with external queries, "querys2feat" (a Linear(Q, Q) of them) or "learned".
    """

    accepts_queries = True

    def __init__(self, in_channels: Sequence[int], cfg: Optional[HeadConfig] = None, *,
                 external_queries: bool = False, query_content: str = "querys2feat"):
        super().__init__()
        cfg = cfg if cfg is not None else HeadConfig()
        if query_content not in QUERY_CONTENT:
            raise ValueError(f"query_content must be one of {QUERY_CONTENT}, got {query_content!r}")
        if cfg.hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (sine encoding of x and y), got {cfg.hidden_dim}")
        self.cfg = cfg
        self.num_classes, self.num_queries, self.hidden_dim = cfg.num_classes, cfg.num_queries, cfg.hidden_dim
        self.num_levels = cfg.num_feature_levels
        self.external_queries = external_queries
        self.query_content = query_content if external_queries else "learned"
        dim = cfg.hidden_dim

        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, dim, num_levels=self.num_levels, num_layers=cfg.pixel_decoder_layers,
            num_heads=cfg.num_heads, num_points=cfg.num_points, ffn_dim=cfg.pixel_decoder_ffn_dim, mask_dim=dim)
        self.transformer_decoder = Mask2FormerTransformerDecoder(dim, cfg.decoder_layers, cfg.num_heads,
                                                                 cfg.decoder_ffn_dim)
        if not external_queries:
            self.query_embed = nn.Embedding(cfg.num_queries, dim)
        if self.query_content == "learned":
            self.query_feat = nn.Embedding(cfg.num_queries, dim)
        else:
            self.querys2feat = nn.Linear(dim, dim)
        self.level_embed = nn.Embedding(self.num_levels, dim)
        self.cls_embed = nn.Linear(dim, cfg.num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.criterion = Mask2FormerCriterion(
            cfg.num_classes, num_points=cfg.num_points_loss, oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio, class_weight=cfg.class_weight,
            mask_weight=cfg.mask_weight, dice_weight=cfg.dice_weight, no_object_weight=cfg.no_object_weight)

    def _queries(self, batch: int, queries: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(content, positional) queries, each B x Q x C."""
        if not self.external_queries:
            if queries is not None:
                raise ValueError("this head learns its own queries; build it with external_queries=True "
                                 "to take queries from the tuning method")
            pos = self.query_embed.weight
        else:
            expected = (self.num_queries, self.hidden_dim)
            if queries is None or tuple(queries.shape) != expected:
                got = None if queries is None else tuple(queries.shape)
                raise ValueError(f"this head takes external queries of shape {expected}, got {got}")
            pos = queries
        content = self.querys2feat(pos) if self.query_content == "querys2feat" else self.query_feat.weight
        return content[None].expand(batch, -1, -1), pos[None].expand(batch, -1, -1)

    def _predict(self, queries: torch.Tensor, mask_features: torch.Tensor, attn_size: Optional[tuple[int, int]]):
        """Class logits (B x Q x (K+1)), mask logits (B x Q x H/4 x W/4) and, for the next layer, where
        each query may attend on a map of ``attn_size`` (B x Q x h*w, True where its mask is >= 0.5)."""
        x = self.transformer_decoder.post_norm(queries)
        logits = self.cls_embed(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        allowed = None
        if attn_size is not None:
            with torch.no_grad():
                small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
                allowed = (small.sigmoid() >= 0.5).flatten(2)
                # A query whose mask is empty at this level attends everywhere instead of nowhere.
                allowed |= ~allowed.any(-1, keepdim=True)
        return logits, masks, allowed

    def forward(self, features: Sequence[torch.Tensor], queries: Optional[torch.Tensor] = None) -> dict:
        """
        Args:
            features: 4 maps B x C_i x H/s x W/s at strides 4, 8, 16, 32.
            queries: M x Q external queries (required iff built with ``external_queries``).

        Returns:
            {"pred_logits": B x Q x (K+1), "pred_masks": B x Q x H/4 x W/4, "aux_outputs": [9 dicts]}.
        """
        mask_features, levels = self.pixel_decoder(features)  # levels: lowest resolution first
        batch = mask_features.shape[0]
        memories, memory_pos, sizes = [], [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            sizes.append((int(h), int(w)))
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i].to(level.dtype))
            pos = sine_position_encoding(h, w, self.hidden_dim // 2, device=level.device, dtype=level.dtype)
            memory_pos.append(pos.flatten(1).transpose(0, 1)[None])  # 1 x hw x C
        content, query_pos = self._queries(batch, queries)

        num_layers = len(self.transformer_decoder.layers)
        predictions = []
        logits, masks, allowed = self._predict(content, mask_features, sizes[0])
        predictions.append({"pred_logits": logits, "pred_masks": masks})
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels  # layer i attends level i mod 3, lowest resolution first
            content = layer(content, query_pos, memories[level], memory_pos[level], allowed)
            last = i == num_layers - 1
            logits, masks, allowed = self._predict(content, mask_features,
                                                   None if last else sizes[(i + 1) % self.num_levels])
            predictions.append({"pred_logits": logits, "pred_masks": masks})
        return {**predictions[-1], "aux_outputs": predictions[:-1]}

    def loss(self, outputs: dict, labels: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
        """Mask2Former losses of ``outputs`` against B x H x W labels (see :class:`Mask2FormerCriterion`)."""
        return self.criterion(outputs, labels, ignore_index=ignore_index)

    def segmentation_scores(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """B x K x H x W class scores of the final prediction at ``size`` (see :func:`semantic_scores`)."""
        return semantic_scores(outputs["pred_logits"], outputs["pred_masks"], size)
