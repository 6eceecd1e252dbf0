"""Which entries are fine-tuned, and when (fishertune.md §5).

Global, element-wise top-k over all eligible tensors; the tuned fraction grows as

    delta(t) = delta_max - (delta_max - delta_min) * e^{-t / T_s}

and because the ranking is fixed the active set at any t is the top round(delta(t) N) of one ranking:
it only grows. A :class:`Selection` stores the top round(delta_max N) entries once, grouped by tensor
(the layout of the delta vector), each with its global rank; "active at count k" is "rank < k".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["selection_count", "tuned_fraction", "active_count", "Selection", "rank_top_entries",
           "group_by_tensor", "random_scores", "rerank_inactive", "selected_mask"]


def selection_count(num_eligible: int, fraction: float) -> int:
    """round(fraction * N), halves rounded up (5% of DINOv2-L's 304,198,656 -> 15,209,933)."""
    return min(int(math.floor(fraction * num_eligible + 0.5)), num_eligible)


def tuned_fraction(t: int, total: int, delta_min: float, delta_max: float, tau_frac: float) -> float:
    """delta(t) at stage-3 iteration t of ``total`` (T3), with T_s = tau_frac * T3."""
    time_constant = tau_frac * total
    if time_constant <= 0:
        return delta_max
    return delta_max - (delta_max - delta_min) * math.exp(-max(t, 0) / time_constant)


def active_count(t: int, total: int, num_eligible: int, *, delta_min: float, delta_max: float,
                 tau_frac: float) -> int:
    """How many of the ranked entries train at stage-3 iteration t (never above round(delta_max N))."""
    fraction = tuned_fraction(t, total, delta_min, delta_max, tau_frac)
    return min(selection_count(num_eligible, fraction), selection_count(num_eligible, delta_max))


@dataclass
class Selection:
    """The top entries, grouped by tensor in the eligible order.

    counts: T int64, entries per tensor (sums to K).
    index: K int64, flat index of each entry inside its tensor (ascending within a tensor).
    rank: K int64, position of each entry in the global ranking (0 = highest score).
    """

    counts: torch.Tensor
    index: torch.Tensor
    rank: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.index.numel())


def _flat_scores(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise FloatingPointError(f"FisherTune: {bad} selection scores are not finite")
    return flat


def rank_top_entries(scores: Sequence[torch.Tensor], k: int) -> Selection:
    """The k highest-scoring entries over all tensors (element-wise, global), grouped by tensor.

    Ties are broken as torch.topk breaks them on the scores' device (deterministic for one device).
    """
    flat = _flat_scores(scores)
    sizes = torch.tensor([s.numel() for s in scores], dtype=torch.int64, device=flat.device)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot select {k} of {flat.numel()} entries")
    top = torch.topk(flat, k, sorted=True).indices  # global flat positions, best first
    del flat
    return group_by_tensor(top, sizes)


def group_by_tensor(top: torch.Tensor, sizes: torch.Tensor) -> Selection:
    """A :class:`Selection` from the global flat positions of the chosen entries, best first, and the
    tensors' sizes (the layout of the concatenation of all tensors)."""
    order = torch.argsort(top)  # grouping by tensor = sorting the global positions
    positions = top[order]
    rank = order  # top[order[i]] has rank order[i]
    starts = torch.cumsum(sizes, 0) - sizes
    tensor_id = torch.searchsorted(starts, positions, right=True) - 1
    index = positions - starts[tensor_id]
    counts = torch.bincount(tensor_id, minlength=len(sizes))
    return Selection(counts.cpu(), index, rank)


def random_scores(shapes: Sequence[torch.Size], seed: int, device=None) -> list[torch.Tensor]:
    """Uniform scores for the "random" ablation, from a seeded CPU generator (the same draw on every
    process and device)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator).to(device) for shape in shapes]


def rerank_inactive(selection: Selection, scores: Sequence[torch.Tensor], num_active: int) -> torch.Tensor:
    """A DR-FIM refresh that keeps the layout: the active entries (rank < num_active) keep their ranks,
    the inactive candidates are re-ordered by the new ``scores``. Returns the new rank vector.

    Only the candidates of the first ranking (top delta_max) can be re-ordered: the delta vector and
    its optimizer state are laid out for them, and an inactive entry has zero delta and zero Adam
    state, so moving it in the ranking needs no change to either.
    """
    # gathered tensor by tensor: the scores of all entries are never concatenated (``scores`` may be a
    # lazy sequence computing one tensor at a time, see .streaming)
    chunks = selection.index.split([int(c) for c in selection.counts])
    entry_scores = torch.cat([_flat_scores([scores[i]]).to(chunk.device)[chunk] for i, chunk in enumerate(chunks)])
    rank = selection.rank.clone()
    inactive = torch.nonzero(rank >= num_active).squeeze(1)
    order = torch.argsort(entry_scores[inactive], descending=True, stable=True)
    rank[inactive[order]] = torch.arange(num_active, num_active + inactive.numel(), device=rank.device,
                                         dtype=rank.dtype)
    return rank


def selected_mask(shape: torch.Size, index: torch.Tensor, rank: Optional[torch.Tensor] = None,
                  num_active: Optional[int] = None) -> torch.Tensor:
    """A dense boolean mask of one tensor's (active) selected entries, for tests and statistics."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=index.device)
    keep = index if rank is None or num_active is None else index[rank < num_active]
    mask[keep.long()] = True
    return mask.view(shape)
