"""Child-Tuning (Xu et al., EMNLP 2021): update only a child network of the pretrained backbone.

Two variants, two methods:

* ``childtune-f`` (:class:`ChildTuneF`, task-free): full fine-tuning in which every step keeps each
  backbone gradient entry with probability p_f and rescales the kept ones by 1 / p_f (an unbiased
  estimate of the full gradient), so a fresh random child network is updated each step. The mask of
  iteration t is drawn from a generator seeded by (train.seed, t, tensor index): every micro-batch of a
  step and every process get the same mask, and a resumed run continues with the same masks.
  Backbone lr x 0.1 by default, like ``full`` (it is full fine-tuning with a gradient mask).
* ``childtune-d`` (:class:`ChildTuneD`, task-driven): the child network is the top p_d of the backbone's
  entries by (plain, empirical) Fisher information at the pretrained weights, fixed for the run and
  trained without rescaling. This is FisherTune's machinery with the plain-Fisher ranking
  (``selection: fisher``: no shift x', no variational rounds) and a constant fraction
  (delta_min = delta_max = p_d): the estimate (:mod:`.fishertune.fisher`), the global top-k
  (:mod:`.fishertune.selection`) and the sparse theta_pt + scatter(delta) training
  (:mod:`.fishertune.sparse`) are FisherTune's own, so the two differ only in how they rank.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from ..config import FisherTuneConfig
from .base import Full
from .fishertune.method import FisherTune

__all__ = ["ChildTuneF", "ChildTuneD", "build_childtune_f", "build_childtune_d", "childtune_d_fishertune_config"]


class ChildTuneF(Full):
    """Every backbone tensor trains; its gradient is masked by Bernoulli(p) / p, a new mask per step."""

    name = "childtune-f"

    def __init__(self, p: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < p <= 1.0:
            raise ValueError(f"method.childtune.p_f must be in (0, 1], got {p}")
        self.p = p
        self.seed = seed
        self.iteration = 0  # set by the engine before each step (on_train_iteration)
        self._handles: list = []

    def attach(self, backbone) -> None:
        super().attach(backbone)
        for handle in self._handles:
            handle.remove()
        self._handles = [param.register_hook(self._mask_hook(index))
                         for index, param in enumerate(backbone.model.parameters())]

    def on_train_iteration(self, iteration: int, trainer) -> None:
        self.iteration = iteration
        cfg = getattr(trainer, "cfg", None)
        self.seed = int(cfg.train.seed) if cfg is not None else 0

    def gradient_mask(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """The 0 / (1/p) mask of tensor ``index`` at the current iteration (shape and device of ``like``)."""
        # A stable seed per (run seed, iteration, tensor): no state to save, identical on every rank.
        key = f"{self.seed}:{self.iteration}:{index}".encode()
        generator = torch.Generator(device=like.device).manual_seed(zlib.crc32(key))
        keep = torch.rand(like.shape, generator=generator, device=like.device) < self.p
        return keep.to(like.dtype) / self.p

    def _mask_hook(self, index: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.gradient_mask(index, grad)

        return hook


class ChildTuneD(FisherTune):
    """FisherTune with a plain-Fisher ranking and a fixed fraction p_d (see the module docstring)."""

    name = "childtune-d"


def childtune_d_fishertune_config(cfg) -> FisherTuneConfig:
    """The FisherTune options that make it ChildTune-D, from ``cfg.childtune`` (a ChildTuneConfig)."""
    options = cfg.childtune
    if not 0.0 < options.p_d <= 1.0:
        raise ValueError(f"method.childtune.p_d must be in (0, 1], got {options.p_d}")
    return dataclasses.replace(
        FisherTuneConfig(), selection="fisher", variational=False, delta_min=options.p_d, delta_max=options.p_d,
        num_batches=options.num_batches, warmup_iters=options.warmup_iters, eligible=options.eligible,
        refresh_interval=0, train_perturb_prob=0.0, per_sample=False)


def build_childtune_f(cfg, backbone) -> ChildTuneF:
    """``METHODS["childtune-f"]``."""
    return ChildTuneF(p=cfg.childtune.p_f)


def build_childtune_d(cfg, backbone) -> ChildTuneD:
    """``METHODS["childtune-d"]``."""
    return ChildTuneD(childtune_d_fishertune_config(cfg))
