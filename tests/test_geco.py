"""GeCo's geometric-consistency loss (github DZhaoXd/GeCo at 5c5f12a): the perturbation and the loss
against a transcription of the public code written here line by line, its schedule, its gate, the
gradients it sends, and its (absent) state."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dgss.config import ConfigError, GeCoLossConfig, load_config, validate_config
from dgss.models.geco import (GeCoLoss, geodesic_consistency, perturb_feature_map, pool_to_token_budget,
                              tangent_plane_perturbation)
from dgss.tuning.model import build_segmentor
from test_soma_checkpoint import SOMA, merged_reference, pretrained, release_layout  # noqa: F401 (a fixture)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MODEL = [
    "model.backbone=dinov2_s", "model.img_size=64", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
    "model.head.num_classes=4", "model.head.num_queries=8", "model.head.hidden_dim=32",
    "model.head.pixel_decoder_layers=1", "model.head.pixel_decoder_ffn_dim=64", "model.head.num_heads=4",
    "model.head.num_points=2", "model.head.decoder_ffn_dim=64", "model.head.num_points_loss=256",
    "model.head.decoder_layers=2",
]


# ------------------------------------------------------------------------------------------------
# The public code, transcribed (rein/models/utils/geco_regularizer.py, _build_perturbation, lines
# 183-262, and rein/models/segmentors/geco_encoder_decoder.py, _geodesic_consistency, lines 70-97),
# one token at a time where the code is batched, so that an indexing slip in either shows.


def public_perturbation(tokens, noise, *, alpha=0.1, beta=0.2, num_neighbors=8, tangent_dim=4,
                        curvature_threshold=None, curvature_quantile=0.5, eps=1e-6):
    b, n, c = tokens.shape
    k = min(num_neighbors, n - 1)
    d = min(tangent_dim, k)
    geom = F.normalize(tokens.detach().float(), dim=-1, eps=eps)
    curvature = torch.zeros(b, n)
    basis = torch.zeros(b, n, d, c)
    for i in range(b):
        for j in range(n):
            dist = torch.cdist(geom[i, j][None], geom[i])[0]
            dist[j] = float("inf")
            knn = dist.topk(k, largest=False).indices
            offsets = geom[i, knn] - geom[i, j]  # k x c
            gram = offsets @ offsets.T + eps * torch.eye(k)
            vals, vecs = torch.linalg.eigh(gram)
            top_vals, top_vecs = vals[-d:].clamp_min(eps), vecs[:, -d:]  # d, k x d
            residual = offsets - top_vecs @ (top_vecs.T @ offsets)
            curv = (residual.pow(2).sum(-1) / (offsets.pow(2).sum(-1) + eps)).mean()
            curvature[i, j] = torch.nan_to_num(curv, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
            for e in range(d):  # einsum("bnkd,bnkc,bnd->bndc")
                basis[i, j, e] = (top_vecs[:, e, None] * offsets).sum(0) * top_vals[e].rsqrt()
    coeff = torch.einsum("bnc,bndc->bnd", noise, basis)
    tangent = torch.einsum("bnd,bndc->bnc", coeff, basis)
    normal = noise - tangent
    high = F.normalize(tangent, dim=-1, eps=eps)
    low = F.normalize(tangent + beta * normal, dim=-1, eps=eps)
    if curvature_threshold is None:
        threshold = torch.quantile(curvature, q=curvature_quantile, dim=1, keepdim=True)
    else:
        threshold = torch.full((b, 1), float(curvature_threshold))
    direction = F.normalize(torch.where((curvature >= threshold)[..., None], high, low), dim=-1, eps=eps)
    epsilon = (alpha / (1.0 + curvature)).clamp(min=0.0, max=alpha)[..., None]
    scale = tokens.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.nan_to_num(epsilon * direction * scale, nan=0.0, posinf=0.0, neginf=0.0)


def public_consistency(clean, perturbed, eps=1e-6):
    clean = torch.nan_to_num(clean.detach().float(), nan=0.0, posinf=30.0, neginf=-30.0).clamp(-30.0, 30.0)
    perturbed = torch.nan_to_num(perturbed.float(), nan=0.0, posinf=30.0, neginf=-30.0).clamp(-30.0, 30.0)
    p, q = clean.softmax(dim=1).clamp_min(eps), perturbed.softmax(dim=1).clamp_min(eps)
    inner = (p.sqrt() * q.sqrt()).sum(dim=1).clamp(min=-1.0 + eps, max=1.0 - eps)
    return torch.nan_to_num(torch.acos(inner).pow(2).mean(), nan=0.0, posinf=0.0)


def public_pool_size(h, w, max_tokens):  # geco_regularizer.py lines 174-181
    aspect = h / max(w, 1)
    out_h = max(1, int((max_tokens * aspect) ** 0.5))
    out_w = max(1, max_tokens // out_h)
    while out_h * out_w > max_tokens:
        out_w = max(1, out_w - 1)
    return out_h, out_w


def clustered_tokens(b=2, n=24, c=12, seed=0):
    """Tokens on a few curved sheets (neighbourhoods of different curvature), not plain noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(b, n, 2, generator=gen) * 2 - 1
    curved = torch.cat([t, t.pow(2).sum(-1, keepdim=True) * torch.linspace(0, 2, n)[None, :, None]], -1)
    lift = torch.randn(3, c, generator=gen)
    return curved @ lift + 0.05 * torch.randn(b, n, c, generator=gen) + 0.5


# ------------------------------------------------------------------------------------------------
# The formula


@pytest.mark.parametrize("settings", [{}, {"curvature_threshold": 0.3, "beta": 0.5},
                                      {"num_neighbors": 5, "tangent_dim": 2, "curvature_quantile": 0.25}])
def test_the_perturbation_equals_the_public_code_token_by_token(settings):
    tokens = clustered_tokens()
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    cfg = dict(alpha=0.1, beta=0.2, num_neighbors=8, tangent_dim=4, curvature_threshold=None,
               curvature_quantile=0.5, eps=1e-6)
    cfg.update(settings)
    ours = tangent_plane_perturbation(tokens, noise=noise, **cfg)
    reference = public_perturbation(tokens, noise, **cfg)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    # the step is at most alpha times the token's RMS, and some tokens take the mixed direction
    rms = tokens.pow(2).mean(-1).sqrt()
    assert (ours.norm(dim=-1) <= cfg["alpha"] * rms + 1e-6).all()
    assert ours.norm(dim=-1).min() > 0


def test_the_draw_is_the_global_generators_randn_like_the_public_code():
    tokens = clustered_tokens()
    torch.manual_seed(11)
    drawn = tangent_plane_perturbation(tokens, alpha=0.1, beta=0.2, num_neighbors=8, tangent_dim=4,
                                       curvature_threshold=None, curvature_quantile=0.5, eps=1e-6)
    torch.manual_seed(11)
    noise = torch.randn_like(tokens)
    torch.testing.assert_close(drawn, public_perturbation(tokens, noise), rtol=1e-4, atol=1e-6)


def test_maps_larger_than_the_token_budget_are_pooled_and_the_step_upsampled():
    cfg = GeCoLossConfig(enabled=True, max_tokens=12, num_neighbors=4, tangent_dim=2)
    feature = clustered_tokens(b=1, n=35, c=6).transpose(1, 2).reshape(1, 6, 5, 7)
    pooled = pool_to_token_budget(feature, cfg.max_tokens)
    assert pooled.shape[-2:] == public_pool_size(5, 7, 12) == (2, 6)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(feature, (2, 6)))
    noise = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(4))
    out = perturb_feature_map(feature, cfg, noise=noise)
    tokens = pooled.flatten(2).transpose(1, 2)
    step = public_perturbation(tokens, noise, num_neighbors=4, tangent_dim=2).transpose(1, 2).reshape(1, 6, 2, 6)
    expected = feature + F.interpolate(step, size=(5, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    small = feature[..., :3, :4]  # 12 tokens: no pooling
    assert pool_to_token_budget(small, 12) is small


def test_the_loss_equals_the_public_formula_and_its_extremes():
    gen = torch.Generator().manual_seed(2)
    clean, perturbed = torch.rand(2, 5, 6, 7, generator=gen), torch.rand(2, 5, 6, 7, generator=gen)
    ours = geodesic_consistency(clean, perturbed, eps=1e-6)
    torch.testing.assert_close(ours, public_consistency(clean, perturbed), rtol=1e-6, atol=0)
    # equal distributions: arccos(1 - eps)^2 = 2 eps to first order; disjoint one-hots: about (pi / 2)^2
    assert geodesic_consistency(clean, clean, eps=1e-6) == pytest.approx(2e-6, rel=3e-2)  # 1 - eps in float32
    hot_a = torch.tensor([60.0, -60.0])[None, :, None, None]
    hot_b = torch.tensor([-60.0, 60.0])[None, :, None, None]  # clamped to +-30, floored at eps: p = (1, 1e-6)
    assert geodesic_consistency(hot_a, hot_b, eps=1e-6) == pytest.approx(math.acos(2 * math.sqrt(1e-6)) ** 2,
                                                                         rel=1e-5)
    # the clean scores are a target: no gradient reaches them
    clean.requires_grad_(True)
    perturbed.requires_grad_(True)
    geodesic_consistency(clean, perturbed, eps=1e-6).backward()
    assert clean.grad is None and perturbed.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Schedule and configuration


def test_the_schedule_is_zero_before_start_iter_and_the_weight_from_it():
    geco = GeCoLoss(GeCoLossConfig(enabled=True, weight=0.1, start_iter=1000))
    assert [geco.weight_at(i) for i in (0, 998, 999)] == [0.0, 0.0, 0.0]
    # the public ramp lambda * min((it + 1) / warmup, 1) is 1 wherever the gate (it >= warmup) opens
    assert [geco.weight_at(i) for i in (1000, 1001, 39_999)] == [0.1, 0.1, 0.1]
    assert not geco.active(999) and geco.active(1000) and geco.active(None) and geco.weight_at(None) == 0.1
    always = GeCoLoss(GeCoLossConfig(enabled=True, weight=0.3, start_iter=0))
    assert always.weight_at(0) == 0.3 and always.active(0)
    assert list(geco.state_dict()) == [] and list(geco.parameters()) == []  # nothing to checkpoint


def test_the_defaults_are_the_public_gta_config():
    # configs/geco/geco_dinov2-L_mask2former_gta.py lines 6-23
    cfg = load_config().loss.geco
    assert not cfg.enabled
    assert (cfg.weight, cfg.start_iter, cfg.alpha, cfg.beta, cfg.num_neighbors, cfg.tangent_dim) == (0.1, 1000, 0.1,
                                                                                                       0.2, 8, 4)
    assert (cfg.curvature_threshold, cfg.curvature_quantile, cfg.max_tokens, cfg.eps, cfg.detach_clean,
            cfg.levels) == (None, 0.5, 1024, 1e-6, True, [-1])


@pytest.mark.parametrize("override, key", [("loss.geco.levels=[4]", "loss.geco.levels"),
                                           ("loss.geco.curvature_quantile=1.5", "loss.geco.curvature_quantile"),
                                           ("loss.geco.num_neighbors=0", "loss.geco.num_neighbors"),
                                           ("loss.geco.weight=-1", "loss.geco.weight")])
def test_bad_values_are_one_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(load_config(None, [override]))


# ------------------------------------------------------------------------------------------------
# In the segmentor


def geco_model(method="lora", *extra):
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_MODEL, f"method.name={method}", "method.lora.rank=2", "loss.geco.enabled=true",
                             "loss.geco.start_iter=5", "loss.geco.num_neighbors=4", "loss.geco.tangent_dim=2", *extra])
    return build_segmentor(cfg).train()


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 4, (2, 64, 64), generator=gen)


def test_before_start_iter_the_term_is_zero_and_draws_nothing():
    images, labels = batch()
    with_geco = geco_model()
    without = geco_model("lora", "loss.geco.enabled=false")
    assert without.geco is None
    torch.manual_seed(7)
    losses = with_geco.loss(images, labels, iteration=4)
    state_after = torch.get_rng_state()
    torch.manual_seed(7)
    plain = without.loss(images, labels, iteration=4)
    assert torch.equal(torch.get_rng_state(), state_after)  # the gate closed: no perturbation drawn
    assert losses["loss_geco"].item() == 0.0 and "loss_geco" not in plain
    torch.testing.assert_close(losses["loss"], plain["loss"], rtol=0, atol=0)


def test_from_start_iter_the_term_is_the_weighted_loss_of_the_perturbed_pass():
    images, labels = batch()
    model = geco_model()
    torch.manual_seed(7)
    losses = model.loss(images, labels, iteration=5)
    head_terms = sum(v for k, v in losses.items() if k not in ("loss", "loss_geco"))
    torch.testing.assert_close(losses["loss"], head_terms + losses["loss_geco"])
    # by hand: the same draws (Mask2Former's point sampling first, then the perturbation) in the same order
    torch.manual_seed(7)
    features = model.forward_features(images)
    queries = model.method.head_queries() if model.head.accepts_queries else None
    outputs = model.head(features, queries)
    model.head.loss(outputs, labels, ignore_index=255)
    noisy = [*features[:3], perturb_feature_map(features[3], model.geco.cfg)]
    expected = 0.1 * public_consistency(model.head.segmentation_scores(outputs, (64, 64)),
                                        model.head.segmentation_scores(model.head(noisy, queries), (64, 64)))
    torch.testing.assert_close(losses["loss_geco"], expected, rtol=1e-5, atol=1e-7)
    assert losses["loss_geco"] > 0
    # the same RNG state gives the same term: a resumed run (the trainer restores it) repeats it exactly
    torch.manual_seed(7)
    assert torch.equal(model.loss(images, labels, iteration=5)["loss_geco"], losses["loss_geco"])
    # a training term: in eval mode the losses are the head's alone (geco_encoder_decoder.py line 30)
    assert "loss_geco" not in model.eval().loss(images, labels, iteration=5)


@pytest.mark.parametrize("method", ["lora", "soma"])
def test_its_gradient_reaches_every_trainable_backbone_tensor_and_the_head(method):
    extra = ["method.soma.rank=2", "method.soma.start_block=2"] if method == "soma" else []
    model = geco_model(method, "loss.geco.start_iter=0", *extra)
    images, labels = batch()
    trainable = [(n, p) for n, p in model.method.named_parameters() if p.requires_grad]
    assert trainable
    with torch.no_grad():  # away from the start, where LoRA's zero B would block A's gradient
        for _, p in trainable:
            p.add_(torch.randn_like(p) * 0.1)
    model.loss(images, labels, iteration=0)["loss_geco"].backward()
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert not any(k.startswith("geco") for k in model.state_dict())  # checkpoints keep their layout


# ------------------------------------------------------------------------------------------------
# The GeCo configuration and its released checkpoint


def test_the_geco_config_is_somas_public_code_config_plus_the_loss_evaluated_where_geco_evaluates():
    from dgss.config import to_dict

    geco = load_config(str(CONFIGS / "geco" / "dinov2-l_gtav_512.yaml"))
    soma = load_config(str(CONFIGS / "soma" / "dinov2-l_gtav_512_public-code.yaml"))
    assert geco.loss.geco.enabled and geco.loss.geco == dataclasses.replace(GeCoLossConfig(), enabled=True)
    a, b = to_dict(geco), to_dict(soma)
    assert {k for k in a if a[k] != b[k]} == {"name", "loss", "data"}
    assert {k for k in a["data"] if a["data"][k] != b["data"][k]} == {"test"}
    # the public data configs' test resize: 2048 x 1024 (Cityscapes, Mapillary), 1280 x 720 (BDD100K)
    assert [(d.type, d.resize) for d in geco.data.test] == [("cityscapes", [2048, 1024]), ("bdd100k", [1280, 720]),
                                                           ("mapillary", [2048, 1024])]
    assert [dataclasses.replace(d, resize=None) for d in geco.data.test] == \
        [dataclasses.replace(d, resize=None) for d in soma.data.test]
    dinov3 = to_dict(load_config(str(CONFIGS / "geco" / "dinov3-l_gtav_512.yaml")))
    assert {k for k in a if a[k] != dinov3[k]} == {"name", "model"}
    assert dinov3["model"]["backbone"] == "dinov3_l" and dinov3["model"]["patch_size"] == 16


def geco_release(pretrained_state, head_state, gen, *, steps=None):
    """A GeCo training checkpoint's tensors as its public code saves them (mmengine's whole-model
    state dict: unlike SoMA's extracted release, every backbone tensor, q/k/v split by its converter,
    the tuned Linears' W the pretrained one, loaded over the SVD residual), from SoMA's layout."""
    state = release_layout(pretrained_state, head_state, gen)
    for key, value in pretrained_state.items():
        if key.endswith("bias"):
            continue  # release_layout holds every bias
        if ".attn.qkv." in key:
            for name, piece in zip("qkv", value.chunk(3)):
                state["backbone.model." + key.replace("qkv", name)] = piece.clone()
        else:
            state["backbone.model." + key] = value.clone()
    return state


def test_a_released_geco_checkpoint_loads_through_dgss_load_and_dgss_eval(pretrained, tmp_path, capsys):
    import json

    import dgss
    from dgss.cli import main
    from dgss.engine.distributed import DistContext
    from dgss.engine.evaluate import evaluate_datasets
    from test_engine_support import tiny_config

    path, pretrained_state = pretrained
    config = tiny_config(tmp_path, "geco_release", head="mask2former", method="soma", weights=str(path))
    overrides = [*SOMA, "loss.geco.enabled=true"]
    cfg = load_config(config, overrides)
    head = build_segmentor(load_config(config, [*SOMA, "method.name=frozen"])).head
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(5)
    ema = geco_release(pretrained_state, head.state_dict(), gen)
    raw = geco_release(pretrained_state, head.state_dict(), gen)
    raw = {"module." + k: v for k, v in raw.items()}
    file = tmp_path / "geco_gta_512_best.pth"
    torch.save({"meta": {"iter": 40000, "seed": 0}, "state_dict": ema, "ema_state_dict": raw}, file)

    predictor = dgss.load(file, config=config, overrides=overrides, device="cpu")
    assert predictor.cfg.loss.geco.enabled and predictor.cfg.method.soma.init == "public_code"
    reference = merged_reference(cfg, ema)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(predictor.model.whole_inference(x), reference.whole_inference(x), rtol=0, atol=1e-5)
    out = tmp_path / "eval_geco"
    assert main(["eval", str(config), "--checkpoint", str(file), "--out", str(out), "--no-progress", *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    for r in evaluate_datasets(reference, cfg.data.test, cfg, DistContext()):
        assert results["datasets"][r.name]["miou"] == pytest.approx(r.miou, abs=1e-4), r.name
    # a file whose frozen tensors are not the pretrained ones is refused, naming the tensor
    wrong = dict(ema, **{"backbone.model.blocks.0.attn.q.weight": ema["backbone.model.blocks.0.attn.q.weight"] + 1})
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(Exception, match=r"blocks\.0\.attn\.qkv\.weight"):
        dgss.load(tmp_path / "wrong.pth", config=config, overrides=overrides, device="cpu")


# ------------------------------------------------------------------------------------------------
# In training


def test_training_starts_the_term_at_start_iter_and_a_resumed_run_repeats_it_bit_for_bit(tmp_path):
    import json

    from safetensors.torch import load_file
    from test_engine_support import tiny_config

    from dgss.engine.trainer import Trainer

    # a large step and weight: a random tiny head scores all pixels alike, and the loss would sit at its
    # floor (arccos(1 - eps)^2, no gradient) with the published ones
    geco = ["loss.geco.enabled=true", "loss.geco.start_iter=2", "loss.geco.num_neighbors=4", "loss.geco.weight=10",
            "loss.geco.alpha=50"]

    def run(name, extra, resume=None):
        cfg = load_config(tiny_config(tmp_path, name, head="mask2former", method="full", iters=4,
                                      checkpoint_interval=2), extra)
        return Trainer(cfg, resume=resume).train()

    final = run("geco", geco)
    logged = [json.loads(line) for line in (final.parent / "logs" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["loss_geco"] for r in logged if r.get("kind") == "train"]
    assert terms[:2] == [0.0, 0.0] and min(terms[2:]) > 10 * 2.1e-6  # iterations 3 and 4 (0-based 2, 3)
    resumed = run("resumed", geco, resume=str(final.parent / "checkpoints" / "iter_0000002.safetensors"))
    plain = run("plain", [])
    a, b, c = load_file(str(final)), load_file(str(resumed)), load_file(str(plain))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the term has no state but the iteration and the RNG
    assert not all(torch.equal(a[k], c[k]) for k in a)  # and it changes the training
