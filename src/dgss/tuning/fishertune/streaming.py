"""Selection scores one tensor at a time, and a running top-k: the scores of all entries never exist at once.

    scores = TensorScores(estimate, "drfim", options, fraction=0.05)   # a lazy mapping name -> scores
    selection = streamed_top_entries(scores, names, k)                # = rank_top_entries(dense, k)

:func:`~.drfim.selection_scores` builds every tensor's scores, and :func:`~.selection.rank_top_entries`
concatenates them: for DINOv3-7B that is 6.7 B entries, 27 GB per copy in fp32, several copies at once.
Here a tensor's scores are computed when asked for (the same element-wise arithmetic, so the same
numbers), and the only global quantities the DR-FIM needs, the two terms' values at the top-fraction
threshold, come from a running top-k over the tensors in turn. The selection keeps a running top-k of
(score, global position) pairs: its memory is k entries (12 bytes each) and one tensor's scores.

The selected set equals the dense one; entries whose scores tie at the threshold may be chosen
differently (torch.topk breaks ties its own way), and the plain form's ratio floor is a float64 mean
instead of a float32 one. Both are far below the Jaccard 0.99 tests/test_fishertune_streaming.py holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Optional, Sequence

import torch

from .drfim import DRFIMOptions, FisherEstimate, SCORE_MODES, relative_change, shift_weight
from .quantile import streamed_quantile  # noqa: F401  (re-exported: its home before issue 38)
from .selection import Selection, group_by_tensor

__all__ = ["RunningTopK", "TensorScores", "ScoreList", "streamed_top_entries", "streamed_quantile"]


class RunningTopK:
    """The k largest of a stream of float tensors, with their global positions (int64).

    ``add(values, start)`` offers the entries of one tensor (flat positions ``start + i``); only
    entries above the current k-th value can enter once k are held, so most tensors cost one compare.
    """

    def __init__(self, k: int):
        self.k = k
        self.values: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    def add(self, values: torch.Tensor, start: int) -> None:
        values = values.reshape(-1).float()
        if self.values is not None and self.values.numel() >= self.k and self.k > 0:
            # ties with the k-th value change no value, only a tie-break
            positions = torch.nonzero(values > self.values.min()).squeeze(1)
            values, positions = values[positions], positions + start
        else:
            positions = torch.arange(start, start + values.numel(), dtype=torch.int64, device=values.device)
        if self.values is not None:
            values = torch.cat([self.values, values])
            positions = torch.cat([self.positions.to(values.device), positions])
        if values.numel() > self.k:
            top = torch.topk(values, self.k, sorted=False)
            values, positions = top.values, positions[top.indices]
        self.values, self.positions = values, positions

    def kth_value(self) -> float:
        """The k-th largest value offered (the smallest held)."""
        return float(self.values.min())

    def best_first(self) -> torch.Tensor:
        """The held positions, highest value first (ties: lower position first)."""
        by_position = torch.argsort(self.positions)
        order = by_position[torch.argsort(self.values[by_position], descending=True, stable=True)]
        return self.positions[order]


def _threshold_unit(tensors: Iterator[torch.Tensor], total: int, fraction: float) -> float:
    """:func:`~.drfim.threshold_scale` over a stream of tensors (the same number: the k-th largest
    value, the mean when it is not positive, 1 when every value is 0)."""
    k = min(max(int(round(fraction * total)), 1), total)
    top, running, start = RunningTopK(k), 0.0, 0
    for values in tensors:
        top.add(values, start)
        running += float(values.double().sum())
        start += values.numel()
    value = top.kth_value()
    if not value > 0:
        value = running / total
    return value if value > 0 else 1.0


class TensorScores(Mapping):
    """The scores of :func:`~.drfim.selection_scores` as a read-only mapping computed per tensor.

    Args:
        estimate: a :class:`~.drfim.FisherEstimate`.
        mode: "drfim", "fisher" or "domain".
        options: :class:`~.drfim.DRFIMOptions`.
        fraction: delta_max (the terms' unit is their top-fraction threshold).
    """

    def __init__(self, estimate: FisherEstimate, mode: str, options: DRFIMOptions, fraction: float):
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode '{mode}' (one of {', '.join(SCORE_MODES)})")
        if mode != "fisher" and estimate.fisher_shifted is None:
            raise ValueError("the domain term needs the shifted estimate F(x')")
        self.estimate, self.mode, self.options = estimate, mode, options
        self.names = list(estimate.fisher_x)
        total = sum(f.numel() for f in estimate.fisher_x.values())
        self.floor = 0.0
        if mode != "fisher" and not estimate.variational:  # the plain ratio's floor: ratio_eps x mean F > 0
            positive_sum = sum(float(f[f > 0].double().sum()) for f in estimate.fisher_x.values())
            positive_count = sum(int((f > 0).sum()) for f in estimate.fisher_x.values())
            self.floor = options.ratio_eps * (positive_sum / positive_count if positive_count else 1.0)
        self.task_unit = self.domain_weight = None
        if mode == "drfim":
            self.task_unit = _threshold_unit((self.task(n) for n in self.names), total, fraction)
            domain_unit = _threshold_unit((self.domain(n) for n in self.names), total, fraction)
            self.domain_weight = options.domain_balance * shift_weight(options.eps_mu, options.eps_sigma) / domain_unit

    def task(self, name: str) -> torch.Tensor:
        f = self.estimate.fisher_x[name]
        if self.options.normalization == "global":
            return f
        return f / f.mean() if float(f.mean()) > 0 else f

    def domain(self, name: str) -> torch.Tensor:
        est = self.estimate
        if est.variational:
            return relative_change(est.precision(name), est.precision(name, shifted=True))
        return relative_change(est.fisher_x[name], est.fisher_shifted[name], self.floor)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.estimate.fisher_x:
            raise KeyError(name)
        if self.mode == "fisher":
            return self.task(name)
        if self.mode == "domain":
            return self.domain(name)
        return self.task(name) / self.task_unit + self.domain_weight * self.domain(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class ScoreList(Sequence):
    """``[scores[name] for name in names]`` computed only when an item is read (for :mod:`.selection`)."""

    def __init__(self, scores: Mapping, names: Sequence[str]):
        self.scores, self.names = scores, list(names)

    def __getitem__(self, i):
        return self.scores[self.names[i]]

    def __len__(self) -> int:
        return len(self.names)


def streamed_top_entries(scores: Mapping, names: Sequence[str], k: int) -> Selection:
    """:func:`~.selection.rank_top_entries` of ``[scores[n] for n in names]`` with one tensor's scores
    in memory at a time (the same Selection but for the order of tied scores)."""
    top, start, sizes = RunningTopK(k), 0, []
    for name in names:
        values = scores[name]
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise FloatingPointError(f"FisherTune: {bad} selection scores of '{name}' are not finite")
        top.add(values, start)
        start += values.numel()
        sizes.append(values.numel())
    if not 0 <= k <= start:
        raise ValueError(f"cannot select {k} of {start} entries")
    device = top.values.device if top.values is not None else torch.device("cpu")
    if k == 0:
        return group_by_tensor(torch.zeros(0, dtype=torch.int64, device=device), torch.tensor(sizes, device=device))
    return group_by_tensor(top.best_first(), torch.tensor(sizes, dtype=torch.int64, device=device))
