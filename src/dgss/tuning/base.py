"""The small interface every tuning method implements, and optimizer-group helpers.

A tuning method decides how a pretrained backbone adapts: which backbone parameters train, which new
parameters it adds (as its own submodules), which hooks it places on the backbone's blocks, and
whether it hands queries to the head (Rein). The segmentor and the engine only use this interface;
they never test a method's name.

    method = build_method(cfg.method, backbone)   # attaches itself to the backbone
    groups = method.parameter_groups(lr, weight_decay)
    queries = method.head_queries()                # M x Q or None
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from ..models.param_groups import NO_DECAY_KEYWORDS, decay_groups  # the head's groups are made so too

__all__ = ["TuningMethod", "NO_DECAY_KEYWORDS", "decay_groups", "count_trainable", "require_token_backbone"]

def count_trainable(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def require_token_backbone(backbone, method: str, layouts: tuple[str, ...] = ("nlc", "nhwc")) -> None:
    """Raise a clear error when ``method`` (which works on transformer tokens) meets a backbone whose
    blocks have another token layout (a CNN, or SAM's B x H x W x C grid for methods that add tokens)."""
    if backbone.token_layout not in layouts:
        kinds = {"nlc": "ViT", "nhwc": "SAM", "nchw": "CNN"}
        allowed = ", ".join(kinds[layout] for layout in layouts)
        raise ValueError(f"method '{method}' needs a transformer backbone ({allowed}); '{backbone.name}' is a "
                         f"{kinds.get(backbone.token_layout, backbone.token_layout)}")


class TuningMethod(nn.Module):
    """Base class. Subclasses own their new parameters as submodules and set ``name``.

    Attributes:
        backbone_requires_grad: False only when no gradient needs to flow through the backbone at all
            (Frozen): the segmentor then runs the backbone under ``torch.no_grad()``.
        freeze_backbone_mode: keep the pretrained backbone in eval mode during training (no dropout,
            drop-path or BatchNorm statistics updates), as Rein and every adapter method do.
    """

    name: str = "base"
    backbone_requires_grad: bool = True
    freeze_backbone_mode: bool = True
    # When head_queries() is not None: where the head's content queries come from. "querys2feat":
    # a Linear(Q, Q) of the supplied queries (Rein); "learned": the head's own (Rein on SAM-H).
    query_content: str = "querys2feat"

    def __init__(self) -> None:
        super().__init__()
        # A plain list, so the backbone is not registered (and not saved) as part of the method.
        self._backbone_ref: list = []

    @property
    def backbone(self):
        return self._backbone_ref[0] if self._backbone_ref else None

    def attach(self, backbone) -> None:
        """Bind to ``backbone``: set requires_grad on its parameters, register hooks."""
        self._backbone_ref[:] = [backbone]
        for p in backbone.model.parameters():
            p.requires_grad_(False)

    def trainable_backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Pretrained backbone parameters this method trains (none for adapter methods)."""
        return ((n, p) for n, p in self.backbone.model.named_parameters() if p.requires_grad)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups for the method's own parameters, the backbone's trainable ones and the neck."""
        groups = decay_groups(self.named_parameters(), lr, weight_decay)
        groups += decay_groups(self.trainable_backbone_parameters(), lr * backbone_lr_mult, weight_decay)
        if self.backbone.neck is not None:
            groups += decay_groups(self.backbone.neck.named_parameters(), lr, weight_decay)
        return groups

    def num_trainable_backbone_parameters(self) -> int:
        """Trainable parameters that live in (or are added to) the backbone, as the papers count them."""
        own = count_trainable(self.parameters())
        backbone = sum(p.numel() for _, p in self.trainable_backbone_parameters())
        return own + backbone

    def on_train_iteration(self, iteration: int, trainer) -> None:
        """Called by the training engine before every iteration (0-based), also after a resume.

        Methods with stages (FisherTune: head warm-up, estimation, sparse tuning) act here; they may
        use ``trainer.model`` (the unwrapped Segmentor), ``trainer.next_batch()`` (source batches),
        ``trainer.cfg`` and ``trainer.total_iters``. Whatever they decide must live in their state dict
        (parameters or buffers) so that a resumed run continues exactly.
        """

    def head_queries(self) -> Optional[torch.Tensor]:
        """Queries (M x Q) the method supplies to the head, or None for the head's own."""
        return None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None and self.freeze_backbone_mode:
            self.backbone.model.eval()
        return self


class Frozen(TuningMethod):
    """The backbone is fixed and runs without gradient; only the head (and CLIP's neck) train."""

    name = "frozen"
    backbone_requires_grad = False


class Full(TuningMethod):
    """Every backbone parameter trains, at lr x ``method.backbone_lr_mult``, which defaults to 0.1 for
    ``full`` (dgss.config.DEFAULT_BACKBONE_LR_MULT): the Rein authors found that at lr x 1 full
    fine-tuning collapses. The backbone runs in train mode (its drop-path applies)."""

    name = "full"
    freeze_backbone_mode = False

    def attach(self, backbone) -> None:
        self._backbone_ref[:] = [backbone]
        for p in backbone.model.parameters():
            p.requires_grad_(True)
