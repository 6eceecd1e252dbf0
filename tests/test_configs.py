"""Every shipped config loads, names valid dataset types, and builds its model (tiny overrides)."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from dgss.config import load_config
from dgss.data import DATASET_TYPES
from dgss.tuning.model import build_segmentor

ROOT = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p for p in ROOT.rglob("*.yaml") if "_base_" not in p.parts and "datasets" not in p.parts)

TINY_HEAD = [
    "model.head.hidden_dim=32", "model.head.num_queries=8", "model.head.num_heads=2",
    "model.head.pixel_decoder_layers=1", "model.head.pixel_decoder_ffn_dim=32", "model.head.decoder_layers=2",
    "model.head.decoder_ffn_dim=32", "model.head.num_points_loss=64",
    "method.rein.num_tokens=8", "method.rein.query_dim=32",
    "method.fada.num_tokens=8", "method.fada.query_dim=32",
    "method.soma.start_block=1",  # SoMA's published configs tune blocks 8-23; the tiny models have 4
]


def test_the_published_settings_are_all_there():
    names = {str(p.relative_to(ROOT)) for p in EXPERIMENTS}
    for expected in ["rein/dinov2-l_gtav_512.yaml", "fishertune/dinov2-l_gtav_512.yaml", "frozen/dinov2-l_gtav_512.yaml",
                     "full/dinov2-l_gtav_512.yaml", "rein/dinov2-l_citys2acdc_1024.yaml",
                     "fishertune/dinov2-l_citys2acdc_1024.yaml", "rein/eva02-l_gtav_512.yaml", "rein/clip-l_gtav_512.yaml",
                     "rein/sam-h_gtav_512.yaml", "rein/dinov2-l_gtav+synthia+urbansyn_512.yaml",
                     "rein/dinov2-l_gtav+citys1-16_512.yaml", "eval/rein_dinov2-l_cityscapes-c.yaml",
                     "eval/rein_dinov2-l_adverse.yaml"]:
        assert expected in names


def test_the_512_recipe_numbers():
    cfg = load_config(ROOT / "rein/dinov2-l_gtav_512.yaml")
    assert (cfg.train.iters, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay) == (40000, 4, 1e-4, 0.05)
    assert cfg.eval.crop_size == [512, 512] and cfg.eval.stride == [341, 341]
    assert [d.type for d in cfg.data.test] == ["cityscapes", "bdd100k", "mapillary"]
    assert cfg.method.rein.num_tokens == cfg.model.head.num_queries == 100
    acdc = load_config(ROOT / "rein/dinov2-l_citys2acdc_1024.yaml")
    assert (acdc.train.lr, acdc.train.warmup_iters, acdc.eval.stride) == (6e-5, 10000, [683, 683])
    assert {d.condition for d in acdc.data.test} == {"fog", "night", "rain", "snow"}
    full = load_config(ROOT / "full/dinov2-l_gtav_512.yaml")
    assert full.method.backbone_lr_mult == 0.1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    for ds in cfg.data.train + cfg.data.val + cfg.data.test:
        assert ds.type in DATASET_TYPES, (path, ds.type)
    kwargs = "{" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in tiny_overrides(cfg.model.backbone).items()) + "}"
    tiny = load_config(path, ["model.weights=null", "model.img_size=64", f"model.backbone_kwargs={kwargs}", *TINY_HEAD])
    model = build_segmentor(tiny).eval()
    assert model.backbone.name == cfg.model.backbone
    assert model.method.name == cfg.method.name
    with torch.no_grad():
        scores = model.whole_inference(torch.randn(1, 3, 64, 64))
    assert scores.shape == (1, 19, 64, 64)
