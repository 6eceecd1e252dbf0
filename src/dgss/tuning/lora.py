"""LoRA (Hu et al., ICLR 2022) on the timm blocks, through Hugging Face ``peft``.

For each targeted projection W (C_in -> C_out) of every block:  y = W x + (alpha / r) B A dropout(x),
A: r x C_in (Kaiming uniform), B: C_out x r (zeros), so training starts at the pretrained model.

``peft.inject_adapter_in_model`` swaps each targeted ``nn.Linear`` for a peft layer holding the original
as ``base_layer`` and the factors as ``lora_A.default`` / ``lora_B.default``. dgss keeps peft's names out
of every state dict:

  * the factors are owned by the method (``method.lora.<block path with "_">.{a,b}.weight``) and taken
    out of the backbone's module tree, so ``backbone.model`` holds only pretrained tensors (all frozen:
    a model file stores LoRA + head without the backbone, and the backbone fingerprint is unchanged);
  * the peft layer's own state dict is mapped back to timm's keys (``attn.qkv.weight``, not
    ``attn.qkv.base_layer.weight``) when saving and loading.

Targets: ``qkv`` (the fused projection, or EVA's ``q_proj``/``k_proj``/``v_proj``), ``proj`` (attention
output), ``fc1`` (SwiGLU: ``fc1_g`` and ``fc1_x``), ``fc2``. Defaults (rank 8 on qkv, alpha 8, no dropout)
give 786,432 parameters on DINOv2-L, the 0.79M of the LoRA row in Rein's and FisherTune's tables.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .base import TuningMethod, decay_groups, require_token_backbone

__all__ = ["LoRA", "build_lora", "lora_target_names", "merged_weight", "TARGETS"]

# target -> the attribute paths inside one block it may name (whichever exist are used)
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "proj": ("attn.proj",),
    "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"),
    "fc2": ("mlp.fc2",),
}
_ADAPTER = "default"  # peft's adapter name; never appears in dgss keys


def _submodule(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def lora_target_names(backbone, targets: list[str]) -> list[str]:
    """Full module names (in ``backbone.model``) of the Linear layers that get LoRA."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"method.lora.targets: unknown {unknown} (choose from {', '.join(TARGETS)})")
    block_names = {id(m): n for n, m in backbone.model.named_modules()}
    names = []
    for block in backbone.blocks:
        prefix = block_names[id(block)]
        for target in targets:
            for path in TARGETS[target]:
                if isinstance(_submodule(block, path), nn.Linear):
                    names.append(f"{prefix}.{path}")
    if not names:
        raise ValueError(f"method.lora.targets {targets} match no Linear layer of '{backbone.name}'")
    return names


class LoRA(TuningMethod):
    """Low-rank updates of the targeted projections; the pretrained backbone is frozen, in eval mode."""

    name = "lora"

    def __init__(self, backbone, *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 targets: tuple[str, ...] = ("qkv",)) -> None:
        super().__init__()
        require_token_backbone(backbone, self.name)
        if rank < 1:
            raise ValueError(f"method.lora.rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_names = lora_target_names(backbone, list(targets))
        self.lora = nn.ModuleDict()  # filled by attach: "<path with _>" -> {"a": Linear, "b": Linear}
        self._peft_layers: list[nn.Module] = []

    def attach(self, backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # lazily: peft imports transformers

        if self._peft_layers:
            raise RuntimeError("this LoRA is already attached; build a new one for another backbone")
        super().attach(backbone)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                            target_modules=self.target_names)
        inject_adapter_in_model(config, backbone.model, adapter_name=_ADAPTER)
        for name in self.target_names:
            layer = backbone.model.get_submodule(name)
            pair = nn.ModuleDict({"a": layer.lora_A[_ADAPTER], "b": layer.lora_B[_ADAPTER]})
            # Move the factors (and the dropout) out of the backbone's module tree: peft's forward still
            # finds them as plain attributes, but backbone.model.parameters() / state_dict() no longer list
            # them. The method owns them instead.
            for attr in ("lora_A", "lora_B", "lora_dropout"):
                holder = layer._modules.pop(attr)
                object.__setattr__(layer, attr, holder)
            layer._register_state_dict_hook(_timm_keys_on_save)
            layer.register_load_state_dict_pre_hook(_peft_keys_on_load)
            self.lora[name.replace(".", "_")] = pair
            self._peft_layers.append(layer)
        for param in self.lora.parameters():
            param.requires_grad_(True)
        for param in backbone.model.parameters():  # peft may leave flags as it found them; make sure
            param.requires_grad_(False)

    def trainable_backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())  # the pretrained tensors never train; the factors are the method's own

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """The factors stand for updates of backbone weights: lr x ``backbone_lr_mult`` (1.0 by default,
        the factors at the head's lr), as SoMA's factors and FisherTune's delta; the neck (if any) at lr."""
        groups = decay_groups(self.named_parameters(), lr * backbone_lr_mult, weight_decay)
        if self.backbone.neck is not None:
            groups += decay_groups(self.backbone.neck.named_parameters(), lr, weight_decay)
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        # the factors' dropout lives outside the backbone's tree now: follow the method's mode
        for layer in self._peft_layers:
            layer.lora_dropout.train(mode)
        return self


def _timm_keys_on_save(module, state_dict, prefix, local_metadata) -> None:
    """``<prefix>base_layer.weight`` -> ``<prefix>weight`` (and bias): timm's own key names."""
    for key in [k for k in state_dict if k.startswith(prefix + "base_layer.")]:
        state_dict[prefix + key[len(prefix + "base_layer."):]] = state_dict.pop(key)


def _peft_keys_on_load(module, state_dict, prefix, *args) -> None:
    """The inverse of :func:`_timm_keys_on_save`, so timm-named files load into the peft layer."""
    for attr in ("weight", "bias"):
        key = prefix + attr
        if key in state_dict:
            state_dict[prefix + "base_layer." + attr] = state_dict.pop(key)


def build_lora(cfg, backbone) -> LoRA:
    """``METHODS["lora"]``: from ``cfg.lora`` (a :class:`LoRAConfig`)."""
    options = cfg.lora
    return LoRA(backbone, rank=options.rank, alpha=options.alpha, dropout=options.dropout,
                targets=tuple(options.targets))


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """W + (alpha / r) B A of one LoRA-wrapped layer (for export and tests)."""
    a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
    return layer.base_layer.weight + layer.scaling[_ADAPTER] * (b @ a)
