"""Label tables shared by the rest of the library: class names, palette, id <-> train id maps."""

from __future__ import annotations

import numpy as np
import pytest

from dgss.data import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID, colorize
from dgss.data.labels import LabelValueError, synthia_mapping, train_id_mapping


def test_class_names_and_palette():
    assert len(CITYSCAPES_CLASSES) == 19 and len(CITYSCAPES_PALETTE) == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[18] == "bicycle"
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128) and CITYSCAPES_PALETTE[13] == (0, 0, 142)
    assert len(set(CITYSCAPES_PALETTE)) == 19
    image = colorize(np.array([[0, 13], [255, 18]]))
    assert image.dtype == np.uint8 and tuple(image[0, 1]) == (0, 0, 142) and tuple(image[1, 0]) == (0, 0, 0)


def test_label_id_tables():
    assert LABEL_ID_TO_TRAIN_ID.shape == (256,) and LABEL_ID_TO_TRAIN_ID.dtype == np.uint8
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(256):
        assert LABEL_ID_TO_TRAIN_ID[label_id] == expected.get(label_id, 255)
    assert [TRAIN_ID_TO_LABEL_ID[t] for t in range(19)] == sorted(expected)
    assert TRAIN_ID_TO_LABEL_ID[255] == 0  # ignore -> "unlabeled" for the benchmark server


def test_label_mapping_reports_values_it_does_not_define():
    synthia = synthia_mapping()
    raw = np.array([[3, 8], [21, 1000]], np.uint16)
    with pytest.raises(LabelValueError, match=r"some/file\.png .*SYNTHIA.*: 1000 \(1 pixels\)"):
        synthia(raw, "some/file.png")
    with pytest.warns(UserWarning, match="1000"):
        mapped = synthia(raw, "some/file.png", on_unknown="ignore")
    assert mapped.tolist() == [[0, 13], [3, 255]]
    two_classes = train_id_mapping(2)
    assert two_classes(np.array([[0, 1, 255]], np.uint8)).tolist() == [[0, 1, 255]]
    with pytest.raises(LabelValueError, match=": 2"):
        two_classes(np.array([[2]], np.uint8))
