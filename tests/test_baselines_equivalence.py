"""VPT and VQT against explicit references and the frozen backbone; trainable-parameter counts on
DINOv2-L against the papers' tables (meta device: shapes only)."""

import pytest
import torch

from conftest import TINY_VIT, tiny_overrides
from dgss.config import load_config
from dgss.models.backbones import build_backbone
from dgss.tuning import build_method
from dgss.tuning.vpt import drop_prompts, insert_prompts
from dgss.tuning.vqt import query_block_outputs


def method_cfg(name, *extra):
    return load_config(None, [f"method.name={name}", *extra]).method


def last_block_map(backbone, images):
    """The raw output of the last block (no pyramid, no method feeding): B x C x h x w."""
    last = len(backbone.blocks) - 1
    return backbone.model.forward_intermediates(images, indices=[last], norm=False, intermediates_only=True)[0]


def vit(name="dinov2_s_reg"):  # with 4 register tokens: prompts must go after class + registers
    torch.manual_seed(0)
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name)).eval()
    # frozen as every method leaves it (kernels may differ in the last bit when weights require grad)
    return backbone.requires_grad_(False)


def test_vpt_without_prompts_is_the_frozen_backbone():
    images = torch.randn(2, 3, 64, 64)
    backbone = vit()
    frozen = [f.clone() for f in backbone(images)]
    build_method(method_cfg("vpt", "method.vpt.num_tokens=0"), backbone)
    assert all(torch.equal(a, b) for a, b in zip(frozen, backbone(images)))


def test_vpt_equals_an_explicit_prepend_and_drop_loop():
    images = torch.randn(2, 3, 64, 64)
    backbone = vit()
    frozen = last_block_map(backbone, images)
    method = build_method(method_cfg("vpt", "method.vpt.num_tokens=3"), backbone)
    hooked = last_block_map(backbone, images)
    assert not torch.allclose(hooked, frozen)  # the prompts do act on the patches
    model, npt = backbone.model, backbone.num_prefix_tokens
    method.detach_hooks()
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block, prompts in zip(model.blocks, method.prompts):
            x = drop_prompts(block(insert_prompts(x, prompts, npt)), 3, npt)
        reference = x[:, npt:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert torch.allclose(hooked, reference, atol=1e-6)


def test_vpt_on_rope_backbones_gives_prompts_no_position():
    images = torch.randn(1, 3, 64, 64)
    for name in ("eva02_l", "dinov3_s"):
        backbone = vit(name)
        build_method(method_cfg("vpt", "method.vpt.num_tokens=2"), backbone)
        assert [f.shape for f in backbone(images)] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    with pytest.raises(ValueError, match="needs a transformer backbone"):
        build_method(method_cfg("vpt"), build_backbone("sam_b", img_size=64, **tiny_overrides("sam_b")))


@pytest.mark.parametrize("name", ["dinov2_s_reg", "eva02_l", "sam_b"])
def test_vqt_leaves_the_main_stream_and_with_zero_output_layers_the_features_unchanged(name):
    images = torch.randn(2, 3, 64, 64)
    backbone = vit(name)
    frozen_map = last_block_map(backbone, images)
    frozen_feats = [f.clone() for f in backbone(images)]
    method = build_method(method_cfg("vqt", "method.vqt.num_tokens=2"), backbone)
    method.train()
    assert all(torch.equal(a, b) for a, b in zip(frozen_feats, backbone(images)))  # to_features start at zero
    with torch.no_grad():
        for linear in method.to_features:
            linear.weight.normal_()
    fed = backbone(images)
    assert all(f.requires_grad for f in fed) and not torch.allclose(fed[0], frozen_feats[0])  # the queries feed the head
    assert torch.equal(last_block_map(backbone, images), frozen_map)  # ... and never the main stream
    fed[-1].sum().backward()
    assert method.queries.grad is not None and method.queries.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in backbone.model.parameters())


def test_vqt_query_outputs_equal_a_masked_joint_pass_through_the_block():
    """Oracle: run timm's block on [tokens, queries] with an attention mask that lets queries read the
    tokens only and lets no token read a query; the query rows of the output are VQT's outputs."""
    backbone = vit("dinov2_s")
    block = backbone.model.blocks[1]
    tokens, queries = torch.randn(2, 17, 32), torch.randn(3, 32)
    n, t = 17, 3
    allowed = torch.zeros(n + t, n + t, dtype=torch.bool)
    allowed[:, :n] = True  # everyone reads the original tokens, nobody reads a query
    with torch.no_grad():
        joint = block(torch.cat([tokens, queries.expand(2, -1, -1)], dim=1), attn_mask=allowed)
        ours = query_block_outputs(block, tokens, queries)
        assert torch.allclose(joint[:, :n], block(tokens), atol=1e-5)
    assert torch.allclose(ours, joint[:, n:], atol=1e-5)


def dinov2_l_count(name, *extra):
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l")
        return build_method(method_cfg(name, *extra), backbone).num_trainable_backbone_parameters()


def test_trainable_backbone_parameters_on_dinov2_l_match_the_papers():
    # Rein's Table 1 (also the baselines of FisherTune's): LoRA 0.79M, VPT 3.69M, AdaptFormer 3.17M,
    # Rein 2.99M, Full 304.20M; FisherTune 15.21M (5% of DINOv2-L).
    assert dinov2_l_count("lora") == 24 * 8 * (1024 + 3 * 1024) == 786_432
    assert dinov2_l_count("vpt") == 24 * 150 * 1024 == 3_686_400
    assert dinov2_l_count("adaptformer") == 24 * (1024 * 64 + 64 + 64 * 1024 + 1024) == 3_171_840
    assert dinov2_l_count("rein") == 2_990_081
    assert dinov2_l_count("fishertune") == 15_209_933
    assert dinov2_l_count("full") == dinov2_l_count("childtune-f") == 304_198_656
    assert dinov2_l_count("childtune-d") == round(0.2 * 304_198_656)
    assert dinov2_l_count("frozen") == 0
    assert dinov2_l_count("vqt") > 24 * 10 * 1024


def test_tiny_vit_overrides_are_the_ones_tests_assume():
    assert TINY_VIT == dict(depth=4, embed_dim=32, num_heads=2)
