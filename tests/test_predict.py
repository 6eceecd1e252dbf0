"""Using a trained model: `dgss.load` for every checkpoint kind, `Predictor.predict` on every input type,
test-time augmentation, and the label-id format."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_engine_support import backbone_weights_file, tiny_config

import dgss
from dgss.config import EvalConfig, load_config
from dgss.data import TRAIN_ID_TO_LABEL_ID
from dgss.engine.trainer import Trainer
from dgss.fileio import CHECKSUM_KEY, save_safetensors
from dgss.tuning.model import build_segmentor
from dgss.predict import TTA, CheckpointError, Predictor, parse_tta, train_ids_to_label_ids, tta_inference
from dgss.tuning.rein_checkpoint import export_official_rein


def street_image(height=64, width=96, seed=0):
    """A smooth random RGB image (uint8), so that predictions are not all one class."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 6)).astype(np.float32))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return image[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def trained_rein(tmp_path_factory):
    """A tiny Rein + Mask2Former run trained for 3 iterations (final model and a checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("rein_run")
    config = tiny_config(tmp_path, "rein", head="mask2former", method="rein", iters=3, checkpoint_interval=3)
    cfg = load_config(config)
    trainer = Trainer(cfg)
    trainer.train()
    return cfg, trainer.model.eval(), tmp_path / "runs" / "rein", config


def test_round_trip_load_predicts_exactly_as_the_trained_model(trained_rein):
    cfg, trained, run, _ = trained_rein
    image = street_image()
    expected = Predictor(trained, cfg).predict(image)
    fresh = Predictor(build_segmentor(cfg).eval(), cfg).predict(image)
    assert not torch.allclose(fresh.scores, expected.scores)  # training changed the model: the oracle is sharp
    for path in (run / "model_final.safetensors", run, run / "checkpoints" / "iter_0000003.state.pt"):
        model = dgss.load(path, device="cpu")
        assert not model.model.training and model.source.suffix == ".safetensors"
        result = model.predict(image)
        assert torch.equal(result.scores, expected.scores) and torch.equal(result.labels, expected.labels)
    assert result.labels.shape == (64, 96) and result.labels.dtype == torch.int64
    assert result.scores.shape == (19, 64, 96) and result.colour().shape == (64, 96, 3)


def test_every_input_type_gives_the_same_prediction(trained_rein, tmp_path):
    cfg, trained, _, _ = trained_rein
    model = Predictor(trained, cfg)
    image = street_image(seed=1)
    Image.fromarray(image).save(tmp_path / "x.png")
    reference = model.predict(image).scores
    chw = torch.from_numpy(image).permute(2, 0, 1)
    inputs = [tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(image), chw, chw.float(),
              image.astype(np.float64)]
    for item in inputs:
        assert torch.equal(model.predict(item).scores, reference), type(item)
    both = model.predict([image, image[:, ::-1]])
    assert len(both) == 2 and torch.equal(both[0].scores, reference)
    with pytest.raises(ValueError, match="H x W x 3"):
        model.predict(np.zeros((4, 5, 6, 7), np.uint8))


def test_method_only_checkpoint_rebuilds_the_backbone_from_its_weights_file(tmp_path):
    weights = backbone_weights_file(tmp_path, "a.pth")
    config = tiny_config(tmp_path, "method_only", method="rein", head="mask2former", weights=str(weights), iters=1)
    cfg = load_config(config)
    trainer = Trainer(cfg)
    final = trainer.train()
    names = list(load_file(str(final)))
    assert not any(k.startswith("backbone.model.") for k in names)  # the file holds Rein + head only
    image = street_image()
    expected = Predictor(trainer.model.eval(), cfg).predict(image).scores
    assert torch.equal(dgss.load(final, device="cpu").predict(image).scores, expected)

    moved = weights.rename(tmp_path / "moved.pth")
    with pytest.raises(CheckpointError, match="does not exist here"):
        dgss.load(final)
    assert torch.equal(dgss.load(final, backbone_weights=moved, device="cpu").predict(image).scores, expected)
    other = backbone_weights_file(tmp_path, "b.pth", std=0.3)
    with pytest.raises(CheckpointError, match="differ from the backbone weights"):
        dgss.load(final, backbone_weights=other)


def test_official_rein_checkpoint_loads_with_its_config(trained_rein, tmp_path):
    cfg, trained, _, config = trained_rein
    official = tmp_path / "rein_official.pth"
    backbone = tmp_path / "backbone.pth"
    torch.save({"state_dict": export_official_rein(trained.method, trained.head)}, official)
    torch.save(trained.backbone.model.state_dict(), backbone)  # the backbone comes from its own file
    image = street_image()
    expected = Predictor(trained, cfg).predict(image).scores
    model = dgss.load(official, config=config, backbone_weights=backbone, device="cpu")
    assert torch.equal(model.predict(image).scores, expected)
    with pytest.raises(CheckpointError, match="pass the experiment config"):
        dgss.load(official)


def test_bad_checkpoints_are_clear_errors_naming_the_file(trained_rein, tmp_path):
    _, _, run, _ = trained_rein
    with pytest.raises(CheckpointError, match="not found"):
        dgss.load(tmp_path / "nothing.safetensors")
    unknown = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match=r"classifier\.pth is a checkpoint of an unknown kind"):
        dgss.load(unknown)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        dgss.load(corrupt)
    with pytest.raises(CheckpointError, match="without model_final"):
        dgss.load(tmp_path)

    final = run / "model_final.safetensors"
    with safe_open(str(final), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(final))
    dropped = sorted(k for k in state if k.startswith("head."))[0]
    del state[dropped]
    truncated = tmp_path / "missing_key.safetensors"
    save_file(state, str(truncated), metadata=metadata)  # the old checksum: refused as damaged
    with pytest.raises(CheckpointError, match=r"missing_key\.safetensors is damaged: its contents do not match"):
        dgss.load(truncated)
    save_safetensors(state, truncated, metadata={k: v for k, v in metadata.items() if k != CHECKSUM_KEY})
    with pytest.raises(CheckpointError, match=rf"missing_key\.safetensors does not fit.*{dropped}"):
        dgss.load(truncated)  # a well-formed file without that key


def test_label_ids_map_train_ids_back_to_cityscapes_ids():
    train_ids = np.array([[13, 0, 255], [18, 10, 5], [11, 1, 2]], dtype=np.int64)
    # the Cityscapes label ids of car, road, unlabeled / bicycle, sky, pole / person, sidewalk, building
    assert train_ids_to_label_ids(train_ids).tolist() == [[26, 7, 0], [33, 23, 17], [24, 8, 11]]
    assert train_ids_to_label_ids(torch.arange(19)).tolist() == TRAIN_ID_TO_LABEL_ID[:19].tolist()
    assert train_ids_to_label_ids(torch.arange(19)).dtype == np.uint8


class PixelwiseModel(torch.nn.Module):
    """A 1 x 1 convolution: its scores commute with flips, so flip TTA must equal plain inference."""

    num_classes = 19

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, self.num_classes, 1)
        self.eval_cfg = EvalConfig(mode="whole")

    def whole_inference(self, images):
        return self.conv(images).softmax(1)

    def slide_inference(self, images, crop=None, stride=None):
        return self.whole_inference(images)


def test_flip_tta_of_a_flip_equivariant_model_equals_plain_inference():
    model = PixelwiseModel()
    images = torch.randn(2, 3, 16, 24)
    plain = tta_inference(model, images)
    assert torch.allclose(tta_inference(model, images, TTA(flip=True)), plain, atol=1e-6)
    doubled = tta_inference(model, images, TTA(scales=(2.0,)))  # bilinear x2 then back: not the identity
    assert not torch.allclose(doubled, plain, atol=1e-4)


def test_tta_averages_flipped_and_rescaled_views_of_the_real_model(trained_rein):
    cfg, trained, _, _ = trained_rein
    images = torch.randn(1, 3, 64, 96)
    plain = trained.whole_inference(images)
    flipped = trained.whole_inference(images.flip(-1)).flip(-1)
    assert not torch.allclose(plain, flipped, atol=1e-4)  # the model is not flip-equivariant
    got = tta_inference(trained, images, parse_tta("flip"), mode="whole")
    assert torch.allclose(got, (plain + flipped) / 2, atol=1e-6)
    big = torch.nn.functional.interpolate(images, size=(128, 192), mode="bilinear", align_corners=False)
    big_scores = torch.nn.functional.interpolate(trained.whole_inference(big), size=(64, 96), mode="bilinear",
                                                 align_corners=False)
    got = tta_inference(trained, images, parse_tta("scales=1.0,2.0"), mode="whole")
    assert torch.allclose(got, (plain + big_scores) / 2, atol=1e-6)
    slide = tta_inference(trained, images, TTA(), mode="slide", crop=(64, 64), stride=(32, 32))
    assert torch.allclose(slide, trained.slide_inference(images, crop=(64, 64), stride=(32, 32)))


def test_tta_specs_parse_and_reject_nonsense():
    assert parse_tta("flip,scales=0.75,1.0,1.25") == TTA(flip=True, scales=(0.75, 1.0, 1.25))
    assert parse_tta("scales=0.5,1,flip") == TTA(flip=True, scales=(0.5, 1.0))
    assert parse_tta(None) == TTA() and len(TTA(flip=True, scales=(1.0, 2.0)).views()) == 4
    with pytest.raises(ValueError, match="unknown --tta item 'rotate'"):
        parse_tta("flip,rotate")
    with pytest.raises(ValueError, match="numbers"):
        parse_tta("scales=big")


def test_any_image_size_is_padded_to_what_the_network_takes(trained_rein):
    cfg, trained, _, _ = trained_rein
    images = torch.randn(1, 3, 50, 70)  # not a multiple of the patch (16) nor of the coarsest stride (32)
    with pytest.raises(Exception):
        trained.whole_inference(images)
    reference = trained.whole_inference(torch.nn.functional.pad(images, (0, 26, 0, 14)))[..., :50, :70]
    assert torch.equal(tta_inference(trained, images, mode="whole"), reference)
    # slide mode: a side shorter than the window is padded, a longer one is tiled with full windows
    wide = torch.randn(1, 3, 50, 140)
    reference = trained.slide_inference(torch.nn.functional.pad(wide, (0, 0, 0, 14)), crop=(64, 64),
                                        stride=(32, 32))[..., :50, :]
    assert torch.equal(tta_inference(trained, wide, mode="slide", crop=(64, 64), stride=(32, 32)), reference)
    result = Predictor(trained, cfg).predict(street_image(50, 70))
    assert result.labels.shape == (50, 70)
