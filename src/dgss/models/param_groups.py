"""Optimizer parameter groups by name: which parameters get weight decay.

Shared by the head (:meth:`dgss.models.segmentor.Segmentor.parameter_groups`) and every tuning method
(:mod:`dgss.tuning.base` re-exports both names), so that one list decides what decays.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["NO_DECAY_KEYWORDS", "decay_groups"]

# Parameter-name fragments that get no weight decay (rein.md: tokens, scale, norms, query and
# level embeddings; plus the position/class/register embeddings of the backbone).
NO_DECAY_KEYWORDS = (
    "norm",
    "learnable_tokens",
    "scale",
    "query_embed",
    "query_feat",
    "level_embed",
    "pos_embed",
    "cls_token",
    "reg_token",
    "gamma",
    "ls1",
    "ls2",
)


def decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    no_decay_keywords: tuple[str, ...] = NO_DECAY_KEYWORDS,
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group (by name)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (no_decay if any(k in name for k in no_decay_keywords) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups
