"""The backbone zoo: every family builds tiny, gives the 4-scale pyramid, exposes its blocks."""

import pytest
import torch

from conftest import tiny_overrides
from dgss.models.backbones import BACKBONES, build_backbone

ALL = sorted(BACKBONES)


def test_dinov2_large_parameter_count_is_the_papers():
    # "304.20M": DINOv2-L at 512 with patch 16 (pos grid 32 x 32 + class position), built on meta.
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l", img_size=512, patch_size=16)
    assert sum(p.numel() for p in backbone.parameters()) == 304_198_656
    assert backbone.out_indices == (7, 11, 15, 23)
    assert len(backbone.blocks) == 24 and backbone.num_prefix_tokens == 1


@pytest.mark.parametrize("name", ALL)
def test_every_family_builds_tiny_and_gives_the_pyramid(name):
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name)).eval()
    assert len(backbone.blocks) == len(backbone.block_stage) >= 4
    assert len(backbone.out_indices) == 4 and len(set(backbone.out_indices)) == 4
    for h, w in [(64, 64), (96, 128)]:
        with torch.no_grad():
            feats = backbone(torch.randn(2, 3, h, w))
        assert len(feats) == 4
        for feat, stride, channels in zip(feats, (4, 8, 16, 32), backbone.channels):
            assert feat.shape == (2, channels, h // stride, w // stride), (name, stride)
            assert feat.dtype == torch.float32 and torch.isfinite(feat).all()


def test_default_out_indices_and_prefix_tokens_per_family():
    with torch.device("meta"):
        assert build_backbone("sam_h").out_indices == (7, 15, 23, 31)
        assert build_backbone("sam_h").global_attn_indexes == (7, 15, 23, 31)
        assert build_backbone("dinov2_b").out_indices == (3, 5, 7, 11)
        assert build_backbone("dinov2_g").out_indices == (9, 19, 29, 39)
        assert build_backbone("dinov2_l_reg").num_prefix_tokens == 5  # class + 4 registers
        assert build_backbone("dinov3_l").num_prefix_tokens == 5
        assert build_backbone("resnet50").channels == [256, 512, 1024, 2048]
        assert build_backbone("convnext_l").channels == [192, 384, 768, 1536]
        assert build_backbone("eva02_l").patch_size == 16


def test_tiny_sam_uses_its_global_attention_blocks():
    backbone = build_backbone("sam_b", img_size=64, depth=8, embed_dim=32, num_heads=2,
                              global_attn_indexes=(1, 3, 5, 7), window_size=4)
    assert backbone.global_attn_indexes == (1, 3, 5, 7)
    assert backbone.out_indices == (1, 3, 5, 7)  # features come from the global-attention blocks
    assert backbone.token_layout == "nhwc" and backbone.num_prefix_tokens == 0


def test_plain_vit_pyramid_is_bilinear_rescaling_of_block_outputs():
    backbone = build_backbone("dinov2_s", img_size=64, **tiny_overrides("dinov2_s")).eval()
    taken = {}
    for i in backbone.out_indices:
        backbone.blocks[i].register_forward_hook(lambda m, a, out, i=i: taken.__setitem__(i, out))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
    grid = (64 // 16, 96 // 16)
    for feat, i, scale in zip(feats, backbone.out_indices, (4, 2, 1, 0.5)):
        tokens = taken[i][:, backbone.num_prefix_tokens:]  # patch tokens, no final norm
        fmap = tokens.reshape(1, *grid, -1).permute(0, 3, 1, 2)
        expected = fmap if scale == 1 else torch.nn.functional.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
        torch.testing.assert_close(feat, expected)


def test_a_forward_hook_on_a_block_changes_the_features():
    backbone = build_backbone("dinov2_s", img_size=64, **tiny_overrides("dinov2_s")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        handle = backbone.blocks[0].register_forward_hook(lambda m, a, out: out * 0.0)
        after = backbone(x)
        handle.remove()
        again = backbone(x)
    assert not torch.allclose(before[-1], after[-1])
    torch.testing.assert_close(before[-1], again[-1])


def test_clip_has_a_trainable_deconv_pyramid():
    backbone = build_backbone("clip_l", img_size=64, **tiny_overrides("clip_l"))
    assert backbone.neck is not None
    neck_params = {id(p) for p in backbone.neck.parameters()}
    assert neck_params and not neck_params & {id(p) for p in backbone.model.parameters()}
    feats = backbone(torch.randn(2, 3, 64, 64))
    feats[0].sum().backward()
    assert backbone.neck.fpn1[1].weight.grad is not None


def test_cnn_blocks_cover_every_stage():
    backbone = build_backbone("resnet50", **tiny_overrides("resnet50"))
    assert backbone.block_stage == [0, 1, 2, 3] and backbone.token_layout == "nchw"
    convnext = build_backbone("convnext_l", depths=(2, 1, 1, 1), dims=(16, 32, 64, 128))
    assert convnext.block_stage == [0, 0, 1, 2, 3]


def test_unknown_backbone_names_the_closest():
    with pytest.raises(ValueError, match="unknown backbone 'dinov2_xl'.*did you mean 'dinov2_l'"):
        build_backbone("dinov2_xl")


def test_dinov3_7b_parameter_count_is_timms_on_the_meta_device():
    # 6,716,030,976 parameters (the "7B"): dgss drops no parameter of the dense trunk, nothing is allocated
    import timm

    with torch.device("meta"):
        backbone = build_backbone("dinov3_7b")
        reference = timm.create_model("vit_7b_patch16_dinov3", pretrained=False, num_classes=0)
    count = sum(p.numel() for p in backbone.model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 6_716_030_976
    assert all(p.is_meta for p in backbone.parameters())
    assert len(backbone.blocks) == 40 and backbone.embed_dim == 4096 and backbone.num_prefix_tokens == 5
    assert backbone.out_indices == (9, 19, 29, 39) and backbone.patch_size == 16
