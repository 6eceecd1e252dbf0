"""Measured memory of one training step (or one FisherTune estimation pass) of a shallow model, on the
meta device: shapes and dtypes only, nothing is allocated and nothing is computed.

    peaks = probe_training_step(cfg)     # cfg at a small depth (dgss.engine.memory_plan scales it)

:class:`LiveBytes` is a ``TorchDispatchMode`` that counts every storage an operator creates while it is
active, from its creation until it is freed (views share their base's storage and count once; the
parameters, buffers and inputs that existed before never count). Gradients are told apart when they
land in a parameter's ``.grad``. The step is split in two phases at the moment the backward pass
reaches the backbone's last block: before it (forward, loss, head backward: every activation of the
backbone is alive) and after it (the backbone's backward: activations freed block by block while the
gradients arrive). Each phase's peak grows linearly with the number of blocks, so two shallow probes
give it at any depth; their maximum is the step's peak.

Three things a meta run would do differently are replaced. Attention runs the target device's fused
kernel (:class:`FusedAttention`; on meta PyTorch takes the math path, which keeps every attention
matrix). Hungarian matching (it needs values) assigns every query-class pair of the first min(Q, K)
classes, the most masks any label map can give (the matching costs are still computed: they are alive
at the loss). CUDA's autocast, which dispatches on CUDA tensors only, is emulated for bf16 and fp16 by
:class:`EmulatedAutocast` with CUDA's cast policy (matrix products and convolutions in bf16, casts of
trainable leaves kept for the step; norms, softmax, reductions and losses in fp32), so what is saved for
backward is what autocast saves. Memory a kernel allocates inside itself and frees before it returns is
not seen: the planner adds it as named allowances (:mod:`.memory_plan`: cuBLAS's workspaces and the caching
allocator's share on a GPU, the process's own memory on a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .speed import checkpointing_needed, set_checkpointing

__all__ = ["Peak", "StepPeaks", "LiveBytes", "EmulatedAutocast", "FusedAttention", "planning_matcher",
           "prepare_method", "probe_training_step", "probe_estimate_pass"]


@dataclass(frozen=True)
class Peak:
    """The most bytes alive at once in a phase, and how many of them were gradients (``.grad``)."""

    total: int = 0
    grads: int = 0


@dataclass(frozen=True)
class StepPeaks:
    """The peaks of the two phases of a step (``backbone`` is empty when no gradient reaches a block), and
    ``after``: the bytes besides gradients still alive when the backward pass has returned (the loss terms,
    anything a module keeps): they are there during the optimizer step too."""

    head: Peak
    backbone: Peak
    after: int = 0


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active and still alive; the peak per phase (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.grads = 0
        self._sizes: dict[int, int] = {}
        self._grad_keys: set[int] = set()
        self.phases: list[Peak] = [Peak()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs)) if t.layout == torch.strided}
        for tensor in _tensors(out):
            if tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in inputs:  # a view, an in-place result, or an existing tensor
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            weakref.finalize(storage, self._free, key)
            self._update()
        return out

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self.live -= size
        if key in self._grad_keys:
            self._grad_keys.discard(key)
            self.grads -= size

    def _update(self) -> None:
        if self.live > self.phases[-1].total:
            self.phases[-1] = Peak(self.live, self.grads)

    def mark_gradient(self, tensor: torch.Tensor) -> None:
        """``tensor`` (a parameter's new ``.grad``) counts as a gradient from now on."""
        key = id(tensor.untyped_storage())
        if key in self._sizes and key not in self._grad_keys:
            self._grad_keys.add(key)
            self.grads += self._sizes[key]
            self._update()

    def next_phase(self) -> None:
        """Start a new phase; its peak starts from what is alive now."""
        self.phases.append(Peak(self.live, self.grads))


def _cast(tree, source: torch.dtype, target: torch.dtype, cache: Optional[dict] = None):
    def cast(t):
        if not isinstance(t, torch.Tensor) or t.dtype != source:
            return t
        if cache is not None and t.is_leaf and t.requires_grad:  # autocast caches trainable weights' casts
            if id(t) not in cache:
                cache[id(t)] = (t, t.to(target))
            return cache[id(t)][1]
        return t.to(target)

    return tree_map(cast, tree)


_LOWER = {F.linear, F.conv2d, F.conv_transpose2d, F.scaled_dot_product_attention, torch.matmul, torch.mm,
          torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__,
          torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm}
_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, F.binary_cross_entropy_with_logits,
         F.softplus, torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax, torch.exp,
         torch.Tensor.exp, torch.log, torch.Tensor.log, torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow,
         torch.Tensor.__pow__, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum, torch.logsumexp}


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp -> autocast's dtype


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast's cast policy at the torch-function level (above autograd, as autocast is), for
    tensors autocast does not handle (the meta device): matrix products and convolutions take
    ``dtype`` copies of their fp32 inputs, fp32 ops take fp32 copies of ``dtype`` inputs, everything
    else runs in the dtypes it gets. Casts of trainable leaf tensors are made once and kept until exit."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict = {}
        self.caching = True  # off in backward, where only checkpointed blocks re-run (each in its own region)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args, kwargs = _cast((args, kwargs), torch.float32, self.dtype, self.cache if self.caching else None)
        elif func in _FP32:
            args, kwargs = _cast((args, kwargs), self.dtype, torch.float32)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the target device runs it: on meta it would fall back to the
    math path, which keeps every B x H x N x N attention matrix for backward; the fused kernels keep only
    q, k, v, the output and the log-sum-exp. ``target`` "cuda": memory-efficient attention in fp32, flash
    attention in fp16/bf16; "cpu": the CPU's flash kernel."""

    def __init__(self, target: str = "cuda"):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args), **kwargs)
        q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
        if kwargs.get("enable_gqa"):
            return func(*args, **kwargs)
        p, causal, scale = call.get("dropout_p", 0.0), call.get("is_causal", False), call.get("scale")
        aten = torch.ops.aten
        if mask is not None and mask.dtype == torch.bool:  # the fused kernels take an additive mask
            mask = torch.where(mask, torch.zeros((), dtype=q.dtype, device=q.device),
                               torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        if self.target == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, p, causal, attn_mask=mask, scale=scale)[0]
        if q.dtype == torch.float32 or mask is not None:  # flash attention takes no mask
            return aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, p, causal, scale=scale)[0]
        return aten._scaled_dot_product_flash_attention(q, k, v, p, causal, False, scale=scale)[0]


@contextlib.contextmanager
def planning_matcher() -> Iterator[None]:
    """Mask2Former's matcher without the host: costs computed, then a fixed assignment of the most masks."""
    from ..models.mask2former.matcher import Assignment, HungarianMatcher

    def assign(self, pred_logits, pred_masks, labels, num_classes, point_coords=None):
        costs = self.costs(pred_logits, pred_masks, labels, num_classes, point_coords)
        predictions, batch, queries, classes = costs.shape
        masks = min(queries, classes)
        device = labels.device
        pred = torch.arange(predictions, device=device).repeat_interleave(batch * masks)
        image = torch.arange(batch, device=device).repeat_interleave(masks).repeat(predictions)
        query = torch.arange(masks, device=device).repeat(predictions * batch)
        del costs
        return Assignment(pred, image, query, query.clone(), batch * masks, predictions)

    original = HungarianMatcher.__call__
    HungarianMatcher.__call__ = assign
    try:
        yield
    finally:
        HungarianMatcher.__call__ = original


@torch.no_grad()
def prepare_method(model: nn.Module) -> None:
    """Put a method in its most memory-hungry training state without data: FisherTune after its
    selection with every one of its K entries active (spread over the tensors by size)."""
    method = model.method
    if getattr(method, "name", None) != "fishertune":
        return
    sizes = [t.numel for t in method.tensors]
    total, capacity = sum(sizes), method.capacity
    counts = [capacity * n // total for n in sizes]
    counts[sizes.index(max(sizes))] += capacity - sum(counts)
    method._counts, method._is_selected = counts, True
    method.num_active.fill_(capacity)


def _block_output_marker(model: nn.Module, tracker: LiveBytes) -> list:
    """Hooks that start the tracker's backbone phase when the backward pass reaches a block's output
    (the first to arrive is the last block's: every block output feeds the next block)."""
    started = []

    def on_grad(grad):
        if not started:
            started.append(True)
            tracker.next_phase()

    def forward_hook(module, args, output):
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(on_grad)

    return [block.register_forward_hook(forward_hook) for block in model.backbone.blocks]


def _mark_gradients(model: nn.Module, tracker: LiveBytes) -> list:
    return [p.register_post_accumulate_grad_hook(lambda param: tracker.mark_gradient(param.grad))
            for p in model.parameters() if p.requires_grad]


def _inputs(cfg, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = cfg.data.crop_size
    images = torch.zeros(batch, 3, height, width, device=device)
    labels = torch.zeros(batch, height, width, dtype=torch.long, device=device)
    return images, labels


def _segmentor(cfg, device: str) -> nn.Module:
    from ..tuning.model import build_segmentor

    with torch.device(device):
        model = build_segmentor(cfg)
    model.train()
    if cfg.train.grad_checkpointing and checkpointing_needed(model):  # as the trainer's step does
        set_checkpointing(model.backbone, getattr(cfg.train, "checkpoint_hooks", "replay"))
    return model


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` straight into the autograd engine: ``Tensor.backward`` is a torch function, and
    a torch-function mode is switched off while it handles one, which would hide the forward passes that
    activation checkpointing re-runs from :class:`EmulatedAutocast`."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def _phases(tracker: LiveBytes) -> StepPeaks:
    head = tracker.phases[0]
    backbone = tracker.phases[1] if len(tracker.phases) > 1 else Peak()
    return StepPeaks(head, backbone)


def probe_training_step(cfg, *, amp: str = "none", device: str = "meta", target: str = "cuda") -> StepPeaks:
    """The two phase peaks of one training step (forward, loss, backward) of ``cfg``'s model at its
    batch and crop, without weights, gradients of earlier steps or optimizer state (the plan adds them).
    ``device``: "meta" (nothing allocated), or a real device to check the probe against; ``target``: the
    device planned for ("cuda" or "cpu": which attention kernel runs)."""
    model = _segmentor(cfg, device)
    prepare_method(model)
    tracker = LiveBytes()
    handles = _block_output_marker(model, tracker) + _mark_gradients(model, tracker)
    # fp16 autocast casts to the same ops as bf16 on CUDA (its GradScaler's state is a few scalars)
    autocast = EmulatedAutocast(_AUTOCAST_DTYPES[amp]) if amp in _AUTOCAST_DTYPES else None
    try:
        with planning_matcher(), tracker, FusedAttention(target):
            images, labels = _inputs(cfg, cfg.train.batch_size, device)  # the batch counts too
            with autocast or contextlib.nullcontext():
                loss = model(images, labels)["loss"]
            if autocast is not None:  # checkpointed blocks re-run their forward under the autocast of theirs
                autocast.caching = False
            with autocast or contextlib.nullcontext():
                _backward(loss)
            del loss
        after = tracker.live - tracker.grads
    finally:
        for handle in handles:
            handle.remove()
    return dataclasses.replace(_phases(tracker), after=after)


def probe_estimate_pass(cfg, *, device: str = "meta", target: str = "cuda") -> StepPeaks:
    """The phase peaks of one FisherTune estimation pass (one image with ``per_sample``, else the batch):
    the segmentor at theta, gradients of every eligible tensor taken as the estimate takes them
    (streamed, or all at once with ``estimate_memory: dense``). The sums and theta are the plan's."""
    from ..tuning.fishertune.fisher import squared_gradient_sums

    model = _segmentor(cfg, device)
    method = model.method
    options = method.drfim_options()
    params = {t.name: t.module._parameters[t.attr] for t in method.tensors}
    sums = {n: torch.zeros(p.shape, device=device) for n, p in params.items()}
    forward_loss = method.estimate_forward_loss(model, torch.Generator())
    tracker = LiveBytes()
    handles = _block_output_marker(model, tracker)
    method._suspended = True
    try:
        with planning_matcher(), tracker, FusedAttention(target):
            images, labels = _inputs(cfg, cfg.train.batch_size, device)  # the batch drawn; per_sample: its first image
            batch = {"image": images[:1], "label": labels[:1]} if options.per_sample else {"image": images, "label": labels}
            squared_gradient_sums(lambda p, b: forward_loss(p, b, False), params, [batch],
                                  per_sample=False, sums=sums, streamed=options.streamed)
    finally:
        method._suspended = False
        for handle in handles:
            handle.remove()
    return _phases(tracker)
