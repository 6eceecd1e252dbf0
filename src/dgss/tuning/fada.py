"""FADA (Bi, Yi et al., NeurIPS 2024, "Learning Frequency-Adapted Vision Foundation Model for Domain
Generalized Semantic Segmentation"; public code github JingjunYi/FADA, a fork of Rein's): Rein's tokens
applied to a Haar wavelet split of every layer's features (docs/methods/fada.md).

After each backbone block, with f the N patch tokens of width C and c = C / 4 (file:line below is
rein/models/backbones/reins.py of the public code at b83bbc0):

    LL, LH, HL, HH = four depthwise 2 x 2 stride-2 filters of f (the Haar kernels, 279-331)
    x_low  = LL                                  N x c    content      (153)
    x_high = [LH, HL, HH]                        N x 3c   style        (154)
    d_low  = rein(x_low,  T_low,  mlp_token2feat,  mlp_delta_f)        (187-203)
    d_high = rein(x_high, T_high, mlp_token2feat2, mlp_delta_f2, IN)   (220-233)
    f'     = f + scale * [d_low, d_high]                               (168, 179-180)

    rein(x, T, m1, m2) = m2(softmax(x T^T / sqrt(C))[:, 1:] m1(T[1:]) + x)

rein.md's refinement on each band, with the softmax temperature of the full width C in both branches
(``self.embed_dims ** -0.5``, 190 and 224) and, in the style branch only, the logits instance-normalised
over the M tokens before the softmax (``F.instance_norm``, 222). T_low = A B (L x M x r, L x r x c) and
T_high = A2 B2 (L x M x r, L x r x 3c), LoRA tokens as Rein's (341-387). The head's queries come from the
low-frequency tokens alone, by Rein's link (``return_auto``, 85-97, ``transform`` Linear(c, Q)).

How the bands are laid out on the tokens (``method.fada.layout``):

* ``public_code`` (the default: it produced every published FADA number). The (N, B, C) features are
  ``reshape``d, not transposed, to (B, C, h, w) (149) and each band back by ``reshape(B, N, c)`` and
  ``reshape(N, B, c)`` (152-154). The "image" the wavelet sees is then the flat memory of the features:
  map m holds the values m N ... m N + N - 1 of the (N, B, C) tensor, i.e. consecutive channels of
  consecutive tokens. When 2w divides C, every 2 x 2 cell lies inside one token's channels and a token's
  band values land in its own slot: the transform is a Haar transform of each token's C channels laid
  out as a (C / w) x w image (channel k at row k // w, column k % w), and no token sees another. That is
  the published setting (DINOv2-L at 512: w = 32, C = 1024, a 32 x 32 channel image per token) and
  1024 crops (w = 64). At other shapes cells straddle neighbouring tokens, and images of a batch.
* ``paper``: the transform the paper describes, of the spatial token map (a transpose to B x C x h x w).
  Each band has C channels on the h/2 x w/2 grid of 2 x 2 cells; the paper leaves open how it returns to
  N tokens of width c, and dgss spreads each cell's C coefficients over the cell's four tokens
  (depth-to-space, ``pixel_shuffle``: token (2i + di, 2j + dj) gets channels 4k + 2di + dj, k < c, of
  cell (i, j)), so every token's delta comes from its own cell and the parameters are the public code's.

The grid (h, w) is the patch grid of the current input, recorded by a pre-hook on the patch embedding
(the public code takes h = w = sqrt(N), 147-148: the same for its square 512 crops; non-square inputs
make it fail, dgss uses their real grid). An odd side (the public code fails there too) is padded by
repeating the last row or column of tokens, and the padded tokens' deltas are dropped.

The four wavelet filters are parameters the public code trains: ``WavePool`` sets them
``requires_grad=False`` (313-316), but the backbone's ``train()`` (reins_dinov2.py:36-40) makes every
parameter whose name contains "reins" trainable (utils.py:9-22), so ``reins.wavepool.*.weight`` enter
the optimizer (peft_optimizer_constructor.py:51-52, 150) at lr 1e-4 with weight decay 0.05 (no custom
key of the config matches them) and its log counts them. ``method.fada.train_wavelet: false`` keeps them
the fixed Haar kernels the paper describes.

Trainable parameters on DINOv2-L (C = 1024, c = 256, L = 24, M = 100, r = 16, Q = 256): tokens
38,400 + 98,304 (low) + 38,400 + 294,912 (high), scale 1, MLPs 2 x 65,792 + 2 x 590,592, wavelet
4 x 4,096, transform 65,792, merge 196,864: 2,061,825 (2,045,441 with frozen filters).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import require_token_backbone
from .rein import TOKEN_INIT_PATCH_SIZE, Rein, Reins, refine_in_layout, token_init_bound

__all__ = ["LAYOUTS", "haar_kernels", "HaarWavePool", "FrequencyReins", "FADA", "build_fada"]

LAYOUTS = ("public_code", "paper")
BANDS = ("LL", "LH", "HL", "HH")
# F.instance_norm's default eps, which the public code's style branch uses (reins.py:222)
INSTANCE_NORM_EPS = 1e-5


def haar_kernels() -> dict[str, torch.Tensor]:
    """The four 2 x 2 Haar kernels (applied by cross-correlation, stride 2): outer products of
    L = [1, 1] / sqrt(2) and H = [-1, 1] / sqrt(2), rows first (reins.py:281-288). On a cell
    [[a, b], [c, d]]: LL = (a + b + c + d) / 2, LH = (b + d - a - c) / 2 (right minus left columns),
    HL = (c + d - a - b) / 2 (bottom minus top rows), HH = (a + d - b - c) / 2 (the diagonals)."""
    low = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    high = torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    rows_cols = {"LL": (low, low), "LH": (low, high), "HL": (high, low), "HH": (high, high)}
    return {name: torch.outer(rows, cols).float() for name, (rows, cols) in rows_cols.items()}


class _Kernel(nn.Module):
    """Holds one band's depthwise filter as ``weight`` (C x 1 x 2 x 2), the public code's Conv2d weight
    name (``wavepool.LL.weight``): a parameter when it trains, a buffer when it is the fixed kernel."""

    def __init__(self, weight: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)


class HaarWavePool(nn.Module):
    """Four depthwise 2 x 2 stride-2 filters of every channel, starting as the Haar analysis:
    B x C x h x w -> B x C x 4 x h/2 x w/2 (bands in the order LL, LH, HL, HH)."""

    def __init__(self, channels: int, *, trainable: bool = True) -> None:
        super().__init__()
        self.channels = channels
        for name, kernel in haar_kernels().items():
            setattr(self, name, _Kernel(kernel.expand(channels, 1, 2, 2).clone(), trainable))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        b, _, h, w = maps.shape
        c = self.channels  # a Python int, so that an exported graph knows the kernel's shape
        # one grouped convolution: output channel 4k + band reads input channel k
        weight = torch.stack([getattr(self, name).weight for name in BANDS], dim=1).reshape(4 * c, 1, 2, 2)
        bands = F.conv2d(maps, weight.to(maps.dtype), stride=2, groups=c)
        return bands.view(b, c, 4, h // 2, w // 2)


class FrequencyReins(Reins):
    """FADA's parameters for L layers of width C, under the public code's names (``backbone.reins.*``).

    Inherited from :class:`~dgss.tuning.rein.Reins` at width c = C / 4: the low-frequency (content)
    tokens ``learnable_tokens_a`` / ``_b`` (or plain ``learnable_tokens``), ``scale``,
    ``mlp_token2feat`` and ``mlp_delta_f`` Linear(c, c), ``transform`` Linear(c, Q), ``merge`` and the
    query link. Added: the high-frequency (style) tokens ``learnable_tokens_a2`` / ``_b2`` (or
    ``learnable_tokens2``) of width 3c, ``mlp_token2feat2`` and ``mlp_delta_f2`` Linear(3c, 3c), and
    ``wavepool.{LL,LH,HL,HH}.weight`` (C x 1 x 2 x 2).
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
        layout: str = "public_code",
        train_wavelet: bool = True,
        init_patch_size: int = TOKEN_INIT_PATCH_SIZE,
    ) -> None:
        if embed_dim % 4:
            raise ValueError(f"FADA splits the width C into C/4 + 3C/4: C = {embed_dim} is not a multiple of 4")
        if layout not in LAYOUTS:
            raise ValueError(f"method.fada.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        content = embed_dim // 4
        style = 3 * content
        super().__init__(num_layers, content, num_tokens=num_tokens, lora_rank=lora_rank, query_dim=query_dim,
                         scale_init=scale_init, init_patch_size=init_patch_size)
        self.full_dim = embed_dim  # C: the softmax temperature of both branches (self.embed_dim is c)
        self.layout = layout
        if lora_rank is None:
            # plain tokens: U(-v, v) with the branch's own width (reins.py:53-65, 69)
            self.learnable_tokens2 = nn.Parameter(torch.empty(num_layers, num_tokens, style))
            nn.init.uniform_(self.learnable_tokens2, *_symmetric(token_init_bound(style, None, init_patch_size)))
        else:
            # LoRA tokens: the content pair's bound uses the full width C (reins.py:350-358, self.embed_dims),
            # the style pair's its own 3c (367-375)
            low_bound = token_init_bound(embed_dim, lora_rank, init_patch_size)
            nn.init.uniform_(self.learnable_tokens_a, -low_bound, low_bound)
            nn.init.uniform_(self.learnable_tokens_b, -low_bound, low_bound)
            self.learnable_tokens_a2 = nn.Parameter(torch.empty(num_layers, num_tokens, lora_rank))
            self.learnable_tokens_b2 = nn.Parameter(torch.empty(num_layers, lora_rank, style))
            high = _symmetric(token_init_bound(style, lora_rank, init_patch_size))
            nn.init.uniform_(self.learnable_tokens_a2, *high)
            nn.init.uniform_(self.learnable_tokens_b2, *high)
        self.mlp_token2feat2 = nn.Linear(style, style)
        self.mlp_delta_f2 = nn.Linear(style, style)
        nn.init.kaiming_uniform_(self.mlp_token2feat2.weight, a=math.sqrt(5))  # reins.py:70-71
        nn.init.kaiming_uniform_(self.mlp_delta_f2.weight, a=math.sqrt(5))
        self.wavepool = HaarWavePool(embed_dim, trainable=train_wavelet)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_dim={self.full_dim}, layout={self.layout}"

    def style_tokens(self, layer: Optional[int] = None) -> torch.Tensor:
        """T_high = A2_l B2_l (M x 3c) for one layer, or all layers (L x M x 3c) when ``layer`` is None."""
        if self.lora_rank is None:
            return self.learnable_tokens2 if layer is None else self.learnable_tokens2[layer]
        if layer is None:
            return self.learnable_tokens_a2 @ self.learnable_tokens_b2
        return self.learnable_tokens_a2[layer] @ self.learnable_tokens_b2[layer]

    def refine(self, feats: torch.Tensor, layer: int, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """f' = f + scale * [d_low, d_high] for the patch tokens f (B x N x C, row-major on the h x w
        ``grid``; None: the public code's square grid h = w = sqrt(N))."""
        b, n, c = feats.shape
        h, w = _checked_grid(grid, n)
        padded = _pad_to_even(feats, h, w)
        low, high = self.bands(padded, (h + h % 2, w + w % 2))
        delta_low = self._branch(low, self.tokens(layer), self.mlp_token2feat, self.mlp_delta_f, normalize=False)
        delta_high = self._branch(high, self.style_tokens(layer), self.mlp_token2feat2, self.mlp_delta_f2,
                                  normalize=True)
        delta = torch.cat([delta_low, delta_high], dim=-1)
        if padded is not feats:
            delta = delta.view(b, h + h % 2, w + w % 2, c)[:, :h, :w].reshape(b, n, c)
        return feats + self.scale * delta

    def bands(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_low B x N x c, x_high B x N x 3c) of the tokens ``feats`` (B x N x C) on an even h x w grid."""
        b, n, c = feats.shape
        h, w = grid
        quarter = c // 4
        if self.layout == "public_code":
            # reins.py:120 makes the features N x B x C; 149 reshapes that memory to B x C x h x w
            maps = feats.transpose(0, 1).reshape(b, c, h, w)
            bands = self.wavepool(maps)  # B x C x 4 x h/2 x w/2
            # 152-154: each band read back as B x N x c, then as N x B x c; the style bands concatenated
            # while B x N x c, then read as N x B x 3c
            low = bands[:, :, 0].reshape(n, b, quarter)
            high = torch.cat([bands[:, :, k].reshape(b, n, quarter) for k in (1, 2, 3)], dim=-1)
            return low.transpose(0, 1), high.reshape(n, b, 3 * quarter).transpose(0, 1)
        maps = feats.transpose(1, 2).reshape(b, c, h, w)  # the spatial token map
        bands = self.wavepool(maps)
        per_token = [F.pixel_shuffle(bands[:, :, k], 2).flatten(2).transpose(1, 2) for k in range(4)]  # B x N x c
        return per_token[0], torch.cat(per_token[1:], dim=-1)

    def _branch(self, x: torch.Tensor, tokens: torch.Tensor, token2feat: nn.Linear, delta_f: nn.Linear, *,
                normalize: bool) -> torch.Tensor:
        """rein.md's refinement of one band x (B x N x d) with tokens (M x d), before the scale."""
        logits = x @ tokens.t()  # B x N x M
        if normalize:
            # F.instance_norm of the public code's N x B x M logits: per token and image, over the M tokens,
            # biased variance. Written out because ONNX cannot export instance_norm over a dynamic batch;
            # in float32, as autocast runs instance_norm
            wide = logits.float()
            mean, var = wide.mean(dim=-1, keepdim=True), wide.var(dim=-1, unbiased=False, keepdim=True)
            logits = ((wide - mean) * torch.rsqrt(var + INSTANCE_NORM_EPS)).to(logits.dtype)
        attention = torch.softmax(logits * self.full_dim**-0.5, dim=-1)
        # token 0 is in the softmax but gives no value: Rein's sink (rein.md)
        delta_bar = attention[..., 1:] @ token2feat(tokens[1:])
        return delta_f(delta_bar + x)


def _symmetric(bound: float) -> tuple[float, float]:
    return -bound, bound


def _checked_grid(grid: Optional[tuple[int, int]], n: int) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"FADA needs the token grid: {n} tokens are not a square grid and none was recorded")
        return side, side
    h, w = int(grid[0]), int(grid[1])
    if h * w != n:
        raise ValueError(f"FADA's token grid {h} x {w} does not hold the block's {n} patch tokens")
    return h, w


def _pad_to_even(feats: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Repeat the last row / column of the h x w token grid where a side is odd (B x N' x C)."""
    if h % 2 == 0 and w % 2 == 0:
        return feats
    grid = feats.view(feats.shape[0], h, w, feats.shape[-1])
    if h % 2:
        grid = torch.cat([grid, grid[:, -1:]], dim=1)
    if w % 2:
        grid = torch.cat([grid, grid[:, :, -1:]], dim=2)
    return grid.reshape(feats.shape[0], -1, feats.shape[-1])


class FADA(Rein):
    """The FADA tuning method: Rein's placement, freezing, optimizer groups and query link, with a
    :class:`FrequencyReins` after every block. ViTs (and SAM's global blocks) only: the public code has
    no CNN variant (its ``WavePool(1024)`` fits DINOv2-L's width alone)."""

    name = "fada"

    def __init__(
        self,
        backbone,
        *,
        num_tokens: int = 100,
        lora_rank: Optional[int] = 16,
        query_dim: int = 256,
        scale_init: float = 1e-3,
        lr_mult: float = 1.0,
        layout: str = "public_code",
        train_wavelet: bool = True,
    ) -> None:
        require_token_backbone(backbone, "fada")
        super().__init__(backbone, num_tokens=num_tokens, lora_rank=lora_rank, query_dim=query_dim,
                         scale_init=scale_init, lr_mult=lr_mult)
        (site,) = self.sites  # a ViT (or SAM) has one site
        self.reins = FrequencyReins(len(site.block_indices), site.channels, num_tokens=num_tokens,
                                    lora_rank=lora_rank, query_dim=query_dim, scale_init=scale_init,
                                    layout=layout, train_wavelet=train_wavelet)
        self._grid: Optional[tuple[int, int]] = None

    def attach(self, backbone) -> None:
        """Rein's attachment, plus a pre-hook on the patch embedding that records the token grid."""
        super().attach(backbone)
        if backbone.token_layout == "nlc":
            self._hook_handles.append(backbone.model.patch_embed.register_forward_pre_hook(self._record_grid))

    def _record_grid(self, patch_embed: nn.Module, args) -> None:
        # Read by every block hook of this forward (and by its re-runs under activation checkpointing,
        # which happen before the next forward records another grid).
        size = tuple(args[0].shape[-2:])
        feat_size: Callable = getattr(patch_embed, "dynamic_feat_size", None)
        self._grid = tuple(feat_size(size)) if feat_size is not None else tuple(patch_embed.grid_size)

    def _refine_block_output(self, group: int, layer: int, module, inputs, output: torch.Tensor) -> torch.Tensor:
        grid = tuple(output.shape[1:3]) if self.token_layout == "nhwc" else self._grid
        refine = functools.partial(self.reins.refine, layer=layer, grid=grid)
        return refine_in_layout(refine, output, self.token_layout, self.num_prefix_tokens)


def build_fada(cfg, backbone) -> FADA:
    """``METHODS["fada"]``: a FADA sized for ``backbone`` from ``cfg.fada`` (a :class:`dgss.config.FADAConfig`)."""
    fada = cfg.fada
    return FADA(backbone, num_tokens=fada.num_tokens, lora_rank=fada.lora_rank, query_dim=fada.query_dim,
                scale_init=fada.scale_init, lr_mult=fada.lr_mult, layout=fada.layout,
                train_wavelet=fada.train_wavelet)
