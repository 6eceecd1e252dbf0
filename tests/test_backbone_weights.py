"""Pretrained weights from local files in the official layouts, and Rein's 14 -> 16 conversion."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_SAM, TINY_VIT
from dgss.models.backbone_weights import BackboneWeightsError
from dgss.models.backbones import build_backbone


def randomize(module: torch.nn.Module) -> None:
    """Make every parameter non-trivial (LayerScale starts at 1e-5, which would hide errors)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def features(backbone, x):
    with torch.no_grad():
        return backbone.eval()(x)


def assert_same_features(a, b, x):
    for fa, fb in zip(features(a, x), features(b, x)):
        torch.testing.assert_close(fa, fb)


def dinov2_official_state_dict(backbone) -> dict:
    """timm DINOv2 -> the layout of Meta's dinov2_vit*14[_reg4]_pretrain.pth files."""
    sd = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.randn(1, dim)
    if "reg_token" in sd:  # official: registers separate, pos_embed includes the class position
        cls_pos = torch.randn(1, 1, dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    return sd


@pytest.mark.parametrize("name", ["dinov2_s", "dinov2_s_reg"])
def test_official_dinov2_file_loads_and_reproduces_the_model(tmp_path, name):
    source = build_backbone(name, img_size=56, patch_size=14, **TINY_VIT)
    randomize(source.model)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(dinov2_official_state_dict(source), path)
    loaded = build_backbone(name, img_size=56, patch_size=14, weights=str(path), **TINY_VIT)
    assert_same_features(source, loaded, torch.randn(2, 3, 56, 84))


def keys_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Bicubic (Keys, a = -0.75) resampling matrix, half-pixel centres, border taps clamped."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            d = abs(src - (base + k))
            if d <= 1:
                w = (a + 2) * d**3 - (a + 3) * d**2 + 1
            elif d < 2:
                w = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            else:
                w = 0.0
            m[o, min(max(base + k, 0), n_in - 1)] += w
    return m


def resize_2d(x: np.ndarray, out_hw) -> np.ndarray:
    """x: ... x H x W resized bicubically by the matrices above."""
    mh, mw = keys_cubic_matrix(x.shape[-2], out_hw[0]), keys_cubic_matrix(x.shape[-1], out_hw[1])
    return np.einsum("oh,...hw,pw->...op", mh, x, mw)


def test_rein_conversion_14_to_16_matches_an_independent_computation(tmp_path):
    source = build_backbone("dinov2_s", img_size=70, patch_size=14, **TINY_VIT)  # 5 x 5 grid
    randomize(source.model)
    official = dinov2_official_state_dict(source)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    converted = build_backbone("dinov2_s", img_size=64, patch_size=16, weights=str(path), **TINY_VIT)  # 4 x 4

    kernel = official["patch_embed.proj.weight"].double().numpy()
    expected_kernel = resize_2d(kernel, (16, 16))  # plain bicubic, no magnitude rescaling
    got_kernel = converted.model.patch_embed.proj.weight.detach().double().numpy()
    np.testing.assert_allclose(got_kernel, expected_kernel, rtol=1e-5, atol=1e-6)

    pos = official["pos_embed"][0].double().numpy()  # (1 + 25) x C
    grid = pos[1:].reshape(5, 5, -1).transpose(2, 0, 1)
    expected_grid = resize_2d(grid, (4, 4)).transpose(1, 2, 0).reshape(16, -1)
    got = converted.model.pos_embed[0].detach().double().numpy()
    np.testing.assert_allclose(got[0], pos[0], rtol=0, atol=0)  # class position kept as is
    np.testing.assert_allclose(got[1:], expected_grid, rtol=1e-5, atol=1e-6)
    assert features(converted, torch.randn(1, 3, 64, 64))[0].shape == (1, 32, 16, 16)


def test_timm_patch_resize_is_available_and_differs(tmp_path):
    source = build_backbone("dinov2_s", img_size=70, patch_size=14, **TINY_VIT)
    randomize(source.model)
    path = tmp_path / "d.pth"
    torch.save(dinov2_official_state_dict(source), path)
    rein = build_backbone("dinov2_s", img_size=64, weights=str(path), **TINY_VIT)
    timm_way = build_backbone("dinov2_s", img_size=64, weights=str(path), patch_resize="timm", **TINY_VIT)
    assert not torch.allclose(rein.model.patch_embed.proj.weight, timm_way.model.patch_embed.proj.weight)


def test_official_mae_file_loads(tmp_path):
    source = build_backbone("mae_l", img_size=64, **TINY_VIT)
    randomize(source.model)
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save({"model": source.model.state_dict()}, path)
    loaded = build_backbone("mae_l", img_size=64, weights=str(path), **TINY_VIT)
    assert_same_features(source, loaded, torch.randn(1, 3, 64, 96))


def sam_official_state_dict(backbone) -> dict:
    """timm SAM image encoder -> Meta's sam_vit_*.pth layout (prompt encoder and decoder included)."""
    sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in backbone.model.state_dict().items()}
    sd["image_encoder.neck.0.weight"] = torch.randn(256, 32, 1, 1)
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    return sd


def test_official_sam_file_loads_and_reproduces_the_model(tmp_path):
    source = build_backbone("sam_b", img_size=64, **TINY_SAM)
    randomize(source.model)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_official_state_dict(source), path)
    loaded = build_backbone("sam_b", img_size=64, weights=str(path), **TINY_SAM)
    assert_same_features(source, loaded, torch.randn(1, 3, 64, 64))
    # the same file at another input size: position grid and relative-position tables are resized
    bigger = build_backbone("sam_b", img_size=128, weights=str(path), **TINY_SAM)
    expected = torch.nn.functional.interpolate(
        source.model.pos_embed.permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(bigger.model.pos_embed, expected)
    glob = bigger.model.blocks[1].attn
    assert glob.rel_pos_h.shape[0] == 2 * 8 - 1
    assert features(bigger, torch.randn(1, 3, 128, 128))[-1].shape == (1, 32, 4, 4)


def test_timm_safetensors_file_loads(tmp_path):
    source = build_backbone("eva02_l", img_size=64, **TINY_VIT)
    randomize(source.model)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = build_backbone("eva02_l", img_size=64, weights=str(path), **TINY_VIT)
    assert_same_features(source, loaded, torch.randn(1, 3, 64, 64))


def test_a_file_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path):
    source = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    sd = dict(source.model.state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("dinov2_s", img_size=64, weights=str(path), **TINY_VIT)
    msg = str(err.value)
    assert "broken.pth" in msg and "blocks.1.attn.qkv.weight" in msg and "decoder.extra.weight" in msg
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg


def test_wrong_width_is_reported_as_a_shape_mismatch(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(build_backbone("dinov2_s", img_size=64, depth=4, embed_dim=64, num_heads=2).model.state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="shape mismatches"):
        build_backbone("dinov2_s", img_size=64, weights=str(path), **TINY_VIT)


def test_missing_and_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found: .*absent.pth"):
        build_backbone("dinov2_s", img_size=64, weights=str(tmp_path / "absent.pth"), **TINY_VIT)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="cannot read .*garbage.pth"):
        build_backbone("dinov2_s", img_size=64, weights=str(garbage), **TINY_VIT)


class Evil:  # an arbitrary object: weights_only loading must not unpickle it
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(BackboneWeightsError, match="evil.pth"):
        build_backbone("dinov2_s", img_size=64, weights=str(path), **TINY_VIT)


def dinov3_official_state_dict(backbone) -> dict:
    """timm DINOv3 -> the layout of Meta's dinov3_vit*16_pretrain_*.pth files (the 7B's included: its
    pretraining-only local_cls_norm and mask_token, SwiGLU as w1/w2/w3, LayerScale as ls*.gamma)."""
    renames = (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"),
               ("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"))
    sd = {}
    for key, value in backbone.model.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        sd[key] = value.clone()
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.randn(1, dim)
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = torch.randn(dim), torch.randn(dim)
    return sd


def test_official_dinov3_7b_file_loads_and_reproduces_the_model(tmp_path):
    # the 7B's architecture (SwiGLU aligned to 64, no qkv bias, 4 registers) at width 64 and depth 4
    tiny = dict(depth=4, embed_dim=64, num_heads=2)
    source = build_backbone("dinov3_7b", img_size=64, **tiny)
    randomize(source.model)
    official = dinov3_official_state_dict(source)
    assert "blocks.0.mlp.w1.weight" in official and "storage_tokens" in official
    assert not any("qkv.bias" in k for k in official)
    path = tmp_path / "dinov3_vit7b16_pretrain_lvd1689m.pth"
    torch.save(official, path)
    loaded = build_backbone("dinov3_7b", img_size=64, weights=str(path), **tiny)
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert_same_features(source, loaded, torch.randn(2, 3, 64, 96))
