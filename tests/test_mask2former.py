"""The Mask2Former head: shapes, deformable attention, attention masks, positional encoding."""

import itertools
import math

import pytest
import torch

from dgss.config import HeadConfig
from dgss.models.mask2former import (
    Mask2FormerHead,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_per_level,
    sine_position_encoding,
)
from dgss.models.mask2former.transformer_decoder import MultiheadAttention

TINY_HEAD = dict(num_classes=5, num_queries=6, hidden_dim=32, pixel_decoder_layers=2, pixel_decoder_ffn_dim=64,
                 num_heads=4, num_points=2, decoder_layers=9, decoder_ffn_dim=64, num_points_loss=64)



def tiny_features(batch, height, width, channels=(8, 12, 16, 20)):
    return [torch.randn(batch, c, height // s, width // s) for c, s in zip(channels, (4, 8, 16, 32))]


# ----------------------------------------------------------------------------------- head shapes


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_head_outputs_ten_predictions_of_the_right_shapes(size):
    head = Mask2FormerHead((8, 12, 16, 20), HeadConfig(**TINY_HEAD))
    out = head(tiny_features(2, *size))
    predictions = out["aux_outputs"] + [out]
    assert len(predictions) == 10  # before the first layer and after each of the 9
    for pred in predictions:
        assert pred["pred_logits"].shape == (2, 6, 6) and pred["pred_logits"].dtype == torch.float32
        assert pred["pred_masks"].shape == (2, 6, size[0] // 4, size[1] // 4)
        assert pred["pred_masks"].dtype == torch.float32
        assert torch.isfinite(pred["pred_masks"]).all()
    # Every prediction differs from the next: each layer changes the queries.
    for a, b in zip(predictions, predictions[1:]):
        assert not torch.allclose(a["pred_masks"], b["pred_masks"])
    scores = head.segmentation_scores(out, size)
    assert scores.shape == (2, 5, *size) and (scores >= 0).all()


def test_head_parameters_follow_the_query_mode():
    cfg = HeadConfig(**TINY_HEAD)
    own = dict(Mask2FormerHead((8, 12, 16, 20), cfg).named_parameters())
    rein = dict(Mask2FormerHead((8, 12, 16, 20), cfg, external_queries=True).named_parameters())
    sam = dict(Mask2FormerHead((8, 12, 16, 20), cfg, external_queries=True, query_content="learned").named_parameters())
    assert {"query_embed.weight", "query_feat.weight"} <= own.keys() and "querys2feat.weight" not in own
    assert {"querys2feat.weight", "querys2feat.bias"} <= rein.keys()
    assert "query_embed.weight" not in rein and "query_feat.weight" not in rein
    assert "query_feat.weight" in sam and "query_embed.weight" not in sam and "querys2feat.weight" not in sam


def test_external_queries_are_the_positional_queries_and_feed_querys2feat():
    cfg = HeadConfig(**TINY_HEAD)
    head = Mask2FormerHead((8, 12, 16, 20), cfg, external_queries=True).eval()
    feats = tiny_features(2, 64, 64)
    queries = torch.randn(6, 32, requires_grad=True)
    out = head(feats, queries)
    out["pred_masks"].sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    # The first prediction depends on the queries only through querys2feat (the content queries).
    with torch.no_grad():
        content = head.querys2feat(queries)[None].expand(2, -1, -1)
        mask_features, _ = head.pixel_decoder(feats)
        x = head.transformer_decoder.post_norm(content)
        expected = torch.einsum("bqc,bchw->bqhw", head.mask_embed(x), mask_features)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"], expected)
    with pytest.raises(ValueError, match="external queries"):
        head(feats)
    with pytest.raises(ValueError, match="own queries"):
        Mask2FormerHead((8, 12, 16, 20), cfg)(feats, queries)


def test_attention_mask_comes_from_the_previous_prediction_with_the_empty_row_fix():
    head = Mask2FormerHead((8, 12, 16, 20), HeadConfig(**TINY_HEAD))
    mask_features = torch.zeros(1, 32, 8, 8)
    with torch.no_grad():
        head.mask_embed[4].weight.zero_()
        head.mask_embed[4].bias.zero_()
        head.mask_embed[4].bias[0] = 1.0  # mask = channel 0 of the mask features
    mask_features[0, 0] = -1.0
    mask_features[0, 0, :4, :4] = 1.0  # foreground: the top-left quarter
    _, masks, allowed = head._predict(torch.randn(1, 6, 32), mask_features, (2, 2))
    assert allowed.shape == (1, 6, 4)
    assert allowed[0, :, 0].all() and not allowed[0, :, 1:].any()  # only the top-left cell at 2 x 2
    mask_features[0, 0] = -1.0  # empty everywhere: attend everywhere instead of nowhere
    _, _, allowed = head._predict(torch.randn(1, 6, 32), mask_features, (2, 2))
    assert allowed.all()


def test_multihead_attention_equals_torch_with_inverted_mask():
    torch.manual_seed(1)
    ours = MultiheadAttention(16, 4)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    allowed = torch.rand(2, 5, 7) > 0.5
    allowed[:, :, 0] = True
    expected = ref(q, kv, kv, attn_mask=(~allowed).repeat_interleave(4, dim=0), need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, kv, allowed), expected)


# ------------------------------------------------------------------------- deformable attention


def bilinear_zero_padded(image, x, y):
    """Value of a C x H x W image at continuous pixel coordinates (x, y), pixel centres at integers,
    zero outside: the four-neighbour formula written out."""
    _, height, width = image.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi, yi in itertools.product((x0, x0 + 1), (y0, y0 + 1)):
        weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
        if 0 <= xi < width and 0 <= yi < height:
            total += weight * image[:, yi, xi]
    return total


def reference_deformable_attention(value, shapes, locations, weights):
    """Loops over batch, queries, heads, levels and points."""
    batch, _, heads, dim = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    starts = [0] + list(itertools.accumulate(h * w for h, w in shapes))
    out = torch.zeros(batch, num_queries, heads, dim, dtype=value.dtype)
    for b, q, m in itertools.product(range(batch), range(num_queries), range(heads)):
        for level, (h, w) in enumerate(shapes):
            image = value[b, starts[level]:starts[level + 1], m].T.reshape(dim, h, w)
            for p in range(points):
                x = locations[b, q, m, level, p, 0].item() * w - 0.5
                y = locations[b, q, m, level, p, 1].item() * h - 0.5
                out[b, q, m] += weights[b, q, m, level, p] * bilinear_zero_padded(image, x, y)
    return out.reshape(batch, num_queries, heads * dim)


@pytest.mark.parametrize("impl", [multi_scale_deformable_attention, multi_scale_deformable_attention_per_level])
def test_deformable_attention_equals_the_loop_reference(impl):
    torch.manual_seed(2)
    shapes = [(3, 5), (6, 4), (7, 9)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 3, 4)
    # Some points well outside the maps, some in the half-pixel border band.
    locations = torch.rand(2, 5, 3, 3, 4, 2) * 1.6 - 0.3
    weights = torch.rand(2, 5, 3, 3, 4).softmax(-1)
    expected = reference_deformable_attention(value.double(), shapes, locations.double(), weights.double())
    torch.testing.assert_close(impl(value, shapes, locations, weights).double(), expected, atol=1e-5, rtol=0)


def test_single_grid_sample_path_has_the_per_level_gradients():
    torch.manual_seed(3)
    shapes = [(4, 6), (5, 3), (8, 8)]
    inputs = [torch.randn(2, sum(h * w for h, w in shapes), 2, 3, dtype=torch.float64),
              torch.rand(2, 7, 2, 3, 2, 2, dtype=torch.float64) * 1.4 - 0.2,
              torch.rand(2, 7, 2, 3, 2, dtype=torch.float64)]
    grads = []
    for impl in (multi_scale_deformable_attention, multi_scale_deformable_attention_per_level):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = impl(leaves[0], shapes, leaves[1], leaves[2])
        out.backward(torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view_as(out) / out.numel())
        grads.append([leaf.grad for leaf in leaves])
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain)


def test_deformable_attention_offsets_are_in_pixels_of_each_level():
    """With zero offset weights, a (+1, 0) offset bias and uniform attention, a query reads the value
    one pixel to the right of its own pixel centre on each level (zero past the border)."""
    attn = MultiScaleDeformableAttention(embed_dim=4, num_heads=1, num_levels=2, num_points=3)
    shapes = [(3, 4), (2, 5)]
    with torch.no_grad():
        attn.sampling_offsets.bias.view(1, 2, 3, 2).copy_(torch.tensor([1.0, 0.0]))
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
    value = torch.randn(1, 3 * 4 + 2 * 5, 4)
    # Query = pixel (x=1, y=2) of level 0, whose normalised centre is ((1+.5)/4, (2+.5)/3).
    ref = torch.tensor([[[[1.5 / 4, 2.5 / 3]]]])
    out = attn(torch.randn(1, 1, 4), value, ref, shapes)[0, 0]
    level0 = value[0, :12].T.reshape(4, 3, 4)
    level1 = value[0, 12:].T.reshape(4, 2, 5)
    # On level 1 (2 x 5) the same normalised point is at pixel (1.875 - 0.5, 5/3 - 0.5), plus (1, 0).
    expected = 0.5 * level0[:, 2, 2] + 0.5 * bilinear_zero_padded(level1, 2.375, 7 / 6)
    torch.testing.assert_close(out, expected)


def test_deformable_attention_init_puts_head_points_on_rays():
    attn = MultiScaleDeformableAttention(embed_dim=32, num_heads=8, num_levels=3, num_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # head 0: +x
    torch.testing.assert_close(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)  # head 2: +y
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([1.0, 1.0]))  # head 1: diagonal, max-norm 1
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()


# --------------------------------------------------------------------------- positional encoding


def test_sine_position_encoding_formula():
    height, width, feats = 3, 5, 6
    pos = sine_position_encoding(height, width, feats)
    assert pos.shape == (2 * feats, height, width)
    for c, y, x in itertools.product(range(2 * feats), range(height), range(width)):
        axis_pos, size = ((y + 1), height) if c < feats else ((x + 1), width)
        k = c % feats
        angle = axis_pos / (size + 1e-6) * 2 * math.pi / 10000 ** (2 * (k // 2) / feats)
        expected = math.sin(angle) if k % 2 == 0 else math.cos(angle)
        assert abs(pos[c, y, x].item() - expected) < 1e-5, (c, y, x)
