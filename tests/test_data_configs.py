"""The dataset configs in configs/datasets: all valid, and the adverse-condition test sets (Dark
Zurich, Nighttime Driving, Foggy Zurich, Foggy Driving) read tiny trees in their official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgss.config import load_config
from dgss.data import build_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
H, W = 9, 16


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3))


def train_ids(value: int) -> np.ndarray:
    label = np.full((H, W), value)
    label[0, 0] = 255
    return label


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.data.train or cfg.data.test
    for ds in cfg.data.train + cfg.data.test:
        assert ds.type in ("gtav", "synthia", "cityscapes", "bdd100k", "mapillary", "acdc", "urbansyn", "folder",
                           "synthetic")


def load_test_set(config: str, root: Path):
    cfg = load_config(CONFIGS / config, overrides=[f"data.test.0.root={root}"])
    return build_dataset(cfg.data.test[0], cfg.data, train=False)


def test_dark_zurich_layout(tmp_path):
    seq = tmp_path / "rgb_anon" / "val" / "night" / "GOPR0356"
    gt = tmp_path / "gt" / "val" / "night" / "GOPR0356"
    for i, cls in enumerate((13, 8)):
        stem = f"GOPR0356_frame_00032{i}"
        save(seq / f"{stem}_rgb_anon.png", rgb(i))
        save(gt / f"{stem}_gt_labelTrainIds.png", train_ids(cls))
        save(gt / f"{stem}_gt_labelIds.png", np.full((H, W), 26))  # the other files of the download
        save(gt / f"{stem}_gt_invGray.png", np.full((H, W), 200))
    ds = load_test_set("dark_zurich.yaml", tmp_path)
    assert ds.name == "dark_zurich" and len(ds) == 2
    assert (ds.load(0)[1][1:] == 13).all() and ds.load(0)[1][0, 0] == 255 and (ds.load(1)[1][1:] == 8).all()
    sample = ds[0]
    assert sample["image"].shape == (3, 1080, 1920) and sample["label"].shape == (H, W)


def test_nighttime_driving_layout(tmp_path):
    save(tmp_path / "leftImg8bit" / "test" / "night" / "0_frame_0120_leftImg8bit.png", rgb(0))
    gt = tmp_path / "gtCoarse_daytime_trainvaltest" / "test" / "night"
    save(gt / "0_frame_0120_gtCoarse_labelTrainIds.png", train_ids(11))
    save(gt / "0_frame_0120_gtCoarse_labelIds.png", np.full((H, W), 24))
    ds = load_test_set("nighttime_driving.yaml", tmp_path)
    assert len(ds) == 1 and (ds.load(0)[1][1:] == 11).all()


def test_foggy_zurich_layout_uses_the_official_test_list(tmp_path):
    for i, frame in enumerate(("1508040913.0_frame_000955", "1508040913.0_frame_000956")):
        save(tmp_path / "RGB" / "GP010229" / f"{frame}.png", rgb(i))
    save(tmp_path / "gt_labelTrainIds" / "GP010229" / "1508040913.0_frame_000955.png", train_ids(2))
    lists = tmp_path / "lists_file_names"
    lists.mkdir()
    (lists / "RGB_testv2_filenames.txt").write_text("RGB/GP010229/1508040913.0_frame_000955.png\n")
    ds = load_test_set("foggy_zurich.yaml", tmp_path)
    assert [s.name for s in ds.samples] == ["1508040913.0_frame_000955"]  # the unlabelled frame is not listed
    assert (ds.load(0)[1][1:] == 2).all()


def test_foggy_driving_layout_pairs_fine_and_coarse_labels(tmp_path):
    save(tmp_path / "leftImg8bit" / "test" / "pedestrian" / "pedestrian_20161201_101324_leftImg8bit.png", rgb(0))
    save(tmp_path / "gtFine" / "test" / "pedestrian" / "pedestrian_20161201_101324_gtFine_labelTrainIds.png",
         train_ids(11))
    save(tmp_path / "leftImg8bit" / "test_extra" / "public" / "public_web_14_leftImg8bit.png", rgb(1))
    save(tmp_path / "gtCoarse" / "test_extra" / "public" / "public_web_14_gtCoarse_labelTrainIds.png", train_ids(10))
    ds = load_test_set("foggy_driving.yaml", tmp_path)
    labels = {s.name: ds.load(i)[1] for i, s in enumerate(ds.samples)}
    assert (labels["pedestrian_20161201_101324_leftImg8bit"][1:] == 11).all()
    assert (labels["public_web_14_leftImg8bit"][1:] == 10).all()
