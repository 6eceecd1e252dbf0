"""GeCo's geometric-consistency loss (Zang et al., "GeCo: Geometry-Consistent Regularization for Domain
Generalized Semantic Segmentation", CVPR 2026), as a loss term any method can switch on.

    geco = GeCoLoss(cfg.loss.geco)                       # built by dgss.tuning.model when enabled
    weight = geco.weight_at(iteration)                   # 0 before start_iter, then cfg.weight
    noisy = geco.perturb(features)                       # the 4 maps, the chosen levels perturbed
    term = weight * geco.consistency(clean_scores, noisy_scores)

The segmentor (dgss.models.segmentor) runs the head on the perturbed maps and adds ``loss_geco``. What
follows transcribes the public code (github DZhaoXd/GeCo at 5c5f12a); docs/methods/geco.md has the maths
and the file and line of every number.

Each token of a perturbed map (B x C x H x W, average-pooled to at most ``max_tokens`` tokens) is moved
along a direction drawn in the tangent plane of the token manifold there: its k nearest tokens (in
cosine geometry, the tokens L2-normalised) give offsets whose d leading principal directions span the
plane; the token's curvature is the share of the offsets' energy outside it. A random Gaussian direction
is split into its tangent and normal parts; tokens at or above the image's median curvature move along
the tangent part only, the others along tangent + beta * normal; the step is alpha / (1 + curvature)
times the token's RMS. The perturbation carries no gradient (the code builds it from detached tokens), so
the loss trains the backbone through the clean features it is added to, and the head through its second
pass. The loss is the mean over pixels of the squared Fisher-Rao distance (the arccos of the
Bhattacharyya coefficient) between the softmax of the clean and of the perturbed class scores.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeCoLossConfig

__all__ = ["GeCoLoss", "tangent_plane_perturbation", "pool_to_token_budget", "perturb_feature_map",
           "geodesic_consistency"]

# geco_encoder_decoder.py lines 82-87: scores are cleaned of NaN/inf and clamped to [-30, 30] before the softmax
_SCORE_CLAMP = 30.0


@torch.no_grad()
def tangent_plane_perturbation(tokens: torch.Tensor, *, alpha: float, beta: float, num_neighbors: int,
                               tangent_dim: int, curvature_threshold: Optional[float], curvature_quantile: float,
                               eps: float, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The perturbation of B x N x C tokens, B x N x C, without gradient (geco_regularizer.py lines 183-262).

    ``noise``: the B x N x C Gaussian draw; default ``torch.randn_like(tokens)`` (the public code's, from
    the global generator, so a restored RNG state repeats it)."""
    batch, n, channels = tokens.shape
    if n <= 1 or channels <= 0:
        return torch.zeros_like(tokens)
    k = min(num_neighbors, n - 1)
    d = min(tangent_dim, k)
    unit = F.normalize(tokens.detach().float(), dim=-1, eps=eps)
    distance = torch.cdist(unit, unit)
    distance.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # a token is not its own neighbour
    nearest = distance.topk(k, dim=-1, largest=False).indices  # B x N x k
    neighbours = torch.gather(unit.unsqueeze(1).expand(batch, n, n, channels), 2,
                              nearest.unsqueeze(-1).expand(batch, n, k, channels))
    offsets = neighbours - unit.unsqueeze(2)  # B x N x k x C
    # principal directions of the offsets through their k x k Gram matrix (cheaper than C x C when k << C)
    gram = offsets @ offsets.transpose(-1, -2) + eps * torch.eye(k, device=tokens.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    top_values = eigenvalues[..., -d:].clamp_min(eps)  # B x N x d
    top_vectors = eigenvectors[..., -d:]  # B x N x k x d
    # curvature: the offsets' share outside the span of the top-d directions, averaged over neighbours
    inside = top_vectors @ (top_vectors.transpose(-1, -2) @ offsets)
    outside = offsets - inside
    curvature = outside.pow(2).sum(-1) / (offsets.pow(2).sum(-1) + eps)
    curvature = torch.nan_to_num(curvature.mean(-1), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)  # B x N
    # the tangent basis in feature space: offsets^T v / sqrt(lambda), unit vectors, B x N x d x C
    basis = (top_vectors.transpose(-1, -2) @ offsets) * top_values.rsqrt().unsqueeze(-1)

    noise = torch.randn_like(tokens) if noise is None else noise
    basis = basis.to(noise.dtype)
    tangent = ((basis @ noise.unsqueeze(-1)).transpose(-1, -2) @ basis).squeeze(-2)  # sum_d <noise, b_d> b_d
    normal = noise - tangent
    along_tangent = F.normalize(tangent, dim=-1, eps=eps)
    mixed = F.normalize(tangent + beta * normal, dim=-1, eps=eps)
    if curvature_threshold is None:
        threshold = torch.quantile(curvature.float(), q=curvature_quantile, dim=1, keepdim=True)
    else:
        threshold = curvature.new_full((batch, 1), float(curvature_threshold))
    curved = (curvature >= threshold).unsqueeze(-1)
    direction = F.normalize(torch.where(curved, along_tangent, mixed), dim=-1, eps=eps)
    step = (alpha / (1.0 + curvature)).clamp(0.0, alpha).unsqueeze(-1).to(tokens.dtype)
    rms = tokens.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.nan_to_num(step * direction * rms, nan=0.0, posinf=0.0, neginf=0.0)


def pool_to_token_budget(feature: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """A B x C x H x W map average-pooled to at most ``max_tokens`` positions, its aspect kept as the
    public code does (geco_regularizer.py lines 168-181); unchanged when it already fits."""
    height, width = feature.shape[-2:]
    if height * width <= max_tokens:
        return feature
    out_h = max(1, int((max_tokens * height / max(width, 1)) ** 0.5))
    out_w = max(1, max_tokens // out_h)
    while out_h * out_w > max_tokens and out_w > 1:
        out_w -= 1
    return F.adaptive_avg_pool2d(feature, (out_h, out_w))


def perturb_feature_map(feature: torch.Tensor, cfg: GeCoLossConfig,
                        noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``feature`` (B x C x H x W) plus its tangent-plane perturbation, computed on the pooled tokens and
    upsampled bilinearly to H x W (geco_regularizer.py lines 128-145). ``noise``: B x N x C on the pooled grid."""
    batch, channels, height, width = feature.shape
    pooled = pool_to_token_budget(feature, cfg.max_tokens)
    grid = pooled.shape[-2:]
    tokens = pooled.flatten(2).transpose(1, 2)  # B x N x C
    step = tangent_plane_perturbation(
        tokens, alpha=cfg.alpha, beta=cfg.beta, num_neighbors=cfg.num_neighbors, tangent_dim=cfg.tangent_dim,
        curvature_threshold=cfg.curvature_threshold, curvature_quantile=cfg.curvature_quantile, eps=cfg.eps,
        noise=noise)
    step = step.transpose(1, 2).reshape(batch, channels, *grid)
    if tuple(grid) != (height, width):
        step = F.interpolate(step, size=(height, width), mode="bilinear", align_corners=False)
    return feature + step.to(feature.dtype)


def geodesic_consistency(clean_scores: torch.Tensor, perturbed_scores: torch.Tensor, *, eps: float,
                         detach_clean: bool = True) -> torch.Tensor:
    """Mean over B x H x W of arccos(sum_c sqrt(p_c q_c))^2, p and q the softmax over classes of the
    clean and perturbed B x K x H x W scores (geco_encoder_decoder.py lines 70-97)."""
    if perturbed_scores.shape[-2:] != clean_scores.shape[-2:]:
        perturbed_scores = F.interpolate(perturbed_scores, size=clean_scores.shape[-2:], mode="bilinear",
                                         align_corners=False)
    if detach_clean:
        clean_scores = clean_scores.detach()

    def probabilities(scores: torch.Tensor) -> torch.Tensor:
        scores = torch.nan_to_num(scores.float(), nan=0.0, posinf=_SCORE_CLAMP, neginf=-_SCORE_CLAMP)
        return scores.clamp(-_SCORE_CLAMP, _SCORE_CLAMP).softmax(dim=1).clamp_min(eps)

    bhattacharyya = (probabilities(clean_scores).sqrt() * probabilities(perturbed_scores).sqrt()).sum(dim=1)
    angle = torch.acos(bhattacharyya.clamp(-1.0 + eps, 1.0 - eps))
    return torch.nan_to_num(angle.pow(2).mean(), nan=0.0, posinf=0.0)


class GeCoLoss(nn.Module):
    """The loss's settings and schedule; it holds no tensors (its only state, the iteration, is the
    trainer's, so a resumed run continues it exactly; the public code's counter, a non-persistent
    buffer, restarts at 0 on resume: geco_encoder_decoder.py line 27)."""

    def __init__(self, cfg: GeCoLossConfig):
        super().__init__()
        self.cfg = cfg

    def active(self, iteration: Optional[int]) -> bool:
        """Whether the term is computed at ``iteration`` (0-based; None: outside a trainer, always)."""
        return iteration is None or iteration >= self.cfg.start_iter

    def weight_at(self, iteration: Optional[int]) -> float:
        """0 before ``start_iter``; then ``weight * min((iteration + 1) / start_iter, 1)``, the public
        code's ramp (geco_regularizer.py lines 100-104), which is 1 at every iteration the gate lets
        through (geco_encoder_decoder.py lines 38-42 use the same warmup_iters): the weight is constant."""
        if not self.active(iteration):
            return 0.0
        if iteration is None or self.cfg.start_iter <= 0:
            return self.cfg.weight
        return self.cfg.weight * min((iteration + 1) / self.cfg.start_iter, 1.0)

    def perturb(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone's maps with the configured levels (``cfg.levels``) perturbed, the others as given."""
        chosen = {level % len(features) for level in self.cfg.levels}
        return [perturb_feature_map(f, self.cfg) if i in chosen else f for i, f in enumerate(features)]

    def consistency(self, clean_scores: torch.Tensor, perturbed_scores: torch.Tensor) -> torch.Tensor:
        """The unweighted loss between the clean and the perturbed B x K x H x W class scores."""
        return geodesic_consistency(clean_scores, perturbed_scores, eps=self.cfg.eps,
                                    detach_clean=self.cfg.detach_clean)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"weight={c.weight}, start_iter={c.start_iter}, alpha={c.alpha}, beta={c.beta}, levels={c.levels}"
