"""SoMA (CVPR 2025): minor singular components of the pretrained weights, frozen residual and early
blocks, annealed weight decay; its count on DINOv2-L, exact start, training, round trip, folding, export."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_baselines import batch, tiny_cfg
from test_engine_support import backbone_weights_file, tiny_config

from conftest import TINY_VIT, tiny_overrides
from dgss.compare import resolve_runs, trainable_backbone_parameters
from dgss.config import MethodConfig, SoMAConfig, load_config
from dgss.engine.checkpoint import load_model_weights, save_model
from dgss.engine.optim import build_optimizer
from dgss.models.backbones import build_backbone
from dgss.tuning.model import build_segmentor
from dgss.tuning import build_method
from dgss.tuning.soma import annealed_weight_decay

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ("method.soma.rank=4", "method.soma.start_block=1")


def soma_model(*extra, weights=None):
    torch.manual_seed(0)
    cfg = tiny_cfg("soma", *TINY, *extra, weights=weights)
    return cfg, build_segmentor(cfg)


class FakeTrainer:
    """What SoMA uses of the engine's Trainer: the optimizer and the schedule length."""

    def __init__(self, optimizer, total_iters):
        self.optimizer, self.total_iters = optimizer, total_iters


def perturb(method, std=0.3):
    """Move every factor and bias away from its start (as training would)."""
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * std)


# --------------------------------------------------------------------------------------------
# The published configuration


def test_dinov2_l_has_4866048_trainable_parameters_in_blocks_8_to_23():
    # the public code's config (rank 16 on q, k, v, proj, fc1, fc2 from block 8, bias="all"):
    # 16 blocks x (4 x 16 x (1024 + 1024) + 2 x 16 x (1024 + 4096)) factors + 16 x (3072 + 1024 + 4096 + 1024) biases
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l")
        method = build_method(MethodConfig(name="soma"), backbone)
    assert method.num_trainable_backbone_parameters() == 16 * 294_912 + 16 * 9_216 == 4_866_048
    assert method.target_names[0] == "blocks.8.attn.qkv" and method.target_names[-1] == "blocks.23.mlp.fc2"
    assert len(method.target_names) == 16 * 4
    qkv = method.layers["blocks_8_attn_qkv"]
    assert [tuple(p.a.shape) for p in qkv.parts] == [(16, 1024)] * 3  # q, k, v decomposed separately
    assert [tuple(p.b.shape) for p in qkv.parts] == [(1024, 16)] * 3
    assert tuple(method.layers["blocks_8_mlp_fc1"].parts[0].b.shape) == (4096, 16)
    assert tuple(qkv.bias.shape) == (3072,)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    # every SoMA tensor gets the backbone's lr (x 0.5 by default) and weight decay, as the "backbone" key did
    groups = method.parameter_groups(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.5)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(5e-5, 0.05)]
    assert sum(p.numel() for g in groups for p in g["params"]) == 4_866_048


def test_eva02_l_targets_its_separate_projections_and_swiglu():
    with torch.device("meta"):
        method = build_method(MethodConfig(name="soma"), build_backbone("eva02_l"))
    block = [n for n in method.target_names if n.startswith("blocks.8.")]
    assert block == ["blocks.8.attn.q_proj", "blocks.8.attn.k_proj", "blocks.8.attn.v_proj", "blocks.8.attn.proj",
                     "blocks.8.mlp.fc1_g", "blocks.8.mlp.fc1_x", "blocks.8.mlp.fc2"]
    assert method.layers["blocks_8_attn_k_proj"].bias is None  # EVA's k projection has no bias
    # factors 16 x (4 x 16 x 2048 + 3 x 16 x (1024 + 2730)) + biases 16 x (1024 + 1024 + 1024 + 2 x 2730 + 1024)
    assert method.num_trainable_backbone_parameters() == 16 * 311_264 + 16 * 9_556 == 5_133_120


def test_published_config_defaults_and_compare_row():
    cfg = load_config(CONFIGS / "soma/dinov2-l_gtav_512.yaml")
    assert cfg.method.name == "soma" and cfg.method.backbone_lr_mult == 0.5
    assert cfg.method.soma == SoMAConfig()  # the file spells out the dataclass defaults
    assert (cfg.train.iters, cfg.train.lr, cfg.train.weight_decay) == (40000, 1e-4, 0.05)
    assert tiny_cfg("soma").method.backbone_lr_mult == 0.5  # the default when the config names none
    # `dgss compare ... --methods soma` runs the published config and counts on the meta device
    (run,) = resolve_runs(CONFIGS / "frozen/dinov2-l_gtav_512.yaml", ["soma"])
    assert run.cfg.name == "soma_dinov2-l_gtav_512"
    assert trainable_backbone_parameters(run.cfg) == 4_866_048


# --------------------------------------------------------------------------------------------
# The minor components and the exact start


@pytest.mark.parametrize("name", ["dinov2_s", "eva02_l"])
def test_first_forward_is_the_pretrained_model_and_the_factors_are_the_minor_components(name):
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = backbone(x)
        method = build_method(MethodConfig(name="soma", soma=SoMAConfig(rank=4, alpha=8.0, start_block=1)), backbone)
        tuned = backbone(x)
    assert max(float((a - b).abs().max()) for a, b in zip(tuned, reference)) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(tuned, reference))  # B A - B_0 A_0 is exactly zero at the start
    assert not any(n.startswith("blocks.0.") for n in method.target_names)  # the frozen early block
    for path, layer in zip(method.target_names, method.layers.values()):
        weights = backbone.model.get_submodule(path).weight.detach().chunk(len(layer.parts), 0)
        for w, part in zip(weights, layer.parts):
            s = torch.linalg.svdvals(w.double())
            minor = part.scaling * part.b_init.double() @ part.a_init.double()  # s B_0 A_0, alpha / r = 2
            assert torch.allclose(torch.linalg.svdvals(minor)[:4], s[-4:], atol=1e-5)  # the 4 smallest
            residual = w.double() - minor  # what stays frozen: the other singular triplets
            assert torch.allclose(torch.linalg.svdvals(residual)[:-4], s[:-4], atol=1e-5)
            assert float(torch.linalg.svdvals(residual)[-4:].max()) < 1e-5
            # the square root of S_r / s split evenly: |row i of A| = |column i of B|
            assert torch.allclose(part.a_init.norm(dim=1), part.b_init.norm(dim=0), atol=1e-5)


@pytest.mark.parametrize("name, path", [("dinov2_s", "blocks.2.attn.qkv"), ("eva02_l", "blocks.2.attn.k_proj"),
                                        ("eva02_l", "blocks.3.mlp.fc2")])
def test_the_hook_is_the_dense_layer_with_the_tuned_factors_and_its_gradients(name, path):
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name))
    method = build_method(MethodConfig(name="soma", soma=SoMAConfig(rank=3, start_block=1)), backbone)
    perturb(method)
    linear = backbone.model.get_submodule(path)
    layer = method.layers[path.replace(".", "_")]
    x = torch.randn(2, 5, linear.in_features, requires_grad=True)
    weight = linear.weight + torch.cat([p.scaling * (p.b @ p.a - p.b_init @ p.a_init) for p in layer.parts])
    expected = torch.nn.functional.linear(x, weight, layer.bias if layer.bias is not None else linear.bias)
    output = linear(x)
    assert torch.allclose(output, expected, atol=1e-5)
    inputs = [x, *layer.parameters()]
    cotangent = torch.randn_like(output)
    for got, want in zip(torch.autograd.grad(output, inputs, cotangent), torch.autograd.grad(expected, inputs, cotangent)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: the delta follows the output's dtype
        low = linear(x)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), expected, rtol=0.05, atol=0.1)


def test_principal_components_option_takes_the_largest_triplets():
    backbone = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    method = build_method(MethodConfig(name="soma", soma=SoMAConfig(rank=4, start_block=1, components="principal")),
                          backbone)
    part = method.layers["blocks_1_mlp_fc2"].parts[0]
    s = torch.linalg.svdvals(backbone.model.blocks[1].mlp.fc2.weight.detach().double())
    assert part.scaling == 16 / 4  # alpha 16 (the default), rank 4
    minor = part.scaling * (part.b_init @ part.a_init).double()
    assert torch.allclose(torch.linalg.svdvals(minor)[:4], s[:4], atol=1e-5)


def test_bad_options_are_one_clear_line():
    backbone = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    with pytest.raises(ValueError, match=r"method.soma.start_block must be in \[0, 3\].*got 8"):
        build_method(MethodConfig(name="soma"), backbone)
    with pytest.raises(ValueError, match=r"method.soma.rank must be in \[1, 32\]"):
        build_method(MethodConfig(name="soma", soma=SoMAConfig(rank=40, start_block=1)), backbone)
    with pytest.raises(ValueError, match="method.soma.targets: unknown"):
        build_method(MethodConfig(name="soma", soma=SoMAConfig(targets=["mlp"], start_block=1)), backbone)
    cnn = build_backbone("resnet50", img_size=64, **tiny_overrides("resnet50"))
    with pytest.raises(ValueError, match="needs a transformer backbone"):
        build_method(MethodConfig(name="soma"), cnn)


# --------------------------------------------------------------------------------------------
# Training, saving, folding


def test_only_soma_and_the_head_train_and_every_soma_parameter_gets_a_gradient():
    cfg, model = soma_model()
    model.train()
    data = batch()
    pretrained = {n: p.detach().clone() for n, p in model.backbone.model.named_parameters()}
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    trainer = FakeTrainer(optimizer, 8)
    losses = []
    for step in range(8):
        model.method.on_train_iteration(step, trainer)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(data["image"], data["label"])["loss"]
        loss.backward()
        if step == 0:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {f"method.{n}" for n, _ in model.method.named_parameters()} | {
                f"head.{n}" for n, _ in model.head.named_parameters()}
            for name, p in model.method.named_parameters():  # A and B both start non-zero: both get gradient
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
            soma_lrs = {g["lr"] for g in optimizer.param_groups for p in g["params"]
                        if any(p is q for q in model.method.parameters())}
            assert soma_lrs == {cfg.train.lr * 0.5}
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.95, losses
    assert all(torch.equal(p, pretrained[n]) for n, p in model.backbone.model.named_parameters())
    assert any(not torch.equal(p.a, p.a_init) for layer in model.method.layers.values() for p in layer.parts)


def test_save_load_round_trip_without_the_backbone(tmp_path):
    from safetensors import safe_open

    weights = backbone_weights_file(tmp_path)
    cfg, model = soma_model(weights=str(weights))
    perturb(model.method)
    model.eval()
    path = save_model(model, cfg, tmp_path / "soma.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("backbone.model.")]  # SoMA + head: the backbone is re-attached
    assert "method.layers.blocks_1_attn_qkv.parts.2.b_init" in keys and "method.layers.blocks_3_mlp_fc2.bias" in keys
    torch.manual_seed(123)
    fresh = build_segmentor(cfg).eval()
    load_model_weights(fresh, path)
    images = batch()["image"]
    with torch.no_grad():
        assert torch.equal(model.whole_inference(images), fresh.whole_inference(images))


def test_merge_into_backbone_folds_the_method_into_plain_dense_weights():
    cfg, model = soma_model()
    model.eval()
    perturb(model.method)
    method = model.method
    images = batch()["image"]
    qkv = model.backbone.model.blocks[1].attn.qkv
    layer = method.layers["blocks_1_attn_qkv"]
    expected = qkv.weight.detach().double() + torch.cat(
        [p.scaling * (p.b @ p.a - p.b_init @ p.a_init).detach().double() for p in layer.parts])
    trained_bias = layer.bias.detach().clone()
    with torch.no_grad():
        reference = model.whole_inference(images)
        method.merge_into_backbone()
        merged = model.whole_inference(images)
    assert not list(method.parameters()) and not qkv._forward_hooks  # no SoMA left: a plain ViT
    assert torch.allclose(qkv.weight.double(), expected, atol=1e-6) and torch.equal(qkv.bias, trained_bias)
    assert float((merged - reference).abs().max()) < 1e-4
    assert not torch.allclose(merged, build_segmentor(cfg).eval().whole_inference(images), atol=1e-3)


def test_onnx_export_folds_soma_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from dgss.export import export_model
    from dgss.predict import Predictor

    cfg = load_config(tiny_config(tmp_path, "soma", method="soma"),
                      ["eval.crop_size=[64,64]", *TINY])
    model = build_segmentor(cfg).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        start = model.whole_inference(Predictor(model, cfg).normalize(images))
        perturb(model.method, std=1.0)  # large enough to move the tiny random head's scores
        reference = model.whole_inference(Predictor(model, cfg).normalize(images))
    assert not torch.allclose(reference, start, atol=1e-3)  # so the parity below needs SoMA folded in
    result = export_model(model, cfg, tmp_path / "soma.onnx")
    assert result.notes == ["soma merged into the backbone weights"]
    assert list(model.method.parameters())  # the caller's model keeps its method
    names = [t.name for t in onnx.load(str(result.path)).graph.initializer]
    assert not [n for n in names if "method" in n]  # plain dense weights only
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    scores, _ = session.run(None, {"images": images.numpy()})
    assert np.abs(scores - reference.numpy()).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Annealed weight decay


def test_weight_decay_is_annealed_by_a_cosine_in_every_group(tmp_path):
    cfg = load_config(tiny_config(tmp_path, "soma", head="mask2former", method="soma"), list(TINY))
    model = build_segmentor(cfg)
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    trainer = FakeTrainer(optimizer, total_iters=40000)
    bases = [g["weight_decay"] for g in optimizer.param_groups]
    assert 0.0 in bases and 0.05 in bases  # the head's norms and queries have none
    for it, expected in [(0, 0.05), (20000, (0.05 + 1e-5) / 2), (40000, 1e-5),
                         (10000, 1e-5 + (0.05 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)]:
        model.method.on_train_iteration(it, trainer)
        for group, base in zip(optimizer.param_groups, bases):
            assert group["weight_decay"] == pytest.approx(expected if base else 0.0, rel=1e-12, abs=1e-15), it
    assert annealed_weight_decay(0.05, 1e-5, 50000, 40000) == pytest.approx(1e-5)  # clamped after the end


def test_the_trainer_steps_with_the_annealed_weight_decay(tmp_path):
    from dgss.engine.trainer import Trainer

    cfg = load_config(tiny_config(tmp_path, "soma_wd", method="soma"), [*TINY, "train.weight_decay=0.05"])
    trainer = Trainer(cfg)
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(max(g["weight_decay"] for g in trainer.optimizer.param_groups))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train()
    assert seen == pytest.approx([annealed_weight_decay(0.05, 1e-5, it, 4) for it in range(4)])
    assert seen[0] == pytest.approx(0.05) and seen[-1] < seen[0] / 2


# --------------------------------------------------------------------------------------------
# init: public_code (what the authors' code ran: the minor components of the random initialisation)


def public_code_effective_weights(pretrained, targets, rank, scaling, seed):
    """The public code's order of operations, written out for the test (rein/peft/sora.py as it runs
    under mmengine): the ViT is built with PyTorch's default nn.Linear initialisation, each targeted
    Linear is decomposed in float32 (A, B from its r smallest triplets, sqrt(S / s) on both sides) and
    replaced by W - s B A, then the pretrained weights are loaded over that residual. Returns
    {layer: (W_pt + s B A, A, B)} for ``targets``, a list of (layer name, pretrained weight)."""
    torch.manual_seed(seed)
    built = [(name, torch.nn.Linear(w.shape[1], w.shape[0])) for name, w in targets]  # construction
    out = {}
    for name, linear in built:
        u, s, vh = torch.linalg.svd(linear.weight.data.float(), full_matrices=False)  # sora_init
        sr = s[-rank:] / scaling
        a = torch.diag(torch.sqrt(sr)) @ vh[-rank:, :]
        b = u[:, -rank:] @ torch.diag(torch.sqrt(sr))
        linear.weight.data = linear.weight.data - scaling * b @ a  # the residual ...
        linear.weight.data = pretrained[name].clone()  # ... which init_weights() overwrites (strict=False)
        out[name] = (linear.weight.data + scaling * b @ a, a, b)  # the layer's forward: W x + s B A x
    return out


def test_public_code_init_starts_at_w_plus_sba_of_the_default_linear_initialisation():
    backbone = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.normal_(0, 0.2)  # stand-in pretrained weights
    opts = SoMAConfig(rank=4, alpha=8.0, start_block=2, init="public_code", init_seed=7, svd_dtype="float32")
    method = build_method(MethodConfig(name="soma", soma=opts), backbone)
    # the public code's layers, q, k and v separate, in its order: per block q, k, v, proj, fc1, fc2
    pretrained, targets = {}, []
    for block in (2, 3):
        model = backbone.model.blocks[block]
        for name, weight in zip("qkv", model.attn.qkv.weight.detach().chunk(3)):
            targets.append((f"blocks.{block}.attn.{name}", weight))
        targets += [(f"blocks.{block}.attn.proj", model.attn.proj.weight.detach()),
                    (f"blocks.{block}.mlp.fc1", model.mlp.fc1.weight.detach()),
                    (f"blocks.{block}.mlp.fc2", model.mlp.fc2.weight.detach())]
    pretrained = dict(targets)
    expected = public_code_effective_weights(pretrained, targets, rank=4, scaling=2.0, seed=7)
    for path in method.target_names:
        linear = backbone.model.get_submodule(path)
        names = [path[:-3] + n for n in "qkv"] if path.endswith("qkv") else [path]
        want = torch.cat([expected[n][0] for n in names])
        # the effective weight the hook applies (identity input, bias removed), and the folded one
        with torch.no_grad():
            applied = (linear(torch.eye(linear.in_features)) - method.layers[path.replace(".", "_")].bias).t()
        assert float((applied - want).abs().max()) < 1e-6, path
        delta = torch.cat([p.weight_delta() for p in method.layers[path.replace(".", "_")].parts])
        assert float((linear.weight.double() + delta - want.double()).abs().max()) < 1e-6, path
        assert float(delta.abs().max()) > 1e-3  # it does not start at the pretrained weight
        for name, part in zip(names, method.layers[path.replace(".", "_")].parts):
            torch.testing.assert_close(part.a.detach(), expected[name][1], rtol=0, atol=1e-6)
            torch.testing.assert_close(part.b.detach(), expected[name][2], rtol=0, atol=1e-6)
            assert part.a_init is None and part.b_init is None
    assert not [k for k in method.state_dict() if k.endswith("_init")]  # no frozen start: the residual is W
    # the random weights are PyTorch's nn.Linear default, kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # not DINOv2's truncated normal (std 0.02): |B A| is of the size of the uniform draw's minor part
    fc1 = method.layers["blocks_2_mlp_fc1"].parts[0]
    assert float(fc1.weight_delta().abs().max()) > 0.05


def test_public_code_init_is_seeded_counted_trained_and_saved(tmp_path):
    with torch.device("meta"):  # the count needs no draw and no SVD
        method = build_method(MethodConfig(name="soma", soma=SoMAConfig(init="public_code")), build_backbone("dinov2_l"))
    assert method.num_trainable_backbone_parameters() == 4_866_048

    weights = backbone_weights_file(tmp_path)
    cfg, model = soma_model("method.soma.init=public_code", "method.soma.init_seed=3", weights=str(weights))
    _, same = soma_model("method.soma.init=public_code", "method.soma.init_seed=3", weights=str(weights))
    _, other = soma_model("method.soma.init=public_code", "method.soma.init_seed=4", weights=str(weights))
    a = {k: v for k, v in model.method.state_dict().items()}
    assert all(torch.equal(v, same.method.state_dict()[k]) for k, v in a.items())
    assert not torch.equal(a["layers.blocks_1_mlp_fc1.parts.0.a"], other.method.state_dict()["layers.blocks_1_mlp_fc1.parts.0.a"])
    _, paper = soma_model(weights=str(weights))
    images = batch()["image"]
    with torch.no_grad():  # W + s B A_random is not the pretrained model the paper init starts at
        assert not torch.allclose(model.eval().whole_inference(images), paper.eval().whole_inference(images), atol=1e-4)
    # it trains like the paper init: every factor gets a gradient, the backbone stays as it is
    model.train()
    data = batch()
    model.loss(data["image"], data["label"])["loss"].backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.method.parameters())
    # model files: no start buffers, a strict round trip, and a paper-init file does not load into it
    perturb(model.method)
    model.eval()
    path = save_model(model, cfg, tmp_path / "public.safetensors")
    fresh = build_segmentor(cfg).eval()
    load_model_weights(fresh, path)
    with torch.no_grad():
        assert torch.equal(model.whole_inference(images), fresh.whole_inference(images))
    paper_cfg = tiny_cfg("soma", *TINY, weights=str(weights))
    paper_file = save_model(paper, paper_cfg, tmp_path / "paper.safetensors")
    with pytest.raises(Exception, match="a_init"):
        load_model_weights(fresh, paper_file)
    # folding gives W + s B A; a second fold changes nothing
    with torch.no_grad():
        reference = model.whole_inference(images)
        model.method.merge_into_backbone()
        model.method.merge_into_backbone()
        assert float((model.whole_inference(images) - reference).abs().max()) < 1e-4


def test_the_public_code_config_is_the_published_recipe_with_its_init_and_ema():
    import dataclasses

    base = load_config(CONFIGS / "soma/dinov2-l_gtav_512.yaml")
    public = load_config(CONFIGS / "soma/dinov2-l_gtav_512_public-code.yaml")
    assert public.method.soma.init == "public_code" and base.method.soma.init == "paper"
    assert (public.train.ema.enabled, public.train.ema.momentum, public.train.ema.begin_iter) == (True, 2e-4, 12000)
    assert not base.train.ema.enabled
    # everything else is the published recipe
    same = dataclasses.replace(public, name=base.name, train=dataclasses.replace(public.train, ema=base.train.ema),
                               method=dataclasses.replace(public.method, soma=base.method.soma))
    assert same == base
