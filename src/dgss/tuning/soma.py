"""SoMA (Yun et al., CVPR 2025, arXiv 2412.04077): tune the minor singular components of the pretrained
weights, keep the rest frozen, freeze the early blocks, anneal the weight decay.

For each targeted weight W (C_out x C_in) with SVD W = U S V^T and its r smallest singular triplets
(U_r, S_r, V_r), SoMA trains a low-rank pair initialised from them,

    A = sqrt(S_r / s) V_r^T  (r x C_in),   B = U_r sqrt(S_r / s)  (C_out x r),   s = alpha / r,

(the square root of S split evenly between A and B, as the public code does) and freezes the residual
W_res = W - s B_0 A_0, so the layer computes (W_res + s B A) x + b, which is W x + b at the start.

dgss never writes W_res into the backbone: a forward hook adds s (B A - B_0 A_0) x to the untouched
pretrained layer, with B_0, A_0 kept as buffers, computed as s [B (A - A_0) + (B - B_0) A_0] x: no
cancellation of two nearly equal products, and exact zeros at the start, so the first forward is the
pretrained model's bit for bit. The backbone keeps its pretrained tensors (its fingerprint, and model
files without the backbone, work as for every adapter method), and loading a file never depends on an
SVD being recomputed identically on another machine. A fused ``attn.qkv`` is decomposed as three
weights (q, k, v), as the public code splits it; EVA's q_proj/k_proj/v_proj and SwiGLU's fc1_g/fc1_x
are separate Linears already. ``merge_into_backbone()`` folds everything into the dense weights
(``dgss export`` does it), leaving a plain ViT with no overhead. Building the method costs one SVD per
weight (96 on DINOv2-L: about 2.5 minutes on one CPU core in float64, less with more cores, on a GPU
or with ``svd_dtype: float32``); the count on the meta device costs nothing.

Defaults, from the public code (github ysj9909/SoMA, configs/sora/sora_dinov2-L_mask2former.py and
rein/peft/sora.py): r = 16, alpha = r (s = 1), exact SVD, targets q, k, v, proj, fc1, fc2 of blocks 8-23
(``start_lora_idx = 8``: the first 8 blocks stay frozen), the biases of those layers trained too
(``bias="all"``), lr x 0.5 on all of it (``custom_keys backbone lr_mult 0.5``), weight decay 0.05
annealed to 1e-5 by a cosine over the 40k iterations (``CosineAnnealingParamScheduler`` on
``weight_decay``, every optimizer group). On DINOv2-L: 16 x 294,912 factor entries + 16 x 9,216 biases
= 4,866,048 trainable parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn

from .base import TuningMethod, decay_groups, require_token_backbone
from .lora import TARGETS

__all__ = ["SoMA", "MinorComponents", "build_soma", "singular_factors", "soma_target_names",
           "annealed_weight_decay"]


def singular_factors(weight: torch.Tensor, rank: int, scaling: float, *, principal: bool = False,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s B A = U_r S_r V_r^T for the r smallest (``principal``: largest) singular triplets.

    The SVD runs on the weight's device in ``dtype`` (float64 by default: the smallest singular vectors
    are the least accurate ones in float32); the factors come back in the weight's dtype."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"method.soma.rank must be in [1, {min(weight.shape)}] for a {tuple(weight.shape)} "
                         f"weight, got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)  # s descending
    keep = slice(0, rank) if principal else slice(s.shape[0] - rank, None)
    root = (s[keep] / scaling).sqrt()
    return (root[:, None] * vh[keep]).to(weight.dtype), (u[:, keep] * root[None, :]).to(weight.dtype)


class MinorComponents(nn.Module):
    """s (B A - B_0 A_0) for one weight (a Linear's, or q, k or v of a fused qkv): ``a``, ``b`` train,
    ``a_init``, ``b_init`` (saved with the method) stand for the frozen residual. Applied to x as
    (x [A - A_0; A_0]^T) (s [B, B - B_0])^T: two thin matrices, see the hook."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, *, principal: bool = False,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        a, b = singular_factors(weight, rank, scaling, principal=principal, dtype=dtype)
        self.scaling = scaling
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.register_buffer("a_init", a.clone())
        self.register_buffer("b_init", b.clone())

    def input_factor(self) -> torch.Tensor:
        """[A - A_0; A_0]: 2r x C_in."""
        return torch.cat([self.a - self.a_init, self.a_init])

    def output_factor(self) -> torch.Tensor:
        """s [B, B - B_0]: C_out x 2r."""
        return self.scaling * torch.cat([self.b, self.b - self.b_init], dim=1)

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """s (B A - B_0 A_0) in float64: what folding adds to the pretrained weight."""
        a, b, a0, b0 = (t.double() for t in (self.a, self.b, self.a_init, self.b_init))
        return self.scaling * (b @ a - b0 @ a0)


def soma_target_names(backbone, targets: list[str], start_block: int) -> list[str]:
    """Module names (in ``backbone.model``) of the Linears SoMA tunes: ``targets`` of blocks >= start_block."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"method.soma.targets: unknown {unknown} (choose from {', '.join(TARGETS)})")
    blocks = backbone.blocks
    if not 0 <= start_block < len(blocks):
        raise ValueError(f"method.soma.start_block must be in [0, {len(blocks) - 1}] for '{backbone.name}' "
                         f"({len(blocks)} blocks), got {start_block}")
    block_names = {id(m): n for n, m in backbone.model.named_modules()}
    names = []
    for block in blocks[start_block:]:
        for target in targets:
            for path in TARGETS[target]:
                try:
                    module = block.get_submodule(path)
                except AttributeError:
                    continue
                if isinstance(module, nn.Linear):
                    names.append(f"{block_names[id(block)]}.{path}")
    if not names:
        raise ValueError(f"method.soma.targets {targets} match no Linear layer of '{backbone.name}'")
    return names


def annealed_weight_decay(base: float, minimum: float, iteration: int, total_iters: int) -> float:
    """Cosine from ``base`` at iteration 0 to ``minimum`` at ``total_iters`` (mmengine's
    CosineAnnealingParamScheduler, closed form). A group without decay (``base`` 0) keeps none: the
    recursive mmengine form would raise it towards ``minimum``, an artefact of applying it to every group."""
    if base == 0.0:
        return 0.0
    t = min(max(iteration, 0) / max(total_iters, 1), 1.0)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


class SoMA(TuningMethod):
    """Minor-component factors (and biases) of the targeted Linears in ``layers``; the backbone's own
    tensors never change (the pretrained backbone is frozen and in eval mode)."""

    name = "soma"

    def __init__(self, backbone, *, rank: int = 16, alpha: float = 16.0,
                 targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2"), start_block: int = 8,
                 train_bias: bool = True, components: str = "minor", wd_min: Optional[float] = 1e-5,
                 svd_dtype: str = "float64") -> None:
        super().__init__()
        require_token_backbone(backbone, self.name)
        if rank < 1:
            raise ValueError(f"method.soma.rank must be >= 1, got {rank}")
        if components not in ("minor", "principal"):
            raise ValueError(f"method.soma.components must be 'minor' or 'principal', got '{components}'")
        self.rank, self.scaling, self.wd_min = rank, alpha / rank, wd_min
        self.target_names = soma_target_names(backbone, list(targets), start_block)
        dtype = {"float64": torch.float64, "float32": torch.float32}[svd_dtype]
        self.layers = nn.ModuleDict()  # "<module path with _>" -> parts (+ bias)
        for name in self.target_names:
            linear = backbone.model.get_submodule(name)
            # a fused qkv is three projections: each gets its own SVD (q, k, v rows, in this order)
            weights = linear.weight.chunk(3, 0) if name.endswith("attn.qkv") else (linear.weight,)
            layer = nn.Module()
            layer.parts = nn.ModuleList(MinorComponents(w, rank, self.scaling, principal=components == "principal",
                                                        dtype=dtype) for w in weights)
            # a copy of the pretrained bias that trains instead of it (the public code's bias="all")
            layer.bias = nn.Parameter(linear.bias.detach().clone()) if train_bias and linear.bias is not None \
                else None
            self.layers[name.replace(".", "_")] = layer
        self._handles: list = []

    def attach(self, backbone) -> None:
        super().attach(backbone)  # every pretrained tensor frozen
        self.detach_hooks()
        for name in self.target_names:
            hook = functools.partial(self._add_delta, name.replace(".", "_"))
            self._handles.append(backbone.model.get_submodule(name).register_forward_hook(hook))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _add_delta(self, key: str, module: nn.Linear, inputs, output: torch.Tensor) -> torch.Tensor:
        # One GEMM adds every part and the bias change: [h, 1] @ [blockdiag_i(s [B_i, B_i - B0_i]), b - b_pt]^T
        # with h = x [A_i - A0_i; A0_i]^T stacked over the parts (q, k, v of a fused qkv, or just one),
        # accumulated into the Linear's output (addmm), so the N x C_out output is read and written once
        # (the zero blocks of a fused qkv cost 2/3 of a GEMM of inner size 6r + 1, small next to C_in).
        layer = self.layers[key]
        x = inputs[0].reshape(-1, module.in_features)
        h = x @ torch.cat([part.input_factor() for part in layer.parts]).t().to(x.dtype)
        factor = torch.block_diag(*(part.output_factor() for part in layer.parts))
        if layer.bias is not None:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
            factor = torch.cat([factor, (layer.bias - module.bias)[:, None]], dim=1)
        flat = output.reshape(-1, module.out_features)
        return torch.addmm(flat, h.to(output.dtype), factor.t().to(output.dtype)).view_as(output)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """The factors and biases stand for backbone weights: they get the backbone's lr (x 0.5 by default,
        ``DEFAULT_BACKBONE_LR_MULT``) and weight decay, as the public code's ``backbone`` key gives them."""
        groups = decay_groups(self.named_parameters(), lr * backbone_lr_mult, weight_decay)
        if self.backbone.neck is not None:
            groups += decay_groups(self.backbone.neck.named_parameters(), lr, weight_decay)
        return groups

    def on_train_iteration(self, iteration: int, trainer) -> None:
        """Anneal the weight decay of every optimizer group (head included, as mmengine's scheduler does).
        A pure function of the iteration: a resumed run continues exactly."""
        if self.wd_min is None:
            return
        for group in trainer.optimizer.param_groups:
            base = group.setdefault("initial_weight_decay", group["weight_decay"])
            group["weight_decay"] = annealed_weight_decay(base, self.wd_min, iteration, trainer.total_iters)

    @torch.no_grad()
    def merge_into_backbone(self) -> None:
        """Fold W_pt + s (B A - B_0 A_0) and the trained biases into the backbone's Linears, in place;
        the method is left with no parameters and no hooks (``dgss.export.merge_method``'s contract)."""
        for name in self.target_names:
            linear = self.backbone.model.get_submodule(name)
            layer = self.layers[name.replace(".", "_")]
            delta = torch.cat([part.weight_delta() for part in layer.parts], dim=0)
            linear.weight.copy_((linear.weight.double() + delta.to(linear.weight.device)).to(linear.weight.dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        self.detach_hooks()
        self.layers = nn.ModuleDict()


def build_soma(cfg, backbone) -> SoMA:
    """``METHODS["soma"]``: from ``cfg.soma`` (a :class:`dgss.config.SoMAConfig`)."""
    o = cfg.soma
    return SoMA(backbone, rank=o.rank, alpha=o.alpha, targets=tuple(o.targets), start_block=o.start_block,
                train_bias=o.train_bias, components=o.components, wd_min=o.wd_min, svd_dtype=o.svd_dtype)
