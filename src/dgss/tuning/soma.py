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

Two starting points (``method.soma.init``):

* ``paper`` (the default): the factors are the pretrained weights' minor components and the residual
  W - s B_0 A_0 is frozen, so training starts exactly at the pretrained model, as the paper describes.
* ``public_code``: what the authors' code actually ran (github ysj9909/SoMA at 7ea8c0e). It builds its
  adapters before any pretrained weight exists: ``PEFTBackboneEncoderDecoder.__init__``
  (rein/models/segmentors/frozen_encoder_decoder.py, lines 41-49) wraps the freshly constructed ViT in
  ``SoraModel`` (rein/peft/sora.py), whose ``_find_and_replace`` (lines 63-96) puts its Linear subclass,
  holding the same weight tensor, in place of every targeted layer and calls ``sora_init`` (lines
  187-230): a float32 SVD of that weight, A and B from its r smallest triplets (lines 205-209 and
  222-225), and the weight replaced by W - s B A (lines 228-230). That ViT (rein/models/backbones/
  dino_v2.py, ``DinoVisionTransformer.__init__``, lines 56-181) applies no initialisation of its own:
  unlike Meta's DINOv2 code it has no ``init_weights`` with truncated normals (the file defines
  ``named_apply`` at line 29 and never calls it), so its q, k, v, proj (dino_layers/attention.py, lines
  52-57) and fc1, fc2 (dino_layers/mlp.py, lines 29 and 31) hold PyTorch's ``nn.Linear`` default,
  kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)). mmengine's
  ``Runner.train()`` then calls ``init_weights()``, which reaches the ViT through ``SoraModel.__getattr__``
  (sora.py, lines 143-147) and loads the converted DINOv2 file (the ``Pretrained`` init_cfg of
  configs/_base_/models/dinov2_mask2former.py, lines 28-31) with strict=False. The wrapper subclasses
  nn.Linear, so the key names match and the load overwrites the residual with the plain pretrained W,
  leaving A and B the minor components of the *random* weights: every published SoMA number was
  trained from W + s B A_random (at ViT-L shapes ||s B A||_2 is about 0.015 for q/k/v/proj, 0.62 for
  fc1 and 0.31 for fc2). dgss reproduces that arithmetic: a generator seeded with ``init_seed`` draws
  each targeted weight as a freshly built nn.Linear draws it (its weight, then its bias, layer after
  layer in the public code's order: per block q, k, v, proj, fc1, fc2; a fused qkv as three Linears),
  the factors are that draw's minor components, and nothing is subtracted from the pretrained weight:
  the hook adds s B A and no B_0, A_0 buffers exist. The authors' exact random tensors (their seed 42
  and every earlier draw of their constructor, a float32 LAPACK SVD) are not reproduced, only their
  distribution.

Defaults, from the public code (github ysj9909/SoMA, configs/sora/sora_dinov2-L_mask2former.py and
rein/peft/sora.py): r = 16, alpha = r (s = 1), exact SVD, targets q, k, v, proj, fc1, fc2 of blocks 8-23
(``start_lora_idx = 8``: the first 8 blocks stay frozen), the biases of those layers trained too
(``bias="all"``), lr x 0.5 on all of it (``custom_keys backbone lr_mult 0.5``), weight decay 0.05
annealed to 1e-5 by a cosine over the 40k iterations (``CosineAnnealingParamScheduler`` on
``weight_decay``, every optimizer group). On DINOv2-L: 16 x 294,912 factor entries + 16 x 9,216 biases
= 4,866,048 trainable parameters.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional

import torch
from torch import nn

from .base import TuningMethod, decay_groups, require_token_backbone
from .lora import TARGETS

__all__ = ["SoMA", "MinorComponents", "build_soma", "singular_factors", "soma_target_names",
           "annealed_weight_decay", "public_code_start_weights", "factors_loaded_later", "INITS"]

INITS = ("paper", "public_code")
_decompose = [True]  # False inside factors_loaded_later()


@contextlib.contextmanager
def factors_loaded_later() -> Iterator[None]:
    """Build SoMA with zero factors of the right shapes instead of decomposing any weight, for a caller
    that loads every factor right after (e.g. a released file): saves the SVDs, minutes on a CPU for a ViT-L."""
    _decompose.append(False)
    try:
        yield
    finally:
        _decompose.pop()


def public_code_start_weights(shapes: list[tuple[int, int]], has_bias: bool, generator: torch.Generator
                              ) -> list[torch.Tensor]:
    """The weights (float32, CPU) that freshly built ``nn.Linear(in, out, bias=has_bias)`` layers of these
    (out, in) shapes get, built one after another from ``generator``: PyTorch's default, kaiming-uniform
    with a = sqrt(5), then the bias draw, which only advances the stream."""
    weights = []
    for out_features, in_features in shapes:
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if has_bias:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(torch.empty(out_features), -bound, bound, generator=generator)
        weights.append(weight)
    return weights


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
    """What one weight (a Linear's, or q, k or v of a fused qkv) gets added: ``a``, ``b`` train.

    ``paper`` init (``frozen_start``): s (B A - B_0 A_0), ``a_init``, ``b_init`` (saved with the method)
    standing for the frozen residual W - s B_0 A_0; applied to x as (x [A - A_0; A_0]^T) (s [B, B - B_0])^T,
    two thin matrices (see the hook). ``public_code`` init: s B A, the residual being the plain pretrained
    weight; ``a_init`` and ``b_init`` are None. ``weight`` is the matrix whose minor (or principal)
    components start A and B."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, *, principal: bool = False,
                 dtype: torch.dtype = torch.float64, frozen_start: bool = True) -> None:
        super().__init__()
        if _decompose[-1]:
            a, b = singular_factors(weight, rank, scaling, principal=principal, dtype=dtype)
        else:  # factors_loaded_later(): shapes only
            if not 1 <= rank <= min(weight.shape):
                raise ValueError(f"method.soma.rank must be in [1, {min(weight.shape)}] for a "
                                 f"{tuple(weight.shape)} weight, got {rank}")
            a = weight.new_zeros(rank, weight.shape[1])
            b = weight.new_zeros(weight.shape[0], rank)
        self.scaling = scaling
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.register_buffer("a_init", a.clone() if frozen_start else None)
        self.register_buffer("b_init", b.clone() if frozen_start else None)

    def input_factor(self) -> torch.Tensor:
        """[A - A_0; A_0] (2r x C_in), or A (r x C_in) without a frozen start."""
        if self.a_init is None:
            return self.a
        return torch.cat([self.a - self.a_init, self.a_init])

    def output_factor(self) -> torch.Tensor:
        """s [B, B - B_0] (C_out x 2r), or s B (C_out x r) without a frozen start."""
        if self.b_init is None:
            return self.scaling * self.b
        return self.scaling * torch.cat([self.b, self.b - self.b_init], dim=1)

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """s (B A - B_0 A_0), or s B A, in float64: what folding adds to the pretrained weight."""
        delta = self.b.double() @ self.a.double()
        if self.a_init is not None:
            delta -= self.b_init.double() @ self.a_init.double()
        return self.scaling * delta


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
                 svd_dtype: str = "float64", init: str = "paper", init_seed: int = 0) -> None:
        super().__init__()
        require_token_backbone(backbone, self.name)
        if rank < 1:
            raise ValueError(f"method.soma.rank must be >= 1, got {rank}")
        if components not in ("minor", "principal"):
            raise ValueError(f"method.soma.components must be 'minor' or 'principal', got '{components}'")
        if init not in INITS:
            raise ValueError(f"method.soma.init must be one of {', '.join(INITS)}, got '{init}'")
        self.rank, self.scaling, self.wd_min, self.init = rank, alpha / rank, wd_min, init
        self.target_names = soma_target_names(backbone, list(targets), start_block)
        dtype = {"float64": torch.float64, "float32": torch.float32}[svd_dtype]
        # public_code: one stream for all layers, drawn in the public code's layer order (the target order)
        generator = torch.Generator().manual_seed(init_seed) if init == "public_code" else None
        self.layers = nn.ModuleDict()  # "<module path with _>" -> parts (+ bias)
        for name in self.target_names:
            linear = backbone.model.get_submodule(name)
            # a fused qkv is three projections: each gets its own SVD (q, k, v rows, in this order)
            weights = linear.weight.chunk(3, 0) if name.endswith("attn.qkv") else (linear.weight,)
            if generator is not None and _decompose[-1] and not linear.weight.is_meta:
                drawn = public_code_start_weights([tuple(w.shape) for w in weights], linear.bias is not None, generator)
                weights = tuple(d.to(device=w.device, dtype=w.dtype) for d, w in zip(drawn, weights))
            layer = nn.Module()
            layer.parts = nn.ModuleList(MinorComponents(w, rank, self.scaling, principal=components == "principal",
                                                        dtype=dtype, frozen_start=init == "paper") for w in weights)
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
        """Fold W_pt + s (B A - B_0 A_0) (``public_code``: W_pt + s B A) and the trained biases into the
        backbone's Linears, in place; the method is left with no parameters and no hooks
        (``dgss.export.merge_method``'s contract). A second call does nothing."""
        for name in self.target_names:
            linear = self.backbone.model.get_submodule(name)
            layer = self.layers[name.replace(".", "_")]
            delta = torch.cat([part.weight_delta() for part in layer.parts], dim=0)
            linear.weight.copy_((linear.weight.double() + delta.to(linear.weight.device)).to(linear.weight.dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        self.detach_hooks()
        self.layers = nn.ModuleDict()
        self.target_names = []


def build_soma(cfg, backbone) -> SoMA:
    """``METHODS["soma"]``: from ``cfg.soma`` (a :class:`dgss.config.SoMAConfig`)."""
    o = cfg.soma
    return SoMA(backbone, rank=o.rank, alpha=o.alpha, targets=tuple(o.targets), start_block=o.start_block,
                train_bias=o.train_bias, components=o.components, wd_min=o.wd_min, svd_dtype=o.svd_dtype,
                init=o.init, init_seed=o.init_seed)
