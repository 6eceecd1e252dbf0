"""BatchNorm statistics estimated again before a model is evaluated (PreciseBN; ``eval.precise_bn_batches``).

A BatchNorm layer's running statistics are an exponential average (momentum 0.1) over the last batches
of training: about the last ten, i.e. forty images at batch 4, of a backbone that was still changing
unless it is frozen. Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021) re-estimate them after
training as the plain average over many batches, with the weights fixed. In the DG testbed the linear
head's BatchNorm is the model's only one; its statistics are what a shifted domain is normalised with.
"""

from __future__ import annotations

__all__ = ["recalibrate_batch_norm"]


def recalibrate_batch_norm(model, cfg, batches: int) -> int:
    """Estimate every BatchNorm's running statistics again, as the plain average over ``batches``
    training batches of ``cfg`` (its seed, its augmentation) with the rest of the model in eval mode;
    returns how many BatchNorm layers there were (none: nothing runs)."""
    import torch
    from torch import nn

    from ..data import build_train_loader

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    model.eval()
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
        norm.train()
    batch_iter = iter(build_train_loader(cfg, num_workers=0))
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(batches):
            model(next(batch_iter)["image"].to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
    return len(norms)
