"""FADA (NeurIPS 2024, github JingjunYi/FADA): parameter count on DINOv2-L from the public code's shapes,
init, exactness of the as-run arithmetic against a transcription of the public code's forward, the
paper layout's spatial wavelet on known maps, the checkpoint layout, and the CLI (train, eval, export).

File:line references are rein/models/backbones/reins.py of the public code at b83bbc0 unless named."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from test_engine_support import tiny_config

from dgss.config import FADAConfig, MethodConfig, load_config
from dgss.models.backbones import build_backbone
from dgss.tuning import build_method
from dgss.tuning.fada import FrequencyReins, haar_kernels
from dgss.tuning.rein import format_trainable_parameters, refine_in_layout, trainable_parameter_counts
from dgss.tuning.rein_checkpoint import export_official_rein


def fada_cfg(**kw):
    return MethodConfig(name="fada", fada=FADAConfig(**kw))


def tiny_vit(img_size=64, name="dinov2_s", **kw):
    return build_backbone(name, img_size=img_size, **{**TINY_VIT, **kw})


def randomize_(module, std=0.5):
    """Non-trivial values everywhere (scale = 1e-3 would hide most mistakes); the wavelet filters too,
    as the public code trains them."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


# --------------------------------------------------------------------------------------------
# A transcription of the public code's LoRAReins (reins.py:12-387) in plain torch: the forward of the
# published configuration (batch_first=True and has_cls_token=True from reins_dinov2.py:24-29, LoRA tokens,
# softmax on, link_token_to_query on). WavePool takes the width as an argument (the public code hard-codes
# 1024, DINOv2-L's, at line 51).


class PublicWavePool(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        low = np.ones((1, 2)) / np.sqrt(2)
        high = np.ones((1, 2)) / np.sqrt(2)
        high[0, 0] = -high[0, 0]
        kernels = {"LL": low.T * low, "LH": low.T * high, "HL": high.T * low, "HH": high.T * high}
        for name, kernel in kernels.items():
            conv = torch.nn.Conv2d(channels, channels, kernel_size=2, stride=2, padding=0, bias=False, groups=channels)
            conv.weight.requires_grad = False
            weight = torch.from_numpy(kernel).unsqueeze(0).float().unsqueeze(0)
            conv.weight.data = weight.expand(channels, -1, -1, -1).clone()
            setattr(self, name, conv)

    def forward(self, x):
        return self.LL(x), self.LH(x), self.HL(x), self.HH(x)


class PublicFADA(torch.nn.Module):
    def __init__(self, num_layers, embed_dims, token_length, lora_dim, query_dims):
        super().__init__()
        c = embed_dims // 4
        self.num_layers, self.embed_dims = num_layers, embed_dims
        self.learnable_tokens_a = torch.nn.Parameter(torch.empty(num_layers, token_length, lora_dim))
        self.learnable_tokens_b = torch.nn.Parameter(torch.empty(num_layers, lora_dim, c))
        self.learnable_tokens_a2 = torch.nn.Parameter(torch.empty(num_layers, token_length, lora_dim))
        self.learnable_tokens_b2 = torch.nn.Parameter(torch.empty(num_layers, lora_dim, 3 * c))
        self.scale = torch.nn.Parameter(torch.tensor(0.001))
        self.mlp_token2feat = torch.nn.Linear(c, c)
        self.mlp_delta_f = torch.nn.Linear(c, c)
        self.mlp_token2feat2 = torch.nn.Linear(3 * c, 3 * c)
        self.mlp_delta_f2 = torch.nn.Linear(3 * c, 3 * c)
        self.wavepool = PublicWavePool(embed_dims)
        self.transform = torch.nn.Linear(c, query_dims)
        self.merge = torch.nn.Linear(query_dims * 3, query_dims)

    def get_tokens(self, layer):
        if layer == -1:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def get_tokens2(self, layer):
        return self.learnable_tokens_a2[layer] @ self.learnable_tokens_b2[layer]

    def return_auto(self, feats):
        tokens = self.transform(self.get_tokens(-1)).permute(1, 2, 0)
        tokens = torch.cat([F.max_pool1d(tokens, kernel_size=self.num_layers),
                            F.avg_pool1d(tokens, kernel_size=self.num_layers), tokens[:, :, -1].unsqueeze(-1)], dim=-1)
        return feats, self.merge(tokens.flatten(-2, -1))

    def forward(self, feats, layer):
        feats = feats.permute(1, 0, 2)
        cls_token, feats = torch.tensor_split(feats, [1], dim=0)
        N, B, C = feats.shape
        h = int(np.sqrt(N))
        w = h
        feats = feats.reshape(B, C, h, w)
        ll, lh, hl, hh = self.wavepool(feats)
        c = int(C / 4)
        ll, lh, hl, hh = ll.reshape(B, N, c), lh.reshape(B, N, c), hl.reshape(B, N, c), hh.reshape(B, N, c)
        feats_c = ll.reshape(N, B, c)
        feats_s = torch.cat((lh, hl, hh), -1).reshape(N, B, c * 3)
        feats = feats.reshape(N, B, C)
        delta_featc = self.forward_delta_feat(feats_c, self.get_tokens(layer))
        delta_feats = self.forward_delta_feat2(feats_s, self.get_tokens2(layer))
        delta_feat = torch.cat((delta_featc, delta_feats), -1) * self.scale
        feats = feats + delta_feat
        feats = torch.cat([cls_token, feats], dim=0)
        return feats.permute(1, 0, 2)

    def forward_delta_feat(self, feats, tokens):
        attn = torch.einsum("nbc,mc->nbm", feats, tokens)
        attn = F.softmax(attn * (self.embed_dims**-0.5), dim=-1)
        delta_f = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], self.mlp_token2feat(tokens[1:, :]))
        return self.mlp_delta_f(delta_f + feats)

    def forward_delta_feat2(self, feats, tokens):
        attn = torch.einsum("nbc,mc->nbm", feats, tokens)
        attn = F.instance_norm(attn)
        attn = F.softmax(attn * (self.embed_dims**-0.5), dim=-1)
        delta_f = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], self.mlp_token2feat2(tokens[1:, :]))
        return self.mlp_delta_f2(delta_f + feats)


def public_twin(reins: FrequencyReins) -> PublicFADA:
    """The transcription holding the same tensors: loading by name also checks that dgss's keys are the
    public code's."""
    twin = PublicFADA(reins.num_layers, reins.full_dim, reins.num_tokens, reins.lora_rank, reins.query_dim)
    twin.load_state_dict(reins.state_dict(), strict=True)
    return twin


# --------------------------------------------------------------------------------------------
# The published configuration


def test_dinov2_l_has_the_public_codes_2061825_trainable_parameters():
    # C = 1024 (embed_dims, configs/_base_/models/rein_dinov2_mask2former.py:19), c = C / 4 = 256, L = 24
    # (num_layers, :20), M = 100 (token_length, :18), r = 16 (lora_dim, :23), Q = 256 (query_dims, reins.py:19)
    expected = {
        "reins.learnable_tokens_a": (24, 100, 16),  # reins.py:344-346
        "reins.learnable_tokens_b": (24, 16, 256),  # reins.py:347-349: width int(embed_dims / 4)
        "reins.scale": (),  # reins.py:42
        "reins.mlp_token2feat.weight": (256, 256), "reins.mlp_token2feat.bias": (256,),  # reins.py:43
        "reins.mlp_delta_f.weight": (256, 256), "reins.mlp_delta_f.bias": (256,),  # reins.py:44
        "reins.learnable_tokens_a2": (24, 100, 16),  # reins.py:361-363
        "reins.learnable_tokens_b2": (24, 16, 768),  # reins.py:364-366: width int(embed_dims / 4) * 3
        "reins.mlp_token2feat2.weight": (768, 768), "reins.mlp_token2feat2.bias": (768,),  # reins.py:49
        "reins.mlp_delta_f2.weight": (768, 768), "reins.mlp_delta_f2.bias": (768,),  # reins.py:50
        # reins.py:51 WavePool(1024), 300-311: four depthwise Conv2d(1024, 1024, 2, groups=1024, bias=False)
        **{f"reins.wavepool.{band}.weight": (1024, 1, 2, 2) for band in ("LL", "LH", "HL", "HH")},
        "reins.transform.weight": (256, 256), "reins.transform.bias": (256,),  # reins.py:73
        "reins.merge.weight": (256, 768), "reins.merge.bias": (256,),  # reins.py:74
    }
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l")
        method = build_method(fada_cfg(), backbone)
    assert {n: tuple(p.shape) for n, p in method.named_parameters()} == expected
    total = sum(math.prod(shape) for shape in expected.values())
    assert total == 38_400 + 98_304 + 1 + 2 * 65_792 + 38_400 + 294_912 + 2 * 590_592 + 16_384 + 65_792 + 196_864
    # every "reins" tensor trains in the public code (utils.py:18-21 via reins_dinov2.py:39), the wavelet too
    assert method.num_trainable_backbone_parameters() == total == 2_061_825
    assert trainable_parameter_counts(method)["method"] == 2_061_825
    assert "fada 2,061,825" in format_trainable_parameters(method)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    # optimizer groups as the public config's: no decay on the tokens and scale ("learnable_tokens",
    # "reins.scale" custom keys, rein_dinov2_mask2former_512x512_bs1x4.py:36-37), 0.05 on the rest, the
    # wavelet included (no custom key matches it)
    groups = method.parameter_groups(lr=1e-4, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in method.named_parameters():
        assert (id(p) in no_decay) == ("learnable_tokens" in name or name == "reins.scale"), name

    with torch.device("meta"):
        frozen = build_method(fada_cfg(train_wavelet=False), build_backbone("dinov2_l"))
    assert frozen.num_trainable_backbone_parameters() == 2_061_825 - 16_384 == 2_045_441
    assert set(frozen.reins.state_dict()) == set(method.reins.state_dict())  # the same file layout


def test_shipped_configs_follow_the_public_config():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs" / "fada"
    cfg = load_config(configs / "dinov2-l_gtav_512.yaml")
    # rein_dinov2_mask2former_512x512_bs1x4.py: batch 4 (21), AdamW 1e-4 / 0.05 (28-30), poly over 40k (42-47)
    assert (cfg.train.iters, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, cfg.train.poly_power) == \
        (40000, 4, 1e-4, 0.05, 0.9)
    assert (cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride) == ("slide", [512, 512], [341, 341])  # model file 164-168
    assert cfg.method.fada == FADAConfig() and cfg.model.head.num_queries == cfg.method.fada.num_tokens == 100
    assert (cfg.model.backbone, cfg.model.img_size, cfg.model.patch_size) == ("dinov2_l", 512, 16)
    dinov3 = load_config(configs / "dinov3-l_gtav_512.yaml")
    assert dinov3.method.fada == FADAConfig() and dinov3.train == cfg.train and dinov3.eval == cfg.eval
    with torch.device("meta"):
        method = build_method(dinov3.method, build_backbone("dinov3_l"))
    assert method.num_trainable_backbone_parameters() == 2_061_825 and method.num_prefix_tokens == 5


def test_init_follows_the_public_code():
    torch.manual_seed(0)
    reins = FrequencyReins(24, 1024, num_tokens=100, lora_rank=16, query_dim=256)
    # content pair: sqrt(6 / (3 p^2 + sqrt(C r))) with the full C (reins.py:350-358)
    v_low = math.sqrt(6 / (3 * 16**2 + math.sqrt(1024 * 16)))
    # style pair: sqrt(6 / (3 p^2 + sqrt(3c r))) (reins.py:367-375)
    v_high = math.sqrt(6 / (3 * 16**2 + math.sqrt(768 * 16)))
    for tokens, v in ((reins.learnable_tokens_a, v_low), (reins.learnable_tokens_b, v_low),
                      (reins.learnable_tokens_a2, v_high), (reins.learnable_tokens_b2, v_high)):
        assert 0.99 * v < tokens.abs().max() <= v
    assert reins.scale.item() == pytest.approx(1e-3)
    for linear, width in ((reins.mlp_token2feat, 256), (reins.mlp_delta_f2, 768)):
        assert 0.99 / math.sqrt(width) < linear.weight.abs().max() <= 1 / math.sqrt(width)
    for band, kernel in haar_kernels().items():
        assert torch.equal(getattr(reins.wavepool, band).weight, kernel.expand(1024, 1, 2, 2))
    assert torch.equal(haar_kernels()["LH"], torch.tensor([[-0.5, 0.5], [-0.5, 0.5]]))
    plain = FrequencyReins(2, 64, num_tokens=100, lora_rank=None)  # Reins (plain tokens), reins.py:39-69
    v_plain, v_plain2 = math.sqrt(6 / (3 * 256 + 16)), math.sqrt(6 / (3 * 256 + 48))
    assert tuple(plain.learnable_tokens.shape) == (2, 100, 16) and tuple(plain.learnable_tokens2.shape) == (2, 100, 48)
    assert 0.99 * v_plain < plain.learnable_tokens.abs().max() <= v_plain
    assert 0.99 * v_plain2 < plain.learnable_tokens2.abs().max() <= v_plain2


# --------------------------------------------------------------------------------------------
# Exactness of the as-run arithmetic


@pytest.mark.parametrize("batch, side, width", [(2, 6, 32), (3, 4, 32), (1, 4, 16)])
def test_one_layer_equals_the_public_code(batch, side, width):
    # (2, 6, 32): 2w = 12 does not divide C, so the public code's reshape mixes tokens and images
    reins = FrequencyReins(3, width, num_tokens=5, lora_rank=4, query_dim=8)
    randomize_(reins)
    twin = public_twin(reins)
    x = torch.randn(batch, 1 + side * side, width)  # class token first, as a DINOv2 block's output
    for layer in range(3):
        expected = twin(x, layer)
        refine = lambda f: reins.refine(f, layer, grid=(side, side))  # noqa: E731
        torch.testing.assert_close(refine_in_layout(refine, x, "nlc", 1), expected)
        with torch.no_grad():
            torch.testing.assert_close(refine_in_layout(refine, x, "nlc", 1), expected)


def test_bf16_autocast_stays_close_to_fp32_and_keeps_the_residual_stream():
    reins = FrequencyReins(1, 32, num_tokens=5, lora_rank=4, layout="public_code")
    randomize_(reins, std=0.2)
    feats = 3 * torch.randn(2, 36, 32)
    exact = reins.refine(feats, 0, grid=(6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = reins.refine(feats, 0, grid=(6, 6))
    assert rounded.dtype == torch.float32  # f + scale * delta: f is not rounded
    delta = (exact - feats).abs().max().item()
    assert delta > 0.1
    torch.testing.assert_close(rounded, exact, rtol=0, atol=0.05 * delta)


def test_backbone_with_fada_equals_the_public_code_block_by_block_and_queries():
    backbone = tiny_vit(img_size=96).eval()  # a 6 x 6 token grid, C = 32: the reshape mixes tokens
    method = build_method(fada_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method)
    twin = public_twin(method.reins)
    block_inputs = []
    handles = [blk.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0])) for blk in backbone.blocks]
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        backbone(images)
        for handle in handles:
            handle.remove()
        method.detach_hooks()
        raw = [blk(x) for blk, x in zip(backbone.blocks, block_inputs)]
        for layer in range(len(backbone.blocks) - 1):  # block l's refined output is block l+1's input
            torch.testing.assert_close(block_inputs[layer + 1], twin(raw[layer], layer))
        torch.testing.assert_close(method.head_queries(), twin.return_auto([])[1])  # the low tokens' link
    # with autograd (training): the same arithmetic, and every FADA tensor gets a gradient
    method.attach(backbone)
    feats = backbone(images)
    sum(f.square().mean() for f in feats).backward()
    for name, p in method.named_parameters():
        if not name.startswith(("reins.transform", "reins.merge")):  # those only feed the head's queries
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sam_gets_fada_after_its_global_blocks_on_their_grid_and_cnns_are_refused():
    from conftest import tiny_overrides

    sam = build_backbone("sam_h", img_size=64, **tiny_overrides("sam_h")).eval()
    method = build_method(fada_cfg(num_tokens=6, lora_rank=4, query_dim=8, layout="paper", train_wavelet=False), sam)
    assert method.sites[0].block_indices == (1, 3)  # the global-attention blocks, as Rein's
    randomize_(method, std=0.3)
    inputs = {}
    hooks = [sam.blocks[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i in (1, 2)]
    with torch.no_grad():
        sam(torch.randn(2, 3, 64, 96))  # B x 4 x 6 x C blocks: the grid comes from the block output
        for hook in hooks:
            hook.remove()
        method.detach_hooks()
        raw = sam.blocks[1](inputs[1])
        expected = paper_reference(method.reins, raw.reshape(2, 24, -1), (4, 6)).view_as(raw)
    torch.testing.assert_close(inputs[2], expected)
    with pytest.raises(ValueError, match="needs a transformer backbone"):
        build_method(fada_cfg(), build_backbone("resnet50", **tiny_overrides("resnet50")))


def test_public_code_layout_transforms_each_tokens_channels_not_the_image():
    """When 2w divides C the public code's "image" is each token's channels as a (C/w) x w picture: a map
    constant over space still has high-frequency bands, and a token's bands do not depend on the batch."""
    reins = FrequencyReins(1, 32, num_tokens=3, lora_rank=2)  # C = 32 on a 4 x 4 grid: 2w = 8 divides 32
    vector = torch.randn(32)
    constant = vector.expand(2, 16, 32).contiguous()  # the same token everywhere, in both images
    low, high = reins.bands(constant, (4, 4))
    picture = vector.view(1, 1, 8, 4)  # channel k at row k // 4, column k % 4
    cells = [picture[..., 0::2, 0::2], picture[..., 0::2, 1::2], picture[..., 1::2, 0::2], picture[..., 1::2, 1::2]]
    a, b, c, d = (cell.flatten() for cell in cells)
    expected_low = (a + b + c + d) / 2
    expected_high = torch.cat([(b + d - a - c) / 2, (c + d - a - b) / 2, (a + d - b - c) / 2])
    torch.testing.assert_close(low, expected_low.expand(2, 16, 8))
    torch.testing.assert_close(high, expected_high.expand(2, 16, 24))
    assert high.abs().max() > 0.1  # no spatial variation, yet "high frequencies"
    paper = FrequencyReins(1, 32, num_tokens=3, lora_rank=2, layout="paper")
    assert paper.bands(constant, (4, 4))[1].abs().max() == 0  # the spatial transform sees none
    mixed = torch.randn(2, 16, 32)
    alone = reins.bands(mixed[1:], (4, 4))
    torch.testing.assert_close(reins.bands(mixed, (4, 4))[0][1:], alone[0])


def test_at_the_published_shape_each_token_is_a_32_by_32_channel_image():
    """DINOv2-L at 512 (N = C = 1024, w = 32), batch 2: every token's low band is the Haar LL of its own
    1024 channels laid out as a 32 x 32 picture."""
    reins = FrequencyReins(1, 1024, num_tokens=3, lora_rank=2)
    feats = torch.randn(2, 1024, 1024)
    low, high = reins.bands(feats, (32, 32))
    picture = feats.view(2, 1024, 32, 32)  # channel k at row k // 32, column k % 32
    a, b, c, d = picture[..., 0::2, 0::2], picture[..., 0::2, 1::2], picture[..., 1::2, 0::2], picture[..., 1::2, 1::2]
    torch.testing.assert_close(low, ((a + b + c + d) / 2).flatten(2))
    torch.testing.assert_close(high[..., 512:], ((a + d - b - c) / 2).flatten(2))  # HH, the last third


# --------------------------------------------------------------------------------------------
# The paper layout


def spatial_map_tokens(maps):
    """B x C x h x w -> B x N x C tokens, row-major."""
    return maps.flatten(2).transpose(1, 2)


def test_paper_layout_wavelet_of_known_maps():
    reins = FrequencyReins(1, 16, num_tokens=3, lora_rank=2, layout="paper")  # C = 16, c = 4
    h, w = 4, 6
    amplitude = torch.arange(1.0, 17.0).view(1, 16, 1, 1)  # channel k has amplitude k + 1
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    maps = {
        "constant": torch.ones(h, w),
        "columns": (-1.0) ** cols.expand(h, w),  # +1, -1, +1, ... along a row: LH = (b + d - a - c) / 2 = -2
        "rows": (-1.0) ** rows.expand(h, w),  # HL = (c + d - a - b) / 2 = -2
        "checkerboard": (-1.0) ** (rows + cols),  # HH = (a + d - b - c) / 2 = 2
    }
    values = {"constant": (2, 0, 0, 0), "columns": (0, -2, 0, 0), "rows": (0, 0, -2, 0), "checkerboard": (0, 0, 0, 2)}
    for name, pattern in maps.items():
        tokens = spatial_map_tokens(amplitude * pattern)
        low, high = reins.bands(tokens, (h, w))
        bands = [low, high[..., :4], high[..., 4:8], high[..., 8:]]
        for band, value in zip(bands, values[name]):
            # token (2i + di, 2j + dj) holds channels 4k + 2di + dj of its cell: amplitude 4k + 2di + dj + 1
            grid = band.view(h, w, 4)
            for di in (0, 1):
                for dj in (0, 1):
                    channels = torch.arange(4) * 4 + 2 * di + dj
                    expected = value * (channels + 1.0)
                    torch.testing.assert_close(grid[di::2, dj::2], expected.expand(h // 2, w // 2, 4), msg=name)


def paper_reference(reins, feats, grid):
    """The paper layout from first principles: odd sides padded by repetition, Haar by slicing the
    spatial map, each cell's C values spread over its four tokens by explicit indexing."""
    B, N, C = feats.shape
    h, w = grid
    spatial = feats.view(B, h, w, C)
    if h % 2:
        spatial = torch.cat([spatial, spatial[:, -1:]], 1)
    if w % 2:
        spatial = torch.cat([spatial, spatial[:, :, -1:]], 2)
    a, b, c, d = spatial[:, 0::2, 0::2], spatial[:, 0::2, 1::2], spatial[:, 1::2, 0::2], spatial[:, 1::2, 1::2]
    cells = [(a + b + c + d) / 2, (b + d - a - c) / 2, (c + d - a - b) / 2, (a + d - b - c) / 2]  # B x h/2 x w/2 x C
    H, W = spatial.shape[1:3]
    out = []
    for cell in cells:
        token = torch.empty(B, H, W, C // 4)
        for di in (0, 1):
            for dj in (0, 1):
                token[:, di::2, dj::2] = cell[..., 2 * di + dj::4]
        out.append(token)
    low, high = out[0], torch.cat(out[1:], -1)

    def branch(x, T, m1, m2, normalize):
        logits = x @ T.t()
        if normalize:
            logits = F.instance_norm(logits.flatten(0, 2).unsqueeze(0)).squeeze(0).view_as(logits)
        attn = torch.softmax(logits / math.sqrt(C), -1)
        return m2(attn[..., 1:] @ m1(T[1:]) + x)

    delta = torch.cat([branch(low, reins.tokens(0), reins.mlp_token2feat, reins.mlp_delta_f, False),
                       branch(high, reins.style_tokens(0), reins.mlp_token2feat2, reins.mlp_delta_f2, True)], -1)
    return feats + reins.scale * delta[:, :h, :w].reshape(B, N, C)


def test_paper_layout_through_the_backbone_on_a_non_square_odd_grid():
    backbone = tiny_vit().eval()
    method = build_method(fada_cfg(num_tokens=6, lora_rank=4, query_dim=8, layout="paper", train_wavelet=False), backbone)
    randomize_(method, std=0.3)
    inputs = []
    handles = [backbone.blocks[i].register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for i in (0, 1)]
    with torch.no_grad():
        backbone(torch.randn(2, 3, 80, 96))  # a 5 x 6 token grid: the odd side is padded
        for handle in handles:
            handle.remove()
        method.detach_hooks()
        raw = backbone.blocks[0](inputs[0])
        # the recorded grid reached the hook: block 1's input is block 0's output refined on the 5 x 6 grid
        torch.testing.assert_close(inputs[1][:, 1:], paper_reference(method.reins, raw[:, 1:], (5, 6)))
        torch.testing.assert_close(inputs[1][:, :1], raw[:, :1])  # the class token bypasses


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line

# The public code's names (reins.py:39-74, 341-375; state_dict of reins_dinov2.py:42-49 keeps the keys
# containing "rein") for L layers, M tokens, rank r, width C and query width Q.
def public_checkpoint_shapes(L, M, r, C, Q):
    c = C // 4
    return {
        "backbone.reins.learnable_tokens_a": (L, M, r), "backbone.reins.learnable_tokens_b": (L, r, c),
        "backbone.reins.learnable_tokens_a2": (L, M, r), "backbone.reins.learnable_tokens_b2": (L, r, 3 * c),
        "backbone.reins.scale": (),
        "backbone.reins.mlp_token2feat.weight": (c, c), "backbone.reins.mlp_token2feat.bias": (c,),
        "backbone.reins.mlp_delta_f.weight": (c, c), "backbone.reins.mlp_delta_f.bias": (c,),
        "backbone.reins.mlp_token2feat2.weight": (3 * c, 3 * c), "backbone.reins.mlp_token2feat2.bias": (3 * c,),
        "backbone.reins.mlp_delta_f2.weight": (3 * c, 3 * c), "backbone.reins.mlp_delta_f2.bias": (3 * c,),
        **{f"backbone.reins.wavepool.{band}.weight": (C, 1, 2, 2) for band in ("LL", "LH", "HL", "HH")},
        "backbone.reins.transform.weight": (Q, c), "backbone.reins.transform.bias": (Q,),
        "backbone.reins.merge.weight": (Q, 3 * Q), "backbone.reins.merge.bias": (Q,),
    }


def fada_config_file(tmp_path, name, weights=None, **fada):
    import yaml

    path = tiny_config(tmp_path, name, head="mask2former", method="fada", weights=weights)
    raw = yaml.safe_load(path.read_text())
    raw["method"]["fada"] = {"num_tokens": 6, "lora_rank": 4, "query_dim": 16, **fada}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_file_in_the_public_codes_layout_loads_through_dgss_load_and_eval(tmp_path):
    import dgss
    from dgss.cli import main
    from dgss.engine.distributed import DistContext
    from dgss.engine.evaluate import evaluate_datasets
    from dgss.predict.loading import CheckpointError
    from dgss.tuning.model import build_segmentor
    from test_engine_support import backbone_weights_file

    weights = backbone_weights_file(tmp_path)
    config = fada_config_file(tmp_path, "fada_public", weights=str(weights))
    cfg = load_config(config)
    model = build_segmentor(cfg).eval()
    randomize_(model.method, std=0.2)  # stand-in for training: every FADA tensor moves
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = export_official_rein(model.method, model.head)
    reins = {k: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.reins.")}
    assert reins == public_checkpoint_shapes(L=4, M=6, r=4, C=32, Q=16)
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)  # mmengine's container

    predictor = dgss.load(path, config=config, device="cpu")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(predictor.model.inference(images), model.inference(images))
    out = tmp_path / "eval_public"
    assert main(["eval", str(config), "--checkpoint", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = evaluate_datasets(model, cfg.data.test, cfg, DistContext())
    for r in expected:
        assert results["datasets"][r.name]["miou"] == pytest.approx(r.miou, abs=1e-4)
    rein_config = tiny_config(tmp_path, "rein_cfg", head="mask2former", method="rein", weights=str(weights))
    with pytest.raises(CheckpointError, match="method.name: fada"):
        dgss.load(path, config=rein_config)


def test_grad_checkpointing_reruns_the_hooks_on_the_recorded_grid(tmp_path):
    """Activation checkpointing re-runs every block and its FADA hook in the backward pass; the grid the
    patch embedding recorded is still the forward's, so the step is the same as without checkpointing."""
    import warnings

    from dgss.engine.trainer import Trainer

    steps = []
    for name, train in (("plain", {}), ("ckpt", {"grad_checkpointing": True})):
        config = fada_config_file(tmp_path, f"fada_{name}", layout="paper")
        cfg = load_config(config, [f"train.grad_checkpointing={str(bool(train)).lower()}", "train.iters=1",
                                   "data.crop_size=[64,96]"])  # a 4 x 6 grid: sqrt(N) would not do
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(cfg)
        calls = []
        for block in trainer.model.backbone.blocks:
            block.register_forward_pre_hook(lambda m, args: calls.append(1))
        losses, _ = trainer.train_step(0)
        grads = {n: p.grad.clone() for n, p in trainer.model.method.named_parameters() if p.grad is not None}
        steps.append((losses["loss"], grads, len(calls), len(trainer.model.backbone.blocks)))
    (loss, grads, calls, blocks), (loss_ckpt, grads_ckpt, calls_ckpt, _) = steps
    assert calls == blocks and calls_ckpt == 2 * blocks  # the backward pass re-ran every block
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and "reins.learnable_tokens_b2" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fada_trains_evaluates_and_exports_from_the_cli(tmp_path, capsys):
    import onnxruntime as ort  # a dev dependency

    from dgss.cli import main
    from dgss.predict import Predictor
    from dgss.predict.loading import load_segmentor

    config = fada_config_file(tmp_path, "fada_cli", layout="public_code")
    assert main(["train", str(config)]) == 0
    final = tmp_path / "runs" / "fada_cli" / "model_final.safetensors"
    assert "fada" in capsys.readouterr().out
    loaded = load_segmentor(final)
    reins = loaded.model.method.reins
    # trained: the scale left its 1e-3 start and the wavelet filters their Haar kernels, as in the public code
    assert reins.scale.item() != pytest.approx(1e-3, rel=1e-6)
    assert not torch.equal(reins.wavepool.LL.weight, haar_kernels()["LL"].expand(32, 1, 2, 2))
    out = tmp_path / "eval_cli"
    assert main(["eval", str(config), "--checkpoint", str(final), "--out", str(out)]) == 0
    assert set(json.loads((out / "results.json").read_text())["datasets"]) == {"night", "fog"}
    onnx_path = tmp_path / "fada.onnx"
    assert main(["export", "--checkpoint", str(final), "--out", str(onnx_path), "--input-size", "64", "96"]) == 0
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(0)).float()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores, _ = session.run(None, {"images": images.numpy()})
    model = loaded.model
    with torch.no_grad():
        reference = model.whole_inference(Predictor(model, loaded.cfg).normalize(images))
    assert np.abs(scores - reference.numpy()).max() < 1e-4
