"""Every dataset layout, written tiny in its official download layout: files are found, paired and
their labels decoded to the right train ids; bad input gives errors naming the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgss.config import ConfigError, DataConfig, DatasetConfig
from dgss.data import (
    BadSampleError,
    DataError,
    LabelValueError,
    UnreadableFileError,
    build_dataset,
)
from dgss.data.image_io import write_png_16bit

H, W = 6, 8


def image(seed: int = 0, size=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if mode == "P":  # palette indices are the classes; a full palette keeps PIL from remapping them
        img = Image.frombytes("P", img.size, array.astype(np.uint8).tobytes())
        img.putpalette([(i * 37 + c * 101) % 256 for i in range(256) for c in range(3)])
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
    return path


def label_map(values: dict[tuple[int, int], int], fill: int, size=(H, W)) -> np.ndarray:
    label = np.full(size, fill, np.uint8)
    for (y, x), v in values.items():
        label[y, x] = v
    return label


def build(type_: str, root: Path, **fields):
    return build_dataset(DatasetConfig(type=type_, root=str(root), **fields), DataConfig(), train=False)


# -- one test per layout: known pixels -> train ids --------------------------------------------


def test_gtav_label_ids_become_train_ids(tmp_path):
    ids = label_map({(0, 0): 26, (0, 1): 7, (0, 2): 0, (1, 0): 33, (1, 1): 255, (2, 2): 24}, fill=11)
    save(tmp_path / "images" / "00001.png", image(1))
    save(tmp_path / "labels" / "00001.png", ids, mode="P")  # GTAV ships palette PNGs
    # A label already converted by the usual script is used as train ids.
    save(tmp_path / "images" / "00002.png", image(2))
    save(tmp_path / "labels" / "00002_labelTrainIds.png", label_map({(0, 0): 13}, fill=255))
    ds = build("gtav", tmp_path)
    assert [s.name for s in ds.samples] == ["00001", "00002"]
    _, label = ds.load(0)
    assert label[0, 0] == 13 and label[0, 1] == 0 and label[0, 2] == 255
    assert label[1, 0] == 18 and label[1, 1] == 255 and label[2, 2] == 11 and label[3, 3] == 2
    assert ds.load(1)[1][0, 0] == 13 and ds.load(1)[1][1, 1] == 255
    sample = ds[0]
    assert sample["label"].dtype == torch.int64 and sample["ori_size"] == (H, W)
    assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
    mean = torch.tensor(DataConfig().mean).view(3, 1, 1)
    std = torch.tensor(DataConfig().std).view(3, 1, 1)
    torch.testing.assert_close(sample["image"] * std + mean, torch.from_numpy(image(1)).permute(2, 0, 1).float(),
                               atol=1e-3, rtol=0)


def test_synthia_reads_class_from_first_channel_of_16bit_png(tmp_path):
    rng = np.random.default_rng(0)
    raw = np.zeros((H, W, 3), np.uint16)
    raw[..., 0] = 3  # road everywhere...
    raw[0, 0, 0], raw[0, 1, 0], raw[0, 2, 0], raw[1, 0, 0] = 8, 10, 22, 19  # car, person, lanemarking, bus
    raw[..., 1] = rng.integers(256, 60000, (H, W))  # instance ids need the full 16 bits
    raw[..., 2] = 8  # a reader taking the wrong channel would see "car" everywhere
    save(tmp_path / "RGB" / "0000001.png", image())
    write_png_16bit(tmp_path / "GT" / "LABELS" / "0000001.png", raw)
    ds = build("synthia", tmp_path)
    _, label = ds.load(0)
    assert (label[0, 0], label[0, 1], label[0, 2], label[1, 0]) == (13, 11, 255, 15)
    assert (label[2:] == 0).all()
    assert ds.eval_class_ids is not None and len(ds.eval_class_ids) == 16 and 9 not in ds.eval_class_ids

    raw[3, 3, 0] = 300  # a value beyond SYNTHIA's ids must not silently become a class
    write_png_16bit(tmp_path / "GT" / "LABELS" / "0000001.png", raw)
    with pytest.raises(LabelValueError, match=r"0000001\.png.*300"):
        build("synthia", tmp_path).load(0)


def test_cityscapes_label_ids_mapped_on_the_fly_and_train_ids_preferred(tmp_path):
    city = "aachen"
    for i, fill in enumerate((26, 7)):
        stem = f"{city}_000000_00001{i}"
        save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", image(i))
        save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label_map({(0, 0): 24}, fill=fill))
    # The second image also has a converted file, which wins in "auto" mode.
    stem = f"{city}_000000_000011"
    save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", label_map({}, fill=5))
    ds = build("cityscapes", tmp_path)
    assert ds.samples[0].name == "aachen_000000_000010_leftImg8bit"
    first, second = ds.load(0)[1], ds.load(1)[1]
    assert first[0, 0] == 11 and first[1, 1] == 13
    assert (second == 5).all()
    forced = build("cityscapes", tmp_path, options={"label_type": "label_ids"})
    assert forced.load(1)[1][1, 1] == 0  # label id 7 = road


def test_bdd100k_masks_are_train_ids(tmp_path):
    save(tmp_path / "images" / "10k" / "val" / "7d06fefd-f7be05a6.jpg", image())
    save(tmp_path / "labels" / "sem_seg" / "masks" / "val" / "7d06fefd-f7be05a6.png",
         label_map({(0, 0): 13, (0, 1): 18}, fill=255))
    ds = build("bdd100k", tmp_path)
    img, label = ds.load(0)
    assert img.shape == (H, W, 3) and label[0, 0] == 13 and label[0, 1] == 18 and label[2, 2] == 255


MAPILLARY_V12 = [
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge",
    "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner",
    "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox",
    "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole",
    "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car",
    "Caravan", "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount",
    "Ego Vehicle", "Unlabeled",
]


def test_mapillary_name_rules_match_the_protocol():
    from dgss.data.labels import mapillary_train_id

    expected = {"Curb": 1, "Fence": 4, "Wall": 3, "Bike Lane": 0, "Crosswalk - Plain": 0, "Curb Cut": 1,
                "Parking": 0, "Pedestrian Area": 1, "Road": 0, "Service Lane": 0, "Sidewalk": 1, "Building": 2,
                "Person": 11, "Bicyclist": 12, "Motorcyclist": 12, "Other Rider": 12, "Lane Marking - Crosswalk": 0,
                "Lane Marking - General": 0, "Sky": 10, "Terrain": 9, "Vegetation": 8, "Street Light": 5, "Pole": 5,
                "Traffic Sign Frame": 7, "Utility Pole": 5, "Traffic Light": 6, "Traffic Sign (Back)": 7,
                "Traffic Sign (Front)": 7, "Bicycle": 18, "Bus": 15, "Car": 13, "Motorcycle": 17, "On Rails": 16,
                "Truck": 14}
    assert {name: mapillary_train_id(name) for name in MAPILLARY_V12} == {
        name: expected.get(name, 255) for name in MAPILLARY_V12}


def write_mapillary(root: Path, size=(H, W), split: str = "validation") -> dict[str, int]:
    index = {name: i for i, name in enumerate(MAPILLARY_V12)}
    labels = [{"readable": n, "name": n.lower().replace(" ", "-"), "color": [i, i, i]} for i, n in enumerate(MAPILLARY_V12)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "config_v1.2.json").write_text(json.dumps({"labels": labels}))
    pixels = {(0, 0): index["Lane Marking - General"], (0, 1): index["Car"], (0, 2): index["Traffic Sign (Front)"],
              (0, 3): index["Bird"], (1, 0): index["Curb"], (1, 1): index["Bicyclist"], (1, 2): index["On Rails"],
              (1, 3): index["Unlabeled"], (2, 0): index["Crosswalk - Plain"], (2, 1): index["Utility Pole"]}
    save(root / split / "images" / "abc.jpg", image(size=size))
    save(root / split / "v1.2" / "labels" / "abc.png", label_map(pixels, fill=index["Sky"], size=size), mode="P")
    return index


def test_mapillary_classes_mapped_by_name_from_config_json(tmp_path):
    write_mapillary(tmp_path)
    ds = build("mapillary", tmp_path, split="validation", options={"half_resolution": False})
    label = ds.load(0)[1]
    assert list(label[0, :4]) == [0, 13, 7, 255]  # lane marking -> road, car, sign, bird -> ignore
    assert list(label[1, :4]) == [1, 12, 16, 255]  # curb -> sidewalk, bicyclist -> rider, on rails -> train
    assert list(label[2, :2]) == [0, 5] and label[5, 7] == 10


def test_mapillary_evaluation_uses_half_resolution_by_default(tmp_path):
    for split in ("validation", "training"):
        write_mapillary(tmp_path, size=(12, 16), split=split)
    image_half, label_half = build("mapillary", tmp_path, split="val").load(0)
    assert image_half.shape == (6, 8, 3) and label_half.shape == (6, 8)
    assert label_half[5, 7] == 10 and set(np.unique(label_half)) <= {0, 1, 5, 7, 10, 12, 13, 16, 255}
    training = build_dataset(DatasetConfig(type="mapillary", root=str(tmp_path), split="train"), DataConfig(),
                             train=True)
    assert training.load(0)[1].shape == (12, 16)
    (tmp_path / "config_v1.2.json").unlink()
    with pytest.raises(DataError, match=r"config_v1\.2\.json"):
        build("mapillary", tmp_path, split="validation")


def test_acdc_conditions_splits_and_unlabelled_test(tmp_path):
    for cond, fill in (("fog", 13), ("night", 0)):
        stem = "GOPR0475_frame_000041"
        save(tmp_path / "rgb_anon" / cond / "val" / "GOPR0475" / f"{stem}_rgb_anon.png", image())
        save(tmp_path / "gt" / cond / "val" / "GOPR0475" / f"{stem}_gt_labelTrainIds.png", label_map({}, fill=fill))
        save(tmp_path / "rgb_anon" / cond / "test" / "GOPR0477" / f"{stem}_rgb_anon.png", image())
    assert len(build("acdc", tmp_path, condition="fog")) == 1
    assert (build("acdc", tmp_path, condition="night").load(0)[1] == 0).all()
    with pytest.raises(DataError, match="rain"):  # no rain folder: missing condition folder is named
        build("acdc", tmp_path)
    with pytest.raises(DataError, match="did you mean 'fog'"):
        build("acdc", tmp_path, condition="fgo")
    unlabelled = build("acdc", tmp_path, condition="fog", split="test", with_labels=False)
    sample = unlabelled[0]
    assert "label" not in sample and sample["ori_size"] == (H, W)


def test_urbansyn_void_19_is_ignored(tmp_path):
    save(tmp_path / "rgb" / "rgb_0001.png", image())
    save(tmp_path / "ss" / "ss_0001.png", label_map({(0, 0): 19, (0, 1): 13}, fill=8))
    label = build("urbansyn", tmp_path).load(0)[1]
    assert label[0, 0] == 255 and label[0, 1] == 13 and label[1, 1] == 8


def test_folder_binary_masks_and_id_map(tmp_path):
    save(tmp_path / "images" / "sub" / "a.jpg", image())
    save(tmp_path / "masks" / "sub" / "a.png", label_map({(0, 0): 255, (0, 1): 1}, fill=0))
    binary = build("folder", tmp_path, options={"images": "images", "labels": "masks", "label_format": "binary"})
    assert binary.classes == ("background", "foreground") and binary.num_classes == 2
    label = binary.load(0)[1]
    assert label[0, 0] == 1 and label[0, 1] == 1 and label[1, 1] == 0
    mapped = build("folder", tmp_path, options={"images": "images/**/*.jpg", "labels": "masks",
                                                "classes": ["ground", "object"], "id_map": {0: 0, 255: 1},
                                                "ignore_values": [1]})
    label = mapped.load(0)[1]
    assert label[0, 0] == 1 and label[0, 1] == 255 and label[1, 1] == 0


# -- bad input: clear errors that name the file ------------------------------------------------


def test_missing_root_and_split_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build("gtav", tmp_path / "nowhere")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"leftImg8bit/train.*contains: val"):
        build("cityscapes", tmp_path, split="train")
    with pytest.raises(ConfigError, match="did you mean 'cityscapes'"):
        build("citiscapes", tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'label_type'"):
        build("cityscapes", tmp_path, options={"labeltype": "auto"})
    with pytest.raises(ConfigError, match="needs 'root'"):
        build_dataset(DatasetConfig(type="gtav"), DataConfig(), train=False)


def test_image_without_label_names_both_paths(tmp_path):
    save(tmp_path / "images" / "00001.png", image())
    save(tmp_path / "labels" / "00001.png", label_map({}, 7))
    save(tmp_path / "images" / "00002.png", image())
    with pytest.raises(DataError, match=r"1 of 2 images have no label.*00002\.png \(expected .*labels.*00002"):
        build("gtav", tmp_path)
    assert len(build("gtav", tmp_path, with_labels=False)) == 2


def test_size_mismatch_and_truncated_files_error_or_skip(tmp_path):
    save(tmp_path / "images" / "00001.png", image())
    save(tmp_path / "labels" / "00001.png", label_map({}, 7, size=(H, W - 1)))
    save(tmp_path / "images" / "00002.png", image(size=(40, 40)))
    data = (tmp_path / "images" / "00002.png").read_bytes()
    (tmp_path / "images" / "00002.png").write_bytes(data[: len(data) // 2])
    save(tmp_path / "labels" / "00002.png", label_map({}, 7, size=(40, 40)))
    save(tmp_path / "images" / "00003.png", image())
    save(tmp_path / "labels" / "00003.png", label_map({}, 26))
    ds = build("gtav", tmp_path)
    with pytest.raises(BadSampleError, match=r"labels/00001\.png is 7x6 but image .*images/00001\.png is 8x6"):
        ds[0]
    with pytest.raises(UnreadableFileError, match=r"images/00002\.png"):
        ds[1]
    skipping = build("gtav", tmp_path, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="skipping images/00001.png"):
        assert skipping[0] is None  # evaluation leaves a bad sample out
    train = build_dataset(DatasetConfig(type="gtav", root=str(tmp_path), on_bad_sample="skip"),
                          DataConfig(crop_size=[4, 4], scales=[6]), train=True)
    with pytest.warns(UserWarning, match="skipping"):
        sample = train[1]  # training replaces it by the next readable sample
    assert sample["name"] == "00003" and set(sample["label"].unique().tolist()) <= {13, 255}


def test_label_values_outside_the_mapping(tmp_path):
    save(tmp_path / "images" / "00001.png", image())
    save(tmp_path / "labels" / "00001.png", label_map({(0, 0): 50, (0, 1): 26}, 7), mode="P")
    with pytest.raises(LabelValueError, match=r"labels/00001\.png contains values outside .*: 50 \(1 pixels\)"):
        build("gtav", tmp_path).load(0)
    lenient = build("gtav", tmp_path, on_unknown_label="ignore")
    with pytest.warns(UserWarning, match="50"):
        label = lenient.load(0)[1]
    assert label[0, 0] == 255 and label[0, 1] == 13 and label[1, 1] == 0
    save(tmp_path / "labels" / "00001.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match="RGB image; expected a single channel"):
        build("gtav", tmp_path).load(0)


def test_warnings_are_not_repeated_for_the_same_file(tmp_path):
    save(tmp_path / "images" / "00001.png", image())
    (tmp_path / "images" / "00001.png").write_bytes(b"not a png")
    save(tmp_path / "labels" / "00001.png", label_map({}, 7))
    ds = build("gtav", tmp_path, on_bad_sample="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[0] is None and ds[0] is None
    assert len([w for w in caught if "skipping" in str(w.message)]) == 1
