"""Typed config: YAML + _base_ + dotted overrides; every bad key or type is a clear error."""

import pytest
import yaml

from dgss.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict, validate_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_published_recipe():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.iters == 40000 and cfg.train.batch_size == 4
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05
    assert cfg.data.scales[0] == 256 and cfg.data.scales[-1] == 1024 and len(cfg.data.scales) == 16
    assert cfg.eval.crop_size == [512, 512] and cfg.eval.stride == [341, 341]
    assert cfg.model.head.num_queries == 100 and cfg.model.head.num_points_loss == 12544


def test_yaml_base_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"model": {"backbone": "dinov2_s", "head": {"hidden_dim": 64}}, "train": {"lr": "1e-4"}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "model": {"img_size": 256}, "train": {"iters": 10}})
    cfg = load_config(child, ["train.lr=2e-4", "model.backbone=dinov2_l", "data.test=[{type: cityscapes, root: /d}]"])
    assert cfg.model.backbone == "dinov2_l"
    assert cfg.model.img_size == 256 and cfg.model.head.hidden_dim == 64  # dicts merge key by key
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.iters == 10
    assert cfg.data.test[0].type == "cityscapes" and cfg.data.test[0].root == "/d"
    assert base.exists()


def test_list_item_override(tmp_path):
    path = write(tmp_path / "c.yaml", {"data": {"test": [{"type": "bdd100k", "root": "a"}, {"type": "acdc", "root": "b"}]}})
    cfg = load_config(path, ["data.test.1.condition=night"])
    assert cfg.data.test[1].condition == "night" and cfg.data.test[0].condition is None
    with pytest.raises(ConfigError, match="'5' is not a valid index"):
        load_config(path, ["data.test.5.root=x"])


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'train.lrr'" in msg and "did you mean 'train.lr'" in msg and str(path) in msg


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key 'model.backbon'.*did you mean 'model.backbone'"):
        load_config(None, ["model.backbon=dinov2_l"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"iters": "many"}})
    with pytest.raises(ConfigError, match=r"key 'train.iters'.* expects int, got str 'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'train.lr'.* expects float"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"key 'train.amp'.* expects one of 'none', 'bf16', 'fp16'.*did you mean 'bf16'"):
        load_config(None, ["train.amp=bf61"])
    with pytest.raises(ConfigError, match=r"key 'train.batch_size'.* expects int, got bool"):
        load_config(None, ["train.batch_size=true"])
    with pytest.raises(ConfigError, match=r"key 'data.crop_size\[1\]' .*expects int"):
        load_config(None, ["data.crop_size=[512, x]"])
    with pytest.raises(ConfigError, match=r"key 'eval.precise_bn_batches'.* must be at least 0, got -1"):
        validate_config(load_config(None, ["eval.precise_bn_batches=-1"]))  # not silently off


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    missing_base = write(tmp_path / "m.yaml", {"_base_": "gone.yaml"})
    with pytest.raises(ConfigError, match="config file not found: .*gone.yaml"):
        load_config(missing_base)
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=run1", "train.iters=7", "model.backbone_kwargs={depth: 2}"])
    out = save_config(cfg, tmp_path / "run1" / "config.yaml")
    again = load_config(out)
    assert to_dict(again) == to_dict(cfg)
    assert again.model.backbone_kwargs == {"depth": 2}
