"""FisherTune sparse training: equal to dense masked training step for step, unselected entries
bit-identical under AdamW, optimizer state proportional to the selected count, merging."""

import copy

import pytest
import torch

from dgss.config import FisherTuneConfig
from dgss.models.backbones import build_backbone
from dgss.tuning.fishertune import FisherTune
from dgss.tuning.fishertune.selection import active_count


def tiny_backbone(dtype=torch.float32):
    return build_backbone("dinov2_s", img_size=32, depth=2, embed_dim=32, num_heads=2).to(dtype)


def attached(backbone, **cfg):
    method = FisherTune(FisherTuneConfig(**cfg))
    method.attach(backbone)
    return method


def feature_loss(backbone, images, targets):
    return sum(((f - t) ** 2).mean() for f, t in zip(backbone(images), targets))


def dense_masks(method, count):
    """Per eligible tensor: a dense 0/1 mask of the entries active at ``count``."""
    sel = method.selection()
    masks, offset = {}, 0
    for tensor, n in zip(method.tensors, sel.counts.tolist()):
        mask = torch.zeros(tensor.numel, dtype=torch.float64)
        index, rank = sel.index[offset:offset + n], sel.rank[offset:offset + n]
        mask[index[rank < count]] = 1.0
        masks[tensor.name] = mask.view(tensor.shape)
        offset += n
    return masks


def test_sparse_training_equals_dense_masked_adam_step_for_step():
    torch.manual_seed(0)
    sparse_backbone = tiny_backbone(torch.float64)
    dense_backbone = copy.deepcopy(sparse_backbone)
    method = attached(sparse_backbone, delta_min=0.02, delta_max=0.10)
    method.select(None, seed=1)  # random ranking: any fixed ranking will do
    dense_params = dict(dense_backbone.model.named_parameters())
    for p in dense_params.values():
        p.requires_grad_(True)
    sparse_opt = torch.optim.Adam([method.delta], lr=1e-2)
    dense_opt = torch.optim.Adam(dense_params.values(), lr=1e-2)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        targets = [torch.randn_like(f) for f in sparse_backbone(images)]
    steps, counts = 8, []
    for step in range(steps):
        count = active_count(step, steps, method.num_eligible, delta_min=0.02, delta_max=0.10, tau_frac=0.3)
        counts.append(count)
        method.num_active.fill_(count)
        masks = dense_masks(method, count)

        sparse_opt.zero_grad()
        feature_loss(sparse_backbone, images, targets).backward()
        sparse_opt.step()

        dense_opt.zero_grad()
        feature_loss(dense_backbone, images, targets).backward()
        for name, p in dense_params.items():
            if p.grad is not None:  # None: a tensor the dense forward never reads (the final norm)
                p.grad.mul_(masks[name])
        dense_opt.step()

        current = method.materialized()
        for name, p in dense_params.items():
            torch.testing.assert_close(current[name], p.detach(), rtol=1e-10, atol=1e-12)
    assert counts[0] < counts[-1]  # the set grew during the test
    # every entry that trained is active (the final norm, unused by the dense forward, stays at zero)
    assert counts[0] < int((method.delta != 0).sum()) <= counts[-1]
    assert torch.all(method.delta[method.entry_rank >= counts[-1]] == 0)


def test_adamw_never_changes_unselected_entries_and_the_pretrained_tensors_stay_untouched():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    pretrained = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    method = attached(backbone, delta_min=0.01, delta_max=0.05)
    method.select(None, seed=0)
    method.num_active.fill_(method.capacity // 2)  # half of the candidates active, half not yet
    optimizer = torch.optim.AdamW([method.delta], lr=1e-2, weight_decay=0.5)
    images = torch.randn(2, 3, 32, 32)
    for _ in range(4):
        optimizer.zero_grad()
        sum(f.square().mean() for f in backbone(images)).backward()
        optimizer.step()
    masks = dense_masks(method, method.capacity // 2)
    current = method.materialized()
    changed = 0
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, pretrained[name])  # the Parameter itself is never written
        frozen = masks[name] == 0
        assert torch.equal(current[name][frozen], pretrained[name][frozen])  # bit-identical
        changed += int((current[name] != pretrained[name]).sum())
    assert 0 < changed <= method.capacity // 2
    assert torch.all(method.delta[method.entry_rank >= method.capacity // 2] == 0)  # inactive held at zero


def optimizer_state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for k, v in state.items() if torch.is_tensor(v) and k != "step")


@pytest.mark.parametrize("delta_max", [0.02, 0.08])
def test_optimizer_state_is_proportional_to_the_selected_count(delta_max):
    backbone = tiny_backbone()
    method = attached(backbone, delta_min=0.01, delta_max=delta_max)
    method.select(None)
    method.num_active.fill_(method.capacity)
    optimizer = torch.optim.AdamW(method.parameter_groups(1e-3, 0.01))
    sum(f.mean() for f in backbone(torch.randn(1, 3, 32, 32))).backward()
    optimizer.step()
    # exp_avg and exp_avg_sq of K float32 deltas: nothing scales with the backbone
    assert optimizer_state_bytes(optimizer) == 2 * 4 * method.capacity
    assert method.capacity == round(delta_max * method.num_eligible)
    assert all(p.grad is None for p in backbone.model.parameters())  # no dense gradient is kept


def test_merge_into_dense_gives_the_same_model_without_hooks():
    from dgss.config import load_config
    from dgss.models.segmentor import build_segmentor
    from dgss.tuning.base import Frozen
    from dgss.tuning.fishertune import merge_into_dense

    cfg = load_config(overrides=["model.backbone=dinov2_s", "model.img_size=32", "model.head.type=fpn",
                                 "model.backbone_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                                 "model.head.num_classes=3", "model.head.hidden_dim=16", "method.name=fishertune"])
    model = build_segmentor(cfg).eval()
    model.method.select(None)
    model.method.num_active.fill_(model.method.capacity // 3)
    with torch.no_grad():
        model.method.delta.normal_(0, 0.05)
        model.method.delta.mul_((model.method.entry_rank < model.method.capacity // 3).float())
    expected = model.method.materialized()
    images = torch.randn(2, 3, 32, 32)
    before = model(images)
    merge_into_dense(model)
    assert isinstance(model.method, Frozen)
    assert not any(k.startswith("method.") for k in model.state_dict())
    for name, p in model.backbone.model.named_parameters():
        assert torch.equal(p, expected[name])
    torch.testing.assert_close(model(images), before)
