"""Exponential moving average of the trainable weights (``train.ema``), as mmengine's EMAHook keeps it.

After every iteration t (counted from 1), for every tensor the optimizer trains:

    ema_t = w_t                                   for t <= max(begin_iter, 1)
    ema_t = (1 - momentum) ema_{t-1} + momentum w_t   after that

which is mmengine's convention: ``ExponentialMovingAverage`` updates ``averaged.lerp_(source, momentum)``
(``momentum`` is the weight of the new value, 2e-4 by default), and ``EMAHook`` copies the weights
into the average until iteration ``begin_iter`` (its ``runner.iter + 1 >= begin_iter``) and starts
averaging with a copy (its ``steps == 0``). mmengine averages every parameter and takes the buffers
from the model; the frozen ones never change, and the lerp of a constant is that constant exactly,
so keeping only the trained tensors, and taking everything else (buffers, frozen weights, a method's
bookkeeping such as FisherTune's entry indices) from the model, gives the same weights for less memory.
A method's own trainable state is included as it is: FisherTune's sparse delta values, Rein's tokens,
SoMA's factors, together with the head's and any trained backbone tensor.

A tensor that starts training later (``trainer.rebuild_optimizer()``) joins with its current value,
what mmengine's average of a so far constant tensor would hold. The averages live with the weights
(same device and dtype); under DDP every process keeps its own copy, identical because the weights are.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The averages of ``model``'s trained tensors, by parameter name (see the module docstring)."""

    def __init__(self, momentum: float = 2e-4, begin_iter: int = 0) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"train.ema.momentum must be in (0, 1], got {momentum}")
        if begin_iter < 0:
            raise ValueError(f"train.ema.begin_iter must be >= 0, got {begin_iter}")
        self.momentum, self.begin_iter = float(momentum), int(begin_iter)
        self.averages: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, ema_cfg) -> "WeightEMA":
        """From a :class:`dgss.config.EMAConfig`."""
        return cls(ema_cfg.momentum, ema_cfg.begin_iter)

    @property
    def nbytes(self) -> int:
        """The memory the averages take."""
        return sum(t.numel() * t.element_size() for t in self.averages.values())

    def started(self, iteration: int) -> bool:
        """Whether the average after ``iteration`` iterations differs from a copy of the weights."""
        return iteration > max(self.begin_iter, 1)

    @torch.no_grad()
    def track(self, model: nn.Module, params=None) -> None:
        """Average ``params`` (default: every parameter of ``model`` that requires grad) from now on; a
        tensor tracked already keeps its average."""
        names = {id(p): n for n, p in model.named_parameters()}
        chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        for param in chosen:
            name = names.get(id(param))
            if name is None:
                raise ValueError("train.ema: a trained tensor is not a parameter of the model")
            if name not in self.averages:
                self.averages[name] = param.detach().clone()

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        """After iteration ``iteration`` (counted from 1): copy the weights, or average them in."""
        params = dict(model.named_parameters())
        averages = list(self.averages.values())
        sources = [params[name].detach() for name in self.averages]
        if not averages:
            return
        if self.started(iteration):
            torch._foreach_lerp_(averages, sources, self.momentum)
        else:
            torch._foreach_copy_(averages, sources)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """Put the averages into ``model`` in place (one tensor's copy of extra memory at a time) and the
        weights back on exit, bit for bit."""
        self._swap(model)
        try:
            yield
        finally:
            self._swap(model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averages into ``model`` for good (scoring a checkpoint as the average)."""
        params = dict(model.named_parameters())
        for name, average in self.averages.items():
            params[name].copy_(average)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, average in self.averages.items():
            param = params[name]
            held = param.detach().clone()
            param.copy_(average)
            average.copy_(held)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> average, on the CPU (for ``torch.save``; loads with ``weights_only``)."""
        return {name: t.detach().cpu().clone() for name, t in self.averages.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module, *, source: str = "the checkpoint"
                        ) -> None:
        """Restore saved averages (each to its parameter's device and dtype); a parameter the state does
        not name keeps the average :meth:`track` gave it."""
        params = dict(model.named_parameters())
        unknown = sorted(name for name in state if name not in params)
        wrong = [f"{n}: {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in state.items()
                 if n in params and t.shape != params[n].shape]
        if unknown or wrong:
            raise ValueError(f"the weight EMA in {source} does not fit the model"
                             + (f": unknown tensors {', '.join(unknown[:5])}" if unknown else "")
                             + (f"; shape mismatches {'; '.join(wrong[:5])}" if wrong else ""))
        for name, value in state.items():
            param = params[name]
            self.averages[name] = value.to(device=param.device, dtype=param.dtype).clone()
