"""mIoU from a confusion matrix (no metrics framework), reducible across processes."""

from __future__ import annotations

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix (rows: ground truth, columns: prediction).

    Pixels labelled ``ignore_index`` are skipped. IoU of class c = TP / (TP + FP + FN); the mIoU is
    the nan-mean over classes, where a class that is neither present nor predicted is NaN (left out).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer tensors of the same shape (any batch layout)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != self.ignore_index
        k = self.num_classes
        index = label[valid].long().cpu() * k + pred[valid].long().cpu()
        self.matrix += torch.bincount(index, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes (no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            m = self.matrix.to(device)
            torch.distributed.all_reduce(m)
            self.matrix = m.cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64), NaN for classes absent from both labels and predictions."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return float(torch.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum() / total) if total > 0 else float("nan")
