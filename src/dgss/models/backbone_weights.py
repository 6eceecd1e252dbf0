"""Loading pretrained backbone weights from local files (official and timm layouts) or timm's hub.

Supported files:
  * DINOv2 official ``.pth`` (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``), with and without registers;
  * EVA02 official ``.pt`` (``eva02_L_pt_m38m_p14.pt``, keys under ``module``/``model``);
  * CLIP: OpenAI's ``ViT-L-14.pt`` (a TorchScript archive, taken apart for its tensors without running
    it: :mod:`dgss.models.torchscript_weights`) or a state dict with ``visual.*`` keys;
  * SAM official ``sam_vit_{b,l,h}_*.pth`` (``image_encoder.*`` keys; the prompt encoder and mask
    decoder are ignored);
  * MAE official ``mae_pretrain_vit_large.pth`` (``{"model": ...}``);
  * DINOv3 official ``.pth`` of every size (``dinov3_vit{s,b,l,h+,7b}16_pretrain_lvd1689m-*.pth``; the 7B
    file's ``local_cls_norm`` and ``mask_token`` are pretraining-only and dropped);
  * timm ``.safetensors``/``.pth``/``.bin`` for every family.

Files are read with ``safetensors``, ``torch.load(weights_only=True)`` or, for TorchScript archives, a
restricted unpickler that builds tensors only: no code in a file is imported or run.
timm's own checkpoint filters convert the layouts; this module adds what they do not do: Rein's
14 -> 16 patch conversion, and SAM's position embedding and relative-position tables at a new size.
A file whose keys do not fit the model fails with the missing and unexpected keys listed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..fileio import describe_load_error
from .torchscript_weights import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = ["BackboneWeightsError", "read_state_dict", "rein_resize_patch_embed", "load_backbone_weights"]

# Tensors a backbone file may carry that dgss deliberately does not use.
_IGNORED_PREFIXES = ("head.", "fc_norm.", "neck.", "mask_token", "head_drop.", "attn_pool.")


class BackboneWeightsError(RuntimeError):
    """A weights file could not be read or does not fit the backbone."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``.safetensors``/``.pth``/``.pt``/``.bin`` or a TorchScript archive without
    importing or running anything the file names."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if is_torchscript_archive(path):
        # OpenAI's CLIP release is a TorchScript archive: taken apart for its tensors, never loaded with
        # torch.jit.load (which runs the archive's code); checked first, as torch.load hands such archives to it
        try:
            return read_torchscript_state_dict(path)
        except TorchScriptReadError as err:
            raise BackboneWeightsError(f"cannot read {path} as a TorchScript weights archive: {err}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - we re-raise with the file name below
        raise BackboneWeightsError(
            f"cannot read {path} as a weights file with torch.load(weights_only=True): {describe_load_error(err)}"
        ) from err
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside the usual containers (model / state_dict / module / model_ema)."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            for key in ("model_ema", "model", "state_dict", "module"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise BackboneWeightsError(f"{path} holds no tensor dict (top-level type {type(obj).__name__})")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------
# Conversions timm does not do
# --------------------------------------------------------------------------------------------

_KERNEL_KEYS = ("patch_embed.proj.weight", "visual.conv1.weight")
_POS_KEYS = ("pos_embed", "visual.positional_embedding")


def rein_resize_patch_embed(state_dict: dict[str, torch.Tensor], patch_size: int, grid: tuple[int, int]) -> dict:
    """Rein's conversion of a pretrained ViT to another patch size (e.g. DINOv2 14 -> 16 at 512).

    The patch kernel is resized bicubically (align_corners=False) *without* rescaling its magnitude;
    the position grid (e.g. 37 x 37 -> 32 x 32) is resized bicubically too; position entries of the
    class token (and any other prefix) are kept as they are.
    """
    out = dict(state_dict)
    for key in _KERNEL_KEYS:
        w = out.get(key)
        if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) != (patch_size, patch_size):
            out[key] = F.interpolate(w.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False).to(w.dtype)
    for key in _POS_KEYS:
        pos = out.get(key)
        if pos is None:
            continue
        squeeze = pos.ndim == 2
        p = pos.unsqueeze(0) if squeeze else pos
        if p.ndim != 3:
            continue
        n = p.shape[1]
        side = math.isqrt(n)
        num_prefix = n - side * side
        if num_prefix > 8 or side * side + num_prefix != n or (side, side) == tuple(grid):
            continue
        prefix, patch = p[:, :num_prefix], p[:, num_prefix:]
        patch = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(p.dtype)
        p = torch.cat([prefix, patch], dim=1)
        out[key] = p.squeeze(0) if squeeze else p
    return out


def _resize_sam_tensors(state_dict: dict, model_sd: dict) -> dict:
    """SAM at a new input size: NHWC position embedding (bicubic) and rel-pos tables (linear)."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        target = model_sd.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key == "pos_embed" and value.ndim == 4:  # 1 x H x W x C
            v = F.interpolate(value.permute(0, 3, 1, 2).float(), size=target.shape[1:3], mode="bicubic", align_corners=False)
            out[key] = v.permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2:  # (2S - 1) x head_dim
            v = F.interpolate(value.t().unsqueeze(0).float(), size=target.shape[0], mode="linear", align_corners=False)
            out[key] = v.squeeze(0).t().to(value.dtype)
    return out


def _timm_filter(backbone: "Backbone"):
    """timm's checkpoint filter for the model's module (it converts official layouts)."""
    import importlib

    module = importlib.import_module(type(backbone.model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _check_position_embedding_rank(backbone: "Backbone", state_dict: dict, source: str) -> None:
    """A position embedding of another rank than the model's would fail deep inside the conversions
    (an IndexError or a reshape error); name the key instead."""
    model_pos = getattr(backbone.model, "pos_embed", None)
    if not isinstance(model_pos, torch.Tensor):
        return  # CNNs and RoPE-only models have none
    ranks = {"pos_embed": model_pos.ndim, "image_encoder.pos_embed": model_pos.ndim,
             "visual.positional_embedding": 2}  # OpenAI CLIP stores (tokens, width)
    for key, rank in ranks.items():
        value = state_dict.get(key)
        if torch.is_tensor(value) and value.ndim != rank:
            raise BackboneWeightsError(
                f"{source}: key '{key}' has shape {tuple(value.shape)} (rank {value.ndim}); backbone "
                f"'{backbone.name}' needs a rank-{rank} position embedding (its own is {tuple(model_pos.shape)})")


def convert_state_dict(backbone: "Backbone", state_dict: dict, *, patch_resize: str = "rein",
                       source: str = "the backbone weights") -> dict:
    """Official/timm layout -> the keys and shapes of ``backbone.model`` (``source`` names the file in errors)."""
    model = backbone.model
    _check_position_embedding_rank(backbone, state_dict, source)
    if backbone.family != "cnn" and patch_resize == "rein":
        grid = tuple(model.patch_embed.grid_size)
        state_dict = rein_resize_patch_embed(state_dict, backbone.patch_size, grid)
    elif patch_resize not in ("rein", "timm"):
        raise ValueError(f"patch_resize must be 'rein' or 'timm', got {patch_resize!r}")
    filter_fn = _timm_filter(backbone)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(dict(state_dict), model)
        except (IndexError, KeyError, RuntimeError, ValueError) as err:  # a tensor of an unexpected shape
            raise BackboneWeightsError(f"{source} cannot be converted to backbone '{backbone.name}' (timm's "
                                       f"checkpoint filter failed: {type(err).__name__}: {err}); is it a "
                                       f"'{backbone.name}' checkpoint?") from err
    if backbone.family == "sam":
        state_dict = _resize_sam_tensors(state_dict, model.state_dict())
    return state_dict


def load_backbone_weights(backbone: "Backbone", weights: str, *, patch_resize: str = "rein") -> None:
    """Load ``weights`` ("hub" or a file) into ``backbone.model``, strictly."""
    if weights == "hub":
        path = _hub_file(backbone)
    else:
        path = Path(weights).expanduser()
    state_dict = read_state_dict(path)
    converted = convert_state_dict(backbone, state_dict, patch_resize=patch_resize, source=f"weights file {path}")
    converted = {k: v for k, v in converted.items() if not k.startswith(_IGNORED_PREFIXES)}
    model_sd = backbone.model.state_dict()
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in converted.items()
        if k in model_sd and model_sd[k].shape != v.shape
    ]
    missing = sorted(k for k in model_sd if k not in converted and not _is_buffer_ok(k))
    unexpected = sorted(k for k in converted if k not in model_sd)
    if missing or unexpected or shape_errors:
        raise BackboneWeightsError(
            f"weights file {path} does not fit backbone '{backbone.name}'"
            + (f"\n  missing keys ({len(missing)}): {_short(missing)}" if missing else "")
            + (f"\n  unexpected keys ({len(unexpected)}): {_short(unexpected)}" if unexpected else "")
            + (f"\n  shape mismatches: {_short(shape_errors)}" if shape_errors else "")
        )
    backbone.model.load_state_dict(converted, strict=False)


def _is_buffer_ok(key: str) -> bool:
    # RoPE tables and similar non-learned buffers are rebuilt by the model itself.
    return "rope" in key or key.endswith(("relative_position_index", ".periods"))


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _hub_file(backbone: "Backbone") -> Path:
    """Download the papers' weights through timm's pretrained config (needs internet)."""
    import timm
    from huggingface_hub import hf_hub_download

    spec = backbone.spec
    cfg = timm.models.get_pretrained_cfg(f"{spec.timm_name}.{spec.hub_tag}")
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise BackboneWeightsError(f"timm has no hub weights for {spec.timm_name}.{spec.hub_tag}")
    for filename in (cfg.hf_hub_filename or "model.safetensors", "model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as err:  # noqa: BLE001 - try the next file name, report the last error
            last = err
    raise BackboneWeightsError(f"could not download weights for '{backbone.name}' from {repo}: {last}")
