"""The segmentor: build from a config, train-mode rules, query flow, overfitting, sliding windows."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgss.config import EvalConfig, HeadConfig, load_config
from dgss.models.backbones import build_backbone
from dgss.models.mask2former import Mask2FormerHead
from dgss.models.segmentor import Segmentor, sliding_windows
from dgss.tuning.model import build_segmentor
from dgss.tuning.base import Frozen, TuningMethod

TINY_MODEL = [
    "model.backbone=dinov2_s",
    "model.img_size=64",
    "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
    "model.head.num_classes=4",
    "model.head.num_queries=8",
    "model.head.hidden_dim=32",
    "model.head.pixel_decoder_layers=1",
    "model.head.pixel_decoder_ffn_dim=64",
    "model.head.num_heads=4",
    "model.head.num_points=2",
    "model.head.decoder_ffn_dim=64",
    "model.head.num_points_loss=256",
]



def tiny_config(*extra):
    return load_config(overrides=TINY_MODEL + list(extra))


def blocky_batch():
    """Two 64 x 64 images and labels made of 16-pixel-aligned regions (what a stride-16 backbone can
    resolve), with an ignored band."""
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, :32] = 1
    labels[0, 32:, 32:] = 2
    labels[1, :, :16] = 3
    labels[1, 48:] = 2
    labels[1, :16, 16:] = 255
    return images, labels


class QuerySupplier(TuningMethod):
    """A stand-in for Rein's link: learnable M x Q queries, counted per call."""

    name = "query_supplier"

    def __init__(self, num_queries, dim, content="querys2feat"):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.query_content = content
        self.calls = 0

    def head_queries(self):
        self.calls += 1
        return self.queries


# ---------------------------------------------------------------------------------- building


def test_build_segmentor_from_a_config_with_a_frozen_backbone():
    model = build_segmentor(tiny_config("method.name=frozen", "model.head.decoder_layers=3"))
    assert isinstance(model.head, Mask2FormerHead) and not model.head.external_queries
    assert len(model.head.transformer_decoder.layers) == 3 and model.head.num_queries == 8
    assert model.backbone.channels == [32] * 4
    model.train()
    assert not model.backbone.model.training and model.head.training  # frozen backbone stays in eval
    assert not any(p.requires_grad for p in model.backbone.parameters())
    images, labels = blocky_batch()
    losses = model.loss(images, labels)
    assert set(losses) == {"loss", "loss_cls", "loss_mask", "loss_dice"}
    torch.testing.assert_close(losses["loss"], losses["loss_cls"] + losses["loss_mask"] + losses["loss_dice"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.head.parameters())
    groups = model.parameter_groups(1e-4, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.head.parameters()))
    model.eval()
    assert model.predict(images).shape == (2, 4, 64, 64)


def test_full_fine_tuning_trains_the_backbone_in_train_mode():
    model = build_segmentor(tiny_config("method.name=full", "model.head.decoder_layers=2")).train()
    assert model.backbone.model.training
    images, labels = blocky_batch()
    model.loss(images, labels)["loss"].backward()
    assert all(p.grad is not None for p in model.backbone.model.blocks.parameters())


def test_light_fpn_head_trains_with_per_pixel_cross_entropy():
    model = build_segmentor(tiny_config("model.head.type=fpn")).train()
    images, labels = blocky_batch()
    losses = model.loss(images, labels)
    valid = labels != 255
    logits = F.interpolate(model.head(model.forward_features(images))["logits"], size=(64, 64),
                           mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert model.predict(images).shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match="did you mean 'fpn'"):
        build_segmentor(tiny_config("model.head.type=fnp"))


def test_linear_head_is_one_affine_map_of_the_token_grid_features():
    """Oracle: the logits are W . BN(concat of the four maps at the stride-16 grid) + b, per token."""
    model = build_segmentor(tiny_config("model.head.type=linear", "method.name=frozen")).train()
    head = model.head
    # DINO's linear-probe start: N(0, 0.01) weights, zero bias
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert not head.classifier.bias.any()
    images, labels = blocky_batch()
    features = model.forward_features(images)
    grid = features[2].shape[-2:]
    assert grid == (4, 4)  # a 64 px image, patch 16
    stacked = torch.cat([F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in features], 1)
    mean, var = stacked.mean((0, 2, 3)), stacked.var((0, 2, 3), unbiased=False)
    normed = (stacked - mean[:, None, None]) / (var[:, None, None] + head.norm.eps).sqrt()
    weight = head.classifier.weight[:, :, 0, 0]
    expected = torch.einsum("kc,bchw->bkhw", weight, normed) + head.classifier.bias[:, None, None]
    out = head(features)["logits"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    losses = model.loss(images, labels)
    assert set(losses) == {"loss", "loss_ce"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in head.parameters())
    assert not any(p.grad is not None for p in model.backbone.parameters())
    model.eval()
    assert model.predict(images).shape == (2, 4, 64, 64)


def test_zero_started_linear_head_sends_no_gradient_to_the_backbone_at_step_zero():
    """classifier_init zeros (ViT's fine-tuning head): the classifier starts at zero, so the features'
    gradient is W^T (p - y) = 0 and a fully fine-tuned backbone's first update is nil, while the head's own
    gradient is not; the random numbers drawn are the same as with the normal start."""
    torch.manual_seed(0)
    normal = build_segmentor(tiny_config("model.head.type=linear", "method.name=full"))
    after_normal = torch.rand(1)
    torch.manual_seed(0)
    zeros = build_segmentor(tiny_config("model.head.type=linear", "method.name=full",
                                        "model.head.classifier_init=zeros")).train()
    assert torch.equal(torch.rand(1), after_normal)  # the same draws: the rest of a run is unchanged
    assert not zeros.head.classifier.weight.any() and normal.head.classifier.weight.any()
    images, labels = blocky_batch()
    zeros.loss(images, labels)["loss"].backward()
    assert zeros.head.classifier.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in zeros.backbone.parameters() if p.requires_grad]
    assert backbone_grads and all(g is None or not g.any() for g in backbone_grads)
    normal.train().loss(images, labels)["loss"].backward()
    assert any(p.grad is not None and p.grad.any() for p in normal.backbone.parameters())
    fpn = build_segmentor(tiny_config("model.head.type=fpn", "model.head.classifier_init=zeros"))
    assert not fpn.head.classifier.weight.any() and not fpn.head.classifier.bias.any()
    with pytest.raises(ValueError, match="classifier_init 'zeros' is the per-pixel heads' option"):
        build_segmentor(tiny_config("model.head.type=mask2former", "model.head.classifier_init=zeros"))
    with pytest.raises(Exception, match="classifier_init"):
        build_segmentor(tiny_config("model.head.type=linear", "model.head.classifier_init=uniform"))


@pytest.mark.parametrize("content", ["querys2feat", "learned"])
def test_method_queries_reach_the_head_once_per_forward(content):
    backbone = build_backbone("dinov2_s", img_size=64, depth=4, embed_dim=32, num_heads=2)
    method = QuerySupplier(8, 32, content)
    method.attach(backbone)
    cfg = HeadConfig(num_classes=4, num_queries=8, hidden_dim=32, pixel_decoder_layers=1, decoder_layers=2,
                     num_heads=4, pixel_decoder_ffn_dim=32, decoder_ffn_dim=32, num_points_loss=64)
    head = Mask2FormerHead(backbone.channels, cfg, external_queries=True, query_content=content)
    model = Segmentor(backbone, method, head, num_classes=4).train()
    method.calls = 0
    images, labels = blocky_batch()
    model.loss(images, labels)["loss"].backward()
    assert method.calls == 1
    assert method.queries.grad is not None and method.queries.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="supplies queries"):
        Segmentor(backbone, method, Mask2FormerHead(backbone.channels, cfg), num_classes=4)
    with pytest.raises(ValueError, match="supplies none"):
        Segmentor(backbone, Frozen(), head, num_classes=4)
    with pytest.raises(ValueError, match="predicts 4 classes"):
        Segmentor(backbone, method, head, num_classes=19)


# ------------------------------------------------------------------------------ overfitting


def test_tiny_segmentor_overfits_one_batch():
    torch.manual_seed(0)
    model = build_segmentor(tiny_config("method.name=frozen")).train()
    images, labels = blocky_batch()
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-3, 0.0), lr=1e-3)
    first = None
    for _ in range(220):
        loss = model.loss(images, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.1 * first, (first, loss.item())
    model.eval()
    predicted = model.segment(images)
    valid = labels != 255
    assert (predicted[valid] == labels[valid]).float().mean() > 0.99


# -------------------------------------------------------------------------------- inference


class PerPixel(nn.Module):
    """Scores that depend on each pixel only (a 1 x 1 conv and softmax)."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, images):
        return self.conv(images).softmax(1)


def per_pixel_segmentor(eval_cfg):
    model = build_segmentor(tiny_config("method.name=frozen", "model.head.decoder_layers=1"))
    model.eval_cfg = eval_cfg
    scorer = PerPixel(4)
    calls = []

    def predict(images):
        calls.append(images.shape)
        return scorer(images)

    model.predict = predict
    return model, scorer, calls


def test_mmseg_window_placement():
    assert sliding_windows(512, 1024, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 341, 853),
                                                                   (0, 512, 512, 1024)]
    # 720 x 1280 (BDD100K): 2 rows (the last shifted up to end at 720) x 4 columns.
    boxes = sliding_windows(720, 1280, (512, 512), (341, 341))
    assert sorted({b[:2] for b in boxes}) == [(0, 512), (208, 720)]
    assert sorted({b[2:] for b in boxes}) == [(0, 512), (341, 853), (682, 1194), (768, 1280)]
    assert sliding_windows(300, 200, (512, 512), (341, 341)) == [(0, 300, 0, 200)]  # smaller than a crop


@pytest.mark.parametrize("size", [(40, 100), (64, 64), (20, 37)])
def test_slide_inference_of_a_per_pixel_model_equals_whole_inference(size):
    torch.manual_seed(0)
    model, scorer, calls = per_pixel_segmentor(EvalConfig(mode="slide", crop_size=[32, 48], stride=[20, 30],
                                                          batch_windows=3))
    images = torch.randn(2, 3, *size)
    slide = model.slide_inference(images)
    whole = scorer(images)
    torch.testing.assert_close(slide, whole)
    windows = len(sliding_windows(*size, (32, 48), (20, 30)))
    assert sum(c[0] for c in calls) == 2 * windows and max(c[0] for c in calls) <= 3  # batched windows
    assert all(c[-2:] == (min(32, size[0]), min(48, size[1])) for c in calls)


def test_inference_resizes_scores_to_the_label_size_before_argmax():
    model, scorer, _ = per_pixel_segmentor(EvalConfig(mode="whole"))
    images = torch.randn(1, 3, 32, 48)
    scores = model.inference(images, out_size=(64, 96))
    expected = F.interpolate(scorer(images), size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(model.segment(images, out_size=(64, 96)), expected.argmax(1))
    model.eval_cfg = EvalConfig(mode="slide", crop_size=[16, 16], stride=[8, 8])
    torch.testing.assert_close(model.inference(images, out_size=(64, 96)), expected)


def test_mask2former_scores_are_class_probabilities_times_upsampled_mask_probabilities():
    model = build_segmentor(tiny_config("method.name=frozen", "model.head.decoder_layers=2")).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        scores = model.predict(images)
    probs = out["pred_logits"].softmax(-1)[0, :, :4]  # Q x K
    masks = F.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)[0].sigmoid()
    expected = (probs[:, :, None, None] * masks[:, None]).sum(0)
    torch.testing.assert_close(scores[0], expected)


def test_rein_queries_must_fit_the_head_is_a_config_error():
    from dgss.config import ConfigError, load_config
    from dgss.tuning.model import build_segmentor

    cfg = load_config(None, ["model.backbone=dinov2_s", "model.img_size=64",
                             "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
                             "method.name=rein", "method.rein.num_tokens=10", "model.head.num_queries=12",
                             "method.rein.query_dim=32", "model.head.hidden_dim=32"])
    with pytest.raises(ConfigError, match=r"supplies 10 x 32 queries.*12 x 32.*method.rein.num_tokens"):
        build_segmentor(cfg)
