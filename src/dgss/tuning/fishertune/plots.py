"""Figures of a FisherTune selection (matplotlib, Agg backend: files only, no display).

    plot_selection_fractions(stats["per_block"], "selection_per_block.png", "fraction selected per block")
    plot_score_distribution(scores, "drfim_distribution.png", threshold=kth_score)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["plot_selection_fractions", "plot_score_distribution"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never a window; safe on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def plot_selection_fractions(groups: dict[str, tuple[int, int]], path, title: str,
                             overall: Optional[float] = None) -> Path:
    """Bar chart of selected / total per group ({label: (selected, total)}), with the overall fraction."""
    plt = _pyplot()
    labels = list(groups)
    fractions = [100.0 * s / t if t else 0.0 for s, t in groups.values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2), 3.2))
    ax.bar(range(len(labels)), fractions, color="#3b75af")
    if overall is not None:
        ax.axhline(100.0 * overall, color="#c44e52", linestyle="--", linewidth=1, label="overall")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(range(len(labels)))
    # upright when every label fits its slot (0.45 in; 8-pt characters are about 0.07 in wide), else
    # vertical: slanted labels ("block 07", "embed/other") ran into their neighbours
    vertical = max((len(label) for label in labels), default=0) * 0.07 > 0.4
    ax.set_xticklabels(labels, rotation=90 if vertical else 0, fontsize=8)
    ax.set_ylabel("selected (%)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_score_distribution(scores: dict[str, torch.Tensor], path, *, threshold: Optional[float] = None,
                            max_points: int = 2_000_000, title: str = "DR-FIM distribution") -> Path:
    """Histogram of log10(score) over all eligible entries (a uniform subsample above ``max_points``),
    with the selection threshold (the K-th highest score) marked."""
    plt = _pyplot()
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    if flat.numel() > max_points:
        step = math.ceil(flat.numel() / max_points)
        flat = flat[::step]
    positive = flat[flat > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    if positive.numel():
        ax.hist(positive.log10().numpy(), bins=100, color="#3b75af")
    if threshold is not None and threshold > 0:
        ax.axvline(math.log10(threshold), color="#c44e52", linestyle="--", linewidth=1, label="selection threshold")
        ax.legend(fontsize=8)
    zero = int((flat <= 0).sum())
    ax.set_xlabel("log10(score)" + (f"  ({zero} entries <= 0 not shown)" if zero else ""))
    ax.set_ylabel("entries")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Write a figure (folders created) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
