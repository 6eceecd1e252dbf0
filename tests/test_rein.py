"""Rein (rein.md): parameter count, init, the per-layer equations, the query link, attachment per
backbone family, freezing and gradients. Every reference below is written from rein.md's equations,
not from dgss's code."""

import math

import pytest
import torch
from conftest import tiny_overrides

from dgss.config import MethodConfig, ReinConfig
from dgss.models.backbones import build_backbone
from dgss.tuning import build_method
from dgss.tuning.rein import Reins, ReinSite, format_trainable_parameters, trainable_parameter_counts


def tiny(name, **kw):
    return build_backbone(name, img_size=64, **{**tiny_overrides(name), **kw})


def rein_cfg(**kw):
    return MethodConfig(name="rein", rein=ReinConfig(**kw))


def equations_refine(f, A, B, W1, b1, W2, b2, scale):
    """rein.md 'Forward after layer l' in its own N x B x C layout. f: N x B x C patch tokens."""
    T = A @ B  # M x C
    C = f.shape[-1]
    S = torch.softmax(torch.einsum("nbc,mc->nbm", f, T) / math.sqrt(C), dim=-1)
    values = T[1:] @ W1.t() + b1  # mlp_token2feat(T[1:]), (M-1) x C
    delta_bar = torch.einsum("nbm,mc->nbc", S[:, :, 1:], values)
    delta = (delta_bar + f) @ W2.t() + b2  # mlp_delta_f(delta_bar + f)
    return f + scale * delta


def reference_block_output(reins, layer, raw, num_prefix):
    """Block output after Rein (B x N x C, prefix tokens first), from the equations."""
    f = raw[:, num_prefix:].transpose(0, 1)
    refined = equations_refine(
        f,
        reins.learnable_tokens_a[layer],
        reins.learnable_tokens_b[layer],
        reins.mlp_token2feat.weight,
        reins.mlp_token2feat.bias,
        reins.mlp_delta_f.weight,
        reins.mlp_delta_f.bias,
        reins.scale,
    )
    return torch.cat([raw[:, :num_prefix], refined.transpose(0, 1)], dim=1)


def randomize_(module, std=0.5):
    """Non-trivial values everywhere (scale = 1e-3 would hide most mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


# --------------------------------------------------------------------------------------------


def test_dinov2_l_lora_rein_has_exactly_2990081_trainable_parameters():
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l")
        method = build_method(rein_cfg(num_tokens=100, lora_rank=16, query_dim=256), backbone)
    shapes = {n: tuple(p.shape) for n, p in method.named_parameters()}
    assert shapes == {
        "reins.learnable_tokens_a": (24, 100, 16),
        "reins.learnable_tokens_b": (24, 16, 1024),
        "reins.scale": (),
        "reins.mlp_token2feat.weight": (1024, 1024),
        "reins.mlp_token2feat.bias": (1024,),
        "reins.mlp_delta_f.weight": (1024, 1024),
        "reins.mlp_delta_f.bias": (1024,),
        "reins.transform.weight": (256, 1024),
        "reins.transform.bias": (256,),
        "reins.merge.weight": (256, 768),
        "reins.merge.bias": (256,),
    }
    assert method.num_trainable_backbone_parameters() == 2_990_081
    assert not any(p.requires_grad for p in backbone.model.parameters())
    counts = trainable_parameter_counts(method)
    assert counts == {"method": 2_990_081, "backbone": 0, "neck": 0, "head": 0, "total": 2_990_081}
    assert "2,990,081" in format_trainable_parameters(method)
    # Optimizer groups: no decay on tokens and scale, decay on the MLPs and linears.
    groups = method.parameter_groups(lr=1e-4, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in method.named_parameters():
        expect_no_decay = name in {"reins.learnable_tokens_a", "reins.learnable_tokens_b", "reins.scale"}
        assert (id(p) in no_decay) == expect_no_decay, name
    # the official configs: the Reins train at the head's lr; lr_mult scales it (and only them)
    assert {g["lr"] for g in groups} == {1e-4}
    method.lr_mult = 0.1
    scaled = method.parameter_groups(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.5)
    assert [g["lr"] for g in scaled] == pytest.approx([1e-5] * len(scaled))
    assert sum(p.numel() for g in scaled for p in g["params"]) == 2_990_081


def test_init_ranges_follow_the_formula():
    torch.manual_seed(0)
    lora = Reins(24, 1024, num_tokens=100, lora_rank=16, query_dim=256)
    v = math.sqrt(6 / (3 * 16**2 + math.sqrt(1024 * 16)))  # p = 16
    for tokens in (lora.learnable_tokens_a, lora.learnable_tokens_b):
        assert tokens.abs().max() <= v
        assert tokens.abs().max() > 0.99 * v  # uniform over the whole range, not a narrower one
        assert tokens.std().item() == pytest.approx(v / math.sqrt(3), rel=0.02)
    plain = Reins(3, 64, num_tokens=100, lora_rank=None)
    v_plain = math.sqrt(6 / (3 * 16**2 + 64))
    assert tuple(plain.learnable_tokens.shape) == (3, 100, 64)
    assert v_plain * 0.99 < plain.learnable_tokens.abs().max() <= v_plain
    assert not hasattr(plain, "learnable_tokens_a")
    assert lora.scale.item() == pytest.approx(1e-3) and lora.scale.requires_grad
    for linear in (lora.mlp_token2feat, lora.mlp_delta_f):  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(C), 1/sqrt(C))
        bound = 1 / math.sqrt(1024)
        assert bound * 0.99 < linear.weight.abs().max() <= bound
        assert linear.bias.abs().max() <= bound
    assert tuple(lora.transform.weight.shape) == (256, 1024) and tuple(lora.merge.weight.shape) == (256, 768)


def test_scale_zero_leaves_the_backbone_output_unchanged():
    backbone = tiny("dinov2_s").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = backbone(images)
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method)
    with torch.no_grad():
        method.reins.scale.zero_()
        after = backbone(images)
        method.reins.scale.fill_(0.5)
        refined = backbone(images)
    for a, b, c in zip(before, after, refined):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)  # the hooks are live: a non-zero scale changes the features


def test_one_layer_forward_equals_the_equations():
    reins = Reins(3, 16, num_tokens=5, lora_rank=4, query_dim=8)
    randomize_(reins)
    feats = torch.randn(2, 7, 16)  # B x N x C
    for layer in range(3):
        expected = reference_block_output(reins, layer, feats, num_prefix=0)
        torch.testing.assert_close(reins.refine(feats, layer), expected)
        with torch.no_grad():  # the rearranged inference path (cached operands)
            torch.testing.assert_close(reins.refine(feats, layer), expected.detach())


def test_inference_path_follows_parameter_changes_and_plain_tokens():
    reins = Reins(2, 16, num_tokens=5, lora_rank=None, query_dim=8)
    randomize_(reins)
    feats = torch.randn(3, 6, 16)
    with torch.no_grad():
        first = reins.refine(feats, 1)
        for parameter in (reins.scale, reins.mlp_delta_f.bias, reins.mlp_token2feat.weight, reins.learnable_tokens):
            parameter.mul_(0.5)  # in place, as an optimizer step or a checkpoint load does
            changed = reins.refine(feats, 1)
            assert not torch.allclose(changed, first)
            torch.testing.assert_close(changed, _equations_plain(reins, feats, 1))
            first = changed


def _equations_plain(reins, feats, layer):
    T = reins.learnable_tokens[layer]
    W1, b1, W2, b2 = reins.mlp_token2feat.weight, reins.mlp_token2feat.bias, reins.mlp_delta_f.weight, reins.mlp_delta_f.bias
    return equations_refine(feats.transpose(0, 1), T, torch.eye(T.shape[-1]), W1, b1, W2, b2, reins.scale).transpose(0, 1)


def test_inference_path_under_bf16_autocast_keeps_the_residual_stream_exact():
    reins = Reins(2, 32, num_tokens=5, lora_rank=4, query_dim=8)
    randomize_(reins, std=0.2)
    with torch.no_grad():
        reins.scale.fill_(1e-3)  # the initial scale: the refinement is small against f
    feats = 10 * torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained_path = reins.refine(feats, 0)  # autograd on: the equations as written
        with torch.no_grad():
            inference_path = reins.refine(feats, 0)
    assert inference_path.dtype == trained_path.dtype == torch.float32
    refinement = (trained_path - feats).abs().max()
    assert refinement > 5e-3  # not negligible here
    # Both round their products to bf16 (relative 2^-8 of the refinement); f itself is not rounded,
    # which would cost up to 10 x 2^-9 = 0.02 here.
    torch.testing.assert_close(inference_path, trained_path.detach(), rtol=0, atol=0.02 * refinement.item())


def test_features_and_next_block_see_the_refined_tokens_and_registers_bypass():
    backbone = tiny("dinov2_s_reg", out_indices=[0, 1, 2, 3]).eval()
    assert backbone.num_prefix_tokens == 5  # class + 4 registers
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method)
    block_inputs = []
    handles = [blk.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0])) for blk in backbone.blocks]
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64))
        for handle in handles:
            handle.remove()
        method.detach_hooks()
        raw_outputs = [blk(x) for blk, x in zip(backbone.blocks, block_inputs)]
    for layer in range(3):  # block l's refined output is block l+1's input, prefix tokens untouched
        expected = reference_block_output(method.reins, layer, raw_outputs[layer], num_prefix=5)
        torch.testing.assert_close(block_inputs[layer + 1], expected)
        torch.testing.assert_close(block_inputs[layer + 1][:, :5], raw_outputs[layer][:, :5], rtol=0, atol=0)
    # The stride-16 pyramid level is block 2's output after Rein (patch tokens only, 4 x 4 grid).
    after_rein = reference_block_output(method.reins, 2, raw_outputs[2], num_prefix=5)[:, 5:]
    torch.testing.assert_close(feats[2], after_rein.transpose(1, 2).reshape(2, 32, 4, 4))


def test_queries_are_the_interleaved_max_mean_last_link():
    L, M, C, Q = 3, 4, 8, 5
    reins = Reins(L, C, num_tokens=M, lora_rank=2, query_dim=Q)
    randomize_(reins)
    T = reins.learnable_tokens_a @ reins.learnable_tokens_b  # L x M x C
    U = T @ reins.transform.weight.t() + reins.transform.bias  # L x M x Q
    expected = torch.empty(M, Q)
    for m in range(M):
        flat = []
        for q in range(Q):  # [q0_max, q0_avg, q0_last, q1_max, ...]
            column = U[:, m, q]
            flat += [column.max(), column.mean(), column[-1]]
        expected[m] = reins.merge.weight @ torch.stack(flat) + reins.merge.bias
    torch.testing.assert_close(reins.queries(), expected)


def test_eval_queries_are_computed_once_and_follow_parameter_changes():
    method = build_method(rein_cfg(num_tokens=4, lora_rank=2, query_dim=8), tiny("dinov2_s"))
    method.eval()
    with torch.no_grad():
        first = method.head_queries()
        assert method.head_queries() is first  # cached: no recomputation per forward / window
        method.reins.merge.bias.add_(1.0)  # an in-place change (optimizer step, checkpoint load)
        changed = method.head_queries()
    torch.testing.assert_close(changed, first + 1.0)
    torch.testing.assert_close(changed, method._compute_queries().detach())
    assert method.head_queries().requires_grad  # with autograd on: recomputed, in the graph
    method.train()
    with torch.no_grad():
        assert method.head_queries() is not method.head_queries()  # training: never cached


@pytest.mark.parametrize("name", ["dinov2_s", "dinov2_s_reg", "eva02_l", "dinov3_s", "clip_l", "mae_l"])
def test_gradients_reach_every_rein_parameter_and_no_backbone_parameter(name):
    backbone = tiny(name)
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    backbone.train()
    method.train()
    assert len(method.reins.learnable_tokens_a) == len(backbone.blocks)  # every block gets a Rein
    feats = backbone(torch.randn(2, 3, 64, 64))
    queries = method.head_queries()
    assert tuple(queries.shape) == (6, 8)
    loss = sum(f.square().mean() for f in feats) + queries.square().mean()
    loss.backward()
    for pname, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    for pname, p in backbone.model.named_parameters():
        assert not p.requires_grad and p.grad is None, pname
    if backbone.neck is not None:  # CLIP's trainable pyramid trains too
        assert all(p.grad is not None for p in backbone.neck.parameters())


def test_dropout_and_drop_path_are_inactive_in_training_mode():
    backbone = tiny("dinov2_s", drop_path_rate=0.5, proj_drop_rate=0.5)
    images = torch.randn(2, 3, 64, 64)
    backbone.train()
    assert not torch.equal(backbone(images)[3], backbone(images)[3])  # the backbone does drop when training
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method)
    backbone.train()  # what a segmentor's train() does to its children, then:
    method.train()
    assert method.training and not backbone.model.training
    torch.testing.assert_close(backbone(images)[3], backbone(images)[3], rtol=0, atol=0)


def test_sam_attaches_to_exactly_the_global_attention_blocks():
    backbone = tiny("sam_b").eval()  # global attention in blocks 1 and 3 of 4
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method)
    assert method.sites == [ReinSite((1, 3), 32)]
    assert tuple(method.reins.learnable_tokens_a.shape) == (2, 6, 4)  # L = number of global blocks
    assert [len(blk._forward_hooks) for blk in backbone.blocks] == [0, 1, 0, 1]
    assert method.query_content == "learned"  # SAM keeps the head's learned content queries
    x = torch.randn(2, 4, 4, 32)  # B x H x W x C
    with torch.no_grad():
        refined = [backbone.blocks[i](x) for i in (1, 3)]
        method.detach_hooks()
        raw = [backbone.blocks[i](x) for i in (1, 3)]
    for layer, (out, r) in enumerate(zip(refined, raw)):
        expected = reference_block_output(method.reins, layer, r.reshape(2, 16, 32), num_prefix=0)
        torch.testing.assert_close(out, expected.reshape(2, 4, 4, 32))


@pytest.mark.parametrize("name, channels", [("convnext_l", (16, 32, 64, 128)), ("resnet50", (256, 512, 1024, 2048))])
def test_cnn_gets_one_rein_per_stage_and_summed_queries(name, channels):
    backbone = build_backbone(name, **tiny_overrides(name)).eval()
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method, std=0.05)
    assert [site.channels for site in method.sites] == list(channels)
    assert [site.block_indices for site in method.sites] == [(0,), (1,), (2,), (3,)]  # one sub-block per stage
    assert [g.embed_dim for g in method.reins] == list(channels)
    assert all(len(blk._forward_hooks) == 1 for blk in backbone.blocks)
    assert method.query_content == "querys2feat"
    assert "reins.3.learnable_tokens_b" in method.state_dict()
    summed = sum(g.queries() for g in method.reins)
    torch.testing.assert_close(method.head_queries(), summed)
    assert not torch.allclose(method.head_queries(), method.reins[0].queries())
    # A stage's sub-block output (B x C x H x W) is refined as H*W tokens by that stage's Reins.
    x = torch.randn(2, channels[1], 4, 4) if name == "convnext_l" else torch.randn(2, channels[0], 4, 4)
    with torch.no_grad():
        out = backbone.blocks[1](x)
        method.detach_hooks()
        raw = backbone.blocks[1](x)
    tokens = raw.flatten(2).transpose(1, 2)
    expected = reference_block_output(method.reins[1], 0, tokens, num_prefix=0).transpose(1, 2).reshape(raw.shape)
    torch.testing.assert_close(out, expected)


def test_activation_checkpointing_reruns_the_hooks_without_changing_gradients():
    backbone = tiny("dinov2_s")
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method, std=0.2)
    method.train()
    images = torch.randn(2, 3, 64, 64)

    def grads(checkpointing):
        backbone.set_grad_checkpointing(checkpointing)
        method.zero_grad()
        sum(f.square().mean() for f in backbone(images)).backward()
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert backbone.model.grad_checkpointing and set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
