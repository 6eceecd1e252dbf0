"""AdamW over the segmentor's parameter groups, with its state saved by parameter *name*.

Names rather than positions: a method may change which tensors train (FisherTune selects backbone
parameters after its estimation stage) and ask for the optimizer to be rebuilt; a parameter that
keeps training keeps its moments, and a resumed run finds each parameter's state by name even when
the groups are built in another order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["build_optimizer", "optimizer_state_by_name", "load_optimizer_state_by_name"]

# group options that come from the config, not from the checkpoint
_GROUP_OPTIONS = ("lr", "initial_lr", "weight_decay", "betas", "params")


def build_optimizer(model: nn.Module, train_cfg, backbone_lr_mult: float) -> torch.optim.AdamW:
    """AdamW (lr, weight decay, betas of ``train_cfg``) over ``model.parameter_groups``; each group
    remembers its ``initial_lr`` for the schedule."""
    groups = model.parameter_groups(train_cfg.lr, train_cfg.weight_decay, backbone_lr_mult)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the method and the head have no trainable parameter")
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             betas=tuple(train_cfg.betas))


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """``{"state": {name: {key: tensor}}, "groups": [[names]]}``: loadable with weights_only."""
    names = _names(model)
    state = {}
    for param, values in optimizer.state.items():
        state[names[id(param)]] = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in values.items()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    return {"state": state, "groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict,
                                 *, device: Optional[torch.device] = None) -> dict:
    """Give every parameter of ``optimizer`` its saved state (by name). Returns the saved entries of
    parameters that are not in the optimizer (yet): the caller applies them after a rebuild."""
    pending = dict(saved["state"])
    names = _names(model)
    for group in optimizer.param_groups:
        for param in group["params"]:
            values = pending.pop(names[id(param)], None)
            if values is not None:
                optimizer.state[param] = {
                    # AdamW keeps "step" on the CPU unless capturable/fused; moments live with the parameter
                    k: (v.to(param.device) if torch.is_tensor(v) and k != "step" else v) for k, v in values.items()
                }
    return pending
