"""Visual Query Tuning (Tu et al., CVPR 2023): learnable query tokens read every frozen layer.

Block l gets T query tokens Q_l (T x C). They go through the block's own modules as tokens that
*attend* to the layer's input tokens (keys and values from the main stream) but are never attended
to: the main stream, and with it every feature the backbone hands on, is exactly the frozen
backbone's. The query outputs (B x T x C per layer) summarise what each layer sees, and only they
carry gradient, so the backbone runs without keeping activations (VQT's memory saving): the method
says ``backbone_requires_grad = False`` and computes the query path under ``enable_grad``.

    o_l = Q_l + ls1(proj(softmax(q(LN1 Q_l) k(LN1 x_l)^T / sqrt(d)) v(LN1 x_l)))
    o_l = o_l + ls2(MLP(LN2 o_l))

The keys and values are recomputed from the block's input with the block's own projections (and
RoPE for EVA02 / DINOv3: the query tokens have no position, the patch keys are rotated as the block
does). SAM: the queries attend to the whole grid of each block (windowed or global); relative
position biases do not apply to position-free queries.

How the query outputs feed the head (VQT classifies from their concatenation; a dense head needs
maps, and this choice is dgss's): the layers up to and including ``out_indices[k]`` (after the
previous level's) belong to pyramid level k. Their query outputs are layer-normalised, combined with
learned weights (one per layer and token) into one C-vector per image, and mapped by a linear layer
to the level's channels; the result is added at every position of level k's map. This is the same
as concatenating the summary to every position as extra channels and projecting back with a 1 x 1
convolution whose block on the original channels is the identity. The linear layers start at zero,
so training starts at the frozen model's features.

Default T = 10 query tokens per layer: VQT tunes T per task among small numbers; neither Rein nor
FisherTune states the value behind their VQT rows, so this is dgss's choice.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import TuningMethod, require_token_backbone

__all__ = ["VQT", "build_vqt", "query_block_outputs", "level_layers"]


def level_layers(out_indices: tuple[int, ...]) -> list[list[int]]:
    """Blocks whose queries feed each pyramid level: (out_indices[k-1], out_indices[k]]."""
    groups, start = [], 0
    for index in out_indices:
        groups.append(list(range(start, index + 1)))
        start = max(start, index + 1)
    return groups


def _project_qkv(attn: nn.Module, x: torch.Tensor):
    """q, k, v (each B x heads x N x d) of tokens x (B x N x C) with the attention's own projections."""
    batch, length, _ = x.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        if getattr(attn, "q_bias", None) is not None:  # EVA: separate q/v biases, k without one
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    split = [proj(x).reshape(batch, length, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    return tuple(split)


def _scaled(block: nn.Module, branch: int, x: torch.Tensor) -> torch.Tensor:
    """The block's layer scale of branch 1 (attention) or 2 (MLP): timm's ``ls*`` or EVA's ``gamma_*``."""
    if hasattr(block, f"ls{branch}"):
        return getattr(block, f"ls{branch}")(x)
    gamma = getattr(block, f"gamma_{branch}", None)
    return x if gamma is None else gamma * x


def query_block_outputs(block: nn.Module, x: torch.Tensor, queries: torch.Tensor, *, rope: Optional[torch.Tensor] = None,
                        num_prefix_tokens: int = 0) -> torch.Tensor:
    """Outputs (B x T x C) of query tokens (T x C) passed through ``block`` while reading, never
    changing, its input tokens ``x`` (B x N x C, or SAM's B x H x W x C)."""
    from timm.layers import apply_rot_embed_cat

    tokens = x.flatten(1, 2) if x.dim() == 4 else x
    attn = block.attn
    q_in = queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    _, k, v = _project_qkv(attn, block.norm1(tokens))
    normed_queries = block.norm1(q_in)
    q, _, _ = _project_qkv(attn, normed_queries)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        rotated = apply_rot_embed_cat(k[:, :, num_prefix_tokens:], rope, half=half)
        k = torch.cat([k[:, :, :num_prefix_tokens], rotated.type_as(v)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v)  # B x heads x T x d
    out = out.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)
    if isinstance(getattr(attn, "norm", None), nn.Module):
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(normed_queries).sigmoid()
    y = q_in + _scaled(block, 1, attn.proj(out))
    return y + _scaled(block, 2, block.mlp(block.norm2(y)))


class VQT(TuningMethod):
    """Query tokens ``queries`` (L x T x C, L = blocks up to the last out index), per level a LayerNorm
    ``norms.<k>``, token weights ``weights.<k>`` (L_k x T) and a zero-initialised ``to_features.<k>``."""

    name = "vqt"
    backbone_requires_grad = False  # only the query path needs gradients (computed under enable_grad)

    def __init__(self, backbone, *, num_tokens: int = 10) -> None:
        super().__init__()
        require_token_backbone(backbone, self.name)
        if num_tokens < 1:
            raise ValueError(f"method.vqt.num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.groups = level_layers(backbone.out_indices)
        dim = backbone.embed_dim
        self.queries = nn.Parameter(torch.empty(max(backbone.out_indices) + 1, num_tokens, dim))
        bound = math.sqrt(6.0 / (3 * backbone.patch_size**2 + dim))  # VPT's prompt init
        nn.init.uniform_(self.queries, -bound, bound)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.groups)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.full((len(g), num_tokens), 1.0 / max(len(g) * num_tokens, 1))) for g in self.groups)
        self.to_features = nn.ModuleList(nn.Linear(dim, channels) for channels in backbone.channels)
        for linear in self.to_features:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self._handles: list = []
        self._outputs: dict[int, torch.Tensor] = {}

    def attach(self, backbone) -> None:
        super().attach(backbone)
        self.detach_hooks()
        for i in range(self.queries.shape[0]):
            hook = functools.partial(self._read_layer, i)
            self._handles.append(backbone.blocks[i].register_forward_hook(hook, with_kwargs=True))
        self._handles.append(backbone.register_forward_pre_hook(self._new_pass))
        self._handles.append(backbone.register_forward_hook(self._feed_features))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _grad_context(self):
        # Training: gradients for the query path even inside the segmentor's no_grad backbone pass.
        return torch.enable_grad() if self.training else torch.no_grad()

    def _new_pass(self, module, args) -> None:
        self._outputs = {}

    def _read_layer(self, i: int, block, args, kwargs, output) -> None:
        # Returns None: the block's output (the main stream) is left exactly as it is. Keyed by layer, so
        # a re-run under activation checkpointing stores the same value again.
        x = args[0].detach()
        with self._grad_context():
            self._outputs[i] = query_block_outputs(block, x, self.queries[i], rope=kwargs.get("rope"),
                                                   num_prefix_tokens=self.num_prefix_tokens)

    def summaries(self) -> list[Optional[torch.Tensor]]:
        """Per pyramid level, the weighted sum of its layers' normalised query outputs (B x C)."""
        out = []
        for k, layers in enumerate(self.groups):
            if not layers:
                out.append(None)
                continue
            stacked = torch.stack([self._outputs[i] for i in layers], dim=1)  # B x L_k x T x C
            out.append((self.norms[k](stacked) * self.weights[k][None, :, :, None]).sum(dim=(1, 2)))
        return out

    def _feed_features(self, module, args, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._grad_context():
            fed = []
            for k, (feat, summary) in enumerate(zip(feats, self.summaries())):
                if summary is not None:
                    feat = feat + self.to_features[k](summary).to(feat.dtype)[:, :, None, None]
                fed.append(feat)
        self._outputs = {}
        return fed


def build_vqt(cfg, backbone) -> VQT:
    """``METHODS["vqt"]``: from ``cfg.vqt`` (a :class:`VQTConfig`)."""
    return VQT(backbone, num_tokens=cfg.vqt.num_tokens)
