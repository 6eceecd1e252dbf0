"""SoMA's released checkpoints (the "Adapter&Head Checkpoint" files of github ysj9909/SoMA) in dgss.

The layout, from the public code at 7ea8c0e: training ends with an mmengine checkpoint whose
``state_dict`` holds the whole segmentor and, with mmengine's EMAHook (the DGSS configs use it from
iteration 12,000), the EMA weights: the hook swaps them into ``state_dict`` when saving and keeps the
raw ones under ``ema_state_dict``, with a ``module.`` prefix. tools/extract_soma_weights.py (lines
14-34 and 48-58) keeps of both dicts the keys containing ``lora`` (the factors), those containing
``decode_head.`` (the head), ``backbone.model.mask_token``, and every key ending in ``bias`` that
contains one of the target names as a substring; as ``k`` occurs in ``backbone``, that is every bias
of the backbone, the frozen ones included. The file is ``{"state_dict": ..., "ema_state_dict": ...}``
(the second only for runs with EMA) with keys such as

    backbone.model.blocks.8.attn.q.lora_A.weight       r x C      (A; q, k and v are separate layers)
    backbone.model.blocks.8.attn.q.lora_B.weight       C x r      (B)
    backbone.model.blocks.8.mlp.fc1.bias               4C         (trained: blocks >= start_lora_idx)
    backbone.model.blocks.0.norm1.bias                 C          (frozen: the pretrained value)
    decode_head.query_feat.weight                      ...        (mmseg's Mask2Former head)

tools/merge_soma_weights.py (lines 29-68) puts the plain converted DINOv2 weights under it: the
factors are added to the pretrained W, never to a residual, i.e. the model evaluated is
W + s B A with B, A as trained from the random weights' minor components (``method.soma.init:
public_code``, dgss.tuning.soma). Its evaluation (tools/test.py, line 115, makes the file mmengine's
``load_from``) runs on ``state_dict``, the EMA weights; EMAHook, in the config's hooks, loads that same
dict into its average and swaps it in for testing (mmengine's hooks/ema_hook.py).

    model = segmentor_from_official_soma(cfg, "soma_dinov2-L_g2cbm_best.pth")   # folded, for inference

needs the experiment config the release was trained with (rank, alpha, start block, targets, the head)
and ``cfg.model.weights``, the pretrained DINOv2 file (the release has no backbone weights). Files are
read with ``torch.load(weights_only=True)``; nothing in them is run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Union

import torch

from ..models.backbone_weights import BackboneWeightsError, read_state_dict
from .soma import SoMA, factors_loaded_later

__all__ = ["SoMACheckpointError", "OFFICIAL_SOMA_PREFIX", "is_official_soma_state", "read_official_soma",
           "load_official_soma", "public_code_config", "segmentor_from_official_soma"]

OFFICIAL_SOMA_PREFIX = "backbone.model."
_HEAD_PREFIX = "decode_head."
_WRAPPER = "module."  # the prefix of ema_state_dict's keys
_FACTOR = re.compile(r"(.+)\.lora_([AB])\.weight")


class SoMACheckpointError(RuntimeError):
    """A released SoMA file cannot be read or does not fit the model; the message names the file and keys."""


def _strip(state: dict) -> dict:
    return {(k[len(_WRAPPER):] if k.startswith(_WRAPPER) else k): v for k, v in state.items()}


def is_official_soma_state(state: dict) -> bool:
    """Whether a state dict is in the released SoMA layout (factors under ``backbone.model.*.lora_A``)."""
    return any(k.startswith(OFFICIAL_SOMA_PREFIX) and ".lora_A." in k for k in _strip(state))


def read_official_soma(path: Union[str, os.PathLike], *, raw: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a released file: ``state_dict`` (the EMA weights of an EMA run, what the published
    numbers were evaluated with), or with ``raw`` its ``ema_state_dict`` (the raw weights), prefix removed."""
    if not raw:
        try:
            state = read_state_dict(path)
        except BackboneWeightsError as err:
            raise SoMACheckpointError(str(err)) from err
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise SoMACheckpointError(f"cannot read {path} with torch.load(weights_only=True): {err}") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("ema_state_dict"), dict):
            raise SoMACheckpointError(f"{path} has no 'ema_state_dict' (raw weights): it was not trained with EMA")
        state = obj["ema_state_dict"]
    state = _strip({k: v for k, v in state.items() if torch.is_tensor(v)})
    if not is_official_soma_state(state):
        raise SoMACheckpointError(f"{path} has no '{OFFICIAL_SOMA_PREFIX}*.lora_A.weight' tensors: not a SoMA release")
    return state


def _official_names(target: str) -> list[str]:
    """The public code's layer names of one dgss target, one per part: a fused qkv is its q, k and v."""
    if target.endswith("attn.qkv"):
        stem = target[: -len("qkv")]
        return [stem + "q", stem + "k", stem + "v"]
    return [target]


def _fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn.q/k/v.<t>`` triples -> ``attn.qkv.<t>`` (the public code's converter splits DINOv2's fused qkv)."""
    out = dict(state)
    for key in [k for k in state if re.search(r"\.attn\.q\.[^.]+$", k)]:
        stem, tail = key.rsplit(".attn.q.", 1)
        parts = [f"{stem}.attn.{p}.{tail}" for p in ("q", "k", "v")]
        if all(p in state for p in parts):
            out[f"{stem}.attn.qkv.{tail}"] = torch.cat([state[p] for p in parts])
            for p in parts:
                del out[p]
    return out


@torch.no_grad()
def load_official_soma(method: SoMA, state: dict[str, torch.Tensor], head=None, *, source: str = "the checkpoint",
                       check_frozen: bool = True) -> None:
    """Load a released state dict into ``method`` (built with ``init: public_code``) and ``head``.

    Every factor and trained bias of the method must be in ``state`` with its shape, and no other
    factor may be; the head's tensors load strictly when ``head`` is given. The frozen backbone tensors
    the file carries (the other biases; every tensor in a merged file) must equal the backbone's: a
    difference means ``model.weights`` is not the file the release was trained on."""
    if method.init != "public_code":
        raise SoMACheckpointError(
            f"{source} holds factors trained from W + s B A (the public code's arithmetic), but the model was built "
            f"with method.soma.init={method.init}: build it with init public_code (segmentor_from_official_soma does)")
    state = _strip(state)
    backbone = {k[len(OFFICIAL_SOMA_PREFIX):]: v for k, v in state.items() if k.startswith(OFFICIAL_SOMA_PREFIX)}
    head_state = {k: v for k, v in state.items() if k.startswith(_HEAD_PREFIX)}
    other = sorted(k for k in state if k not in head_state and not k.startswith(OFFICIAL_SOMA_PREFIX))
    if other:
        raise SoMACheckpointError(f"{source}: keys of neither the backbone nor the head: {', '.join(other[:8])}")
    backbone.pop("mask_token", None)  # trainable in the public code, but never used, nor in dgss's ViT
    missing, wrong = [], []

    def take(key: str, like: torch.Tensor):
        value = backbone.pop(key, None)
        if value is None:
            missing.append(OFFICIAL_SOMA_PREFIX + key)
        elif value.shape != like.shape:
            wrong.append(f"{OFFICIAL_SOMA_PREFIX}{key}: file {tuple(value.shape)} vs model {tuple(like.shape)}")
        else:
            return value
        return None

    for target in method.target_names:
        layer = method.layers[target.replace(".", "_")]
        names = _official_names(target)
        for name, part in zip(names, layer.parts):
            for letter, param in (("A", part.a), ("B", part.b)):
                value = take(f"{name}.lora_{letter}.weight", param)
                if value is not None:
                    param.copy_(value)
        if layer.bias is not None:
            pieces = [take(f"{name}.bias", like) for name, like in zip(names, layer.bias.chunk(len(names)))]
            if all(p is not None for p in pieces):
                layer.bias.copy_(torch.cat(pieces))
    extra = sorted(k for k in backbone if _FACTOR.fullmatch(k))
    if missing or wrong or extra:
        raise SoMACheckpointError(
            f"{source} does not fit the SoMA model of the config (method.soma.rank / start_block / targets / "
            "train_bias must be the release's)"
            + (f"\n  missing: {', '.join(missing[:8])}" if missing else "")
            + (f"\n  factors of layers the config does not tune: {', '.join(extra[:8])}" if extra else "")
            + (f"\n  shape mismatches: {'; '.join(wrong[:8])}" if wrong else ""))
    if check_frozen:
        _check_frozen(method.backbone, _fuse_qkv(backbone), source)
    if head is not None:
        from ..models.mask2former.checkpoint import load_official_head_state_dict

        if not head_state:
            raise SoMACheckpointError(f"{source} has no '{_HEAD_PREFIX}*' tensors for the head")
        load_official_head_state_dict(head, head_state)


def _check_frozen(backbone, frozen: dict[str, torch.Tensor], source: str) -> None:
    own = backbone.model.state_dict()
    unknown = sorted(k for k in frozen if k not in own)
    differ = []
    for key, value in frozen.items():
        if key in own:
            mine = own[key].detach().cpu().float()
            if value.shape != mine.shape or not torch.allclose(value.float(), mine, rtol=1e-5, atol=1e-6):
                gap = float((value.float() - mine).abs().max()) if value.shape == mine.shape else float("nan")
                differ.append(f"{key} (max |difference| {gap:.3g})" if gap == gap else f"{key} (shape)")
    if unknown or differ:
        raise SoMACheckpointError(
            f"{source}: frozen backbone tensors that do not match the backbone '{backbone.name}' built from "
            "model.weights (the release carries the pretrained values; is model.weights the DINOv2 file it was "
            "trained on, and method.soma.train_bias/start_block the release's?)"
            + (f"\n  not in the backbone: {', '.join(unknown[:8])}" if unknown else "")
            + (f"\n  different: {', '.join(differ[:8])}" if differ else ""))


def public_code_config(cfg):
    """``cfg`` with ``method.soma.init: public_code`` (the only initialisation whose arithmetic the
    released factors fit)."""
    if cfg.method.name != "soma":
        raise SoMACheckpointError(f"a SoMA release needs a SoMA config (method.name: soma), got '{cfg.method.name}'")
    soma = dataclasses.replace(cfg.method.soma, init="public_code")
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, soma=soma))


def segmentor_from_official_soma(cfg, checkpoint: Union[str, os.PathLike, dict], *, fold: bool = True,
                                 raw: bool = False):
    """``build_segmentor`` of ``cfg`` with ``init: public_code`` (no SVD is computed: every factor comes
    from the file), the release's factors, biases and head loaded and, with ``fold``, SoMA folded into
    the backbone's dense weights (W + s B A; no overhead at inference). ``checkpoint``: a file or its
    state dict; ``raw``: the file's raw weights instead of its EMA ones."""
    from .model import build_segmentor

    cfg = public_code_config(cfg)
    source = "the state dict" if isinstance(checkpoint, dict) else str(checkpoint)
    if isinstance(checkpoint, dict):
        key = "ema_state_dict" if raw else "state_dict"
        if isinstance(checkpoint.get(key), dict):  # the file's container, held in memory
            checkpoint = checkpoint[key]
        elif raw:
            raise SoMACheckpointError("the checkpoint has no 'ema_state_dict' (raw weights): not trained with EMA")
        state = _strip({k: v for k, v in checkpoint.items() if torch.is_tensor(v)})
    else:
        state = read_official_soma(checkpoint, raw=raw)
    with factors_loaded_later():
        segmentor = build_segmentor(cfg)
    load_official_soma(segmentor.method, state, segmentor.head, source=source)
    if fold:
        segmentor.method.merge_into_backbone()
    return segmentor
