"""The baselines of FisherTune's Table 1 (Full, Frozen, LoRA, VPT, AdaptFormer, VQT, ChildTune-F/D): each
trains, sends gradients to exactly its trainable parameters, and survives a save/load round trip."""

import pytest
import torch
from test_engine_support import backbone_weights_file

from conftest import TINY_VIT, tiny_overrides
from dgss.config import load_config
from dgss.engine.checkpoint import load_model_weights, save_model
from dgss.engine.optim import build_optimizer
from dgss.models.backbones import build_backbone
from dgss.tuning.model import build_segmentor
from dgss.tuning import build_method

METHODS = ["frozen", "full", "lora", "vpt", "adaptformer", "vqt", "childtune-f", "childtune-d"]
# Tensors the forward pass never reads: the ViT's final norm (features are taken before it).
UNUSED = ("backbone.model.norm.",)


def tiny_cfg(method, *extra, weights=None):
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    return load_config(None, [
        "model.backbone=dinov2_s", f"model.weights={'null' if weights is None else weights}", "model.img_size=64",
        f"model.backbone_kwargs={kwargs}", "model.head.type=fpn", "model.head.hidden_dim=16",
        f"method.name={method}", "method.vpt.num_tokens=5", "method.vqt.num_tokens=3", "method.lora.rank=4",
        "method.adaptformer.bottleneck=8", "method.childtune.num_batches=2", "train.lr=5e-3", "train.weight_decay=0.0",
        *extra])


class FakeTrainer:
    """What a method may use of the engine's Trainer (ChildTune-D estimates its Fisher here)."""

    def __init__(self, model, cfg, batch):
        self.model, self.cfg, self.total_iters, self.num_train_images = model, cfg, 10, 16
        self._batch = batch

    def next_batch(self):
        return self._batch


def batch(seed=0, size=2):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, 64, 64, generator=gen),
            "label": torch.randint(0, 19, (size, 64, 64), generator=gen)}


def start(method, *extra, weights=None):
    cfg = tiny_cfg(method, *extra, weights=weights)
    torch.manual_seed(0)
    model = build_segmentor(cfg).train()
    data = batch()
    model.method.on_train_iteration(0, FakeTrainer(model, cfg, data))  # ChildTune-D: Fisher and selection here
    return cfg, model, data


@pytest.mark.parametrize("method", METHODS)
def test_trains_and_only_its_parameters_get_gradients(method):
    cfg, model, data = start(method)
    pretrained = {n: p.detach().clone() for n, p in model.backbone.model.named_parameters()}
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    losses = []
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(data["image"], data["label"])["loss"]
        loss.backward()
        if step == 0:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(UNUSED)}
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == trainable, (with_grad ^ trainable)
            optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
            assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.95, losses
    changed = {n for n, p in model.backbone.model.named_parameters() if not torch.equal(p, pretrained[n])}
    if method in ("full", "childtune-f"):
        assert changed  # the backbone itself trains
    else:
        assert not changed  # adapters, prompts, queries, deltas: the pretrained tensors never change
    if method not in ("frozen", "full", "childtune-f"):
        assert model.method.num_trainable_backbone_parameters() > 0


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_predictions(method, tmp_path):
    weights = backbone_weights_file(tmp_path)
    cfg, model, data = start(method, weights=str(weights))
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    for _ in range(2):  # move every zero-initialised part away from its init
        optimizer.zero_grad()
        model.loss(data["image"], data["label"])["loss"].backward()
        optimizer.step()
    model.eval()
    path = save_model(model, cfg, tmp_path / "model.safetensors")
    torch.manual_seed(123)  # another init: everything must come from the file
    fresh = build_segmentor(cfg).eval()
    load_model_weights(fresh, path)
    with torch.no_grad():
        assert torch.equal(model.whole_inference(data["image"]), fresh.whole_inference(data["image"]))


def test_lora_keys_are_dgss_keys_and_the_small_file_needs_no_backbone(tmp_path):
    from safetensors import safe_open

    weights = backbone_weights_file(tmp_path)
    cfg, model, _ = start("lora", weights=str(weights))
    keys = list(model.state_dict())
    assert not [k for k in keys if "base_layer" in k or "lora_A" in k or ".default." in k]
    assert "backbone.model.blocks.0.attn.qkv.weight" in keys and "method.lora.blocks_0_attn_qkv.a.weight" in keys
    assert not any(p.requires_grad for p in model.backbone.model.parameters())
    with safe_open(str(save_model(model, cfg, tmp_path / "m.safetensors")), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("backbone.model.")]  # LoRA + head only
    # the delta is (alpha / r) B A, alpha 8 and r 4 here: zero at the start (B = 0), and exactly the peft layer's output
    layer = model.backbone.model.blocks[0].attn.qkv
    x = torch.randn(3, 32)
    with torch.no_grad():
        model.method.lora["blocks_0_attn_qkv"]["b"].weight.normal_()
        expected = x @ (layer.base_layer.weight + (8 / 4) * model.method.lora["blocks_0_attn_qkv"]["b"].weight
                        @ model.method.lora["blocks_0_attn_qkv"]["a"].weight).t() + layer.base_layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_full_defaults_to_backbone_lr_x_0_1_and_frozen_runs_without_gradient():
    cfg = tiny_cfg("full")
    assert cfg.method.backbone_lr_mult == 0.1
    assert tiny_cfg("full", "method.backbone_lr_mult=0.5").method.backbone_lr_mult == 0.5
    assert tiny_cfg("lora").method.backbone_lr_mult == 1.0
    model = build_segmentor(cfg)
    backbone_ids = {id(p) for p in model.backbone.model.parameters()}
    lrs = {g["lr"] for g in build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult).param_groups
           if any(id(p) in backbone_ids for p in g["params"])}
    assert sorted(lrs) == pytest.approx([5e-4])
    # LoRA's factors stand for backbone updates: at the head's lr by default, scaled by the multiplier
    for mult, expected in ((None, 5e-3), (0.1, 5e-4)):
        lora_cfg = tiny_cfg("lora", *([f"method.backbone_lr_mult={mult}"] if mult else []))
        lora = build_segmentor(lora_cfg)
        factor_ids = {id(p) for p in lora.method.lora.parameters()}
        groups = build_optimizer(lora, lora_cfg.train, lora_cfg.method.backbone_lr_mult).param_groups
        factor_lrs = {g["lr"] for g in groups if any(id(p) in factor_ids for p in g["params"])}
        assert sorted(factor_lrs) == pytest.approx([expected]), mult
        assert sum(p.numel() for g in groups for p in g["params"] if id(p) in factor_ids) == \
            sum(p.numel() for p in lora.method.lora.parameters())
    frozen = build_segmentor(tiny_cfg("frozen")).train()
    assert not frozen.backbone.model.training  # eval mode: no drop-path, no statistics updates
    feats = frozen.forward_features(torch.randn(1, 3, 64, 64))
    assert not any(f.requires_grad for f in feats)  # run under no_grad


def test_childtune_f_masks_gradients_with_bernoulli_p_rescaled():
    cfg, model, data = start("childtune-f", "method.childtune.p_f=0.3")
    model.loss(data["image"], data["label"])["loss"].backward()
    masked = model.backbone.model.blocks[1].mlp.fc1.weight.grad.clone()
    hooks_off = build_segmentor(tiny_cfg("full")).train()
    hooks_off.load_state_dict(model.state_dict())
    hooks_off.loss(data["image"], data["label"])["loss"].backward()
    dense = hooks_off.backbone.model.blocks[1].mlp.fc1.weight.grad
    kept = masked != 0
    assert 0.25 < kept.float().mean() < 0.35  # p = 0.3 of the entries
    assert torch.allclose(masked[kept], dense[kept] / 0.3, rtol=1e-4, atol=1e-7)
    # the same iteration gives the same mask (grad accumulation, every process); the next, another
    method = model.method
    like = torch.empty(1000)
    assert torch.equal(method.gradient_mask(3, like), method.gradient_mask(3, like))
    first = method.gradient_mask(3, like)
    method.iteration = 1
    assert not torch.equal(first, method.gradient_mask(3, like))


def test_childtune_d_is_fishertune_with_plain_fisher_and_a_fixed_fraction():
    cfg, model, _ = start("childtune-d", "method.childtune.p_d=0.1")
    method = model.method
    assert method.cfg.selection == "fisher" and not method.cfg.variational
    assert method.is_selected and int(method.num_active) == method.capacity
    assert method.capacity == round(0.1 * sum(p.numel() for p in model.backbone.model.parameters()))
    assert method.num_trainable_backbone_parameters() == method.capacity


@pytest.mark.parametrize("method", ["lora", "vpt", "adaptformer", "vqt"])
def test_token_methods_refuse_a_cnn_clearly(method):
    backbone = build_backbone("resnet50", img_size=64, **tiny_overrides("resnet50"))
    with pytest.raises(ValueError, match="needs a transformer backbone"):
        build_method(tiny_cfg(method).method, backbone)
