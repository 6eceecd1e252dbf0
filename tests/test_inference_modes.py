"""Inference modes (eval.scale, eval.mode coarse_to_fine; dgss.models.inference): scale 1 is the
unscaled path bit for bit, scale 2 resizes the image before and the scores after, the coarse-to-fine
fusion against a hand computation, and `dgss eval --scale 2` / `dgss predict --mode coarse_to_fine`
end to end on a tiny synthetic model."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine_support import tiny_config

from dgss.cli import main
from dgss.config import ConfigError, EvalConfig, load_config, validate_config
from dgss.engine.checkpoint import save_model
from dgss.engine.distributed import DistContext
from dgss.engine.evaluate import evaluate_datasets
from dgss.models.inference import fuse_coarse_fine, run_inference, scaled_size
from dgss.predict.predictor import Predictor, _padded_inference, tta_inference
from dgss.tuning.model import build_segmentor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny FPN-head segmentor (random weights), its config file and its model file."""
    tmp_path = tmp_path_factory.mktemp("modes")
    config = tiny_config(tmp_path, "modes")
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    return config, cfg, model, save_model(model, cfg, tmp_path / "model.safetensors")


def with_eval(model, **changes):
    model.eval_cfg = dataclasses.replace(model.eval_cfg, **changes)
    return model


def images(h=64, w=96, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_scale_one_is_the_unscaled_path_bit_for_bit(tiny, mode):
    _, _, model, _ = tiny
    with_eval(model, mode=mode, scale=1.0, crop_size=[64, 64], stride=[32, 32])
    x = images()
    run = model.slide_inference if mode == "slide" else model.whole_inference
    plain = run(x)  # what Segmentor.inference computed before eval.scale existed
    assert torch.equal(model.inference(x), plain)
    assert torch.equal(model.inference(x, out_size=(128, 192)),
                       F.interpolate(plain, size=(128, 192), mode="bilinear", align_corners=False))
    # the predictor's path too (padding, no TTA)
    assert torch.equal(tta_inference(model, x), _padded_inference(model, x, mode, None, None))


def test_scale_two_resizes_the_image_before_and_the_scores_to_the_label_size_after(tiny):
    _, _, model, _ = tiny
    with_eval(model, mode="slide", scale=2.0, crop_size=[64, 64], stride=[48, 48])
    x = images()
    big = F.interpolate(x, size=(128, 192), mode="bilinear", align_corners=False)
    expected = model.slide_inference(big)  # scores at 128 x 192 = the labels' size: no second resize
    assert torch.equal(model.inference(x, out_size=(128, 192)), expected)
    torch.testing.assert_close(model.inference(x, out_size=(64, 96)),
                               F.interpolate(expected, size=(64, 96), mode="bilinear", align_corners=False))
    assert not torch.allclose(model.inference(x, out_size=(64, 96)), with_eval(model, scale=1.0).inference(x))
    assert scaled_size(512, 1024, 2.0) == (1024, 2048) and scaled_size(5, 7, 0.5) == (3, 4)


def test_coarse_to_fine_fuses_by_the_documented_rule_computed_by_hand():
    # passes whose scores are known: the coarse (whole) pass says class 0, the fine (slide) one class 1
    seen = {}

    def whole(x):
        seen["whole"] = tuple(x.shape[-2:])
        return torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)

    def slide(x):
        seen["slide"] = tuple(x.shape[-2:])
        return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    cfg = EvalConfig(mode="coarse_to_fine", scale=2.0, coarse_scale=0.5, coarse_weight=0.25)
    fused = run_inference(whole, slide, torch.zeros(1, 3, 16, 24), cfg, out_size=(32, 48))
    assert seen == {"whole": (8, 12), "slide": (32, 48)}  # low resolution whole, high resolution windows
    assert fused.shape == (1, 2, 32, 48)
    assert torch.equal(fused[:, 0], torch.full((1, 32, 48), 0.25))
    assert torch.equal(fused[:, 1], torch.full((1, 32, 48), 0.75))
    assert torch.equal(fuse_coarse_fine(torch.tensor(2.0), torch.tensor(6.0), 0.5), torch.tensor(4.0))


def test_coarse_to_fine_on_a_tiny_model_equals_its_two_passes_resized_and_averaged(tiny):
    _, _, model, _ = tiny
    with_eval(model, mode="coarse_to_fine", scale=1.0, coarse_scale=0.5, coarse_weight=0.5, crop_size=[64, 64],
              stride=[32, 32])
    x = images()
    half = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)  # low-passed
    padded = F.pad(half, (0, 16, 0, 0))  # 32 x 48 -> 32 x 64: multiples of 32 (stride) and 16 (patch)
    coarse = model.whole_inference(padded)[..., :32, :48]
    coarse = F.interpolate(coarse, size=(64, 96), mode="bilinear", align_corners=False)
    fine = model.slide_inference(x)
    torch.testing.assert_close(model.inference(x), 0.5 * coarse + 0.5 * fine, rtol=0, atol=1e-7)
    # the predictor fuses each view the same way
    torch.testing.assert_close(tta_inference(model, x, mode="coarse_to_fine"), 0.5 * coarse + 0.5 * fine,
                               rtol=0, atol=1e-7)


def test_bad_scales_are_one_error_naming_the_key():
    for key in ("eval.scale=0", "eval.coarse_scale=-1", "eval.coarse_weight=2"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            validate_config(load_config(None, [key]))


def test_dgss_eval_scale_two_runs_end_to_end(tiny, tmp_path, capsys):
    config, cfg, _, model_file = tiny
    out = tmp_path / "eval_x2"
    assert main(["eval", str(config), "--checkpoint", str(model_file), "--out", str(out), "--scale", "2",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    scaled = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scale=2.0))
    reference = build_segmentor(scaled)
    reference.load_state_dict(tiny[2].state_dict())
    for r in evaluate_datasets(reference, scaled.data.test, scaled, DistContext()):
        assert results["datasets"][r.name]["miou"] == pytest.approx(r.miou, abs=1e-4), r.name
        # results.json says how the scores were made (no resize box here: the images were scaled)
        assert results["datasets"][r.name]["inference"] == {"mode": "whole", "scale": 2.0, "resize": None,
                                                            "crop_size": [512, 512], "stride": [341, 341]}
    fused = tmp_path / "eval_c2f"
    assert main(["eval", str(config), "--checkpoint", str(model_file), "--out", str(fused), "--mode", "coarse_to_fine",
                 "--no-progress"]) == 0
    inference = json.loads((fused / "results.json").read_text())["datasets"]["night"]["inference"]
    assert inference["mode"] == "coarse_to_fine" and inference["coarse_scale"] == 0.5 and inference["scale"] == 1.0
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["eval", str(config), "--checkpoint", str(model_file), "--mode", "pyramid"])


def test_a_resize_box_is_scaled_instead_of_the_resized_images(tiny):
    # Cityscapes' [1024, 512] at scale 2 must read the originals at 2048 x 1024 (one resampling), not
    # blow a 1024 x 512 image up: here a [48, 32] box at 2 equals a [96, 64] box at 1 exactly
    _, cfg, model, _ = tiny
    model.eval_cfg = dataclasses.replace(cfg.eval, mode="coarse_to_fine")
    test = cfg.data.test[0]
    halved = dataclasses.replace(test, resize=[48, 32])
    full = dataclasses.replace(test, resize=[96, 64])
    # the coarse pass sees 48 x 32 in both: 1.0 of the 48 x 32 frame = 0.5 of the 96 x 64 one
    scaled = evaluate_datasets(with_eval(model, scale=2.0, coarse_scale=1.0), [halved], cfg, DistContext())[0]
    assert model.eval_cfg.scale == 2.0 and model.eval_cfg.coarse_scale == 1.0  # restored afterwards
    plain = evaluate_datasets(with_eval(model, scale=1.0, coarse_scale=0.5), [full], cfg, DistContext())[0]
    assert scaled.iou == plain.iou and scaled.miou == plain.miou
    assert scaled.inference["resize"] == [96, 64] and scaled.inference["scale"] == 2.0
    assert scaled.inference["coarse_scale"] == 1.0 and plain.inference["resize"] == [96, 64]
    from dgss.engine.evaluate import _evaluate  # the image path: the 48 x 32 images blown up by 2

    with_eval(model, scale=2.0, coarse_scale=1.0)
    blown_up = _evaluate(model, halved, cfg, DistContext(), amp="none", num_workers=None, progress=False)
    assert blown_up.iou != plain.iou  # what resizing the 48 x 32 image would have evaluated instead


def test_dgss_predict_takes_the_mode_and_the_scale(tiny, tmp_path, capsys):
    config, cfg, model, model_file = tiny
    rgb = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "street.png")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "street.png"), "--checkpoint", str(model_file), "--config", str(config),
                 "--out", str(out), "--format", "trainids", "--mode", "coarse_to_fine", "--scale", "2",
                 "--no-progress"]) == 0
    model.eval_cfg = cfg.eval  # the config the CLI reads (other tests changed the shared model's)
    predictor = Predictor(model, cfg)
    expected = predictor.predict(rgb, mode="coarse_to_fine", scale=2.0)
    assert not torch.equal(expected.labels, predictor.predict(rgb).labels)  # the options change the result
    written = np.array(Image.open(next(out.rglob("*.png"))))
    assert np.array_equal(written, expected.labels.numpy())
    assert main(["predict", str(tmp_path / "street.png"), "--checkpoint", str(model_file), "--out", str(out),
                 "--scale", "0"]) == 2
    assert "--scale must be above 0" in capsys.readouterr().err


def test_the_predictors_resize_box_is_scaled_as_the_evaluations(tiny):
    _, cfg, model, _ = tiny
    model.eval_cfg = dataclasses.replace(cfg.eval, mode="coarse_to_fine", coarse_scale=1.0)
    predictor = Predictor(model, cfg)
    rgb = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    scaled = predictor.predict(rgb, resize=(48, 32), scale=2.0)
    with_eval(model, coarse_scale=0.5)
    plain = predictor.predict(rgb, resize=(96, 64), scale=1.0)
    assert torch.equal(scaled.scores, plain.scores)
