"""The Domain-Related Fisher Information Matrix (fishertune.md §3-4): formulas and the estimator.

Plain form (per element):

    DRF = F(x) + w * |F(x) - F(x')| / (min(F(x), F(x')) + eps),      w = e^{-(eps_mu + eps_sigma)}

Variational form, with posterior precisions Lambda around the pretrained weights:

    DRF = gamma (Lambda_x - tau^-2) + gamma * w * |Lambda_x - Lambda_x'| / (min(Lambda_x, Lambda_x') + eps)
    Lambda = N_eff * F-hat / gamma + tau^-2          (the fixed point of E_q[loss] + gamma KL(q || p))

:class:`DomainRelatedFisher` runs the estimate: ``num_batches`` source batches, each seen clean (x)
and shifted (x'), i.e. 2 x num_batches forward-backward passes. Plain: all at theta_pt. Variational:
the batches are split over K rounds; round 1 at theta_pt sets tau^-2 and Lambda, each later round
draws theta ~ q and moves Lambda_x, Lambda_x' towards their new fixed-point values by an EMA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .fisher import all_reduce_sums, squared_gradient_sums

__all__ = [
    "shift_weight",
    "domain_related_fisher",
    "variational_domain_related_fisher",
    "domain_term",
    "precision_from_fisher",
    "ema_update",
    "large_quantile",
    "posterior_noise_scale",
    "DRFIMOptions",
    "FisherEstimate",
    "DomainRelatedFisher",
    "round_sizes",
]


def shift_weight(eps_mu: float, eps_sigma: float) -> float:
    """w = e^{-(eps_mu + eps_sigma)} (0.37 at the defaults)."""
    return math.exp(-(eps_mu + eps_sigma))


def domain_term(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float) -> torch.Tensor:
    """weight * |a - b| / (min(a, b) + eps): the relative change of Fisher (or precision) under the shift."""
    return weight * (a - b).abs() / (torch.minimum(a, b) + eps)


def domain_related_fisher(fisher_x: torch.Tensor, fisher_shifted: torch.Tensor, *, eps_mu: float = 0.5,
                          eps_sigma: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """The plain DR-FIM of §3 from F(x) and F(x'), element-wise (any shape)."""
    return fisher_x + domain_term(fisher_x, fisher_shifted, shift_weight(eps_mu, eps_sigma), eps)


def variational_domain_related_fisher(precision_x: torch.Tensor, precision_shifted: torch.Tensor, *,
                                      tau_inv_sq: float, gamma: float = 1.0, eps_mu: float = 0.5,
                                      eps_sigma: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """The stabilised DR-FIM of §4 from Lambda_x and Lambda_x', element-wise (any shape)."""
    weight = shift_weight(eps_mu, eps_sigma)
    return gamma * (precision_x - tau_inv_sq) + gamma * domain_term(precision_x, precision_shifted, weight, eps)


def precision_from_fisher(fisher: torch.Tensor, scale: float, tau_inv_sq: float) -> torch.Tensor:
    """Lambda = scale * F-hat + tau^-2 with scale = N_eff / gamma (the VI fixed point)."""
    return scale * fisher + tau_inv_sq


def ema_update(precision: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Lambda <- (1 - beta) Lambda + beta target (in place; returns ``precision``)."""
    return precision.mul_(1 - beta).add_(target, alpha=beta)


def large_quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's linear-interpolation quantile of a flat tensor of any size (torch.quantile
    refuses more than 2^24 elements; DINOv2-L has 304M eligible entries)."""
    flat = values.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    position = q * (flat.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = flat.kthvalue(low + 1).values.double()
    high_value = low_value if high == low else flat.kthvalue(high + 1).values.double()
    return float(low_value + (high_value - low_value) * (position - low))


def posterior_noise_scale(precision: torch.Tensor, pretrained: torch.Tensor, cap: float) -> torch.Tensor:
    """Standard deviation of q: Lambda^{-1/2}, capped at ``cap`` x RMS(pretrained tensor) so every
    sampled network still works (a documented safeguard, not part of the paper)."""
    rms = pretrained.detach().float().pow(2).mean().sqrt()
    return precision.rsqrt().clamp(max=float(cap * rms))


def round_sizes(num_batches: int, rounds: int) -> list[int]:
    """Split ``num_batches`` over ``rounds`` as evenly as possible (earlier rounds take the remainder);
    rounds that would be empty are dropped."""
    rounds = max(1, min(rounds, num_batches))
    return [num_batches // rounds + (1 if r < num_batches % rounds else 0) for r in range(rounds)]


@dataclass
class DRFIMOptions:
    """The estimator's options (a subset of :class:`dgss.config.FisherTuneConfig`)."""

    variational: bool = True
    rounds: int = 4
    gamma: float = 1.0
    tau_quantile: float = 0.5
    ema_beta: float = 0.5
    noise_cap: float = 0.05
    eps_mu: float = 0.5
    eps_sigma: float = 0.5
    ratio_eps: float = 1e-8
    per_sample: bool = False


@dataclass
class FisherEstimate:
    """What one estimate produced (every tensor float32, shaped like its parameter).

    fisher_x, fisher_shifted: F-hat(x), F-hat(x') at theta_pt (plain: over all batches; variational:
        round 1). ``fisher_shifted`` is None when the shift was not needed (plain-Fisher selection).
    precision_x, precision_shifted: Lambda_x, Lambda_x' after the K rounds (variational only).
    tau_inv_sq: the prior precision tau^-2 (variational only). scale: N_eff / gamma.
    passes: forward-backward passes run on this process (micro-batches with ``per_sample``).
    """

    fisher_x: dict[str, torch.Tensor]
    fisher_shifted: Optional[dict[str, torch.Tensor]]
    precision_x: Optional[dict[str, torch.Tensor]] = None
    precision_shifted: Optional[dict[str, torch.Tensor]] = None
    tau_inv_sq: Optional[float] = None
    scale: float = 1.0
    passes: int = 0


# forward_loss(params, batch, shifted) -> scalar: the loss with ``params`` in place, on x or on x'.
ShiftedForwardLoss = Callable[[dict[str, torch.Tensor], dict, bool], torch.Tensor]


class DomainRelatedFisher:
    """Estimates F(x), F(x') and (variational) Lambda_x, Lambda_x' for a set of parameters.

    Args:
        pretrained: name -> theta_pt tensor (the estimate never writes into them).
        forward_loss: ``(params, batch, shifted) -> loss``; ``shifted`` selects x' (e.g. by turning a
            :class:`~.perturbation.FeatureStatisticsPerturbation` on).
        options: :class:`DRFIMOptions`.
        n_eff: N_eff of Lambda = N_eff F-hat / gamma + tau^-2 (the number of source images).
        generator: drives the theta samples; give every process the same seed under
            torch.distributed so that all of them evaluate the same sampled networks.
    """

    def __init__(self, pretrained: dict[str, torch.Tensor], forward_loss: ShiftedForwardLoss,
                 options: DRFIMOptions, *, n_eff: float, generator: Optional[torch.Generator] = None):
        self.pretrained = pretrained
        self.forward_loss = forward_loss
        self.options = options
        self.scale = float(n_eff) / options.gamma
        self.generator = generator

    def _fisher(self, params: dict[str, torch.Tensor], batches: list[dict], shifted: bool) -> dict[str, torch.Tensor]:
        sums, count = squared_gradient_sums(lambda p, b: self.forward_loss(p, b, shifted), params, batches,
                                            per_sample=self.options.per_sample)
        self._passes += count
        total = all_reduce_sums(sums, count)
        if total == 0:
            raise FloatingPointError("FisherTune: every Fisher batch had a non-finite gradient")
        return {name: s.div_(total) for name, s in sums.items()}

    def estimate(self, batches: Iterator[dict], num_batches: int, *, with_shift: bool = True) -> FisherEstimate:
        """Draw ``num_batches`` batches from ``batches`` and estimate (2 passes per batch with the shift)."""
        self._passes = 0
        opts = self.options
        if not opts.variational:
            chunk = [next(batches) for _ in range(num_batches)]
            fisher_x = self._fisher(self.pretrained, chunk, shifted=False)
            fisher_shifted = self._fisher(self.pretrained, chunk, shifted=True) if with_shift else None
            return FisherEstimate(fisher_x, fisher_shifted, scale=self.scale, passes=self._passes)

        sizes = round_sizes(num_batches, opts.rounds)
        # Round 1, at theta_pt. The same batches are used for x and x' in every round: paired
        # estimates make |F(x) - F(x')| a difference due to the shift, not to different images.
        chunk = [next(batches) for _ in range(sizes[0])]
        fisher_x = self._fisher(self.pretrained, chunk, shifted=False)
        fisher_shifted = self._fisher(self.pretrained, chunk, shifted=True) if with_shift else None
        # tau^-2 from the data: a quantile of N_eff F-hat(x) / gamma over all eligible entries, fixed
        # for the later rounds (the prior does not move; only the posterior does).
        flat = torch.cat([f.reshape(-1) for f in fisher_x.values()]) * self.scale
        tau_inv_sq = large_quantile(flat, opts.tau_quantile)
        del flat
        # A zero floor (e.g. quantile 0 with unused parameters) would give infinite posterior noise;
        # the noise cap bounds it, and the ratio's eps keeps the DR-FIM finite.
        precision_x = {n: precision_from_fisher(f, self.scale, tau_inv_sq) for n, f in fisher_x.items()}
        precision_shifted = (None if fisher_shifted is None else
                             {n: precision_from_fisher(f, self.scale, tau_inv_sq) for n, f in fisher_shifted.items()})

        for size in sizes[1:]:
            chunk = [next(batches) for _ in range(size)]
            theta = self.sample_parameters(precision_x)
            new_x = self._fisher(theta, chunk, shifted=False)
            for name, f in new_x.items():
                ema_update(precision_x[name], precision_from_fisher(f, self.scale, tau_inv_sq), opts.ema_beta)
            del new_x
            if precision_shifted is not None:
                new_shifted = self._fisher(theta, chunk, shifted=True)
                for name, f in new_shifted.items():
                    ema_update(precision_shifted[name], precision_from_fisher(f, self.scale, tau_inv_sq), opts.ema_beta)
                del new_shifted
            del theta
        return FisherEstimate(fisher_x, fisher_shifted, precision_x, precision_shifted, tau_inv_sq,
                              self.scale, self._passes)

    @torch.no_grad()
    def sample_parameters(self, precision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta ~ q = N(theta_pt, diag(Lambda^-1)) with the noise cap. The same posterior (of the clean
        data, Lambda_x) is used for the x and the x' estimate of a round, so they are paired too."""
        sampled = {}
        for name, pretrained in self.pretrained.items():
            std = posterior_noise_scale(precision[name], pretrained, self.options.noise_cap)
            noise = torch.randn(pretrained.shape, generator=self.generator, device=pretrained.device,
                                dtype=torch.float32)
            sampled[name] = (pretrained.float() + std * noise).to(pretrained.dtype)
        return sampled

    def scores(self, estimate: FisherEstimate, mode: str) -> dict[str, torch.Tensor]:
        """Per-element selection scores (higher = fine-tuned first) for ``mode``:

        * "drfim": the DR-FIM, variational or plain as estimated;
        * "domain": its domain term only (the ablation "domain term only");
        * "fisher": F-hat(x) at theta_pt (ChildTune-D style; needs no x').
        """
        opts = self.options
        weight = shift_weight(opts.eps_mu, opts.eps_sigma)
        if mode == "fisher":
            return estimate.fisher_x
        if estimate.fisher_shifted is None:
            raise ValueError(f"selection '{mode}' needs the shifted estimate F(x')")
        out = {}
        if estimate.precision_x is None:  # plain
            for name, f_x in estimate.fisher_x.items():
                f_s = estimate.fisher_shifted[name]
                out[name] = (domain_related_fisher(f_x, f_s, eps_mu=opts.eps_mu, eps_sigma=opts.eps_sigma,
                                                   eps=opts.ratio_eps)
                             if mode == "drfim" else domain_term(f_x, f_s, weight, opts.ratio_eps))
            return out
        for name, lam_x in estimate.precision_x.items():
            lam_s = estimate.precision_shifted[name]
            if mode == "drfim":
                out[name] = variational_domain_related_fisher(
                    lam_x, lam_s, tau_inv_sq=estimate.tau_inv_sq, gamma=opts.gamma, eps_mu=opts.eps_mu,
                    eps_sigma=opts.eps_sigma, eps=opts.ratio_eps)
            else:
                out[name] = opts.gamma * domain_term(lam_x, lam_s, weight, opts.ratio_eps)
        return out
