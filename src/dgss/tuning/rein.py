"""Rein (rein.md): learnable tokens refine a frozen backbone's features after its layers, and the same
tokens become the Mask2Former head's queries.

    method = build_rein(method_cfg, backbone)   # unattached; build_method() also attaches it
    method.attach(backbone)                     # freezes the backbone, registers one hook per layer
    feats = backbone(images)                    # every hooked block's output is refined in place
    queries = method.head_queries()             # M x Q, from the parameters only

Two pieces:
  * :class:`Reins` holds the parameters of one group of L layers of width C (the names match the
    official ``backbone.reins.*`` keys, so an official checkpoint imports by stripping a prefix) and
    implements the per-layer refinement and the token-to-query link.
  * :class:`Rein` is the tuning method: it decides where Reins go on each backbone family
    (:func:`rein_sites`) and connects them with forward hooks. A block's hook returns the refined
    output, so the next block and the feature taken after that block both see the refined tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .base import TuningMethod, count_trainable, decay_groups

__all__ = [
    "TOKEN_INIT_PATCH_SIZE",
    "token_init_bound",
    "Reins",
    "ReinOperands",
    "ReinSite",
    "TOKEN_ALIGNMENT",
    "compute_dtype",
    "rein_sites",
    "Rein",
    "refine_in_layout",
    "build_rein",
    "trainable_parameter_counts",
    "format_trainable_parameters",
]

# p in the token init formula. The official code passes the ViT patch size here; every published
# configuration uses 16 (also for SAM and CNNs), and rein.md fixes it to 16 for every backbone.
TOKEN_INIT_PATCH_SIZE = 16


def token_init_bound(
    embed_dim: int, lora_rank: Optional[int] = None, patch_size: int = TOKEN_INIT_PATCH_SIZE
) -> float:
    """v of the token init U(-v, v): sqrt(6 / (3 p^2 + C)) plain, sqrt(6 / (3 p^2 + sqrt(C r))) LoRA."""
    fan = embed_dim if lora_rank is None else math.sqrt(embed_dim * lora_rank)
    return math.sqrt(6.0 / (3 * patch_size**2 + fan))


class Reins(nn.Module):
    """Tokens and shared MLPs for L consecutive refinement points of width C.

    Parameters (official names): ``learnable_tokens`` L x M x C (plain) or ``learnable_tokens_a``
    L x M x r and ``learnable_tokens_b`` L x r x C (LoRA); ``scale`` (scalar); ``mlp_token2feat`` and
    ``mlp_delta_f`` Linear(C, C), shared by all L layers; ``transform`` Linear(C, Q); ``merge``
    Linear(3Q, Q).
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        *,
        num_tokens: int = 100,
        lora_rank: Optional[int] = 16,
        query_dim: int = 256,
        scale_init: float = 1e-3,
        init_patch_size: int = TOKEN_INIT_PATCH_SIZE,
    ) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"Rein needs at least 2 tokens (token 0 is a sink), got {num_tokens}")
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.num_tokens = num_tokens
        self.lora_rank = lora_rank
        self.query_dim = query_dim

        bound = token_init_bound(embed_dim, lora_rank, init_patch_size)
        if lora_rank is None:
            self.learnable_tokens = nn.Parameter(torch.empty(num_layers, num_tokens, embed_dim))
            nn.init.uniform_(self.learnable_tokens, -bound, bound)
        else:
            self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, num_tokens, lora_rank))
            self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, lora_rank, embed_dim))
            nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
            nn.init.uniform_(self.learnable_tokens_b, -bound, bound)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.mlp_token2feat = nn.Linear(embed_dim, embed_dim)
        self.mlp_delta_f = nn.Linear(embed_dim, embed_dim)
        # nn.Linear already draws its weight this way; done explicitly because rein.md specifies it.
        nn.init.kaiming_uniform_(self.mlp_token2feat.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_delta_f.weight, a=math.sqrt(5))
        self.transform = nn.Linear(embed_dim, query_dim)
        self.merge = nn.Linear(3 * query_dim, query_dim)

    def extra_repr(self) -> str:
        rank = "plain" if self.lora_rank is None else f"lora_rank={self.lora_rank}"
        return (
            f"layers={self.num_layers}, tokens={self.num_tokens}, dim={self.embed_dim}, {rank}, "
            f"query_dim={self.query_dim}"
        )

    def tokens(self, layer: Optional[int] = None) -> torch.Tensor:
        """T_l = A_l B_l (M x C) for one layer, or all layers stacked (L x M x C) when ``layer`` is None."""
        if self.lora_rank is None:
            return self.learnable_tokens if layer is None else self.learnable_tokens[layer]
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def refine(self, feats: torch.Tensor, layer: int, operands: Optional["ReinOperands"] = None) -> torch.Tensor:
        """f' = f + scale * mlp_delta_f(delta_bar + f) for the patch tokens f (B x N x C) after ``layer``.

        ``operands``: this forward's input-independent operands of every layer (:meth:`training_operands`
        or :meth:`inference_operands`), which :class:`Rein` computes once per backbone forward; None:
        computed here. Without autograd the rearranged inference path runs (:meth:`_refine_inference`)."""
        inference = _inference_only()
        if operands is None or operands.inference != inference or not operands.fits(feats):
            operands = (self.inference_operands(compute_dtype(feats)) if inference
                        else self.training_operands(layer=layer))
        if inference:
            return self._refine_inference(feats, operands.index(layer), operands)
        return self._refine_training(feats, operands.index(layer), operands)

    def _refine_training(self, feats: torch.Tensor, index: int, ops: "ReinOperands") -> torch.Tensor:
        """rein.md's equations with autograd, the constants folded into operands computed once per forward:

            S = softmax(f (T / sqrt(C))^T + mask)     (T padded to M' rows; the mask is -inf on the pad)
            x = f + S V                               (V = [0; mlp_token2feat(T[1:]); 0]: token 0 is the sink)
            f' = f + x (s W)^T + s b                  (W, b = mlp_delta_f, s = scale)

        The padded rows take exactly zero attention and give zero values, so the sums are rein.md's; the
        inner sizes are M' (a multiple of 8: tensor-core aligned), not M and M - 1. f stays in its own
        dtype (the residual stream); products run in the autocast dtype when autocast is on."""
        shape = feats.shape
        flat = feats.reshape(-1, shape[-1])
        logits = flat @ ops.logits_t[index] if ops.mask is None else torch.addmm(ops.mask, flat, ops.logits_t[index])
        attention = torch.softmax(logits, dim=-1)  # (B N) x M'
        mixed = torch.addmm(flat, attention, ops.values[index])  # f + S[:, 1:] mlp_token2feat(T[1:])
        return feats + nn.functional.linear(mixed, ops.weight, ops.bias).view(shape)

    def _refine_inference(self, feats: torch.Tensor, index: int, ops: "ReinOperands") -> torch.Tensor:
        """``refine`` without autograd, rearranged so that every input-independent product is done once.

        With W, b = mlp_delta_f, s = scale, S = the token attention and V = mlp_token2feat(T[1:]):

            f' = f + s (W (S[:, 1:] V + f) + b) = f + [f (s W)^T + s b] + S (s V W^T)

        Two GEMMs per layer, the floor (the softmax sits between them): one product of f with the
        concatenation [(s W)^T | T^T / sqrt(C)] gives the bracket and the logits at once (f is read once),
        then S (s V W^T) is added into the bracket in place. Operands are cached in the compute dtype (the
        autocast dtype under autocast: no cast per call), inner sizes padded to M' (exact, as in
        :meth:`_refine_training`); the softmax runs in the compute dtype (bf16 kernels accumulate in fp32),
        the residual f is added in its own dtype."""
        shape, channels = feats.shape, feats.shape[-1]
        flat = feats.reshape(-1, channels).to(ops.dtype)
        both = torch.addmm(ops.bias, flat, ops.weight[index])  # (B N) x (C + M'): [f (sW)^T + s b | logits]
        delta, logits = both[:, :channels], both[:, channels:]
        attention = torch.softmax(logits, dim=-1, dtype=ops.dtype)
        delta.addmm_(attention, ops.values[index])
        return feats + delta.view(shape)

    def training_operands(self, layer: Optional[int] = None) -> "ReinOperands":
        """The operands of :meth:`_refine_training` for every layer (or one ``layer``), with autograd: one
        batched token product and one batched ``mlp_token2feat`` for all layers instead of one per layer."""
        tokens = self.tokens() if layer is None else self.tokens(layer)[None]  # L x M x C
        # the sizes from the module's own count, a Python int: a traced tensor shape (ONNX export) would
        # turn the padding into shape arithmetic the exporter cannot infer
        count = self.num_tokens
        padded = _padded_tokens(count)
        logits_t = nn.functional.pad(tokens * self.embed_dim**-0.5, (0, 0, 0, padded - count))
        values = nn.functional.pad(self.mlp_token2feat(tokens[:, 1:]), (0, 0, 1, padded - count))
        scale = self.scale
        return ReinOperands(
            inference=False, first_layer=layer or 0, dtype=logits_t.dtype, logits_t=logits_t.transpose(1, 2),
            values=values, weight=scale * self.mlp_delta_f.weight, bias=scale * self.mlp_delta_f.bias,
            mask=_token_mask(count, padded, logits_t.dtype, logits_t.device),
            versions=_versions(self))

    def inference_operands(self, dtype: torch.dtype) -> "ReinOperands":
        """The operands of :meth:`_refine_inference` in ``dtype``, computed once and reused until a parameter
        changes (the cache key covers storage, dtype, device and in-place version)."""
        key = (dtype, parameter_state(self))
        cached = getattr(self, "_inference_cache", None)
        if cached is None or cached[0] != key:
            with torch.autocast(self.scale.device.type, enabled=False):  # exact products, then one rounding
                cached = self._inference_cache = (key, self._fold_inference_operands(dtype))
        return cached[1]

    def _fold_inference_operands(self, dtype: torch.dtype) -> "ReinOperands":
        tokens = self.tokens()  # L x M x C
        layers, count, channels = tokens.shape
        padded = _padded_tokens(count)
        w, b, s = self.mlp_delta_f.weight, self.mlp_delta_f.bias, self.scale
        logits_t = nn.functional.pad(tokens * self.embed_dim**-0.5, (0, 0, 0, padded - count)).transpose(1, 2)
        weight = torch.cat([(s * w.t()).expand(layers, channels, channels), logits_t], dim=2)  # L x C x (C + M')
        mask = _token_mask(count, padded, tokens.dtype, tokens.device)
        bias = torch.cat([s * b, mask if mask is not None else tokens.new_zeros(padded)])
        values = s * (self.mlp_token2feat(tokens[:, 1:]) @ w.t())  # L x (M-1) x C
        values = nn.functional.pad(values, (0, 0, 1, padded - count))  # L x M' x C: the sink and pad rows 0
        return ReinOperands(inference=True, first_layer=0, dtype=dtype, logits_t=None,
                            values=values.to(dtype).contiguous(), weight=weight.to(dtype).contiguous(),
                            bias=bias.to(dtype), mask=None, versions=())

    def queries(self) -> torch.Tensor:
        """The token-to-query link: M x Q, from the parameters only (all M tokens, token 0 included)."""
        per_layer = self.transform(self.tokens()).permute(1, 2, 0)  # L x M x Q -> M x Q x L
        pooled = torch.stack([per_layer.amax(-1), per_layer.mean(-1), per_layer[..., -1]], dim=-1)  # M x Q x 3
        # Flattening M x Q x 3 interleaves per channel: [q0_max, q0_mean, q0_last, q1_max, ...],
        # the order the official ``merge.weight`` was trained with.
        return self.merge(pooled.flatten(1))


# Inner sizes of Rein's token GEMMs are padded to a multiple of this: the tensor cores' alignment for
# bf16/fp16 (16 bytes), which also covers TF32's 4. Exact: padded tokens take zero attention and give zero
# values (their logits are -inf, their value rows 0).
TOKEN_ALIGNMENT = 8


def _padded_tokens(count: int) -> int:
    return -(-count // TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT


def _token_mask(count: int, padded: int, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """0 for the M real tokens, -inf for the padding (None when there is none)."""
    if padded == count:
        return None
    mask = torch.zeros(padded, dtype=dtype, device=device)
    mask[count:] = float("-inf")
    return mask


def _versions(module: nn.Module) -> tuple:
    return tuple(p._version for p in module.parameters())


def compute_dtype(feats: torch.Tensor) -> torch.dtype:
    """The dtype Rein's products run in: autocast's on the features' device when it is on, else theirs."""
    device = feats.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else feats.dtype


@dataclass
class ReinOperands:
    """The input-independent operands of one :class:`Reins`' refinements in one forward pass (every layer).

    Training: ``logits_t`` L x C x M' (T / sqrt(C), transposed, padded), ``values`` L x M' x C
    (mlp_token2feat(T[1:]) between a zero sink row and zero pad rows), ``weight``/``bias`` s W and s b,
    ``mask`` (M': 0, or -inf on the pad). Inference: ``weight`` L x C x (C + M') = [(s W)^T | logits_t],
    ``bias`` [s b | mask], ``values`` L x M' x C = s V W^T padded, all in ``dtype``."""

    inference: bool
    first_layer: int  # the layer of index 0 (operands of one layer only: that layer)
    dtype: torch.dtype
    logits_t: Optional[torch.Tensor]
    values: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    mask: Optional[torch.Tensor]
    versions: tuple  # training: the parameters' in-place versions they were computed at

    def index(self, layer: int) -> int:
        index = layer - self.first_layer
        if not 0 <= index < self.values.shape[0]:
            raise IndexError(f"Rein operands of layers {self.first_layer}..{self.first_layer + self.values.shape[0] - 1} "
                             f"asked for layer {layer}")
        return index

    def fits(self, feats: torch.Tensor) -> bool:
        """Whether these operands serve ``feats`` now: the compute dtype (inference) matches."""
        return self.inference is False or self.dtype == compute_dtype(feats)


@dataclass(frozen=True)
class ReinSite:
    """One Reins module's place on a backbone: the blocks it follows and their output width."""

    block_indices: tuple[int, ...]  # indices into ``backbone.blocks``, in execution order
    channels: int


def parameter_state(module: nn.Module) -> tuple:
    """A key that changes whenever any parameter of ``module`` does: storage, dtype, device and the
    in-place version counter (an optimizer step, a checkpoint load, ``.to()``, ``.half()``)."""
    return tuple((p.data_ptr(), p.dtype, p.device, p._version) for p in module.parameters())


def _inference_only() -> bool:
    """True when nothing needs autograd or a traced graph: the rearranged inference path may run."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling())


def rein_sites(backbone) -> list[ReinSite]:
    """Where Rein goes (rein.md's table): one site for a ViT (every block; SAM: only the global
    attention blocks), one site per stage for a CNN (every sub-block of the stage)."""
    if backbone.family == "cnn":
        channels = _cnn_stage_channels(backbone)
        stages = sorted(set(backbone.block_stage))
        return [
            ReinSite(tuple(i for i, s in enumerate(backbone.block_stage) if s == stage), channels[stage])
            for stage in stages
        ]
    if backbone.family == "sam":
        if not backbone.global_attn_indexes:
            raise ValueError(f"backbone '{backbone.name}' has no global-attention blocks to attach Rein to")
        return [ReinSite(tuple(backbone.global_attn_indexes), backbone.embed_dim)]
    return [ReinSite(tuple(range(len(backbone.blocks))), backbone.embed_dim)]


def _cnn_stage_channels(backbone) -> list[int]:
    """Output channels of each stage (= of each of its sub-blocks), from timm's feature_info."""
    by_module = {info["module"]: info["num_chs"] for info in backbone.model.feature_info}
    names = [f"stages.{i}" for i in range(4)] if "stages.0" in by_module else [f"layer{i}" for i in range(1, 5)]
    return [by_module[name] for name in names]


class Rein(TuningMethod):
    """The Rein tuning method: a frozen backbone (kept in eval mode), Reins after its layers, and the
    tokens as the head's queries.

    ``reins`` is one :class:`Reins` for ViTs (state-dict keys ``reins.scale``, ...) and an
    ``nn.ModuleList`` with one :class:`Reins` per stage for CNNs (``reins.0.scale``, ...), whose
    queries are summed.
    """

    name = "rein"

    def __init__(
        self,
        backbone,
        *,
        num_tokens: int = 100,
        lora_rank: Optional[int] = 16,
        query_dim: int = 256,
        scale_init: float = 1e-3,
        lr_mult: float = 1.0,
    ) -> None:
        """Size the Reins for ``backbone`` (L, C per site); :meth:`attach` then hooks them in.

        Args:
            num_tokens: M, the number of tokens and of head queries.
            lora_rank: r of the LoRA tokens; None for plain L x M x C tokens.
            query_dim: Q, the head's query width.
            scale_init: initial value of the learnable ``scale``.
            lr_mult: the Reins' lr is the head's times this (1.0 in the official configs).
        """
        super().__init__()
        if not lr_mult > 0:
            raise ValueError(f"method.rein.lr_mult must be > 0, got {lr_mult}")
        self.lr_mult = float(lr_mult)
        self.sites = rein_sites(backbone)
        self.token_layout = backbone.token_layout
        self.num_prefix_tokens = backbone.num_prefix_tokens
        groups = [
            Reins(
                len(site.block_indices),
                site.channels,
                num_tokens=num_tokens,
                lora_rank=lora_rank,
                query_dim=query_dim,
                scale_init=scale_init,
            )
            for site in self.sites
        ]
        self.reins = nn.ModuleList(groups) if backbone.family == "cnn" else groups[0]
        # rein.md: SAM keeps the head's learned content queries; elsewhere they are querys2feat(queries).
        self.query_content = "learned" if backbone.family == "sam" else "querys2feat"
        self._hook_handles: list = []
        self._operands: Optional[list[ReinOperands]] = None  # this forward's, per group (_prepare_operands)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """The Reins at lr x ``lr_mult``, the neck (if any) at lr; the backbone trains nothing."""
        groups = decay_groups(self.named_parameters(), lr * self.lr_mult, weight_decay)
        if self.backbone.neck is not None:
            groups += decay_groups(self.backbone.neck.named_parameters(), lr, weight_decay)
        return groups

    @property
    def reins_groups(self) -> list[Reins]:
        """The Reins modules, one per site."""
        return list(self.reins) if isinstance(self.reins, nn.ModuleList) else [self.reins]

    def attach(self, backbone) -> None:
        """Freeze ``backbone`` and hook a refinement after every block of every site."""
        if rein_sites(backbone) != self.sites or backbone.token_layout != self.token_layout:
            raise ValueError(f"this Rein was built for another backbone layout than '{backbone.name}'")
        super().attach(backbone)
        self.detach_hooks()
        for group, site in enumerate(self.sites):
            for layer, block_index in enumerate(site.block_indices):
                hook = functools.partial(self._refine_block_output, group, layer)
                self._hook_handles.append(backbone.blocks[block_index].register_forward_hook(hook))
        if type(self)._refine_block_output is Rein._refine_block_output:  # a subclass refining its own way skips it
            self._hook_handles.append(backbone.register_forward_pre_hook(self._prepare_operands))
            self._hook_handles.append(backbone.register_forward_hook(self._release_operands))

    def _prepare_operands(self, backbone, args) -> None:
        """Before each backbone forward: every layer's input-independent operands, once (issue 38).

        Outside every block, so activation checkpointing does not recompute them: a block re-run in the
        backward pass reuses the operands of its forward (they stay until the next forward). Without
        autograd they come from the parameter-keyed cache, whose key is checked here once, not per layer."""
        images = args[0] if args and torch.is_tensor(args[0]) else None
        if _inference_only():
            dtype = compute_dtype(images) if images is not None else self.reins_groups[0].scale.dtype
            self._operands = [group.inference_operands(dtype) for group in self.reins_groups]
        else:
            self._operands = [group.training_operands() for group in self.reins_groups]

    def _release_operands(self, backbone, args, output) -> None:
        if self._operands is not None and self._operands[0].inference:  # nothing will re-run: free them now
            self._operands = None

    def _operands_of(self, group: int) -> Optional[ReinOperands]:
        """This forward's operands of ``group``, or None (a block run outside the backbone's forward, or the
        parameters changed in place since they were computed): the refinement then computes its own."""
        operands = self._operands[group] if self._operands is not None else None
        if operands is not None and not operands.inference and operands.versions != _versions(self.reins_groups[group]):
            return None
        return operands

    def detach_hooks(self) -> None:
        """Remove the hooks: the backbone runs unrefined again."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._operands = None

    def _refine_block_output(self, group: int, layer: int, module, inputs, output: torch.Tensor) -> torch.Tensor:
        # A pure function of its inputs and the parameters: activation checkpointing may re-run it.
        refine = functools.partial(self.reins_groups[group].refine, layer=layer, operands=self._operands_of(group))
        return refine_in_layout(refine, output, self.token_layout, self.num_prefix_tokens)

    def head_queries(self) -> torch.Tensor:
        """M x Q queries for the head. Input-independent; the segmentor calls this once per forward.
        CNNs: the sum of the stages' queries.

        In eval mode without autograd (inference, sliding windows) they are computed once and reused:
        the cache is keyed on every parameter's storage, dtype and version counter, so a checkpoint
        load, an optimizer step, ``.to()`` or ``.half()`` recomputes them (issue 11). Not while tracing
        or compiling: an exported graph computes them from the parameters."""
        if self.training or not _inference_only():
            return self._compute_queries()
        key = parameter_state(self)
        cached = getattr(self, "_query_cache", None)
        if cached is None or cached[0] != key:
            cached = self._query_cache = (key, self._compute_queries())
        return cached[1]

    def _compute_queries(self) -> torch.Tensor:
        queries = [group.queries() for group in self.reins_groups]
        return queries[0] if len(queries) == 1 else torch.stack(queries).sum(0)


def refine_in_layout(refine, x: torch.Tensor, layout: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Apply ``refine`` (B x N x C -> B x N x C) to the patch tokens of a block output.

    "nlc": B x N x C, the leading class/register tokens bypass; "nhwc" (SAM): B x H x W x C;
    "nchw" (CNN): B x C x H x W. The result has the input's layout.
    """
    if layout == "nlc":
        prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        return torch.cat([prefix, refine(patches)], dim=1)
    if layout == "nhwc":
        b, h, w, c = x.shape
        return refine(x.reshape(b, h * w, c)).reshape(b, h, w, c)
    if layout == "nchw":
        b, c, h, w = x.shape
        return refine(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
    raise ValueError(f"unknown token layout {layout!r}")


def build_rein(cfg, backbone) -> Rein:
    """``METHODS["rein"]``: a Rein sized for ``backbone`` from ``cfg.rein`` (a :class:`ReinConfig`)."""
    rein_cfg = cfg.rein
    if rein_cfg.link != "max_mean_last":
        raise ValueError(f"method.rein.link must be 'max_mean_last', got {rein_cfg.link!r}")
    return Rein(
        backbone,
        num_tokens=rein_cfg.num_tokens,
        lora_rank=rein_cfg.lora_rank,
        query_dim=rein_cfg.query_dim,
        scale_init=rein_cfg.scale_init,
        lr_mult=rein_cfg.lr_mult,
    )


def trainable_parameter_counts(method: TuningMethod, head: Optional[nn.Module] = None) -> dict[str, int]:
    """Trainable parameters by part: the method's own (e.g. Rein's 2,990,081 on DINOv2-L), trained
    pretrained backbone parameters, the backbone's neck (CLIP pyramid), the head, and the total."""
    backbone = method.backbone
    counts = {
        "method": count_trainable(method.parameters()),
        "backbone": sum(p.numel() for _, p in method.trainable_backbone_parameters()),
        "neck": count_trainable(backbone.neck.parameters()) if backbone.neck is not None else 0,
        "head": count_trainable(head.parameters()) if head is not None else 0,
    }
    counts["total"] = sum(counts.values())
    return counts


def format_trainable_parameters(method: TuningMethod, head: Optional[nn.Module] = None) -> str:
    """One line for the training log, e.g. ``trainable parameters: 23,456,789 (rein 2,990,081, ...)``."""
    counts = trainable_parameter_counts(method, head)
    parts = [f"{method.name if name == 'method' else name} {n:,}" for name, n in counts.items() if name != "total"]
    return f"trainable parameters: {counts['total']:,} ({', '.join(parts)})"
