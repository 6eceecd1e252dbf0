"""mIoU from the confusion matrix equals a hand computation."""

import math

import pytest
import torch

from dgss.engine.metrics import ConfusionMatrix


def test_miou_matches_a_hand_computation():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    cm = ConfusionMatrix(num_classes=4)
    cm.update(pred, label)
    # class 0: TP 1, FP 1 (pixel (1,1)), FN 1 (pixel (0,1)) -> 1/3
    # class 1: TP 2, FP 1 -> 2/3 ; class 2: TP 1, FN 1 -> 1/2 ; class 3: only under ignore -> NaN
    iou = cm.iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.matrix.sum() == 6  # the two ignored pixels are not counted


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    assert cm.iou()[2] == 0 and cm.miou() == pytest.approx((0.5 + 0.0) / 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 2), torch.zeros(2, 3))
