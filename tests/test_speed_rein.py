"""Rein at its floor (issue 38): the operands every layer shares computed once per backbone forward (not
per layer, not again when checkpointing re-runs a block), token GEMMs padded to the tensor-core alignment,
two GEMMs per layer at inference, no per-call casts of cached operands; and the outputs and gradients
those of rein.md's equations (the oracle of tests/test_rein.py, written from the spec)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dgss.tuning.rein as rein_module
from dgss.tuning.rein import TOKEN_ALIGNMENT, Reins
from test_rein import equations_refine, randomize_, rein_cfg, tiny
from dgss.tuning import build_method

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
         torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


class OpLog(TorchDispatchMode):
    """Every aten op run inside, with its arguments' shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if torch.is_tensor(a)]
        dtypes = [a.dtype for a in args if torch.is_tensor(a)]
        self.ops.append((func, shapes, dtypes))
        return func(*args, **(kwargs or {}))

    def gemms(self):
        return [(f, s) for f, s, _ in self.ops if f in GEMMS]


def plain_refine(reins, feats, layer):
    """rein.md's equations on B x N x C features, from the parameters (tests/test_rein.py's oracle)."""
    if reins.lora_rank is None:
        a, b = reins.learnable_tokens[layer], torch.eye(reins.embed_dim)
    else:
        a, b = reins.learnable_tokens_a[layer], reins.learnable_tokens_b[layer]
    out = equations_refine(feats.transpose(0, 1), a, b, reins.mlp_token2feat.weight, reins.mlp_token2feat.bias,
                           reins.mlp_delta_f.weight, reins.mlp_delta_f.bias, reins.scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("tokens,rank", [(5, 4), (8, 4), (11, None), (100, 16)])
def test_fast_paths_equal_the_equations_in_fp32_with_and_without_padding(tokens, rank):
    reins = Reins(3, 32, num_tokens=tokens, lora_rank=rank, query_dim=8)
    randomize_(reins, std=0.3)
    feats = torch.randn(2, 9, 32, requires_grad=True)
    ops = reins.training_operands()
    assert ops.values.shape[1] % TOKEN_ALIGNMENT == 0 and ops.values.shape[1] >= tokens
    assert (ops.mask is None) == (tokens % TOKEN_ALIGNMENT == 0)
    for layer in range(3):
        expected = plain_refine(reins, feats, layer)
        fast = reins.refine(feats, layer, operands=ops)
        torch.testing.assert_close(fast, expected)
        # gradients too: features, tokens, both MLPs and the scale
        params = [feats] + list(reins.parameters())
        g_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True, retain_graph=True)
        g_plain = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
        for a, b in zip(g_fast, g_plain):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(reins.refine(feats, layer), expected.detach())


def test_inference_under_bf16_autocast_matches_the_equations_under_autocast_and_keeps_f_exact():
    reins = Reins(2, 64, num_tokens=100, lora_rank=16, query_dim=8)
    randomize_(reins, std=0.1)
    feats = 10 * torch.randn(2, 33, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained_path = reins.refine(feats, 1)  # autograd on: the training path
        with torch.no_grad():
            inference_path = reins.refine(feats, 1)
            ops = reins.inference_operands(torch.bfloat16)
    assert inference_path.dtype == torch.float32
    assert {ops.weight.dtype, ops.values.dtype, ops.bias.dtype} == {torch.bfloat16}  # cached in the autocast dtype
    reference = plain_refine(reins, feats, 1).detach()  # fp32 equations
    refinement = (reference - feats).abs().max().item()
    for path in (trained_path.detach(), inference_path):
        # bf16 products: a few bf16 ulps (2^-8) of the refinement; f itself is never rounded
        torch.testing.assert_close(path, reference, rtol=0, atol=0.03 * refinement)


def test_inference_runs_two_gemms_per_layer_with_aligned_inner_sizes_and_no_operand_casts():
    backbone = tiny("dinov2_s").eval()
    method = build_method(rein_cfg(num_tokens=5, lora_rank=4, query_dim=8), backbone)
    randomize_(method, std=0.2)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone(images)  # the operands are cached now
        method.detach_hooks()
        with OpLog() as frozen:
            backbone(images)
        method.attach(backbone)
        with OpLog() as refined:
            backbone(images)
    layers = len(backbone.blocks)
    assert len(refined.gemms()) - len(frozen.gemms()) == 2 * layers
    # f [(sW)^T | T^T / sqrt(C)] (C x (C + M')), then S (s V W^T) with the inner size M' = 8 for M = 5 tokens
    fused = [s for f, s in refined.gemms() if f == torch.ops.aten.addmm.default and s[2] == (32, 32 + 8)]
    into = [s for f, s in refined.gemms() if f == torch.ops.aten.addmm_.default]
    assert len(fused) == len(into) == layers
    assert all(s[1][1] == 8 and s[2] == (8, 32) for s in into)
    # the only casts Rein adds are the features' (one per layer): cached operands are not cast per call
    copies = lambda log: sum(1 for f, _, _ in log.ops if f == torch.ops.aten._to_copy.default)  # noqa: E731
    assert copies(refined) - copies(frozen) <= layers


def test_operands_are_computed_once_per_forward_and_not_again_by_checkpointing(monkeypatch):
    backbone = tiny("dinov2_s")
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method, std=0.2)
    method.train()
    calls = {"training": 0, "key": 0}
    training_operands = Reins.training_operands
    parameter_state = rein_module.parameter_state

    def count_training(self, layer=None):
        calls["training"] += 1
        return training_operands(self, layer)

    def count_key(module):
        calls["key"] += 1
        return parameter_state(module)

    monkeypatch.setattr(Reins, "training_operands", count_training)
    monkeypatch.setattr(rein_module, "parameter_state", count_key)
    images = torch.randn(2, 3, 64, 64)
    for checkpointing in (False, True):
        backbone.set_grad_checkpointing(checkpointing)
        calls["training"] = 0
        sum(f.square().mean() for f in backbone(images)).backward()
        assert calls["training"] == 1, checkpointing  # one per forward, none in the recomputation
    method.eval()
    with torch.no_grad():
        calls["key"] = 0
        backbone(images)
        assert calls["key"] == 1  # the cache key once per forward, not once per layer (4 here)


def test_a_block_run_on_its_own_after_a_parameter_change_does_not_use_stale_operands():
    backbone = tiny("dinov2_s")
    method = build_method(rein_cfg(num_tokens=6, lora_rank=4, query_dim=8), backbone)
    randomize_(method, std=0.2)
    method.train()
    x = torch.randn(2, 17, 32)
    backbone(torch.randn(2, 3, 64, 64))  # leaves this forward's operands for checkpointing's re-runs
    with torch.no_grad():
        method.reins.mlp_delta_f.weight.mul_(2.0)  # an optimizer step
    out = backbone.blocks[1](x)
    method.detach_hooks()
    raw = backbone.blocks[1](x)
    expected = torch.cat([raw[:, :1], plain_refine(method.reins, raw[:, 1:], 1)], dim=1)
    torch.testing.assert_close(out, expected)


def test_a_subclass_with_its_own_refinement_pays_for_no_shared_operands():
    from dgss.config import load_config
    from dgss.tuning import build_method as build

    backbone = tiny("dinov2_s")
    cfg = load_config(None, ["method.name=fada", "method.fada.num_tokens=5", "method.fada.lora_rank=4",
                             "method.fada.query_dim=8"]).method
    fada = build(cfg, backbone)
    rein = build_method(rein_cfg(num_tokens=5, lora_rank=4, query_dim=8), tiny("dinov2_s"))
    assert len(fada._hook_handles) < len(rein._hook_handles)  # no operand hooks on the backbone
    backbone(torch.randn(1, 3, 64, 64))
    assert fada._operands is None
