"""Sparse training of pretrained tensors: theta = theta_pt + scatter(delta), layer by layer (§7).

The pretrained tensors are never written. For every backbone forward pass:

  1. a forward pre-hook on the :class:`~dgss.models.backbones.Backbone` masks the flat delta vector
     (inactive entries contribute neither value nor gradient) and splits it into per-tensor chunks
     with one ``split`` (whose backward is one concatenation, not one full-size zero tensor per
     tensor as per-tensor slicing would give);
  2. a forward pre-hook on each module that owns selected tensors swaps in
     ``theta_pt.flatten().index_add(0, index, chunk)``, and a forward hook (always called, even on an
     exception) puts the pretrained Parameter back.

A layer saves its weight for its backward (``F.linear`` the transposed weight for the input gradient,
``F.conv2d``, ``F.layer_norm``, LayerScale's ``x * gamma``). For a Parameter that costs nothing, but a
dense weight kept in the graph would be one extra copy of every selected tensor until backward (the
bulk of FisherTune's memory over a frozen backbone). So while the backbone runs, the injector also
installs ``torch.autograd.graph.saved_tensors_hooks`` that recognise a saved tensor sharing storage
with a dense weight of this pass and store a recipe instead: the pretrained Parameter, the index, the
delta chunk and the view's geometry. Backward rebuilds the dense weight with the same ``index_add``
(bit-identical: every selected entry is written once, so the sum is the same one addition) and takes
the saved view of it. The dense weight therefore lives only while its layer runs; backward costs one
extra ``index_add`` per selected tensor and holds one rebuilt weight at a time. Its gradient is
produced by the layer's backward and immediately gathered to the selected entries by ``index_add``'s
backward, never kept. Entries outside the index set are copied from theta_pt untouched:
bit-identical by construction.

Parameters read outside any submodule's forward (a ViT's ``cls_token``, ``pos_embed``, registers,
used in timm's ``forward_intermediates``) are swapped in by the Backbone hooks instead; they are
covered by the same hooks, though timm only concatenates and adds them, which saves neither.

Activation checkpointing must be non-reentrant (re-running a block re-runs its hooks, which rebuild
the same dense weight from the same chunks; the chunks are kept until the next forward pass). A
checkpointed block's own saved-tensor hooks sit inside ours and take precedence there, so nothing of
such a block reaches ours. The converse does not hold: hooks placed around the whole backbone
(checkpointing it from outside, ``save_on_cpu``) never see what is saved inside it; gradients stay
right, but those hooks save no memory there.
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


def _storage_key(tensor: torch.Tensor) -> Optional[tuple[torch.device, int]]:
    """What identifies a tensor's memory while it is alive (None: no data of its own to match)."""
    if tensor.layout != torch.strided:
        return None
    try:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None
    if ptr:
        return (tensor.device, ptr)
    # meta tensors all have address 0; their storage object (kept while the storage lives) stands for it,
    # so that a memory plan on the meta device (dgss.engine.memory_probe) sees what the recipes save
    return (tensor.device, id(storage)) if tensor.is_meta else None  # fake tensors: no key


class _DenseRecipe:
    """How to rebuild one dense weight theta_pt + scatter(chunk) in backward (what pack stores)."""

    __slots__ = ("pretrained", "index", "chunk", "dtype", "versions")

    def __init__(self, pretrained: torch.Tensor, index: torch.Tensor, chunk: torch.Tensor, dtype: torch.dtype):
        # ``chunk`` is a view of this pass's masked delta (delta * mask, a fresh tensor), so keeping it
        # keeps the forward's values even if the optimizer updates delta itself before backward.
        self.pretrained, self.index, self.chunk, self.dtype = pretrained, index, chunk.detach(), dtype
        self.versions = self._versions()

    def _versions(self) -> tuple[int, int, int]:
        return self.pretrained._version, self.index._version, self.chunk._version

    def rebuild(self, size, stride, offset) -> torch.Tensor:
        # Autograd refuses a saved tensor modified in place; a recipe whose inputs were would
        # silently give another weight, so refuse the same way.
        if self._versions() != self.versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                "operation: the pretrained tensor, selection index or delta chunk that rebuilds a dense "
                "weight for backward (FisherTune) changed after the forward pass")
        with torch.no_grad():
            dense = apply_delta(self.pretrained, self.index, self.chunk)  # the forward's, bit for bit
        return dense.as_strided(size, stride, offset)


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
        # (module id, attr) -> (pretrained Parameter, storage key of the dense weight swapped in)
        self._swapped: dict[tuple[int, str], tuple[nn.Parameter, Optional[tuple]]] = {}
        # storage key -> recipe, for the dense weights in place right now (so their memory cannot
        # have been reused by another tensor: a key never outlives its weight).
        self._recipes: dict[tuple, _DenseRecipe] = {}
        # One entry per running backbone pass: its saved_tensors_hooks context, or None.
        self._pass_hooks: list[Optional[torch.autograd.graph.saved_tensors_hooks]] = []
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
            dense = apply_delta(original, index, delta)
            key = _storage_key(dense)
            if key is not None:
                self._recipes[key] = _DenseRecipe(original, index, delta, dense.dtype)
            self._swapped[(id(tensor.module), tensor.attr)] = (original, key)
            # Direct dict assignment: nn.Module.__setattr__ refuses a non-Parameter under a parameter
            # name; the module's forward reads it through __getattr__ all the same.
            tensor.module._parameters[tensor.attr] = dense

    def _restore(self, ids: list[int]) -> None:
        for i in ids:
            tensor = self.tensors[i]
            original, key = self._swapped.pop((id(tensor.module), tensor.attr), (None, None))
            if original is not None:
                self._recipes.pop(key, None)
                tensor.module._parameters[tensor.attr] = original

    # ------------------------------------------------------------------ saved tensors

    def _pack(self, saved: torch.Tensor):
        """Saved for backward: a dense weight of this pass (or a view of it, e.g. ``weight.t()``)
        becomes its recipe and the view's geometry; any other tensor is kept as it is."""
        recipe = self._recipes.get(_storage_key(saved)) if self._recipes else None
        if recipe is not None and saved.dtype == recipe.dtype:
            return recipe, (saved.size(), saved.stride(), saved.storage_offset())
        # With saved-tensor hooks autograd no longer checks that a saved tensor is not modified in
        # place before backward: keep its version to check it ourselves.
        return saved, saved._version

    @staticmethod
    def _unpack(packed):
        kept, info = packed
        if isinstance(kept, _DenseRecipe):
            return kept.rebuild(*info)
        if kept._version != info:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a tensor of shape {tuple(kept.shape)} saved in the backbone's forward pass "
                f"(FisherTune), at version {kept._version}; expected version {info}")
        return kept

    # ------------------------------------------------------------------ hooks

    def _backbone_pre_hook(self, module, args):
        self._pass_hooks.append(None)  # first, so that the (always called) post hook pops this pass
        # Computed once per pass and kept until the next one: a checkpointed block's re-run during
        # backward needs the same chunks.
        self._chunks = self.provider()
        if self._chunks is not None and torch.is_grad_enabled():
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            hooks.__enter__()
            self._pass_hooks[-1] = hooks
        self._swap_in(self._root_ids)

    def _backbone_post_hook(self, module, args, output):
        self._restore(self._root_ids)
        hooks = self._pass_hooks.pop() if self._pass_hooks else None
        if hooks is not None:
            hooks.__exit__(None, None, None)

    def _make_pre_hook(self, ids: list[int]):
        def hook(module, args):
            self._swap_in(ids)

        return hook

    def _make_post_hook(self, ids: list[int]):
        def hook(module, args, output):
            self._restore(ids)

        return hook
