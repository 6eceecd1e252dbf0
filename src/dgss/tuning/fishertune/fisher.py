"""Diagonal empirical Fisher information (fishertune.md §1).

    sums, count = squared_gradient_sums(forward_loss, params, batches)       # float32 sums
    fisher = {name: s / count for name, s in sums.items()}                   # F-hat, per element

``F_theta = E[(d loss_i / d theta)^2]`` element-wise over images i, with the ground-truth labels (the
*empirical* Fisher). With ``per_sample=True`` one squared gradient per image (micro-batches of one): the
textbook estimator, B backward passes per batch of B. With ``per_sample=False`` one backward pass per
batch: the squared gradient of the batch-mean loss times B. The batch-mean gradient is the mean of B
per-sample gradients, so for uncorrelated zero-mean ones its square has expectation F / B: times B it
estimates the same per-sample Fisher (biased upwards where the per-sample gradients share a mean).

The parameters are passed in explicitly (``params``: name -> tensor) and the loss is computed with
them in place (``forward_loss(params, batch)``, e.g. through :func:`torch.func.functional_call`): the
gradient is taken with :func:`torch.autograd.grad` for exactly those tensors, so no ``.grad`` of the
model is touched, no ``requires_grad`` flag changes, and the same code estimates the Fisher at a
*sampled* theta (the variational rounds) without writing into the model.

``streamed=True`` squares each tensor's gradient into its sum as soon as backward has produced it
(a post-accumulate-grad hook on the leaf) and drops it, so the gradients of all tensors never exist at
once: one tensor's instead of the whole model's (27 GB for DINOv3-7B in fp32). The sums are the same
numbers (each gradient is the same tensor, added once in the same order of batches and samples). A
pass whose loss is not finite is skipped with a warning as in the default path; a non-finite gradient
under a finite loss cannot be taken back from the sums the pass already reached, and stops the estimate.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["batch_size_of", "split_per_sample", "squared_gradient_sums", "all_reduce_sums", "functional_loss",
           "is_distributed", "all_reduce_count", "reduced_copy"]

ForwardLoss = Callable[[dict[str, torch.Tensor], dict], torch.Tensor]


def split_per_sample(batch: dict) -> list[dict]:
    """A batch dict (tensors / lists with a leading batch dimension B) -> B dicts of one sample each
    (leading dimension kept, so every entry is still a batch, of size 1)."""
    size = batch_size_of(batch)
    return [{k: (v[i:i + 1] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in batch.items()}
            for i in range(size)]


def batch_size_of(batch: dict) -> int:
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch entries disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def squared_gradient_sums(
    forward_loss: ForwardLoss,
    params: dict[str, torch.Tensor],
    batches: Iterable[dict],
    *,
    per_sample: bool = False,
    sums: Optional[dict[str, torch.Tensor]] = None,
    streamed: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of element-wise squared gradients over ``batches`` (or over their samples), in float32.

    Args:
        forward_loss: ``(params, batch) -> scalar loss`` with ``params`` in place of the model's.
        params: name -> tensor (any shape); gradients are taken with respect to these values.
        batches: mini-batch dicts.
        per_sample: one squared gradient per sample (micro-batch of 1) instead of per batch.
        sums: running sums to add to (same names and shapes); new float32 zeros when None.
        streamed: add each tensor's squared gradient as soon as it exists (see the module docstring).

    Returns:
        (sums, count): float32 tensors shaped like ``params``, and the number of squared gradients
        added (batches, or samples with ``per_sample``); ``sums / count`` is the per-sample Fisher.
        Non-finite gradients are skipped with a warning and not counted, so one bad batch cannot
        poison the whole ranking.
    """
    names = list(params)
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    leaf_params = dict(zip(names, leaves))
    if sums is None:
        sums = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names}
    count = 0
    for batch in batches:
        for micro in (split_per_sample(batch) if per_sample else [batch]):
            loss = forward_loss(leaf_params, micro)
            weight = 1.0 if per_sample else float(batch_size_of(micro))
            if streamed:
                count += _streamed_pass(loss, names, leaves, sums, weight)
                continue
            # allow_unused: eligible tensors the loss does not reach (e.g. a final norm a dense
            # backbone skips) have zero Fisher.
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            if not _all_finite([g for g in grads if g is not None]):  # one host sync per pass
                warnings.warn("FisherTune: non-finite gradient in a Fisher batch; skipped", stacklevel=2)
                continue
            for name, grad in zip(names, grads):
                if grad is not None:
                    grad = grad.float()  # float32 accumulation whatever the parameter dtype
                    sums[name].addcmul_(grad, grad, value=weight)
            count += 1
    return sums, count


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one device-to-host sync for all of them (one
    per tensor would stall the GPU once per eligible tensor and pass: hundreds per pass on a ViT-L)."""
    if not tensors:
        return True
    flags = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    # meta tensors (a memory plan's probe) have no values to check, but take the check's memory all the same
    return True if flags.is_meta else bool(flags)


def _finite(tensor: torch.Tensor) -> bool:
    finite = torch.isfinite(tensor).all()
    # meta tensors (a memory plan's probe) have no values to check, but take the check's memory all the same
    return True if tensor.is_meta else bool(finite)


def _streamed_pass(loss: torch.Tensor, names: list[str], leaves: list[torch.Tensor],
                   sums: dict[str, torch.Tensor], weight: float) -> int:
    """One backward pass whose gradients go straight into ``sums`` tensor by tensor; 1 if it counted."""
    if not _finite(loss.detach()):
        warnings.warn("FisherTune: non-finite loss in a Fisher batch; skipped", stacklevel=3)
        return 0

    # Each tensor's finiteness stays on the device (a flag per tensor, no sync in the backward pass); the
    # flags are read once, after it.
    finite: dict[str, torch.Tensor] = {}

    def add(name: str):
        def hook(leaf: torch.Tensor) -> None:
            grad, leaf.grad = leaf.grad.float(), None
            finite[name] = torch.isfinite(grad).all()  # also on meta (a memory probe): the flags' memory counts
            sums[name].addcmul_(grad, grad, value=weight)
        return hook

    handles = [leaf.register_post_accumulate_grad_hook(add(name)) for name, leaf in zip(names, leaves)]
    try:
        # inputs=: only these leaves get gradients (the head's parameters and .grad stay untouched)
        torch.autograd.backward(loss, inputs=[leaf for leaf in leaves])
    finally:
        for handle in handles:
            handle.remove()
    all_finite = torch.stack(list(finite.values())).all() if finite else None
    if all_finite is not None and not all_finite.is_meta and not bool(all_finite):  # the pass's one host read
        bad = next(name for name, flag in finite.items() if not bool(flag))
        raise FloatingPointError(
            f"FisherTune: non-finite gradient of '{bad}' under a finite loss; the streamed estimate cannot "
            "take back what this pass already added: set method.fishertune.estimate_memory=dense, which "
            "skips such passes")
    return 1


def all_reduce_sums(sums: dict[str, torch.Tensor], count: int) -> int:
    """Sum the Fisher sums and counts over all processes (no-op outside torch.distributed), so every
    rank ends with the estimate over the union of the ranks' batches. Returns the global count."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    for tensor in sums.values():
        dist.all_reduce(tensor)
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_count(count: int, device: torch.device) -> int:
    """A count summed over every process (a tensor on ``device``: NCCL reduces no host tensor)."""
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def reduced_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process, as a new tensor."""
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def functional_loss(module: torch.nn.Module, prefix: str, loss_fn: Callable) -> ForwardLoss:
    """A ``forward_loss`` for :func:`squared_gradient_sums` that runs ``module`` with some of its
    tensors replaced: ``params`` keys are names relative to ``module.<prefix>``, and
    ``loss_fn(module_call, batch)`` computes the loss from ``module_call(*args)``."""
    from torch.func import functional_call

    def forward_loss(params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        full = {f"{prefix}{name}": value for name, value in params.items()}
        return loss_fn(lambda *args: functional_call(module, full, args), batch)

    return forward_loss
