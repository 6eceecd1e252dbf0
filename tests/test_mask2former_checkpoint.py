"""Official Rein checkpoint names (rein.md, mmdet 3.x Mask2Former naming) map onto the head."""

import pytest
import torch

from dgss.config import HeadConfig
from dgss.models.mask2former import (
    HeadCheckpointError,
    Mask2FormerHead,
    convert_official_head_state_dict,
    head_to_official_key,
    load_official_head_state_dict,
    official_head_state_dict,
    official_to_head_key,
)



def official_rein_head_keys() -> dict[str, tuple]:
    """``decode_head.*`` tensors of an official Rein DINOv2-L checkpoint with their shapes: mmseg
    ``ReinMask2FormerHead`` (replace_query_feat=True) = mmdet ``Mask2FormerHead`` without query_embed
    and query_feat, plus ``querys2feat``; in_channels 1024 x 4, 256 wide, 100 queries, 19 classes."""
    C, F_ENC, F_DEC = 256, 1024, 2048
    keys = {}
    pd = "decode_head.pixel_decoder."
    for i in range(3):  # 1 x 1 conv (with bias) + GN for the strides 32, 16, 8 inputs
        keys[f"{pd}input_convs.{i}.conv.weight"] = (C, 1024, 1, 1)
        keys[f"{pd}input_convs.{i}.conv.bias"] = (C,)
        keys[f"{pd}input_convs.{i}.gn.weight"] = (C,)
        keys[f"{pd}input_convs.{i}.gn.bias"] = (C,)
    for i in range(6):
        layer = f"{pd}encoder.layers.{i}."
        keys[layer + "self_attn.sampling_offsets.weight"] = (8 * 3 * 4 * 2, C)
        keys[layer + "self_attn.sampling_offsets.bias"] = (8 * 3 * 4 * 2,)
        keys[layer + "self_attn.attention_weights.weight"] = (8 * 3 * 4, C)
        keys[layer + "self_attn.attention_weights.bias"] = (8 * 3 * 4,)
        keys[layer + "self_attn.value_proj.weight"] = (C, C)
        keys[layer + "self_attn.value_proj.bias"] = (C,)
        keys[layer + "self_attn.output_proj.weight"] = (C, C)
        keys[layer + "self_attn.output_proj.bias"] = (C,)
        keys[layer + "ffn.layers.0.0.weight"] = (F_ENC, C)
        keys[layer + "ffn.layers.0.0.bias"] = (F_ENC,)
        keys[layer + "ffn.layers.1.weight"] = (C, F_ENC)
        keys[layer + "ffn.layers.1.bias"] = (C,)
        for n in range(2):
            keys[layer + f"norms.{n}.weight"] = (C,)
            keys[layer + f"norms.{n}.bias"] = (C,)
    keys[pd + "level_encoding.weight"] = (3, C)
    keys[pd + "lateral_convs.0.conv.weight"] = (C, 1024, 1, 1)  # no bias before a GN
    keys[pd + "lateral_convs.0.gn.weight"] = (C,)
    keys[pd + "lateral_convs.0.gn.bias"] = (C,)
    keys[pd + "output_convs.0.conv.weight"] = (C, C, 3, 3)
    keys[pd + "output_convs.0.gn.weight"] = (C,)
    keys[pd + "output_convs.0.gn.bias"] = (C,)
    keys[pd + "mask_feature.weight"] = (C, C, 1, 1)
    keys[pd + "mask_feature.bias"] = (C,)
    td = "decode_head.transformer_decoder."
    for i in range(9):
        layer = f"{td}layers.{i}."
        for attn in ("self_attn", "cross_attn"):
            keys[layer + f"{attn}.attn.in_proj_weight"] = (3 * C, C)
            keys[layer + f"{attn}.attn.in_proj_bias"] = (3 * C,)
            keys[layer + f"{attn}.attn.out_proj.weight"] = (C, C)
            keys[layer + f"{attn}.attn.out_proj.bias"] = (C,)
        keys[layer + "ffn.layers.0.0.weight"] = (F_DEC, C)
        keys[layer + "ffn.layers.0.0.bias"] = (F_DEC,)
        keys[layer + "ffn.layers.1.weight"] = (C, F_DEC)
        keys[layer + "ffn.layers.1.bias"] = (C,)
        for n in range(3):
            keys[layer + f"norms.{n}.weight"] = (C,)
            keys[layer + f"norms.{n}.bias"] = (C,)
    keys[td + "post_norm.weight"] = (C,)
    keys[td + "post_norm.bias"] = (C,)
    keys["decode_head.level_embed.weight"] = (3, C)
    keys["decode_head.cls_embed.weight"] = (20, C)
    keys["decode_head.cls_embed.bias"] = (20,)
    for i in (0, 2, 4):
        keys[f"decode_head.mask_embed.{i}.weight"] = (C, C)
        keys[f"decode_head.mask_embed.{i}.bias"] = (C,)
    keys["decode_head.querys2feat.weight"] = (C, C)
    keys["decode_head.querys2feat.bias"] = (C,)
    return keys


@pytest.fixture(scope="module")
def rein_head():
    return Mask2FormerHead([1024] * 4, HeadConfig(), external_queries=True)


def test_rein_head_has_exactly_the_official_keys_and_shapes(rein_head):
    ours = {k: tuple(v.shape) for k, v in official_head_state_dict(rein_head).items()}
    official = official_rein_head_keys()
    assert sorted(set(ours) - set(official)) == [] and sorted(set(official) - set(ours)) == []
    assert ours == official


def test_key_map_is_the_decode_head_prefix_both_ways():
    key = "decode_head.pixel_decoder.encoder.layers.3.self_attn.value_proj.weight"
    assert official_to_head_key(key) == "pixel_decoder.encoder.layers.3.self_attn.value_proj.weight"
    assert head_to_official_key(official_to_head_key(key)) == key
    assert official_to_head_key("module.decode_head.cls_embed.bias") == "cls_embed.bias"
    assert official_to_head_key("backbone.reins.scale") is None
    for key in official_rein_head_keys():
        assert head_to_official_key(official_to_head_key(key)) == key


def test_official_checkpoint_loads_every_head_tensor(rein_head):
    torch.manual_seed(0)
    source = Mask2FormerHead([1024] * 4, HeadConfig(), external_queries=True)
    checkpoint = {"state_dict": {**official_head_state_dict(source), "backbone.reins.scale": torch.ones(())},
                  "meta": {"iter": 40000}}
    report = load_official_head_state_dict(rein_head, checkpoint)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    for key, value in source.state_dict().items():
        assert torch.equal(rein_head.state_dict()[key], value), key
    assert len(convert_official_head_state_dict(checkpoint)) == len(official_rein_head_keys())


def test_loading_lists_missing_unexpected_and_mismatched_keys():
    cfg = HeadConfig(num_classes=4, num_queries=5, hidden_dim=32, pixel_decoder_layers=1, decoder_layers=2,
                     num_heads=4, pixel_decoder_ffn_dim=32, decoder_ffn_dim=32)
    head = Mask2FormerHead([16] * 4, cfg, external_queries=True)
    checkpoint = official_head_state_dict(head)
    del checkpoint["decode_head.transformer_decoder.post_norm.bias"]
    checkpoint["decode_head.query_embed.weight"] = torch.zeros(5, 32)
    checkpoint["decode_head.cls_embed.weight"] = torch.zeros(20, 32)
    with pytest.raises(HeadCheckpointError) as err:
        load_official_head_state_dict(head, checkpoint)
    message = str(err.value)
    assert "missing (1): decode_head.transformer_decoder.post_norm.bias" in message
    assert "unexpected (1): decode_head.query_embed.weight" in message
    assert "decode_head.cls_embed.weight: checkpoint (20, 32), head (5, 32)" in message
    assert "external_queries" in message  # the hint about query parameters
    before = head.state_dict()["level_embed.weight"].clone()
    checkpoint["decode_head.level_embed.weight"] = torch.ones(3, 32)
    report = load_official_head_state_dict(head, checkpoint, strict=False)
    assert report["missing"] == ["decode_head.transformer_decoder.post_norm.bias"]
    assert torch.equal(head.state_dict()["level_embed.weight"], torch.ones(3, 32))
    assert not torch.equal(before, torch.ones(3, 32))
    with pytest.raises(HeadCheckpointError, match="no 'decode_head"):
        load_official_head_state_dict(head, {"backbone.x": torch.zeros(1)})


def test_sam_and_plain_heads_use_the_stock_query_names():
    cfg = HeadConfig(num_classes=4, num_queries=5, hidden_dim=32, pixel_decoder_layers=1, decoder_layers=2,
                     num_heads=4, pixel_decoder_ffn_dim=32, decoder_ffn_dim=32)
    sam = official_head_state_dict(Mask2FormerHead([16] * 4, cfg, external_queries=True, query_content="learned"))
    plain = official_head_state_dict(Mask2FormerHead([16] * 4, cfg))
    assert "decode_head.query_feat.weight" in sam and "decode_head.querys2feat.weight" not in sam
    assert "decode_head.query_embed.weight" not in sam
    assert {"decode_head.query_embed.weight", "decode_head.query_feat.weight"} <= set(plain)
