"""Learning-rate schedule: optional linear warm-up, then polynomial (or cosine) decay, per iteration.

The factor is a pure function of the iteration, so a resumed run needs no scheduler state beyond
the iteration itself; the engine multiplies each optimizer group's ``initial_lr`` by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PolySchedule"]


@dataclass(frozen=True)
class PolySchedule:
    """lr(it) = base * factor(it).

    * warm-up (it < warmup_iters): linear from ``warmup_start_factor`` to 1;
    * then poly: ``(1 - t) ** power`` with t = (it - warmup_iters) / (total_iters - warmup_iters),
      reaching 0 at ``total_iters`` (protocols.md: "poly schedule power 0.9 over 40,000 iterations";
      "linear warm-up 10k iterations then poly to 40k"), floored at ``min_lr / base`` (the group's
      own ``min_lr`` scaled like its ``lr``);
    * ``decay="cosine"``: ``(1 + cos(pi t)) / 2`` instead of the poly factor, with the same t and floor.
    """

    total_iters: int
    power: float = 0.9
    warmup_iters: int = 0
    warmup_start_factor: float = 1e-6
    min_factor: float = 0.0
    decay: str = "poly"

    def __post_init__(self) -> None:
        if self.decay not in ("poly", "cosine"):
            raise ValueError(f"train.lr_decay must be 'poly' or 'cosine', got {self.decay!r}")
        if self.total_iters < 1:
            raise ValueError(f"train.iters must be >= 1, got {self.total_iters}")
        if not 0 <= self.warmup_iters < self.total_iters:
            raise ValueError(f"train.warmup_iters must be in [0, train.iters), got {self.warmup_iters}")

    def factor(self, iteration: int) -> float:
        """Multiplier of the base lr for 0-based ``iteration`` (the step about to be taken)."""
        if iteration < self.warmup_iters:
            progress = iteration / self.warmup_iters
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress
        span = self.total_iters - self.warmup_iters
        t = min(max(iteration - self.warmup_iters, 0) / span, 1.0)
        decayed = (1.0 + math.cos(math.pi * t)) / 2 if self.decay == "cosine" else (1.0 - t) ** self.power
        return max(decayed, self.min_factor)

    def apply(self, optimizer, iteration: int) -> float:
        """Set every group's lr to ``initial_lr * factor(iteration)``; returns the first group's lr."""
        factor = self.factor(iteration)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0

    @classmethod
    def from_config(cls, train_cfg) -> "PolySchedule":
        min_factor = train_cfg.min_lr / train_cfg.lr if train_cfg.lr > 0 else 0.0
        return cls(total_iters=train_cfg.iters, power=train_cfg.poly_power, warmup_iters=train_cfg.warmup_iters,
                   warmup_start_factor=train_cfg.warmup_start_factor, min_factor=min_factor,
                   decay=train_cfg.lr_decay)
