"""VPT-deep (Jia et al., ECCV 2022): learnable prompt tokens prepended before every layer, dropped after it.

Before block l the sequence [prefix, patches] (prefix: class + register tokens) becomes
[prefix, P_l, patches] with P_l the layer's T prompts (B x T x C, shared over the batch); after the block
the T prompt outputs are dropped, so block l + 1 sees new prompts P_{l+1} and every feature the head
takes has the original length. The prompts change the patches only through attention.

Equivalence that defines "unused": with T = 0 the backbone is the frozen one, bit for bit; and a block
whose attention could not see the prompts would return the patches unchanged (tests check both, and
compare with an explicit prepend/drop loop).

RoPE backbones (EVA02, DINOv3) rotate the tokens after the prefix by their grid position; a prompt has
no position, so the block's ``rope`` argument gets T identity rows (sin 0, cos 1) for the prompts.
SAM's blocks work on a B x H x W x C grid with windowed attention, where no token can be prepended:
VPT is refused there, as for CNNs.

Defaults: 150 prompts per layer (as the Rein authors used; 24 x 150 x 1024 = 3,686,400 parameters on
DINOv2-L, the 3.69M of their table), VPT's Xavier-uniform init U(-v, v), v = sqrt(6 / (3 p^2 + C)).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .base import TuningMethod, require_token_backbone

__all__ = ["VPT", "build_vpt", "insert_prompts", "drop_prompts", "rope_with_prompts"]


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """B x N x C, T x C -> B x (N + T) x C with the prompts right after the prefix tokens."""
    batch = x.shape[0]
    prompts = prompts.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
    return torch.cat([x[:, :num_prefix_tokens], prompts, x[:, num_prefix_tokens:]], dim=1)


def drop_prompts(x: torch.Tensor, num_prompts: int, num_prefix_tokens: int) -> torch.Tensor:
    """B x (N + T) x C -> B x N x C, the inverse of :func:`insert_prompts`."""
    return torch.cat([x[:, :num_prefix_tokens], x[:, num_prefix_tokens + num_prompts:]], dim=1)


def rope_with_prompts(rope: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """timm's RoPE tensor (... x N_patches x 2D, sin then cos) with ``num_prompts`` identity rows first."""
    sin_half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(*rope.shape[:-2], num_prompts, sin_half),
                          rope.new_ones(*rope.shape[:-2], num_prompts, rope.shape[-1] - sin_half)], dim=-1)
    return torch.cat([identity, rope], dim=-2)


class VPT(TuningMethod):
    """``prompts``: L x T x C, one row of T prompts per block; the backbone is frozen, in eval mode."""

    name = "vpt"

    def __init__(self, backbone, *, num_tokens: int = 150, init: str = "xavier", dropout: float = 0.0) -> None:
        super().__init__()
        require_token_backbone(backbone, self.name, layouts=("nlc",))
        if num_tokens < 0:
            raise ValueError(f"method.vpt.num_tokens must be >= 0, got {num_tokens}")
        self.num_tokens = num_tokens
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.prompts = nn.Parameter(torch.zeros(len(backbone.blocks), num_tokens, backbone.embed_dim))
        if init == "xavier":
            bound = math.sqrt(6.0 / (3 * backbone.patch_size**2 + backbone.embed_dim))
            nn.init.uniform_(self.prompts, -bound, bound)
        elif init != "zeros":
            raise ValueError(f"method.vpt.init must be 'xavier' or 'zeros', got {init!r}")
        self.prompt_dropout = nn.Dropout(dropout)
        self._handles: list = []

    def attach(self, backbone) -> None:
        super().attach(backbone)
        self.detach_hooks()
        if self.num_tokens == 0:
            return  # nothing to prepend: exactly the frozen backbone
        for i, block in enumerate(backbone.blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._prepend, i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._drop))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _prepend(self, i: int, module, args, kwargs):
        # Pure functions of the inputs and the parameters: activation checkpointing may re-run them.
        x, *rest = args
        x = insert_prompts(x, self.prompt_dropout(self.prompts[i]), self.num_prefix_tokens)
        if kwargs.get("rope") is not None:
            kwargs = {**kwargs, "rope": rope_with_prompts(kwargs["rope"], self.num_tokens)}
        return (x, *rest), kwargs

    def _drop(self, module, args, output: torch.Tensor) -> torch.Tensor:
        return drop_prompts(output, self.num_tokens, self.num_prefix_tokens)


def build_vpt(cfg, backbone) -> VPT:
    """``METHODS["vpt"]``: from ``cfg.vpt`` (a :class:`VPTConfig`)."""
    return VPT(backbone, num_tokens=cfg.vpt.num_tokens, init=cfg.vpt.init, dropout=cfg.vpt.dropout)
