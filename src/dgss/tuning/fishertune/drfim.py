"""The Domain-Related Fisher Information Matrix (fishertune.md): the estimator and the selection scores.

What the paper gives, per element (w = e^{-(eps_mu + eps_sigma)}, F the diagonal Fisher, x' the sample
under the simulated shift, Lambda the posterior precision of q = N(theta_pt, Lambda^-1) under the prior
p = N(theta_pt, tau^2 I)):

    plain:        DRF = F(x) + w |F(x) - F(x')| / (min(F(x), F(x')) + eps)
    variational:  DRF = gamma (Lambda_x - tau^-2) + gamma w |Lambda_x - Lambda_x'| / min(Lambda_x, Lambda_x')

Taken literally, the first term is in loss^2 / theta^2 units and the second is a pure number, so their
sum ranks by whichever happens to be larger (fishertune.md §2: the plain form was the domain term
alone). What dgss does where the paper gives no number (fishertune.md §3; measured in
docs/performance.md, "FisherTune's ranking"):

1. **Per-sample Fisher** (``per_sample``, default): F = mean over images of the squared gradient of that
   image's loss. With ``per_sample=False`` the squared gradient of the batch-mean loss is multiplied by
   the batch size B, which estimates the same per-sample quantity (exactly, for uncorrelated zero-mean
   per-sample gradients) at one backward pass per batch.
2. **Two terms, each in units of its own selection threshold.** task = F(x) (variational:
   gamma (Lambda_x - tau^-2), which is the same F averaged over theta ~ q), domain = the relative change
   of the Fisher (plain) or of the posterior precision (variational) under the shift. Each is divided
   by its own value at the top-delta_max threshold over all eligible entries, so an entry that either
   term alone would select scores about 1 or more, and

       DRF = task / s_task + balance * w * domain / s_domain            (``domain_balance``, default 2)

   keeps the paper's sum and its weight w while making it independent of the loss scale. The ablation
   "FIM" ranks by the task term, "Delta F" by the domain term. With ``normalization="tensor"``
   (default) each tensor's Fisher is first divided by its own mean: ranked in raw units, the patch
   embedding, whose gradients are largest, takes 93-98% of the budget on the demo ViT.
3. **A variational estimate that uses its posterior.** The prior is per tensor and relative:
   tau_t = ``prior_rho`` x RMS(theta_pt of tensor t). The data precision is F / gamma, with gamma (the
   KL weight of the free energy E_q[loss] + gamma KL(q || p)) set so that data and prior precision are
   equal at the ``prior_quantile`` of tau_t^2 F over the entries the loss reaches: per tensor with
   ``normalization="tensor"``, over all tensors with "global" (a scale measured on the model, not a loss
   unit). Lambda is updated batch by batch with the variational-online-Newton step of that free energy
   at a fixed mean theta_pt,

       Lambda <- (1 - beta_t) Lambda + beta_t (F_t(theta ~ q) / gamma + tau^-2),   beta_t = 1 / t,

   where F_t is the per-sample Fisher of batch t at one theta ~ q_x, for x (Lambda_x) and for x'
   (Lambda_x': the shifted data's precision at the same weights, so that the two differ by the shift
   alone and not by two weight draws). beta_t = 1 / t makes Lambda the running mean of the
   batches' targets, i.e. Lambda = F_bar / gamma + tau^-2 with F_bar the posterior-averaged Fisher
   (gamma is re-measured on F_bar after batches 1, 2, 4, 8, ... and the last, so the final prior weight
   rests on all the data). The
   sample noise Lambda^{-1/2} <= tau needs no clamp; entries with a large Fisher are sampled more
   narrowly (``FisherEstimate.prior_dominated_share`` reports where the prior still dominates). The
   prior is also what stabilises the domain term: where the data precision is small next to tau^-2,
   |Lambda_x - Lambda_x'| / min(...) shrinks towards 0 instead of dividing noise by noise.

Nothing depends on the dataset size (the paper's N_eff is absorbed into gamma), on the loss scale
(every term is a ratio of Fishers) or, with per-sample Fisher, on the estimation batch size.

Memory (``estimate_memory="streamed"``, the default): gradients go into their sums tensor by tensor
(:mod:`.fisher`); under torch.distributed each process keeps its own sums, reduced tensor by tensor where
read; scores and quantiles never exist for all tensors at once (:mod:`.streaming`). What stays is the
weights, the two sums and theta: 16 bytes per eligible entry (docs/performance.md, section 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.distributed as dist

from .fisher import (all_reduce_count, all_reduce_sums, batch_size_of, is_distributed, reduced_copy,
                     squared_gradient_sums)
from .quantile import large_quantile, streamed_quantile

__all__ = [
    "shift_weight",
    "relative_change",
    "large_quantile",
    "threshold_scale",
    "prior_precisions",
    "DRFIMOptions",
    "FisherEstimate",
    "DomainRelatedFisher",
    "task_scores",
    "domain_scores",
    "selection_scores",
    "SCORE_MODES",
]

SCORE_MODES = ("drfim", "fisher", "domain")


def shift_weight(eps_mu: float, eps_sigma: float) -> float:
    """w = e^{-(eps_mu + eps_sigma)} (0.37 at the defaults)."""
    return math.exp(-(eps_mu + eps_sigma))


def relative_change(a: torch.Tensor, b: torch.Tensor, floor: float | torch.Tensor = 0.0) -> torch.Tensor:
    """|a - b| / (min(a, b) + floor), element-wise: how much a Fisher (or precision) changes under the shift."""
    return (a - b).abs() / (torch.minimum(a, b) + floor)


def _flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.detach().reshape(-1).float() for s in scores.values()])


def threshold_scale(scores: dict[str, torch.Tensor], fraction: float) -> float:
    """The score of the entry at the top-``fraction`` threshold over all tensors: the unit in which a
    term is expressed before the two are added. Falls back to the mean when the threshold is 0 (more
    than 1 - fraction of the entries score 0) and to 1 when every score is 0."""
    flat = _flat(scores)
    k = min(max(int(round(fraction * flat.numel())), 1), flat.numel())
    value = float(torch.topk(flat, k, sorted=False).values.min())
    if not value > 0:
        value = float(flat.mean())
    return value if value > 0 else 1.0


def prior_precisions(pretrained: dict[str, torch.Tensor], rho: float) -> dict[str, float]:
    """tau_t^-2 with tau_t = rho x RMS(theta_pt of tensor t), one number per tensor. A tensor that is all
    zeros (a zero-initialised bias) takes the RMS of all eligible entries instead."""
    if not rho > 0:
        raise ValueError(f"method.fishertune.prior_rho must be > 0, got {rho}")
    sums = {n: float(t.detach().double().pow(2).sum()) for n, t in pretrained.items()}
    total = sum(t.numel() for t in pretrained.values())
    overall = math.sqrt(sum(sums.values()) / max(total, 1))
    if overall == 0:
        raise ValueError("every eligible pretrained tensor is zero: there is no scale for the prior")
    out = {}
    for name, tensor in pretrained.items():
        rms = math.sqrt(sums[name] / max(tensor.numel(), 1)) or overall
        out[name] = 1.0 / (rho * rms) ** 2
    return out


@dataclass
class DRFIMOptions:
    """The estimator's options (the matching fields of :class:`dgss.config.FisherTuneConfig`)."""

    variational: bool = True
    per_sample: bool = True
    eps_mu: float = 0.5
    eps_sigma: float = 0.5
    domain_balance: float = 2.0
    normalization: Literal["global", "tensor"] = "tensor"
    prior_rho: float = 0.05
    prior_quantile: float = 0.9
    ratio_eps: float = 1e-8
    estimate_memory: Literal["streamed", "dense"] = "streamed"  # gradients and scores tensor by tensor, or all

    @property
    def streamed(self) -> bool:
        return self.estimate_memory == "streamed"

    def __post_init__(self) -> None:
        if not 0.0 < self.prior_quantile < 1.0:
            raise ValueError(f"method.fishertune.prior_quantile must be in (0, 1), got {self.prior_quantile}")
        if self.domain_balance < 0:
            raise ValueError(f"method.fishertune.domain_balance must be >= 0, got {self.domain_balance}")
        if self.estimate_memory not in ("streamed", "dense"):
            raise ValueError(f"method.fishertune.estimate_memory must be 'streamed' or 'dense', "
                             f"got '{self.estimate_memory}'")
        if self.normalization not in ("global", "tensor"):
            raise ValueError(f"method.fishertune.normalization must be 'global' or 'tensor', "
                             f"got '{self.normalization}'")


@dataclass
class FisherEstimate:
    """What one estimate produced (every tensor float32, shaped like its parameter).

    fisher_x, fisher_shifted: the per-sample Fisher on x and on x' (plain: at theta_pt; variational:
        averaged over the batches' theta ~ q). ``fisher_shifted`` is None when no shift was estimated.
    prior_precision: tau_t^-2 per tensor, gamma: the data scale per tensor (variational only; the same
        number for every tensor with ``normalization="global"``).
    passes: forward-backward passes run on this process (one per image with ``per_sample``).
    """

    fisher_x: dict[str, torch.Tensor]
    fisher_shifted: Optional[dict[str, torch.Tensor]]
    prior_precision: Optional[dict[str, float]] = None
    gamma: Optional[dict[str, float]] = None
    passes: int = 0

    @property
    def variational(self) -> bool:
        return self.prior_precision is not None

    def precision(self, name: str, shifted: bool = False) -> torch.Tensor:
        """Lambda = F_bar / gamma + tau^-2 of one tensor (the posterior after every batch)."""
        if not self.variational:
            raise ValueError("a plain estimate has no posterior precision")
        fisher = (self.fisher_shifted if shifted else self.fisher_x)[name]
        return fisher / self.gamma[name] + self.prior_precision[name]

    def prior_dominated_share(self) -> Optional[float]:
        """The share of entries whose prior precision tau^-2 exceeds their data precision F_bar(x) / gamma
        (None for a plain estimate)."""
        if not self.variational:
            return None
        dominated = sum(int((f / self.gamma[n] < self.prior_precision[n]).sum()) for n, f in self.fisher_x.items())
        return dominated / sum(f.numel() for f in self.fisher_x.values())


# forward_loss(params, batch, shifted) -> scalar: the loss with ``params`` in place, on x or on x'.
ShiftedForwardLoss = Callable[[dict[str, torch.Tensor], dict, bool], torch.Tensor]


class DomainRelatedFisher:
    """Estimates F(x), F(x') (plain) or the posteriors q_x, q_x' (variational) of a set of parameters.

    Args:
        pretrained: name -> theta_pt tensor (never written).
        forward_loss: ``(params, batch, shifted) -> loss``; ``shifted`` selects x'.
        options: :class:`DRFIMOptions`.
        generator: drives the theta samples; give every process the same seed under torch.distributed
            so that all of them evaluate the same sampled networks.
        progress: called with the number of batches done after each batch (a progress bar), or None.
    """

    def __init__(self, pretrained: dict[str, torch.Tensor], forward_loss: ShiftedForwardLoss,
                 options: DRFIMOptions, *, generator: Optional[torch.Generator] = None,
                 progress: Optional[Callable[[int], None]] = None):
        self.pretrained = pretrained
        self.forward_loss = forward_loss
        self.options = options
        self.generator = generator
        self.progress = progress

    def _add_fisher(self, params, batch: dict, shifted: bool, sums: dict[str, torch.Tensor]) -> int:
        """Add one batch's squared gradients (per sample, or x B per batch), summed over every process,
        to the running ``sums``; returns how many per-sample estimates they stand for."""
        distributed = is_distributed()
        streamed = self.options.streamed
        # Under torch.distributed the batch's sums are reduced on their own (the running sums are the
        # same on every process already); alone, or streamed (each process keeps its own sums, reduced
        # where they are read: :meth:`_global`), they are added in place (no extra copy of the model).
        target = {n: torch.zeros_like(s) for n, s in sums.items()} if distributed and not streamed else sums
        _, count = squared_gradient_sums(lambda p, b: self.forward_loss(p, b, shifted), params, [batch],
                                         per_sample=self.options.per_sample, sums=target, streamed=streamed)
        self.passes += batch_size_of(batch) if self.options.per_sample else 1
        if distributed and streamed:  # the count only
            return all_reduce_count(count, next(iter(sums.values())).device)
        if distributed:
            count = all_reduce_sums(target, count)
            for name, value in target.items():
                sums[name].add_(value)
        return count

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """A running sum over every process: itself, or (streamed, distributed) a reduced copy of it."""
        return reduced_copy(local) if self.options.streamed and is_distributed() else local

    def estimate(self, batches: Iterator[dict], num_batches: int, *, with_shift: bool = True) -> FisherEstimate:
        """Draw ``num_batches`` batches from ``batches`` and estimate (each batch seen as x and, with the
        shift, as x': the same images for both, so that F(x) - F(x') is due to the shift)."""
        if num_batches < 1:
            raise ValueError(f"method.fishertune.num_batches must be >= 1, got {num_batches}")
        self.passes = 0
        names = list(self.pretrained)
        zeros = lambda: {n: torch.zeros(self.pretrained[n].shape, dtype=torch.float32,  # noqa: E731
                                        device=self.pretrained[n].device) for n in names}
        sums_x, sums_s = zeros(), (zeros() if with_shift else None)
        count_x = count_s = 0
        variational = self.options.variational
        prior = prior_precisions(self.pretrained, self.options.prior_rho) if variational else None
        gamma = None
        for done in range(1, num_batches + 1):
            batch = next(batches)
            if not variational:
                count_x += self._add_fisher(self.pretrained, batch, False, sums_x)
                if with_shift:
                    count_s += self._add_fisher(self.pretrained, batch, True, sums_s)
            else:
                # One theta ~ q_x for x and x': the two Fishers of a batch are taken at the same weights, so
                # their difference is due to the shift alone (sampling x' at its own posterior would add
                # the difference of two weight draws exactly where the posteriors differ).
                theta = self.sample_parameters(sums_x, count_x, gamma, prior)
                count_x += self._add_fisher(theta, batch, False, sums_x)
                if with_shift:
                    count_s += self._add_fisher(theta, batch, True, sums_s)
                del theta
                # The data scale, re-measured on all batches so far after batch 1, 2, 4, 8, ... and the
                # last (from one batch of a few images it would be off by factors of several, and the
                # prior's weight with it; a quantile of every entry after every batch would cost as much
                # as the passes on a GPU).
                if done & (done - 1) == 0 or done == num_batches:
                    gamma = self.data_scale(sums_x, prior, count_x)
            if self.progress is not None:
                self.progress(done)
        if count_x == 0 or (with_shift and count_s == 0):
            raise FloatingPointError("FisherTune: every Fisher batch had a non-finite gradient")
        if self.options.streamed and is_distributed():  # every process's own passes, summed in place
            for sums in (sums_x, sums_s or {}):
                for tensor in sums.values():
                    dist.all_reduce(tensor)
        fisher_x = {n: s.div_(count_x) for n, s in sums_x.items()}
        fisher_s = None if sums_s is None else {n: s.div_(count_s) for n, s in sums_s.items()}
        return FisherEstimate(fisher_x, fisher_s, prior, gamma, self.passes)

    def data_scale(self, sums: dict[str, torch.Tensor], prior: dict[str, float], count: int) -> dict[str, float]:
        """gamma such that F / gamma = tau^-2 at the ``prior_quantile`` of tau^2 F (F = sums / count) over
        the entries with a nonzero Fisher (entries the loss does not reach have no data to weigh against
        the prior): one quantile over all tensors (``normalization="global"``) or one per tensor
        ("tensor"; a tensor the loss does not reach takes the quantile over all tensors)."""
        q = self.options.prior_quantile

        def positive(name):
            values = self._global(sums[name]).reshape(-1)
            return values[values > 0] / (prior[name] * count)

        def overall():
            if all(positive(n).numel() == 0 for n in sums):
                raise FloatingPointError("FisherTune: every eligible entry has a zero Fisher (no gradient reaches them)")
            if self.options.streamed:  # the same quantile without concatenating every entry (.quantile)
                return streamed_quantile(lambda: (positive(n) for n in sums), q)
            return large_quantile(torch.cat([positive(n) for n in sums]), q)

        if self.options.normalization == "global":
            value = overall()
            return {n: value for n in sums}
        out, unreached = {}, []
        for name in sums:
            values = positive(name)
            if values.numel():
                out[name] = large_quantile(values, q)
            else:
                unreached.append(name)
        if unreached:
            value = overall()
            out.update({n: value for n in unreached})
        return {n: out[n] for n in sums}

    @torch.no_grad()
    def sample_parameters(self, sums: dict[str, torch.Tensor], count: int, gamma: Optional[dict[str, float]],
                          prior: dict[str, float]) -> dict[str, torch.Tensor]:
        """theta ~ q = N(theta_pt, Lambda^-1), Lambda = F_bar / gamma + tau^-2 from the running sums (the
        prior alone before the first batch). The standard deviation is at most tau."""
        sampled = {}
        for name, pretrained in self.pretrained.items():
            precision = torch.full(pretrained.shape, prior[name], dtype=torch.float32, device=pretrained.device)
            if count and gamma is not None:
                precision.add_(self._global(sums[name]), alpha=1.0 / (count * gamma[name]))
            noise = torch.randn(pretrained.shape, generator=self.generator, device=pretrained.device,
                                dtype=torch.float32)
            sampled[name] = (pretrained.float() + noise.mul_(precision.rsqrt_())).to(pretrained.dtype)
        return sampled


# ---------------------------------------------------------------------------------------------- scores


def task_scores(estimate: FisherEstimate, normalization: str = "global") -> dict[str, torch.Tensor]:
    """The task term: F(x) (variational: gamma (Lambda_x - tau^-2), the posterior-averaged F(x)).
    ``normalization="tensor"`` divides each tensor's values by their mean, so that no tensor takes the
    budget by the raw size of its gradients."""
    if normalization == "global":
        return dict(estimate.fisher_x)
    return {n: f / f.mean() if float(f.mean()) > 0 else f for n, f in estimate.fisher_x.items()}


def domain_scores(estimate: FisherEstimate, ratio_eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """The domain term. Variational: |Lambda_x - Lambda_x'| / min(Lambda_x, Lambda_x') (the prior is the
    floor). Plain: |F(x) - F(x')| / (min(F(x), F(x')) + eps), eps = ``ratio_eps`` x the mean F(x) over
    the entries with a nonzero Fisher (a relative floor, so the ratio does not depend on the loss scale)."""
    if estimate.fisher_shifted is None:
        raise ValueError("the domain term needs the shifted estimate F(x')")
    if estimate.variational:
        return {n: relative_change(estimate.precision(n), estimate.precision(n, shifted=True))
                for n in estimate.fisher_x}
    flat = _flat(estimate.fisher_x)
    positive = flat[flat > 0]
    floor = ratio_eps * (float(positive.mean()) if positive.numel() else 1.0)
    return {n: relative_change(f, estimate.fisher_shifted[n], floor) for n, f in estimate.fisher_x.items()}


def selection_scores(estimate: FisherEstimate, mode: str, options: DRFIMOptions,
                     fraction: float) -> dict[str, torch.Tensor]:
    """Per-element scores (higher = fine-tuned first) for ``mode``: "fisher" (the task term), "domain"
    (the domain term) or "drfim" (both, each divided by its top-``fraction`` threshold)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode '{mode}' (one of {', '.join(SCORE_MODES)})")
    if mode == "fisher":
        return task_scores(estimate, options.normalization)
    domain = domain_scores(estimate, options.ratio_eps)
    if mode == "domain":
        return domain
    task = task_scores(estimate, options.normalization)
    task_unit, domain_unit = threshold_scale(task, fraction), threshold_scale(domain, fraction)
    weight = options.domain_balance * shift_weight(options.eps_mu, options.eps_sigma) / domain_unit
    return {n: task[n] / task_unit + weight * domain[n] for n in task}
