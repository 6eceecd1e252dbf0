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

__all__ = ["build_optimizer", "adamw_implementation", "AdamWWithSGDGroups", "optimizer_state_by_name", "load_optimizer_state_by_name"]

# group options that come from the config, not from the checkpoint
_GROUP_OPTIONS = ("lr", "initial_lr", "weight_decay", "betas", "params")


class AdamWWithSGDGroups(torch.optim.AdamW):
    """AdamW, except for the groups marked ``"sgd": True``, which take torch.optim.SGD's step with
    momentum (``momentum`` of the group, no dampening, no Nesterov; the group's ``weight_decay`` as a
    coupled L2 term): ``buf = momentum * buf + (grad + wd * p)`` (``buf = grad + wd * p`` at the first
    step), ``p -= lr * buf``. One optimizer, so the schedule, the checkpoints (state by name: the SGD
    groups' ``momentum_buffer``), the weight EMA and a rebuild see every group as before."""

    @torch.no_grad()
    def _sgd_step(self) -> None:
        for group in self.param_groups:
            if not group.get("sgd"):
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                step = param.grad if group["weight_decay"] == 0 else param.grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = step.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(step)
                param.add_(buf, alpha=-group["lr"])

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sgd_step()
        # AdamW passes over parameters without a gradient: hide the SGD groups' for its step
        hidden = [(p, p.grad) for g in self.param_groups if g.get("sgd") for p in g["params"] if p.grad is not None]
        for param, _ in hidden:
            param.grad = None
        try:
            super().step()
        finally:
            for param, grad in hidden:
                param.grad = grad
        return loss


def _apply_head_rule(groups: list[dict], train_cfg) -> None:
    """``train.head_optim`` on the head's groups (marked ``"head"`` by the segmentor)."""
    rule = train_cfg.head_optim
    if rule.lr_mult <= 0:
        raise ValueError(f"train.head_optim.lr_mult must be > 0, got {rule.lr_mult}")
    if rule.weight_decay is not None and rule.weight_decay < 0:
        raise ValueError(f"train.head_optim.weight_decay must be >= 0, got {rule.weight_decay}")
    if not 0.0 <= rule.momentum < 1.0:
        raise ValueError(f"train.head_optim.momentum must be in [0, 1), got {rule.momentum}")
    if rule.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"train.head_optim.optimizer must be 'adamw' or 'sgd', got {rule.optimizer!r}")
    for group in groups:
        if not group.get("head"):
            continue
        group["lr"] *= rule.lr_mult
        if rule.weight_decay is not None and group["weight_decay"] > 0:  # the no-decay group stays so
            group["weight_decay"] = rule.weight_decay
        if rule.optimizer == "sgd":
            group["sgd"], group["momentum"] = True, rule.momentum


def build_optimizer(model: nn.Module, train_cfg, backbone_lr_mult: float) -> torch.optim.AdamW:
    """AdamW (lr, weight decay, betas of ``train_cfg``) over ``model.parameter_groups``, the head's groups
    as ``train_cfg.head_optim`` says (SGD groups: :class:`AdamWWithSGDGroups`); each group remembers its
    ``initial_lr`` for the schedule."""
    groups = model.parameter_groups(train_cfg.lr, train_cfg.weight_decay, backbone_lr_mult)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the method and the head have no trainable parameter")
    head_optim = getattr(train_cfg, "head_optim", None)
    if head_optim is not None:
        _apply_head_rule(groups, train_cfg)
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = AdamWWithSGDGroups if any(g.get("sgd") for g in groups) else torch.optim.AdamW
    return optimizer(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, betas=tuple(train_cfg.betas),
                     **adamw_implementation(groups, getattr(train_cfg, "fused_adamw", False)))


def adamw_implementation(groups: list[dict], fused: bool) -> dict:
    """AdamW's keyword for its implementation (``train.fused_adamw``): ``fused=True`` when every tensor is
    a plain CUDA floating-point tensor (one kernel for all of them), else ``foreach=True``; ``{}`` (torch's
    own choice: foreach on CUDA, a per-tensor loop on a CPU) when ``fused`` is false. Sharded (FSDP's
    DTensor) parameters take foreach: fused is kept to the case the GPU check measured."""
    if not fused:
        return {}
    params = [p for g in groups for p in g["params"]]
    plain_cuda = all(type(p.data) is torch.Tensor and p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if params and plain_cuda else {"foreach": True}


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
                # AdamW keeps "step" on the CPU unless capturable/fused; moments live with the parameter
                on_device = bool(group.get("fused") or group.get("capturable"))
                optimizer.state[param] = {
                    k: (v.to(param.device) if torch.is_tensor(v) and (k != "step" or on_device) else v)
                    for k, v in values.items()
                }
    return pending
