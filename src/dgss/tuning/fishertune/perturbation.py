"""The simulated domain shift x' (fishertune.md §2): perturbed feature statistics, applied by a hook.

    shift = FeatureStatisticsPerturbation(backbone, layers=[0], eps_mu=0.5, eps_sigma=0.5)
    with shift.active(generator):           # one fresh draw of z for this forward pass
        loss_shifted = model.loss(images, labels)

At the input of each chosen block, per sample and channel, over the tokens (the patch tokens of a
ViT, all positions of SAM's H x W grid or a CNN's feature map): mu, sigma, then

    x' = sigma' * (x - mu) / sigma + mu',   mu' = mu + eps_mu * sigma * z1,   sigma' = sigma * (1 + eps_sigma * z2)

with z1, z2 ~ N(0, 1) per sample and channel. Labels are unchanged.

Choices the paper leaves open (documented defaults):
  * Prefix tokens (class, registers) are left as they are: they are not image positions, and the
    statistics are the patch tokens' ("patch tokens after the patch embedding").
  * sigma is sqrt(var + 1e-6) (biased variance) so constant channels do not divide by zero.
  * mu and sigma are not detached: x' is then a plain function of x, and the Fisher of x' is the
    Fisher of the network composed with that function.
  * The formula is kept literally: 1 + eps_sigma * z2 can be negative (z2 < -1 / eps_sigma, about 2%
    of channels at eps_sigma = 0.5), which flips those channels around their mean.
  * z is drawn once per layer per forward pass and cached until the next :meth:`new_draw`, so a
    re-run of a block (activation checkpointing) sees the same x'. The hook has no other side effect.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["FeatureStatisticsPerturbation", "perturb_feature_statistics"]

_SIGMA_EPS = 1e-6


def perturb_feature_statistics(x: torch.Tensor, z_mu: torch.Tensor, z_sigma: torch.Tensor, *,
                               eps_mu: float, eps_sigma: float, dims: tuple[int, ...]) -> torch.Tensor:
    """x' of the spec for features ``x`` whose statistics are taken over ``dims``.

    ``z_mu``, ``z_sigma``: standard normal draws broadcastable to ``x`` with size 1 on ``dims``
    (e.g. B x 1 x C for B x N x C tokens).
    """
    mu = x.mean(dim=dims, keepdim=True)
    sigma = (x.var(dim=dims, keepdim=True, unbiased=False) + _SIGMA_EPS).sqrt()
    mu_shifted = mu + eps_mu * sigma * z_mu
    sigma_shifted = sigma * (1 + eps_sigma * z_sigma)
    return sigma_shifted * (x - mu) / sigma + mu_shifted


class FeatureStatisticsPerturbation:
    """Forward pre-hooks on ``backbone.blocks[layers]`` that replace the block input by x' while active.

    Args:
        backbone: a :class:`~dgss.models.backbones.Backbone` (token layout "nlc", "nhwc" or "nchw").
        layers: indices into ``backbone.blocks`` whose *input* is perturbed (default: the first
            block, i.e. the patch tokens after the patch embedding).
        eps_mu, eps_sigma: the perturbation strengths (spec default 0.5 each).
    """

    def __init__(self, backbone, layers: Sequence[int] = (0,), eps_mu: float = 0.5, eps_sigma: float = 0.5):
        blocks = backbone.blocks
        for layer in layers:
            if not -len(blocks) <= layer < len(blocks):
                raise ValueError(f"perturb layer {layer} is out of range for {len(blocks)} blocks")
        self.layers = [layer % len(blocks) for layer in layers]
        self.eps_mu, self.eps_sigma = float(eps_mu), float(eps_sigma)
        self.layout = backbone.token_layout
        self.num_prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        self.enabled = False
        self.generator: Optional[torch.Generator] = None
        self._noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [
            blocks[layer].register_forward_pre_hook(self._make_hook(layer), with_kwargs=True) for layer in self.layers
        ]

    @property
    def shift_weight(self) -> float:
        """e^{-(eps_mu + eps_sigma)}, the weight of the domain term in the DR-FIM."""
        return float(torch.exp(torch.tensor(-(self.eps_mu + self.eps_sigma), dtype=torch.float64)))

    def new_draw(self) -> None:
        """Forget the cached z: the next forward pass draws new ones."""
        self._noise.clear()

    @contextlib.contextmanager
    def active(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Perturb every forward pass inside the block; one fresh z draw on entry (from ``generator``,
        or the global RNG when None)."""
        previous = (self.enabled, self.generator)
        self.enabled, self.generator = True, generator
        self.new_draw()
        try:
            yield
        finally:
            self.enabled, self.generator = previous
            self.new_draw()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ the hook

    def _noise_for(self, layer: int, shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._noise.get(layer)
        if cached is None or tuple(cached[0].shape) != shape or cached[0].device != device:
            gen = self.generator
            if gen is not None and gen.device != torch.device(device):
                raise ValueError(f"perturbation generator is on {gen.device}, features on {device}")
            z = torch.randn((2, *shape), generator=gen, device=device, dtype=torch.float32)
            cached = (z[0].to(dtype), z[1].to(dtype))
            self._noise[layer] = cached
        return cached

    def _perturb(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if self.layout == "nlc":  # B x N x C, prefix tokens first
            prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix:]
            z_mu, z_sigma = self._noise_for(layer, (x.shape[0], 1, x.shape[2]), x.device, x.dtype)
            shifted = perturb_feature_statistics(patches, z_mu, z_sigma, eps_mu=self.eps_mu,
                                                 eps_sigma=self.eps_sigma, dims=(1,))
            return torch.cat([prefix, shifted], dim=1) if self.num_prefix else shifted
        if self.layout == "nhwc":  # SAM: B x H x W x C
            shape, dims = (x.shape[0], 1, 1, x.shape[3]), (1, 2)
        else:  # CNN: B x C x H x W
            shape, dims = (x.shape[0], x.shape[1], 1, 1), (2, 3)
        z_mu, z_sigma = self._noise_for(layer, shape, x.device, x.dtype)
        return perturb_feature_statistics(x, z_mu, z_sigma, eps_mu=self.eps_mu, eps_sigma=self.eps_sigma, dims=dims)

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.enabled:
                return None
            if args:
                return (self._perturb(args[0], layer), *args[1:]), kwargs
            key = next(iter(kwargs))  # a block called with its input as a keyword
            return args, {**kwargs, key: self._perturb(kwargs[key], layer)}

        return hook
