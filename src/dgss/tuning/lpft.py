"""LP-FT (Kumar et al., ICLR'22): probe first, then fine-tune everything.

Full fine-tuning from a randomly initialised head distorts good pretrained features: the head's early,
large gradients flow into the backbone. LP-FT trains the head alone on the frozen backbone for the
first ``method.lpft.probe_fraction`` of the iterations (linear probing's role; here the probe is the
segmentation head), then every backbone parameter trains as in ``full`` (lr x 0.1 by default). It is
the testbed's positive control for feature distortion (docs/testbed.md, precondition P5).
"""

from __future__ import annotations

from .base import Full

__all__ = ["LPFT", "build_lpft"]


class LPFT(Full):
    name = "lp-ft"

    def __init__(self, probe_fraction: float):
        super().__init__()
        if not 0.0 <= probe_fraction < 1.0:
            raise ValueError(f"method.lpft.probe_fraction must be in [0, 1), got {probe_fraction}")
        self.probe_fraction = float(probe_fraction)

    def probe_iters(self, total_iters: int) -> int:
        return int(round(self.probe_fraction * total_iters))

    def on_train_iteration(self, iteration: int, trainer) -> None:
        # requires_grad decides everything: a parameter without a gradient is left untouched by AdamW
        # (no step, no weight decay), so the backbone stays exactly pretrained while probing. The state
        # is a function of the iteration alone, so a resumed run is in the right stage.
        tuning = iteration >= self.probe_iters(int(trainer.total_iters))
        for p in self.backbone.model.parameters():
            p.requires_grad_(tuning)

    def num_trainable_backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.model.parameters())  # all of them, in the second stage


def build_lpft(cfg, backbone) -> LPFT:
    return LPFT(cfg.lpft.probe_fraction)
