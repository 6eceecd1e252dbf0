"""Import and export of the head's weights in the official (mmseg/mmdet, Rein) checkpoint layout.

An official Rein checkpoint holds the head as ``decode_head.<name>`` with mmdet 3.x module names
(``pixel_decoder.*``, ``transformer_decoder.layers.{i}.*``, ``transformer_decoder.post_norm.*``,
``level_embed``, ``cls_embed``, ``mask_embed.{0,2,4}``, ``querys2feat`` or ``query_embed`` /
``query_feat``). :class:`~.head.Mask2FormerHead` uses the same names, so the map is the prefix:

    decode_head.pixel_decoder.encoder.layers.0.self_attn.value_proj.weight
        <-> pixel_decoder.encoder.layers.0.self_attn.value_proj.weight

Loading is strict by default: every head tensor must be present with its shape, and every
``decode_head.*`` tensor must be used; the error lists what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

__all__ = [
    "OFFICIAL_PREFIX",
    "HeadCheckpointError",
    "official_to_head_key",
    "head_to_official_key",
    "convert_official_head_state_dict",
    "official_head_state_dict",
    "load_official_head_state_dict",
]

OFFICIAL_PREFIX = "decode_head."
_WRAPPERS = ("module.", "model.")  # DDP / EMA wrappers some checkpoints were saved through


class HeadCheckpointError(KeyError):
    """The official head tensors do not fit the head; the message lists every difference."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def official_to_head_key(key: str) -> Optional[str]:
    """``decode_head.<name>`` -> ``<name>`` (our head's state-dict key); None for non-head keys."""
    for wrapper in _WRAPPERS:
        if key.startswith(wrapper + OFFICIAL_PREFIX):
            key = key[len(wrapper):]
    if not key.startswith(OFFICIAL_PREFIX):
        return None
    return key[len(OFFICIAL_PREFIX):]


def head_to_official_key(key: str) -> str:
    """Our head's state-dict key -> the official ``decode_head.<name>``."""
    return OFFICIAL_PREFIX + key


def _unwrap(checkpoint: Mapping) -> Mapping:
    """Accept a raw state dict or an mmengine checkpoint ({"state_dict": ..., "meta": ...})."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        return checkpoint["state_dict"]
    return checkpoint


def convert_official_head_state_dict(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors of an official checkpoint, under our head's keys (other keys dropped)."""
    converted = {}
    for key, value in _unwrap(checkpoint).items():
        new_key = official_to_head_key(key)
        if new_key is not None:
            converted[new_key] = value
    return converted


def official_head_state_dict(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's state dict under official ``decode_head.*`` keys (for export)."""
    return {head_to_official_key(k): v for k, v in head.state_dict().items()}


def load_official_head_state_dict(head: nn.Module, checkpoint: Mapping[str, torch.Tensor], *,
                                  strict: bool = True) -> dict[str, list[str]]:
    """Load the ``decode_head.*`` tensors of an official checkpoint into ``head``.

    Args:
        head: a :class:`~.head.Mask2FormerHead` built with the checkpoint's sizes (and, for Rein,
            ``external_queries=True``).
        checkpoint: a state dict with ``decode_head.`` keys (other keys, e.g. the backbone's, are
            ignored), or an mmengine checkpoint holding one under "state_dict".
        strict: raise :class:`HeadCheckpointError` on any missing, unexpected or mis-shaped tensor.
            Otherwise load what fits and report the rest.

    Returns:
        {"missing": [...], "unexpected": [...], "mismatched": [...]} in official key names.
    """
    tensors = convert_official_head_state_dict(checkpoint)
    own = head.state_dict()
    missing = sorted(k for k in own if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)}, head {tuple(own[k].shape)}"
        for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    )
    report = {
        "missing": [head_to_official_key(k) for k in missing],
        "unexpected": [head_to_official_key(k) for k in unexpected],
        "mismatched": [head_to_official_key(k) for k in mismatched],
    }
    if not tensors:
        raise HeadCheckpointError(f"no '{OFFICIAL_PREFIX}*' tensors in the checkpoint")
    if strict and (missing or unexpected or mismatched):
        lines = ["official head checkpoint does not fit the head:"]
        for title, keys in report.items():
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        hint = ""
        if any("querys2feat" in k or "query_embed" in k or "query_feat" in k for k in missing + unexpected):
            hint = ("\n  (query parameters differ: a Rein checkpoint needs external_queries=True, with "
                    "query_content='querys2feat', or 'learned' for SAM-H)")
        raise HeadCheckpointError("\n".join(lines) + hint)
    fitting = {k: v for k, v in tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    head.load_state_dict(fitting, strict=False)
    return report
