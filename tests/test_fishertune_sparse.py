"""FisherTune sparse training: equal to dense masked training step for step, unselected entries
bit-identical under AdamW, optimizer state proportional to the selected count, merging."""

import copy
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from dgss.config import FisherTuneConfig
from dgss.models.backbones import build_backbone
from dgss.tuning.fishertune import FisherTune, sparse
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
    from dgss.tuning.model import build_segmentor
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


# ---------------------------------------------------------------- dense weights rebuilt in backward


def trained_method(backbone, active_frac=0.7):
    """A method with every eligible tensor selected (delta_max 0.5) and non-zero deltas."""
    method = attached(backbone, delta_min=0.5, delta_max=0.5)
    method.select(None, seed=0)
    method.num_active.fill_(int(method.capacity * active_frac))
    with torch.no_grad():
        method.delta.normal_(0, 0.1)
    return method


def grads_of(backbone, method, images):
    """d(loss)/d(delta) and d(loss)/d(images) for a fixed linear loss of the features."""
    x = images.clone().requires_grad_(True)
    feats = backbone(x)
    gen = torch.Generator().manual_seed(1)
    loss = sum((f * torch.randn(f.shape, generator=gen)).sum() for f in feats)
    return torch.autograd.grad(loss, [method.delta, x])


def reference_grads(backbone, method, images):
    """The same gradients with the dense weights as ordinary graph tensors, put in place for the
    whole pass with the injector idle: what the layers computed when they kept the dense weight."""
    chunks = method._delta_chunks()
    originals = [t.module._parameters[t.attr] for t in method.tensors]
    for t, p, chunk in zip(method.tensors, originals, chunks):
        t.module._parameters[t.attr] = sparse.apply_delta(p, *chunk)
    method._suspended = True  # provider() -> None: no swap, no saved-tensor hooks
    try:
        return grads_of(backbone, method, images)
    finally:
        method._suspended = False
        for t, p in zip(method.tensors, originals):
            t.module._parameters[t.attr] = p


@pytest.fixture
def dense_weights_made(monkeypatch):
    """Weak references to the memory of every dense weight ``apply_delta`` makes (to the storage, not
    the tensor: a layer may save a view or an alias of the weight, which keeps only the storage)."""
    made = []
    real = sparse.apply_delta

    def recording(*args):
        out = real(*args)
        made.append(StorageWeakRef(out.untyped_storage()))
        return out

    monkeypatch.setattr(sparse, "apply_delta", recording)
    return made


def forward_then_backward(backbone, method, images, made):
    """Gradients as in :func:`grads_of`, and how many dense weights were still alive between the
    forward pass and backward."""
    x = images.clone().requires_grad_(True)
    made.clear()
    feats = backbone(x)
    gc.collect()
    alive = sum(not ref.expired() for ref in made)
    assert len(made) > 0
    gen = torch.Generator().manual_seed(1)
    loss = sum((f * torch.randn(f.shape, generator=gen)).sum() for f in feats)
    return alive, torch.autograd.grad(loss, [method.delta, x])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dense_weights_do_not_outlive_their_layer_and_gradients_are_bit_identical(dense_weights_made, checkpointing):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    method = trained_method(backbone)
    assert all(c > 0 for c in method.tensor_counts.tolist())  # every tensor is swapped
    images = torch.randn(2, 3, 32, 32)
    expected = reference_grads(backbone, method, images)
    backbone.set_grad_checkpointing(checkpointing)  # non-reentrant (timm's default)
    alive, grads = forward_then_backward(backbone, method, images, dense_weights_made)
    assert alive == 0  # the graph holds recipes, not dense weights
    # Bit-identical: the rebuilt weight is the same index_add of the same operands (each selected
    # entry written once), and backward then runs the same kernels on the same values.
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


def test_the_weights_saved_by_linear_conv_layer_norm_and_layer_scale_become_recipes():
    backbone = tiny_backbone()
    method = trained_method(backbone)
    names = {id(p): n for n, p in backbone.model.named_parameters()}
    packed, pack = [], method.injector._pack

    def recording_pack(saved):
        out = pack(saved)
        if isinstance(out[0], sparse._DenseRecipe):
            packed.append(names[id(out[0].pretrained)])
        return out

    method.injector._pack = recording_pack  # read when the hooks are installed, per pass
    sum(f.sum() for f in backbone(torch.randn(1, 3, 32, 32))).backward()
    assert {"patch_embed.proj.weight",  # F.conv2d
            "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",  # F.linear (saves weight.t())
            "blocks.0.norm1.weight",  # F.layer_norm
            "blocks.1.ls2.gamma",  # LayerScale: x * gamma
            } <= set(packed)
    assert "cls_token" not in packed and "pos_embed" not in packed  # cat and add save neither


def test_a_block_called_twice_in_one_pass(dense_weights_made):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    backbone.model.blocks[1] = backbone.model.blocks[0]  # one module, two calls per pass
    method = trained_method(backbone)
    images = torch.randn(2, 3, 32, 32)
    expected = reference_grads(backbone, method, images)
    alive, grads = forward_then_backward(backbone, method, images, dense_weights_made)
    assert alive == 0
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


class SavedTensorRecorder(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors saved under it that reach it (innermost saved-tensor hooks win)."""

    def __init__(self):
        self.count = 0

        def pack(t):
            self.count += 1
            return t

        super().__init__(pack, lambda t: t)


def test_saved_tensor_hooks_are_installed_only_while_there_are_chunks():
    backbone = tiny_backbone()
    method = attached(backbone)  # not selected yet: provider() -> None
    ours, pack = [], method.injector._pack
    method.injector._pack = lambda t: ours.append(1) or pack(t)
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    outer = SavedTensorRecorder()
    with outer:
        backbone(images)
    assert outer.count > 0 and not ours  # no hooks of ours in between
    method.select(None)
    method.num_active.fill_(method.capacity)
    backbone(images)
    assert ours


def test_an_exception_in_a_layer_restores_the_parameters_and_removes_the_hooks():
    backbone = tiny_backbone()
    method = trained_method(backbone)
    injector, pack_calls, pack = method.injector, [], method.injector._pack
    injector._pack = lambda t: pack_calls.append(1) or pack(t)

    def fail(*args):
        raise ValueError("boom")

    backbone.model.blocks[1].mlp.fc2.forward = fail
    with pytest.raises(ValueError, match="boom"):
        backbone(torch.randn(1, 3, 32, 32))
    assert all(isinstance(p, torch.nn.Parameter) for m in backbone.model.modules() for p in m._parameters.values())
    assert not injector._recipes and not injector._swapped and not injector._pass_hooks
    pack_calls.clear()
    torch.randn(3, requires_grad=True).exp()  # exp saves its result: would reach a leaked hook
    assert not pack_calls


def test_rebuilding_refuses_a_pretrained_tensor_changed_after_the_forward_pass():
    backbone = tiny_backbone()
    method = trained_method(backbone)
    loss = sum(f.square().sum() for f in backbone(torch.randn(1, 3, 32, 32)))
    with torch.no_grad():
        backbone.model.blocks[1].mlp.fc2.weight.add_(1.0)  # the dense copy would have hidden this
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, [method.delta])


@pytest.mark.parametrize("selected", [False, True])
def test_an_activation_changed_in_place_before_backward_is_still_an_error(selected):
    # Under saved-tensor hooks autograd skips its version check; the injector's hooks do it instead.
    backbone = tiny_backbone()
    method = trained_method(backbone) if selected else attached(backbone)  # with/without our hooks
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    loss = sum(f.square().sum() for f in backbone(images))
    with torch.no_grad():
        images.add_(1.0)  # saved by the patch embedding (its input)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, [images])
