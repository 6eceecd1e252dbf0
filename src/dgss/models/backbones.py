"""The Vision Foundation Model zoo: one factory over timm, a block list, and the 4-scale pyramid.

    backbone = build_backbone("dinov2_l", weights="dinov2_vitl14_pretrain.pth")
    feats = backbone(images)        # 4 maps at strides 4/8/16/32, B x C_i x H/s x W/s

Every backbone exposes ``blocks`` (the modules a tuning method attaches to, in execution order), the
token layout of a block's output, and how many prefix (class + register) tokens lead the sequence.
Features are taken after the blocks listed in ``out_indices`` without the final norm (rein.md), and
turned into a pyramid: bilinear x4/x2/x1/x0.5 for plain ViTs, a trainable deconvolution pyramid for
CLIP (as Rein does), or the stage outputs for CNNs.

Weights: ``None`` (random init), ``"hub"`` (timm's download, for users who are online) or a local file
in the official or timm layout; see :mod:`dgss.models.backbone_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_name

__all__ = ["BackboneSpec", "BACKBONES", "Backbone", "build_backbone", "list_backbones", "check_backbone_name",
           "canonical_backbone_name"]


@dataclass(frozen=True)
class BackboneSpec:
    """What dgss needs to know about one pretrained VFM."""

    timm_name: str  # timm architecture
    hub_tag: str  # timm pretrained tag of the weights the papers used (for weights="hub")
    family: Literal["vit", "eva", "sam", "cnn"]
    out_indices: tuple[int, ...]  # 0-based blocks (ViT) or stages (CNN) whose outputs feed the head
    pyramid: Literal["bilinear", "deconv", "stages"] = "bilinear"
    native_patch: int = 14  # patch size of the pretrained weights


# Out indices: Rein's choice for 24-layer models (7/11/15/23), the same spacing for 12 layers,
# thirds-to-quarters for 40 layers (Rein's DINOv2-G, and DINOv3-7B), the global-attention blocks for SAM.
BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_s": BackboneSpec("vit_small_patch14_dinov2", "lvd142m", "vit", (3, 5, 7, 11)),
    "dinov2_b": BackboneSpec("vit_base_patch14_dinov2", "lvd142m", "vit", (3, 5, 7, 11)),
    "dinov2_l": BackboneSpec("vit_large_patch14_dinov2", "lvd142m", "vit", (7, 11, 15, 23)),
    "dinov2_g": BackboneSpec("vit_giant_patch14_dinov2", "lvd142m", "vit", (9, 19, 29, 39)),
    "dinov2_s_reg": BackboneSpec("vit_small_patch14_reg4_dinov2", "lvd142m", "vit", (3, 5, 7, 11)),
    "dinov2_b_reg": BackboneSpec("vit_base_patch14_reg4_dinov2", "lvd142m", "vit", (3, 5, 7, 11)),
    "dinov2_l_reg": BackboneSpec("vit_large_patch14_reg4_dinov2", "lvd142m", "vit", (7, 11, 15, 23)),
    "dinov2_g_reg": BackboneSpec("vit_giant_patch14_reg4_dinov2", "lvd142m", "vit", (9, 19, 29, 39)),
    "eva02_l": BackboneSpec("eva02_large_patch14_224", "mim_m38m", "eva", (7, 11, 15, 23)),
    "clip_l": BackboneSpec("vit_large_patch14_clip_224", "openai", "vit", (7, 11, 15, 23), "deconv"),
    "sam_b": BackboneSpec("samvit_base_patch16", "sa1b", "sam", (2, 5, 8, 11), native_patch=16),
    "sam_l": BackboneSpec("samvit_large_patch16", "sa1b", "sam", (5, 11, 17, 23), native_patch=16),
    "sam_h": BackboneSpec("samvit_huge_patch16", "sa1b", "sam", (7, 15, 23, 31), native_patch=16),
    "mae_l": BackboneSpec("vit_large_patch16_224", "mae", "vit", (7, 11, 15, 23), native_patch=16),
    "convnext_l": BackboneSpec("convnext_large", "fb_in22k", "cnn", (0, 1, 2, 3), "stages", 4),
    "resnet50": BackboneSpec("resnet50", "tv_in1k", "cnn", (1, 2, 3, 4), "stages", 4),
    "dinov3_s": BackboneSpec("vit_small_patch16_dinov3", "lvd1689m", "eva", (3, 5, 7, 11), native_patch=16),
    "dinov3_b": BackboneSpec("vit_base_patch16_dinov3", "lvd1689m", "eva", (3, 5, 7, 11), native_patch=16),
    "dinov3_l": BackboneSpec("vit_large_patch16_dinov3", "lvd1689m", "eva", (7, 11, 15, 23), native_patch=16),
    "dinov3_hplus": BackboneSpec("vit_huge_plus_patch16_dinov3", "lvd1689m", "eva", (7, 15, 23, 31), native_patch=16),
    # DINOv3 7B (6.716B parameters: 40 blocks of width 4096, SwiGLU 8192, 4 registers): features after
    # the quarter blocks 9/19/29/39, as for the 40-block DINOv2-g
    "dinov3_7b": BackboneSpec("vit_7b_patch16_dinov3", "lvd1689m", "eva", (9, 19, 29, 39), native_patch=16),
}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def canonical_backbone_name(name: str) -> str:
    """The registered name ``name`` spells, ignoring case and - versus _ (the configs' file names say
    ``dinov2-l``, papers ``DINOv2-L``: both mean ``dinov2_l``); ``name`` itself when none matches."""
    key = str(name).lower().replace("-", "_")
    return key if key in BACKBONES else name


def check_backbone_name(name: str, where: str = "") -> None:
    """ConfigError (one line, the closest name) unless ``name`` is a registered backbone (model.backbone)
    or one spelt differently (:func:`canonical_backbone_name`)."""
    check_name("model.backbone", canonical_backbone_name(name), BACKBONES, "backbone", where)


class DeconvPyramid(nn.Module):
    """Rein's trainable CLIP pyramid from four stride-16 maps (C channels each).

    x4: GN -> ConvT(2,2) -> BN -> GELU -> ConvT(2,2); x2: GN -> ConvT(2,2); x1: GN; x0.5: GN -> MaxPool(2).
    GN uses 32 groups (1 if C is not divisible by 32), a choice the specification leaves open.
    """

    def __init__(self, dim: int):
        super().__init__()
        groups = 32 if dim % 32 == 0 else 1
        self.fpn1 = nn.Sequential(
            nn.GroupNorm(groups, dim),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.GroupNorm(groups, dim), nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn3 = nn.GroupNorm(groups, dim)
        self.fpn4 = nn.Sequential(nn.GroupNorm(groups, dim), nn.MaxPool2d(2))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fpn1(feats[0]), self.fpn2(feats[1]), self.fpn3(feats[2]), self.fpn4(feats[3])]


def bilinear_pyramid(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Four stride-16 maps -> strides 4, 8, 16, 32 (bilinear x4, x2, x1, x0.5, align_corners=False)."""
    scales = (4.0, 2.0, 1.0, 0.5)
    return [
        f if s == 1.0 else F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False)
        for f, s in zip(feats, scales)
    ]


class Backbone(nn.Module):
    """A timm VFM plus what the segmentor and the tuning methods need.

    Attributes:
        model: the timm module holding every pretrained parameter (and only those).
        neck: the trainable pyramid for CLIP, else None (a parameter-free pyramid is used).
        out_indices: blocks (ViT) or stages (CNN) whose outputs form the pyramid.
        channels: channels of the 4 pyramid levels.
        token_layout: layout of a block's output: "nlc" (B x N x C, prefix tokens first),
            "nhwc" (SAM: B x H x W x C) or "nchw" (CNN).
        num_prefix_tokens: class + register tokens leading an "nlc" sequence.
        blocks: the blocks in execution order (for CNNs every sub-block of every stage).
        block_stage: for each block, its stage (0 for every block of a plain ViT).
    """

    def __init__(self, name: str, spec: BackboneSpec, model: nn.Module, out_indices: tuple[int, ...]):
        super().__init__()
        self.name = name
        self.spec = spec
        self.family = spec.family
        self.model = model
        self.out_indices = tuple(out_indices)
        self.neck: Optional[nn.Module] = None
        if spec.family == "cnn":
            self.token_layout = "nchw"
            self.num_prefix_tokens = 0
            stages = _cnn_stages(model, spec)
            self._blocks = [blk for stage in stages for blk in stage]
            self.block_stage = [i for i, stage in enumerate(stages) for _ in stage]
            infos = model.feature_info
            self.channels = [infos[i]["num_chs"] for i in self.out_indices]
        else:
            self.token_layout = "nhwc" if spec.family == "sam" else "nlc"
            self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
            self._blocks = list(model.blocks)
            self.block_stage = [0] * len(self._blocks)
            self.channels = [model.embed_dim] * 4
            if spec.pyramid == "deconv":
                self.neck = DeconvPyramid(model.embed_dim)
        self.embed_dim = self.channels[-1]
        self.global_attn_indexes = tuple(getattr(model, "global_attn_indexes", None) or ()) or tuple(
            i for i, blk in enumerate(self._blocks) if getattr(blk, "window_size", 1) == 0
        )

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @property
    def patch_size(self) -> int:
        if self.family == "cnn":
            return 4
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grad_checkpointing(self) -> bool:
        return getattr(self, "_grad_checkpointing", False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (ViT/EVA/SAM blocks, CNN stage blocks) through timm's
        ``forward_intermediates``: only block inputs are kept, each block runs again in the backward pass.

        Always non-reentrant (timm's default, enforced here): re-running a block re-runs its hooks
        (Rein, VPT, FisherTune) and gradients reach parameters inside blocks even when nothing before
        block 0 requires grad (frozen-backbone methods), which reentrant checkpointing would drop.
        """
        setter = getattr(self.model, "set_grad_checkpointing", None)
        if setter is None:
            raise ValueError(f"backbone '{self.name}' ({type(self.model).__name__}) does not support activation "
                             "checkpointing: set train.grad_checkpointing=false")
        if enable:
            from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

            if use_reentrant_ckpt():  # TIMM_REENTRANT_CKPT=1 in the environment
                import warnings

                warnings.warn("timm was set to reentrant activation checkpointing (TIMM_REENTRANT_CKPT); dgss "
                              "needs non-reentrant checkpointing and switches timm to it", stacklevel=2)
                set_reentrant_ckpt(False)
        try:
            setter(enable)
        except (AssertionError, NotImplementedError) as err:  # timm models that refuse it
            raise ValueError(f"backbone '{self.name}' ({type(self.model).__name__}) does not support activation "
                             f"checkpointing ({err or type(err).__name__}): "
                             "set train.grad_checkpointing=false") from err
        self._grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x H x W -> 4 maps at strides 4/8/16/32 (B x C_i x H/s x W/s)."""
        # timm takes each index once; a very shallow (test) model may repeat one, so map back.
        unique = sorted(set(self.out_indices))
        taken = self.model.forward_intermediates(
            x, indices=unique, norm=False, stop_early=True, intermediates_only=True
        )
        feats = [taken[unique.index(i)] for i in self.out_indices]
        if self.family == "cnn":
            return list(feats)
        if self.neck is not None:
            return self.neck(list(feats))
        return bilinear_pyramid(list(feats))


def _cnn_stages(model: nn.Module, spec: BackboneSpec) -> list[list[nn.Module]]:
    if hasattr(model, "stages"):  # ConvNeXt
        return [list(stage.blocks) for stage in model.stages]
    return [list(getattr(model, f"layer{i}")) for i in range(1, 5)]  # ResNet


def _timm_kwargs(spec: BackboneSpec, img_size: int, patch_size: int, drop_path_rate: float, overrides: dict) -> dict:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if spec.family == "cnn":
        kwargs.update(drop_path_rate=drop_path_rate) if spec.timm_name.startswith("convnext") else None
    else:
        kwargs.update(img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate)
        if spec.family in ("vit", "eva"):
            kwargs["dynamic_img_size"] = True  # any input size: position embeddings are resized on the fly
    kwargs.update(overrides)
    return kwargs


def build_backbone(
    name: str,
    *,
    weights: Optional[str] = None,
    img_size: int = 512,
    patch_size: int = 16,
    out_indices: Optional[list[int] | tuple[int, ...]] = None,
    drop_path_rate: float = 0.0,
    patch_resize: str = "rein",
    **overrides: Any,
) -> Backbone:
    """Build a VFM backbone by dgss name (see :func:`list_backbones`).

    Args:
        name: e.g. ``"dinov2_l"``, ``"dinov2_l_reg"``, ``"eva02_l"``, ``"clip_l"``, ``"sam_h"``.
        weights: None (random init), ``"hub"`` (timm's download) or a local file.
        img_size, patch_size: the input size the position embeddings are built for, and the patch
            size (16 for every published Rein/FisherTune setting; pretrained kernels are resized).
        out_indices: blocks whose outputs feed the pyramid; default the family's (rein.md).
        patch_resize: "rein" (plain bicubic kernel resize, as Rein's converted DINOv2) or "timm".
        **overrides: passed to the timm constructor (``depth``, ``embed_dim``, ``num_heads``, ...),
            e.g. to build tiny models for tests.
    """
    name = canonical_backbone_name(name)
    if name not in BACKBONES:
        import difflib

        close = difflib.get_close_matches(name, BACKBONES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown backbone '{name}'{hint} (available: {', '.join(list_backbones())})")
    spec = BACKBONES[name]
    if weights is not None and weights != "hub":
        # a missing or unreadable file is found before the model is built (seconds and gigabytes for a ViT-L)
        from ..fileio import UnusablePathError, check_input_file
        from .backbone_weights import BackboneWeightsError

        from .weight_sources import download_hint

        try:
            check_input_file(weights, "backbone weights file")
        except UnusablePathError as err:
            raise BackboneWeightsError(f"{err}{download_hint(name, weights)}") from None
    kwargs = _timm_kwargs(spec, img_size, patch_size, drop_path_rate, overrides)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    for attr in ("fc_norm", "attn_pool", "head_drop"):
        # classification-only parts: never used for dense features, so not kept as parameters
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    if spec.family == "sam":
        # SAM's neck (conv to 256 channels) is not part of the segmentation pyramid: drop it.
        model.prune_intermediate_layers(None, prune_norm=True, prune_head=True)
    indices = tuple(out_indices) if out_indices is not None else _default_indices(spec, model)
    if spec.family == "cnn":
        # the classifier's pooling norm is not part of the dense features
        model.prune_intermediate_layers(list(indices), prune_norm=True, prune_head=True)
    backbone = Backbone(name, spec, model, indices)
    if weights is not None:
        from .backbone_weights import load_backbone_weights

        load_backbone_weights(backbone, weights, patch_resize=patch_resize)
    return backbone


def _default_indices(spec: BackboneSpec, model: nn.Module) -> tuple[int, ...]:
    """The spec's indices, or for a depth-overridden (tiny) model: the same relative positions."""
    if spec.family == "cnn":
        return spec.out_indices
    depth = len(model.blocks)
    if spec.family == "sam":
        glob = tuple(getattr(model, "global_attn_indexes", None) or ())
        if len(glob) == 4 and max(glob) < depth:
            return glob
    full_depth = spec.out_indices[-1] + 1
    if depth == full_depth:
        return spec.out_indices
    # the same relative positions, non-decreasing (a model shallower than 4 blocks repeats one)
    scaled = [min(depth - 1, max(0, round((i + 1) * depth / full_depth) - 1)) for i in spec.out_indices]
    for k in range(1, 4):
        scaled[k] = min(depth - 1, max(scaled[k], scaled[k - 1] + 1))
    return tuple(scaled)
