"""Sparse training of pretrained tensors: theta = theta_pt + scatter(delta), layer by layer (§7).

The pretrained tensors are never written. For every backbone forward pass:

  1. a forward pre-hook on the :class:`~dgss.models.backbones.Backbone` masks the flat delta vector
     (inactive entries contribute neither value nor gradient) and splits it into per-tensor chunks
     with one ``split`` (whose backward is one concatenation, not one full-size zero tensor per
     tensor as per-tensor slicing would give);
  2. a forward pre-hook on each module that owns selected tensors swaps in
     ``theta_pt.flatten().index_add(0, index, chunk)``, and a forward hook (always called, even on an
     exception) puts the pretrained Parameter back.

So the dense weight exists only while its layer runs and for that layer's backward (where the layer
saves it, as it would save the Parameter itself); the dense weight gradient is produced by the layer's
backward and immediately gathered to the selected entries by ``index_add``'s backward, never kept.
Entries outside the index set are copied from theta_pt untouched: bit-identical by construction.

Parameters read outside any submodule's forward (a ViT's ``cls_token``, ``pos_embed``, registers,
used in timm's ``forward_intermediates``) are swapped in by the Backbone hooks instead.

Activation checkpointing must be non-reentrant (re-running a block re-runs its hooks, which rebuild
the same dense weight from the same chunks; the chunks are kept until the next forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["EligibleTensor", "eligible_tensors", "apply_delta", "DeltaInjector"]


@dataclass(frozen=True)
class EligibleTensor:
    """One pretrained tensor that may be fine-tuned: its name in ``backbone.model``, owner and shape."""

    name: str
    module: nn.Module  # the module whose ``_parameters`` holds it
    attr: str
    shape: torch.Size

    @property
    def numel(self) -> int:
        return int(self.shape.numel())


def eligible_tensors(model: nn.Module, patterns: Optional[list[str]] = None) -> list[EligibleTensor]:
    """The tensors of ``model`` whose names match one of the fnmatch ``patterns`` (None: all), in
    ``named_parameters`` order (the order of the global ranking and of the delta layout)."""
    import fnmatch

    out = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out.append(EligibleTensor(name, module, attr, param.shape))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted(out, key=lambda t: order[t.name])


def apply_delta(pretrained: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """theta_pt + scatter(delta) as a new tensor (differentiable in ``delta``): B-any shape."""
    flat = pretrained.detach().reshape(-1)
    return flat.index_add(0, index, delta.to(flat.dtype)).view(pretrained.shape)


ChunkProvider = Callable[[], Optional[list[tuple[torch.Tensor, torch.Tensor]]]]


class DeltaInjector:
    """The hooks that make a backbone compute with theta_pt + scatter(delta).

    Args:
        backbone: the Backbone (its ``model`` holds the pretrained tensors).
        tensors: the eligible tensors (:func:`eligible_tensors` of ``backbone.model``).
        provider: called once per backbone forward pass; returns one (index, delta chunk) pair per
            eligible tensor, in order, or None for "use the pretrained weights" (before the
            selection exists, while an estimate runs, after merging).
    """

    def __init__(self, backbone, tensors: list[EligibleTensor], provider: ChunkProvider):
        self.provider = provider
        self._chunks: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._swapped: dict[tuple[int, str], nn.Parameter] = {}
        root = backbone.model
        by_module: dict[int, list[int]] = {}
        modules: dict[int, nn.Module] = {}
        for i, tensor in enumerate(tensors):
            by_module.setdefault(id(tensor.module), []).append(i)
            modules[id(tensor.module)] = tensor.module
        self.tensors = tensors
        self._root_ids = by_module.pop(id(root), [])
        self._handles = [
            backbone.register_forward_pre_hook(self._backbone_pre_hook),
            backbone.register_forward_hook(self._backbone_post_hook, always_call=True),
        ]
        for key, ids in by_module.items():
            module = modules[key]
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(ids)))
            self._handles.append(module.register_forward_hook(self._make_post_hook(ids), always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._chunks = None

    # ------------------------------------------------------------------ swapping

    def _swap_in(self, ids: list[int]) -> None:
        chunks = self._chunks
        if chunks is None:
            return
        for i in ids:
            index, delta = chunks[i]
            if index.numel() == 0:
                continue  # nothing selected in this tensor: the Parameter itself, no extra work
            tensor = self.tensors[i]
            original = tensor.module._parameters[tensor.attr]
            if not isinstance(original, nn.Parameter):  # already swapped (re-entrant call)
                continue
            self._swapped[(id(tensor.module), tensor.attr)] = original
            # Direct dict assignment: nn.Module.__setattr__ refuses a non-Parameter under a parameter
            # name; the module's forward reads it through __getattr__ all the same.
            tensor.module._parameters[tensor.attr] = apply_delta(original, index, delta)

    def _restore(self, ids: list[int]) -> None:
        for i in ids:
            tensor = self.tensors[i]
            original = self._swapped.pop((id(tensor.module), tensor.attr), None)
            if original is not None:
                tensor.module._parameters[tensor.attr] = original

    def _backbone_pre_hook(self, module, args):
        # Computed once per pass and kept until the next one: a checkpointed block's re-run during
        # backward needs the same chunks.
        self._chunks = self.provider()
        self._swap_in(self._root_ids)

    def _backbone_post_hook(self, module, args, output):
        self._restore(self._root_ids)

    def _make_pre_hook(self, ids: list[int]):
        def hook(module, args):
            self._swap_in(ids)

        return hook

    def _make_post_hook(self, ids: list[int]):
        def hook(module, args, output):
            self._restore(ids)

        return hook
