"""The pixel decoder and the decoder layers against step-by-step references built from torch's own
attention and the loop-based deformable attention of test_mask2former."""

import torch
import torch.nn.functional as F
from torch import nn

from dgss.config import HeadConfig
from dgss.models.mask2former import Mask2FormerHead, MSDeformAttnPixelDecoder, sine_position_encoding
from dgss.models.mask2former.transformer_decoder import AttentionWithPosition, MaskedDecoderLayer
from test_mask2former import reference_deformable_attention



def randomize(module):
    """Replace the structured init (zero offsets, unit norms) by noise so that every path matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def torch_attention(ours: AttentionWithPosition, query, key, value, query_pos, key_pos, allowed=None):
    """The same block with torch.nn.MultiheadAttention (mask True = blocked, repeated per head)."""
    ref = nn.MultiheadAttention(ours.attn.dim, ours.attn.num_heads, batch_first=True)
    ref.load_state_dict(ours.attn.state_dict())
    mask = None if allowed is None else (~allowed).repeat_interleave(ours.attn.num_heads, dim=0)
    return query + ref(query + query_pos, key + key_pos, value, attn_mask=mask, need_weights=False)[0]


def test_positional_embeddings_enter_queries_and_keys_but_not_values():
    block = AttentionWithPosition(16, 4)
    q, qpos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    kv, kpos = torch.randn(2, 9, 16), torch.randn(1, 9, 16)
    allowed = torch.rand(2, 5, 9) > 0.4
    allowed[..., 3] = True
    expected = torch_attention(block, q, kv, kv, qpos, kpos, allowed)
    torch.testing.assert_close(block(q, kv, kv, qpos, kpos, allowed), expected)


def test_decoder_layer_is_masked_cross_attention_then_self_attention_then_ffn_post_norm():
    torch.manual_seed(0)
    layer = randomize(MaskedDecoderLayer(16, 4, 24))
    x, qpos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    memory, mpos = torch.randn(2, 9, 16), torch.randn(1, 9, 16)
    allowed = torch.rand(2, 5, 9) > 0.5
    allowed[..., 0] = True
    expected = layer.norms[0](torch_attention(layer.cross_attn, x, memory, memory, qpos, mpos, allowed))
    expected = layer.norms[1](torch_attention(layer.self_attn, expected, expected, expected, qpos, qpos))
    hidden = torch.relu(layer.ffn.layers[0][0](expected))
    expected = layer.norms[2](expected + layer.ffn.layers[1](hidden))
    torch.testing.assert_close(layer(x, qpos, memory, mpos, allowed), expected)


def reference_pixel_decoder(dec: MSDeformAttnPixelDecoder, feats):
    """mmdet's MSDeformAttnPixelDecoder written out for 4 inputs, 3 encoder levels."""
    batch, dim = feats[0].shape[0], dec.dim
    tokens, pos, refs, shapes = [], [], [], []
    for i, feat in enumerate([feats[3], feats[2], feats[1]]):  # strides 32, 16, 8
        h, w = feat.shape[-2:]
        shapes.append((h, w))
        conv = dec.input_convs[i]
        tokens.append(conv.gn(conv.conv(feat)).flatten(2).transpose(1, 2))
        level_pos = sine_position_encoding(h, w, dim // 2) + dec.level_encoding.weight[i][:, None, None]
        pos.append(level_pos.flatten(1).T)
        for y in range(h):
            for x in range(w):
                refs.append(((x + 0.5) / w, (y + 0.5) / h))
    x = torch.cat(tokens, 1)
    pos = torch.cat(pos, 0)[None]
    refs = torch.tensor(refs)  # N x 2
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # L x 2 (x, y)
    for layer in dec.encoder.layers:
        attn = layer.self_attn
        heads, levels, points = attn.num_heads, attn.num_levels, attn.num_points
        query = x + pos
        offsets = attn.sampling_offsets(query).view(batch, -1, heads, levels, points, 2)
        locations = refs[None, :, None, None, None, :] + offsets / sizes[None, None, None, :, None, :]
        weights = attn.attention_weights(query).view(batch, -1, heads, levels * points).softmax(-1)
        value = attn.value_proj(x).view(batch, x.shape[1], heads, -1)
        sampled = reference_deformable_attention(value, shapes, locations,
                                                 weights.view(batch, -1, heads, levels, points))
        x = layer.norms[0](x + attn.output_proj(sampled))
        x = layer.norms[1](x + layer.ffn(x))
    outs = [part.transpose(1, 2).reshape(batch, dim, h, w)
            for part, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]
    lateral = dec.lateral_convs[0].gn(dec.lateral_convs[0].conv(feats[0]))
    y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    out_conv = dec.output_convs[0]
    y = torch.relu(out_conv.gn(out_conv.conv(y)))
    return dec.mask_feature(y), outs


def test_pixel_decoder_equals_the_written_out_reference():
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder([6, 7, 8, 9], 16, num_layers=2, num_heads=2, num_points=2, ffn_dim=20,
                                   mask_dim=12)
    with torch.no_grad():  # non-trivial offsets and attention weights
        for layer in dec.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.5)
            layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    feats = [torch.randn(2, c, 32 // s, 48 // s) for c, s in zip([6, 7, 8, 9], (2, 4, 8, 16))]
    mask_features, levels = dec(feats)
    with torch.no_grad():
        expected_mask, expected_levels = reference_pixel_decoder(dec, feats)
    assert mask_features.shape == (2, 12, 16, 24)
    assert [tuple(level.shape[-2:]) for level in levels] == [(2, 3), (4, 6), (8, 12)]  # coarse first
    torch.testing.assert_close(mask_features, expected_mask, atol=1e-5, rtol=1e-4)
    for level, expected in zip(levels, expected_levels):
        torch.testing.assert_close(level, expected, atol=1e-5, rtol=1e-4)


def test_decoder_layer_i_attends_level_i_mod_3_masked_by_the_previous_prediction():
    torch.manual_seed(0)
    cfg = HeadConfig(num_classes=3, num_queries=4, hidden_dim=16, pixel_decoder_layers=1, pixel_decoder_ffn_dim=16,
                     num_heads=2, num_points=2, decoder_layers=5, decoder_ffn_dim=16)
    head = Mask2FormerHead([8] * 4, cfg)
    calls = []
    for layer in head.transformer_decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: calls.append(args))
    out = head([torch.randn(2, 8, 64 // s, 96 // s) for s in (4, 8, 16, 32)])
    level_tokens = [2 * 3, 4 * 6, 8 * 12]  # strides 32, 16, 8
    assert [args[2].shape[1] for args in calls] == [level_tokens[i % 3] for i in range(5)]
    previous = out["aux_outputs"]
    for i, args in enumerate(calls):
        size = [(2, 3), (4, 6), (8, 12)][i % 3]
        small = F.interpolate(previous[i]["pred_masks"], size=size, mode="bilinear", align_corners=False)
        allowed = (small.sigmoid() >= 0.5).flatten(2)
        allowed[~allowed.any(-1)] = True
        assert torch.equal(args[4], allowed), i
