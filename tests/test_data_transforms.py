"""The augmentation recipe: resize rules, cat_max_ratio crops, image and label moving together,
labels staying integer, photometric ranges, evaluation resize-to-fit."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from dgss.config import DataConfig
from dgss.data.transforms import (
    EvalTransform,
    TrainTransform,
    fit_resize_shape,
    hsv_to_rgb,
    photometric_distortion,
    random_crop_box,
    resize_label,
    rgb_to_hsv,
    short_side_resize_shape,
)

MEAN, STD = DataConfig().mean, DataConfig().std
COLOURS = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)


def train_transform(**overrides) -> TrainTransform:
    options = dict(crop_size=[32, 32], scales=[48], max_long_side=4096, cat_max_ratio=1.0, mean=MEAN, std=STD,
                   flip_prob=0.5, photometric=False)
    options.update(overrides)
    return TrainTransform(**options)


def blocky_label(h: int, w: int, seed: int = 0, block: int = 8) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 19, (h // block + 1, w // block + 1))
    return np.kron(small, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def unnormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (image * std + mean).permute(1, 2, 0).numpy()


def test_resize_shapes_follow_the_reference_rules():
    assert short_side_resize_shape(1052, 1914, 512, 2048) == (512, 932)
    assert short_side_resize_shape(1052, 1914, 1024, 2048) == (1024, 1863)
    assert short_side_resize_shape(500, 3000, 1024, 2048) == (341, 2048)  # long side capped
    assert short_side_resize_shape(3000, 500, 256, 2048) == (1536, 256)  # portrait
    assert fit_resize_shape(1024, 2048, (1024, 512)) == (512, 1024)  # Cityscapes
    assert fit_resize_shape(720, 1280, (1280, 720)) == (720, 1280)  # BDD100K unchanged
    assert fit_resize_shape(1500, 2000, (1024, 512)) == (512, 683)  # short side binds
    assert fit_resize_shape(2000, 1000, (1024, 512)) == (1024, 512)  # portrait fits the turned box
    assert fit_resize_shape(270, 480, (1920, 1080)) == (1080, 1920)  # small images are scaled up


def test_default_scales_are_the_reference_list():
    assert DataConfig().scales == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]


def test_random_crop_respects_cat_max_ratio():
    # Class 0 everywhere except a 20 x 20 patch of class 1 (and ignore pixels, which never count):
    # one random 24 x 24 crop in five holds >= 25% of class 1; the retries must find those.
    label = np.zeros((48, 48), np.uint8)
    label[:20, :20] = 1
    label[44:, :] = 255

    def balanced(box) -> bool:
        top, left, h, w = box
        counts = np.bincount(label[top: top + h, left: left + w].ravel(), minlength=256)[:255]
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    seeds = range(300)
    checked = [balanced(random_crop_box(label, (24, 24), 0.75, np.random.default_rng(s))) for s in seeds]
    unchecked = [balanced(random_crop_box(label, (24, 24), 1.0, np.random.default_rng(s))) for s in seeds]
    assert np.mean(unchecked) < 0.3  # the constraint is rare by chance...
    assert np.mean(checked) > 0.75  # ...and the retries find it
    top, left, h, w = random_crop_box(label, (200, 50), 0.75, np.random.default_rng(0))
    assert (h, w) == (48, 48) and (top, left) == (0, 0)  # crops never leave the image


@pytest.mark.parametrize("seed", range(6))
def test_image_and_label_move_together(seed):
    label = blocky_label(40, 56, seed)
    image = COLOURS[label]  # each pixel's colour encodes its class
    transform = train_transform(scales=[24, 40, 64], crop_size=[32, 32])
    out_image, out_label = transform(image, label, np.random.default_rng(seed))
    assert out_image.shape == (3, 32, 32) and out_label.shape == (32, 32) and out_label.dtype == torch.int64
    colours = unnormalise(out_image)
    lab = out_label.numpy()
    # Compare where the 3 x 3 neighbourhood is one class (bilinear blending only touches borders).
    padded = np.pad(lab, 1, mode="edge")
    uniform = np.all([padded[1 + dy: 33 + dy, 1 + dx: 33 + dx] == lab
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0) & (lab != 255)
    assert uniform.sum() > 50
    np.testing.assert_allclose(colours[uniform], COLOURS[lab[uniform]], atol=1.5)


def test_flip_probability_one_mirrors_both():
    label = blocky_label(32, 32, 3)
    image = COLOURS[label]
    out_image, out_label = train_transform(scales=[32], flip_prob=1.0)(image, label, np.random.default_rng(0))
    assert torch.equal(out_label, torch.from_numpy(label[:, ::-1].copy()).long())
    np.testing.assert_allclose(unnormalise(out_image), image[:, ::-1], atol=1e-3)
    out_image, out_label = train_transform(scales=[32], flip_prob=0.0)(image, label, np.random.default_rng(0))
    assert torch.equal(out_label, torch.from_numpy(label).long())


def test_labels_are_never_interpolated():
    label = np.where(blocky_label(37, 53, 1, block=3) % 2 == 0, 0, 18).astype(np.uint8)
    for size in ((100, 31), (11, 17), (74, 106)):
        assert set(np.unique(resize_label(torch.from_numpy(label), size).numpy())) <= {0, 18}
    out_image, out_label = train_transform(scales=[20, 77], crop_size=[64, 64])(
        COLOURS[label], label, np.random.default_rng(5))
    assert set(out_label.unique().tolist()) <= {0, 18, 255}


def test_small_images_are_padded_with_zero_and_ignore():
    label = blocky_label(16, 24, 2)
    out_image, out_label = train_transform(scales=[16], crop_size=[32, 32], flip_prob=0.0)(
        COLOURS[label], label, np.random.default_rng(0))
    assert (out_label[16:] == 255).all() and (out_label[:, 24:] == 255).all()
    assert (out_image[:, 16:] == 0).all() and (out_image[:, :, 24:] == 0).all()
    assert torch.equal(out_label[:16, :24], torch.from_numpy(label).long())


def test_eval_transform_fits_image_and_keeps_label():
    label = blocky_label(64, 128, 4)
    image, out_label = EvalTransform(resize=[64, 32], mean=MEAN, std=STD)(COLOURS[label], label)
    assert image.shape == (3, 32, 64) and torch.equal(out_label, torch.from_numpy(label).long())
    image, _ = EvalTransform(resize=None, mean=MEAN, std=STD)(COLOURS[label], label)
    np.testing.assert_allclose(unnormalise(image), COLOURS[label], atol=1e-3)


class ScriptedRng:
    """Records the ranges the distortion draws from; returns the upper end (or a scripted choice)."""

    def __init__(self) -> None:
        self.calls = []

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return 1 if high is None else high - 1

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return high


def test_photometric_distortion_uses_the_recipe_ranges():
    rng = ScriptedRng()
    grey = torch.full((3, 4, 4), 100.0)
    out = photometric_distortion(grey, rng)
    uniforms = [c[1:] for c in rng.calls if c[0] == "uniform"]
    assert uniforms == [(-32.0, 32.0), (0.5, 1.5), (0.5, 1.5)]  # brightness, contrast, saturation
    assert ("integers", -18, 19) in rng.calls  # hue, OpenCV units (180 per turn)
    # grey stays grey under saturation and hue changes: (100 + 32) * 1.5 = 198
    torch.testing.assert_close(out, torch.full((3, 4, 4), 198.0))
    colour = torch.tensor([250.0, 10.0, 10.0]).view(3, 1, 1).expand(3, 2, 2)
    assert photometric_distortion(colour, ScriptedRng()).max() <= 255.0


def test_hsv_round_trip_matches_colorsys():
    rgb = torch.rand(3, 5, 7)
    hsv = rgb_to_hsv(rgb)
    for y, x in ((0, 0), (2, 3), (4, 6)):
        expected = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        np.testing.assert_allclose(hsv[:, y, x].numpy(), expected, atol=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)
