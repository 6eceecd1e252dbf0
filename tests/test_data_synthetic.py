"""The procedural street-scene generator: deterministic, all classes, real appearance shifts between
domains, and writers that the real dataset classes read back."""

from __future__ import annotations

import numpy as np
import pytest

from dgss.config import DataConfig, DatasetConfig
from dgss.data import DOMAINS, build_dataset, generate, write_cityscapes_layout, write_gtav_layout

SIZE = (64, 128)
APPEARANCE_DOMAINS = [d for d in DOMAINS if d != "geometry"]


def test_generation_is_deterministic_per_seed():
    for domain in DOMAINS:
        image, label = generate(domain, 7, SIZE)
        again_image, again_label = generate(domain, 7, SIZE)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert label.shape == SIZE and label.dtype == np.uint8 and label.max() <= 18
        assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
        assert not np.array_equal(label, generate(domain, 8, SIZE)[1])


@pytest.mark.parametrize("domain", ["clean", "geometry"])
def test_all_19_classes_appear_across_a_batch(domain):
    present = set()
    for seed in range(12):
        present |= set(np.unique(generate(domain, seed, SIZE)[1]).tolist())
    assert present == set(range(19))


def test_appearance_domains_share_the_layout_of_a_seed():
    reference = generate("clean", 3, SIZE)[1]
    for domain in APPEARANCE_DOMAINS:
        assert np.array_equal(generate(domain, 3, SIZE)[1], reference)
    assert not np.array_equal(generate("geometry", 3, SIZE)[1], reference)


def batch(domain: str, seeds=range(8)):
    images, labels = zip(*(generate(domain, s, SIZE) for s in seeds))
    return np.stack(images).astype(np.float32), np.stack(labels)


def test_domains_differ_in_channel_statistics():
    stats = {d: batch(d) for d in DOMAINS}
    brightness = {d: images.mean() for d, (images, _) in stats.items()}
    contrast = {d: images.std(axis=(1, 2)).mean() for d, (images, _) in stats.items()}
    assert brightness["night"] < 0.35 * brightness["textured"]
    assert contrast["fog"] < 0.7 * contrast["textured"] and brightness["fog"] > brightness["textured"]

    def saturation(images):
        return (images.max(axis=3) - images.min(axis=3)).mean()

    assert saturation(stats["rain"][0]) < 0.8 * saturation(stats["textured"][0])

    def detail(images):  # mean absolute horizontal gradient: texture and noise
        return np.abs(np.diff(images, axis=2)).mean()

    assert detail(stats["textured"][0]) > 2.0 * detail(stats["clean"][0])
    # Same labels, other colours: the mean sky colour moves far in colour-shifted images.
    textured_images, labels = stats["textured"]
    shifted_images, _ = stats["colorshift"]
    sky = labels == 10
    assert np.linalg.norm(textured_images[sky].mean(0) - shifted_images[sky].mean(0)) > 40
    # Other geometry: a lower horizon puts the road lower and makes it narrower.
    road_rows = {d: np.nonzero(stats[d][1] == 0)[1].mean() for d in ("textured", "geometry")}
    assert road_rows["geometry"] > road_rows["textured"] + 3
    assert (stats["geometry"][1] == 0).mean() < 0.8 * (stats["textured"][1] == 0).mean()


def test_a_classifier_trained_on_one_domain_loses_accuracy_on_others():
    """Nearest class-mean colour classifier: fit on clean scenes, test on unseen scenes per domain."""
    train_images, train_labels = batch("clean", range(100, 110))
    means = np.stack([train_images[train_labels == c].mean(0) if (train_labels == c).any() else np.full(3, 1e6)
                      for c in range(19)])

    def accuracy(domain: str) -> float:
        images, labels = batch(domain, range(200, 204))
        distances = ((images[..., None, :] - means) ** 2).sum(-1)
        return float((distances.argmin(-1) == labels).mean())

    in_domain = accuracy("clean")
    assert in_domain > 0.5
    for domain in ("night", "fog", "colorshift", "rain"):
        assert accuracy(domain) < in_domain - 0.1, domain


def test_writers_produce_layouts_the_datasets_read_back(tmp_path):
    write_gtav_layout(tmp_path / "gtav", "textured", n=3, seed=5, size=SIZE)
    gtav = build_dataset(DatasetConfig(type="gtav", root=str(tmp_path / "gtav")), DataConfig(), train=False)
    assert [s.name for s in gtav.samples] == ["00001", "00002", "00003"]
    for i in range(3):
        image, label = gtav.load(i)
        expected_image, expected_label = generate("textured", 5 + i, SIZE)
        assert np.array_equal(image, expected_image) and np.array_equal(label, expected_label)
    write_cityscapes_layout(tmp_path / "cs", "night", n=2, seed=9, size=SIZE, split="val")
    for label_type in ("train_ids", "label_ids"):
        cs = build_dataset(DatasetConfig(type="cityscapes", root=str(tmp_path / "cs"), split="val",
                                         options={"label_type": label_type}), DataConfig(), train=False)
        assert np.array_equal(cs.load(1)[1], generate("night", 10, SIZE)[1])


def test_synthetic_dataset_type_renders_on_the_fly():
    options = {"domain": "fog", "num_images": 5, "size": list(SIZE), "seed": 3}
    train = build_dataset(DatasetConfig(type="synthetic", options=options),
                          DataConfig(crop_size=[32, 32], scales=[48]), train=True)
    val = build_dataset(DatasetConfig(type="synthetic", split="val", options=options), DataConfig(), train=False)
    assert len(train) == 5 and train[0]["image"].shape == (3, 32, 32)
    assert np.array_equal(train.load(2)[1], generate("fog", 5, SIZE)[1])
    assert np.array_equal(val.load(2)[1], generate("fog", 10_000_005, SIZE)[1])  # never a training scene
    sample = val[0]
    assert sample["label"].shape == SIZE and sample["ori_size"] == SIZE and sample["name"] == "fog_10000003"
    with pytest.raises(ValueError, match="did you mean 'night'"):
        build_dataset(DatasetConfig(type="synthetic", options={"domain": "nihgt"}), DataConfig(), train=False)
