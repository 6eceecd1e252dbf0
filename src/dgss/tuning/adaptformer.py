"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck adapter parallel to every block's MLP.

For the MLP branch of block l, with x' the block's stream after attention,

    x_l = x' + MLP(LN(x')) + s * up(ReLU(down(LN(x'))))

(the adapter reads the same normalised input as the MLP; ``s`` is a fixed scale, 0.1). ``up`` starts
at zero, so training starts exactly at the frozen model. Defaults (bottleneck 64, s = 0.1) are
AdaptFormer's; on DINOv2-L that is 24 x (1024 x 64 + 64 + 64 x 1024 + 1024) = 3,171,840 parameters,
the 3.17M of the AdaptFormer row in Rein's and FisherTune's tables.

Two hooks per block put it in without touching timm's modules or state-dict keys: one on ``norm2``
keeps LN(x'), one on ``drop_path2`` (the last module of the MLP branch in timm's ViT, EVA and SAM
blocks, after the layer scale) adds the adapter's output. So the adapter is not multiplied by the
pretrained layer scale, as in the formula.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import TuningMethod, require_token_backbone

__all__ = ["Adapter", "AdaptFormer", "build_adaptformer"]


class Adapter(nn.Module):
    """down (C -> b), ReLU, dropout, up (b -> C) times ``scale``: B x N x C -> B x N x C."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale  # fixed, not learned
        # AdaptFormer's init: down as LoRA's A (Kaiming uniform), up and the biases zero.
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


class AdaptFormer(TuningMethod):
    """One :class:`Adapter` per block (``adapters.<i>``); the backbone is frozen and in eval mode."""

    name = "adaptformer"

    def __init__(self, backbone, *, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        require_token_backbone(backbone, self.name)
        self.adapters = nn.ModuleList(
            Adapter(backbone.embed_dim, bottleneck, scale, dropout) for _ in backbone.blocks)
        self._handles: list = []
        self._mlp_inputs: dict[int, torch.Tensor] = {}

    def attach(self, backbone) -> None:
        super().attach(backbone)
        self.detach_hooks()
        for i, block in enumerate(backbone.blocks):
            self._handles.append(block.norm2.register_forward_hook(functools.partial(self._keep_mlp_input, i)))
            self._handles.append(block.drop_path2.register_forward_hook(functools.partial(self._add_adapter, i)))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_mlp_input(self, i: int, module, inputs, output) -> None:
        # Overwritten on every pass (a re-run under activation checkpointing stores the same tensor).
        self._mlp_inputs[i] = output

    def _add_adapter(self, i: int, module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapters[i](self._mlp_inputs.pop(i))


def build_adaptformer(cfg, backbone) -> AdaptFormer:
    """``METHODS["adaptformer"]``: sized from ``cfg.adaptformer`` (a :class:`AdaptFormerConfig`)."""
    options = cfg.adaptformer
    return AdaptFormer(backbone, bottleneck=options.bottleneck, scale=options.scale, dropout=options.dropout)
