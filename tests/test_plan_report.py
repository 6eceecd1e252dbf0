"""`dgss plan`'s report: trainable parameters of the backbone and the head apart, one line explaining each
figure and column, and the evaluation memory (whole image and sliding window) measured on the meta device
against the same passes on real CPU tensors."""

import json

import pytest
import torch
from test_memory_plan import tiny

from dgss.cli import main
from dgss.config import save_config
from dgss.engine.eval_memory import DEFAULT_EVAL_IMAGE, eval_image_size, plan_eval_memory
from dgss.engine.memory_probe import FusedAttention, LiveBytes
from dgss.plan import VARIANT_COLUMNS
from dgss.tuning.model import build_segmentor

EVAL = ["eval.crop_size=[64,64]", "eval.stride=[40,40]", "eval.batch_windows=2"]
TEST_SETS = ('data.test=[{type: synthetic, name: wide, resize: [160, 96]}, '
             '{type: synthetic, name: small, resize: [64, 64]}]')


def real_cpu_inference_bytes(cfg, mode, size):
    """The live bytes of `Segmentor.inference` as `dgss eval` runs it (no_grad), on real CPU tensors."""
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    model.eval_cfg.mode = mode
    tracker = LiveBytes()
    with torch.no_grad(), tracker, FusedAttention("cpu"):
        images = torch.zeros(1, 3, *size)
        scores = model.inference(images)
        del scores, images
    return max(p.total for p in tracker.phases)


@pytest.mark.parametrize("method", ["frozen", "full"])
def test_evaluation_memory_on_meta_equals_the_real_pass_on_cpu(method):
    cfg = tiny(method, 4, *EVAL, TEST_SETS)
    assert eval_image_size(cfg) == ((96, 160), "wide")  # the largest resize box, (W, H) -> (h, w)
    plans = {p.mode: p for p in plan_eval_memory(cfg, target="cpu")}
    assert set(plans) == {"whole", "slide"} and plans["slide"].configured  # eval.mode's default
    model = build_segmentor(cfg)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for mode, plan in plans.items():
        assert not plan.error and plan.image_size == (96, 160)
        assert plan.weights == weights and plan.peak == weights + plan.activations
        assert plan.activations == real_cpu_inference_bytes(cfg, mode, (96, 160)), mode


def test_evaluation_memory_follows_the_eval_settings():
    base = tiny("rein", 4, *EVAL, TEST_SETS)
    slide = {p.mode: p for p in plan_eval_memory(base, target="cpu")}["slide"]
    more = {p.mode: p for p in plan_eval_memory(tiny("rein", 4, *EVAL, TEST_SETS, "eval.batch_windows=8"),
                                                 target="cpu")}["slide"]
    assert more.activations > slide.activations  # more windows per forward pass
    # Rein's no-grad fast path holds its cached operands too (a few small tensors); the plain path the
    # meta probe takes is within 1% of it
    real = real_cpu_inference_bytes(base, "slide", (96, 160))
    assert abs(slide.activations - real) <= 0.01 * real
    # eval.scale scales the box, as the evaluation does: the image the planner passes is the scaled box
    scaled = tiny("frozen", 4, *EVAL, TEST_SETS, "eval.scale=0.5")
    assert eval_image_size(scaled) == ((48, 80), "wide")
    half = {p.mode: p for p in plan_eval_memory(scaled, target="cpu")}["whole"]
    unscaled = tiny("frozen", 4, *EVAL, TEST_SETS)  # a 48 x 80 image at scale 1: the same pass
    assert half.image_size == (48, 80) and half.activations == real_cpu_inference_bytes(unscaled, "whole", (48, 80))
    # no resize box: a full Cityscapes image; a side the backbone cannot take is reported, not raised
    assert eval_image_size(tiny("rein")) == (DEFAULT_EVAL_IMAGE, None)
    odd = plan_eval_memory(tiny("rein", 4, *EVAL, 'data.test=[{type: synthetic, resize: [100, 90]}]'), target="cpu")
    whole = {p.mode: p for p in odd}["whole"]
    assert "divisible by patch size" in whole.error and whole.activations == 0
    coarse = plan_eval_memory(tiny("rein", 4, *EVAL, TEST_SETS, "eval.mode=coarse_to_fine"), target="cpu")
    assert [p.mode for p in coarse] == ["whole", "slide", "coarse_to_fine"] and coarse[2].configured


def test_the_report_counts_backbone_and_head_apart_and_explains_every_line(tmp_path, capsys):
    cfg = tiny("rein", 4, *EVAL, TEST_SETS)
    path = save_config(cfg, tmp_path / "tiny.yaml")
    assert main(["plan", str(path), "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = build_segmentor(cfg)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    assert data["backbone_trainable"] == model.method.num_trainable_backbone_parameters() > 0
    assert data["head_trainable"] == head and data["trainable"] == data["backbone_trainable"] + head
    assert [e["mode"] for e in data["evaluation"]] == ["whole", "slide"]
    assert all(e["peak"] > e["weights"] > 0 and e["fits"] is None for e in data["evaluation"])

    assert main(["plan", str(path), "--device", "cpu", "--gpu-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert (f"trainable: {data['backbone_trainable']:,} in the backbone (method rein, the count the papers give) + "
            f"{head:,} in the head and neck = {data['trainable']:,}") in text
    section = text[text.index("memory of training"):text.index("on 1 x 80 GB")].splitlines()[1:]
    assert all(len(line.split("   ", 2)) == 3 for line in section), section  # name, GiB, what it is
    assert "(alive at the peak)" not in text
    evaluation = text[text.index("memory of evaluating one image of 96x160"):].splitlines()
    assert evaluation[1].lstrip().startswith("whole image") and evaluation[2].lstrip().startswith("sliding window")
    assert "64x64 windows, stride 40x40, 2 per pass" in evaluation[2] and "eval.mode, fits" in evaluation[2]
    table = text[text.index("training variants"):].splitlines()
    header = table[1].split()
    assert header == [name for name, _ in VARIANT_COLUMNS]
    for name, _ in VARIANT_COLUMNS:  # one line per column under the table
        assert sum(line.strip().startswith(f"{name}:") for line in table) == 1
