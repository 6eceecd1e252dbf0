"""Rein checkpoints: the official layout (import and export) and dgss's own model files.

An official Rein checkpoint (mmseg) holds ``backbone.reins.*`` and ``decode_head.*`` (rein.md,
"Official checkpoint names"); the backbone comes from its own pretrained file (e.g. the official
DINOv2 one), which dgss loads with ``build_backbone(name, weights=...)``. A full mmseg checkpoint may
also carry the backbone's tensors under ``backbone.*`` (official layout); those load when present.

    model = segmentor_from_official_rein(cfg, "rein_dinov2_mask2former.pth")   # evaluate it
    state = export_official_rein(model.method, model.head)    # the official keys, for the official code

:class:`~dgss.tuning.rein.Reins` uses the official parameter names, so the Rein part is a prefix
strip (``backbone.reins.scale`` -> ``reins.scale``); the head part is
:mod:`dgss.models.mask2former.checkpoint`'s.

dgss's own files (safetensors + a JSON "dgss" metadata entry with the config), one call each way:

    save_model_file(model, cfg, "rein_dinov2.safetensors")                         # self-contained
    save_model_file(model, cfg, "rein_dinov2_head.safetensors", include_backbone=False)  # Rein + head
    model = load_model_file("rein_dinov2_head.safetensors", backbone_weights="dinov2_vitl14_pretrain.pth")
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ..config import ExperimentConfig, from_dict, to_dict
from ..fileio import CHECKSUM_KEY, DamagedFileError, load_safetensors, save_safetensors
from ..models.backbone_weights import convert_state_dict, read_state_dict
from .rein import Rein

__all__ = [
    "OFFICIAL_REIN_PREFIX",
    "OFFICIAL_HEAD_PREFIX",
    "OFFICIAL_BACKBONE_PREFIX",
    "ReinCheckpointError",
    "OfficialReinCheckpoint",
    "split_official_state_dict",
    "read_official_checkpoint",
    "load_official_reins",
    "official_reins_state",
    "import_official_rein",
    "export_official_rein",
    "segmentor_from_official_rein",
    "save_model_file",
    "load_model_file",
    "read_model_file",
    "read_model_file_metadata",
]

OFFICIAL_REIN_PREFIX = "backbone.reins."
OFFICIAL_HEAD_PREFIX = "decode_head."
OFFICIAL_BACKBONE_PREFIX = "backbone."


class ReinCheckpointError(RuntimeError):
    """A checkpoint does not fit the Rein model it is loaded into; the message says how."""


@dataclass
class OfficialReinCheckpoint:
    """An official state dict split into its parts, each with its prefix removed."""

    reins: dict[str, torch.Tensor] = field(default_factory=dict)  # "scale", "learnable_tokens_a", ...
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # mmdet names ("pixel_decoder.*", ...)
    backbone: dict[str, torch.Tensor] = field(default_factory=dict)  # official backbone names, if any
    other: list[str] = field(default_factory=list)  # keys of none of the parts (not loaded)


def split_official_state_dict(state_dict: dict[str, torch.Tensor]) -> OfficialReinCheckpoint:
    """Split ``backbone.reins.*`` / ``decode_head.*`` / other ``backbone.*`` keys, removing the prefixes."""
    parts = OfficialReinCheckpoint()
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_REIN_PREFIX):
            parts.reins[key[len(OFFICIAL_REIN_PREFIX) :]] = value
        elif key.startswith(OFFICIAL_HEAD_PREFIX):
            parts.head[key[len(OFFICIAL_HEAD_PREFIX) :]] = value
        elif key.startswith(OFFICIAL_BACKBONE_PREFIX):
            parts.backbone[key[len(OFFICIAL_BACKBONE_PREFIX) :]] = value
        else:
            parts.other.append(key)
    return parts


def read_official_checkpoint(path: Union[str, os.PathLike]) -> OfficialReinCheckpoint:
    """Read an official ``.pth`` (mmseg's ``{"state_dict": ...}`` or a bare dict) without unpickling code."""
    parts = split_official_state_dict(read_state_dict(path))
    if not parts.reins:
        raise ReinCheckpointError(f"{path} has no '{OFFICIAL_REIN_PREFIX}*' tensors: not a Rein checkpoint")
    return parts


def load_official_reins(method: Rein, reins_state: dict[str, torch.Tensor]) -> None:
    """Load the Rein part (keys without ``backbone.reins.``) into ``method.reins``, strictly."""
    expected = method.reins.state_dict()
    missing = sorted(set(expected) - set(reins_state))
    unexpected = sorted(set(reins_state) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(reins_state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in reins_state and reins_state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        hint = ""
        if any(k.startswith("learnable_tokens_") for k in unexpected) or "learnable_tokens" in unexpected:
            hint = "\n  (plain vs LoRA tokens: set method.rein.lora_rank to match the checkpoint)"
        elif wrong_shape:
            hint = "\n  (check method.rein.num_tokens / lora_rank / query_dim and the backbone against the checkpoint)"
        raise ReinCheckpointError(
            "Rein checkpoint does not fit this Rein model"
            + (f"\n  missing: {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected: {', '.join(unexpected)}" if unexpected else "")
            + (f"\n  shape mismatches: {'; '.join(wrong_shape)}" if wrong_shape else "")
            + hint
        )
    method.reins.load_state_dict(reins_state, strict=True)


def official_reins_state(method: Rein) -> dict[str, torch.Tensor]:
    """The Rein tensors under their official names (``backbone.reins.*``)."""
    return {OFFICIAL_REIN_PREFIX + k: v.detach() for k, v in method.reins.state_dict().items()}


def _load_official_backbone(backbone, backbone_state: dict[str, torch.Tensor]) -> None:
    """Backbone tensors embedded in a full official checkpoint (official layout), strictly."""
    converted = convert_state_dict(backbone, backbone_state)
    try:
        result = backbone.model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ReinCheckpointError(f"the checkpoint's backbone tensors do not fit '{backbone.name}': {err}") from err
    missing = [k for k in result.missing_keys if "rope" not in k and not k.endswith("relative_position_index")]
    if missing or result.unexpected_keys:
        raise ReinCheckpointError(
            f"the checkpoint's backbone tensors do not fit '{backbone.name}': "
            f"missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )


def import_official_rein(
    checkpoint: Union[str, os.PathLike, dict],
    method: Rein,
    head: Optional[nn.Module] = None,
) -> OfficialReinCheckpoint:
    """Load an official Rein checkpoint (file or state dict) into ``method`` (and ``head``).

    The Rein part always loads, strictly. The head part loads, strictly, when ``head`` is given (a
    Mask2Former head built with the checkpoint's sizes and external queries). Backbone tensors load
    into ``method.backbone`` when the checkpoint carries them; published Rein checkpoints do not: the
    backbone comes from its own file through ``build_backbone(..., weights=file)``.
    Returns the split checkpoint (its ``other`` lists keys that were not loaded).
    """
    if isinstance(checkpoint, dict):
        if isinstance(checkpoint.get("state_dict"), dict):  # an mmengine checkpoint held in memory
            checkpoint = checkpoint["state_dict"]
        parts = split_official_state_dict(checkpoint)
    else:
        parts = read_official_checkpoint(checkpoint)
    if not parts.reins:
        raise ReinCheckpointError(f"the checkpoint has no '{OFFICIAL_REIN_PREFIX}*' tensors: not a Rein checkpoint")
    load_official_reins(method, parts.reins)
    if parts.backbone:
        _load_official_backbone(method.backbone, parts.backbone)
    if head is not None:
        from ..models.mask2former.checkpoint import load_official_head_state_dict

        if not parts.head:
            raise ReinCheckpointError(f"the checkpoint has no '{OFFICIAL_HEAD_PREFIX}*' tensors for the head")
        load_official_head_state_dict(head, {OFFICIAL_HEAD_PREFIX + k: v for k, v in parts.head.items()})
    return parts


def export_official_rein(method: Rein, head: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """``backbone.reins.*`` (+ ``decode_head.*`` when ``head`` is given): what the official code loads."""
    state = official_reins_state(method)
    if head is not None:
        from ..models.mask2former.checkpoint import official_head_state_dict

        state.update({k: v.detach() for k, v in official_head_state_dict(head).items()})
    return state


def segmentor_from_official_rein(cfg, checkpoint: Union[str, os.PathLike, dict]):
    """One call for evaluating a published Rein model: ``build_segmentor(cfg)`` (``cfg.model.weights``:
    the backbone's own file, e.g. the official DINOv2 one) with the checkpoint's Rein and head loaded."""
    from .model import build_segmentor

    segmentor = build_segmentor(cfg)
    import_official_rein(checkpoint, segmentor.method, segmentor.head)
    return segmentor


# --------------------------------------------------------------------------------------------
# dgss's own model files
# --------------------------------------------------------------------------------------------
#
# One safetensors file with a small JSON metadata entry ("dgss") naming the backbone and holding the
# resolved experiment config, so that one call rebuilds the model:
#   * contents "full": every tensor of the segmentor; needs nothing else.
#   * contents "rein+head": everything except the pretrained backbone tensors (``backbone.model.*``),
#     i.e. Rein, CLIP's pyramid and the head (DINOv2-L: 3.0M + 20.6M parameters, ~95 MB in fp32,
#     against ~1.3 GB with the backbone); the backbone comes from its own pretrained file, as
#     rein.md says a Rein checkpoint should.

# 2: the file carries a checksum (dgss.fileio.CHECKSUM_KEY), so a version-2 file without one is damaged
MODEL_FILE_VERSION = 2
PRETRAINED_PREFIX = "backbone.model."


def load_segmentor_state(segmentor, state: dict, source, *, with_backbone: bool, error: type = None,
                         what: str = "the model its config builds"):
    """Load a segmentor state dict strictly, except that the pretrained backbone's tensors
    (``backbone.model.*``) may be absent when ``with_backbone`` is False (they come from their own file).

    Raises ``error`` (default :class:`ReinCheckpointError`) naming ``source`` on any mismatch.
    """
    error = error or ReinCheckpointError
    try:
        result = segmentor.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise error(f"{source} does not fit {what}: {err}") from err
    missing = [k for k in result.missing_keys if with_backbone or not k.startswith(PRETRAINED_PREFIX)]
    if missing or result.unexpected_keys:
        raise error(f"{source} does not fit {what}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    return result


def save_model_file(segmentor, cfg, path: Union[str, os.PathLike], *, include_backbone: bool = True,
                    metadata: Optional[dict] = None):
    """Write ``segmentor`` (built from the ExperimentConfig ``cfg``) to ``path`` (.safetensors).

    ``include_backbone=False`` writes the small "rein+head" file; it refuses a model whose pretrained
    backbone tensors were trained (full fine-tuning), since they could not be restored from the
    pretrained file. ``metadata``: extra JSON-serialisable entries of the "dgss" metadata (the
    training engine adds the iteration and the backbone's fingerprint).
    """
    state = segmentor.state_dict()
    if not include_backbone:
        trained = [n for n, p in segmentor.backbone.model.named_parameters() if p.requires_grad]
        if trained:
            raise ReinCheckpointError(
                f"the backbone trains {len(trained)} pretrained tensors (e.g. {trained[0]}): save the full file"
            )
        state = {k: v for k, v in state.items() if not k.startswith(PRETRAINED_PREFIX)}
    metadata = {
        "format_version": MODEL_FILE_VERSION,
        "contents": "full" if include_backbone else "rein+head",
        "backbone": cfg.model.backbone,
        "backbone_weights": cfg.model.weights,
        "method": cfg.method.name,
        "config": to_dict(cfg),
        **(metadata or {}),
    }
    # never a half-written file under the final name, and the umask's mode (safetensors alone writes 0600)
    return save_safetensors(_unshared_cpu(state), path, metadata={"dgss": json.dumps(metadata)})


def read_model_file_metadata(path: Union[str, os.PathLike]) -> dict:
    """The "dgss" metadata of a model file: contents, backbone, backbone_weights, method, config."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("dgss")
    if raw is None:
        raise ReinCheckpointError(f"{path} is not a dgss model file (no 'dgss' metadata)")
    return json.loads(raw)


def read_model_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, "dgss" metadata) of a model file, its checksum verified.

    Raises:
        DamagedFileError: truncated, bit-flipped, or a checksummed version without its checksum.
        ReinCheckpointError: a safetensors file without dgss metadata.
    """
    tensors, raw = load_safetensors(path)
    if "dgss" not in raw:
        raise ReinCheckpointError(f"{path} is not a dgss model file (no 'dgss' metadata)")
    meta = json.loads(raw["dgss"])
    if meta.get("format_version", 1) >= 2 and CHECKSUM_KEY not in raw:  # its name had a bit flipped
        raise DamagedFileError(f"{path} is damaged: the checksum a model file of format "
                               f"{meta.get('format_version')} carries is missing")
    return tensors, meta


def load_model_file(path: Union[str, os.PathLike], *, backbone_weights: Optional[str] = None):
    """Rebuild and load a model saved by :func:`save_model_file`, in eval mode on the CPU.

    Args:
        backbone_weights: for a "rein+head" file, the pretrained backbone file (default: the one
            recorded at save time). Ignored for a "full" file.
    """
    from .model import build_segmentor  # lazily: the model module imports this package's registry

    tensors, meta = read_model_file(path)  # checksum verified before the config in it is trusted
    cfg = from_dict(ExperimentConfig, meta["config"], source=str(path))
    full = meta["contents"] == "full"
    weights = None if full else (backbone_weights or meta.get("backbone_weights"))
    if not full and weights is None:
        raise ReinCheckpointError(
            f"{path} holds Rein and head only: pass backbone_weights= (the pretrained '{meta['backbone']}' file)"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=weights))
    segmentor = build_segmentor(cfg)
    load_segmentor_state(segmentor, tensors, path, with_backbone=full)
    return segmentor.eval()


def _unshared_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; safetensors refuses tensors that share memory, so those are copied."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out
