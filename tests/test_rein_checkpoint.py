"""Official Rein checkpoints (rein.md "Official checkpoint names"): import, export, round trips."""

import pytest
import torch
from conftest import tiny_overrides

from dgss.config import MethodConfig, ReinConfig
from dgss.models.backbones import build_backbone
from dgss.tuning import build_method
from dgss.tuning.rein_checkpoint import (
    ReinCheckpointError,
    export_official_rein,
    import_official_rein,
    official_reins_state,
)

# The Rein keys rein.md lists, with their shapes for a LoRA Rein of L layers, M tokens, rank r,
# width C and query width Q.
def official_rein_shapes(L, M, r, C, Q):
    return {
        "backbone.reins.scale": (),
        "backbone.reins.learnable_tokens_a": (L, M, r),
        "backbone.reins.learnable_tokens_b": (L, r, C),
        "backbone.reins.mlp_token2feat.weight": (C, C),
        "backbone.reins.mlp_token2feat.bias": (C,),
        "backbone.reins.mlp_delta_f.weight": (C, C),
        "backbone.reins.mlp_delta_f.bias": (C,),
        "backbone.reins.transform.weight": (Q, C),
        "backbone.reins.transform.bias": (Q,),
        "backbone.reins.merge.weight": (Q, 3 * Q),
        "backbone.reins.merge.bias": (Q,),
    }


def tiny_rein(name="dinov2_s", **rein):
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name))
    cfg = MethodConfig(name="rein", rein=ReinConfig(**{"num_tokens": 6, "lora_rank": 4, "query_dim": 8, **rein}))
    return backbone, build_method(cfg, backbone)


def random_official_state(L=4, M=6, r=4, C=32, Q=8):
    return {k: torch.randn(shape) for k, shape in official_rein_shapes(L, M, r, C, Q).items()}


def test_dinov2_l_exports_exactly_the_official_rein_names_and_shapes():
    with torch.device("meta"):
        backbone = build_backbone("dinov2_l")
        method = build_method(MethodConfig(name="rein"), backbone)
    exported = {k: tuple(v.shape) for k, v in official_reins_state(method).items()}
    assert exported == official_rein_shapes(L=24, M=100, r=16, C=1024, Q=256)


def test_official_state_dict_round_trips_through_import_and_export():
    backbone, method = tiny_rein()
    official = random_official_state()
    official["decode_head.level_embed"] = torch.randn(3, 8)  # head keys are split off, not loaded here
    official["backbone.reins.scale"] = torch.tensor(0.25)
    parts = import_official_rein(official, method)
    assert sorted(parts.head) == ["level_embed"] and not parts.backbone and not parts.other
    assert method.reins.scale.item() == 0.25
    torch.testing.assert_close(method.head_queries(), method.reins.queries())
    exported = export_official_rein(method)
    assert set(exported) == {k for k in official if k.startswith("backbone.reins.")}
    for key, value in exported.items():
        torch.testing.assert_close(value, official[key], rtol=0, atol=0)
    # The imported tensors drive the forward: tokens of layer 0 are A[0] @ B[0] from the file.
    a, b = official["backbone.reins.learnable_tokens_a"], official["backbone.reins.learnable_tokens_b"]
    torch.testing.assert_close(method.reins.tokens(0), a[0] @ b[0])


def test_official_file_with_mmseg_container_and_embedded_backbone(tmp_path):
    """A full mmseg checkpoint: {"meta", "state_dict"} with backbone tensors in the official DINOv2 layout."""
    backbone, method = tiny_rein()
    donor = build_backbone("dinov2_s", img_size=64, **tiny_overrides("dinov2_s"))
    official = random_official_state()
    official.update({"backbone." + k: v for k, v in donor.model.state_dict().items()})
    official["backbone.mask_token"] = torch.zeros(1, 32)  # official DINOv2 files carry it; unused
    path = tmp_path / "rein_official.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": official}, path)
    import_official_rein(path, method)
    for key, value in donor.model.state_dict().items():
        torch.testing.assert_close(backbone.model.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(method.reins.merge.weight, official["backbone.reins.merge.weight"], rtol=0, atol=0)


def test_mismatched_checkpoints_fail_with_a_reason():
    _, method = tiny_rein()
    wrong_rank = random_official_state(r=8)
    with pytest.raises(ReinCheckpointError, match="learnable_tokens_a.*shape|shape mismatches"):
        import_official_rein(wrong_rank, method)
    missing = random_official_state()
    del missing["backbone.reins.merge.bias"]
    with pytest.raises(ReinCheckpointError, match="missing: merge.bias"):
        import_official_rein(missing, method)
    _, plain = tiny_rein(lora_rank=None)
    with pytest.raises(ReinCheckpointError, match="lora_rank"):
        import_official_rein(random_official_state(), plain)
    with pytest.raises(ReinCheckpointError, match="not a Rein checkpoint"):
        import_official_rein({"decode_head.level_embed": torch.zeros(3, 8)}, method)


def test_cnn_rein_uses_one_official_module_per_stage():
    _, method = tiny_rein("convnext_l")
    exported = official_reins_state(method)
    assert "backbone.reins.0.learnable_tokens_a" in exported and "backbone.reins.3.merge.bias" in exported
    perturbed = {k: v + 1 for k, v in exported.items()}
    import_official_rein(perturbed, method)
    for key, value in official_reins_state(method).items():
        torch.testing.assert_close(value, perturbed[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# With the Mask2Former head and the segmentor
# --------------------------------------------------------------------------------------------

TINY_HEAD = dict(num_classes=3, num_queries=6, hidden_dim=16, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32,
                 num_heads=2, num_points=2, decoder_layers=2, decoder_ffn_dim=32, num_points_loss=64)


def tiny_experiment(weights):
    from dgss.config import ExperimentConfig, HeadConfig, ModelConfig

    cfg = ExperimentConfig()
    cfg.model = ModelConfig(backbone="dinov2_s", weights=str(weights), img_size=64,
                            backbone_kwargs=tiny_overrides("dinov2_s"), head=HeadConfig(**TINY_HEAD))
    cfg.method = MethodConfig(name="rein", rein=ReinConfig(num_tokens=6, lora_rank=4, query_dim=16))
    cfg.eval.mode = "whole"
    return cfg


@pytest.fixture
def dinov2_file(tmp_path):
    """A tiny backbone saved in the official DINOv2 layout (timm's names plus ``mask_token``)."""
    donor = build_backbone("dinov2_s", img_size=64, **tiny_overrides("dinov2_s"))
    state = {k: v.normal_(0, 0.2) for k, v in donor.model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(state, path)
    return path


def trained_segmentor(cfg):
    from dgss.tuning.model import build_segmentor

    model = build_segmentor(cfg)
    with torch.no_grad():  # stand-in for training: every Rein and head tensor changes
        for p in list(model.method.parameters()) + list(model.head.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_official_checkpoint_with_head_round_trips_and_predicts_the_same(tmp_path, dinov2_file):
    from dgss.tuning.rein_checkpoint import segmentor_from_official_rein

    cfg = tiny_experiment(dinov2_file)
    source = trained_segmentor(cfg)
    official = export_official_rein(source.method, source.head)
    assert set(official) >= set(official_rein_shapes(L=4, M=6, r=4, C=32, Q=16))
    head_keys = [k for k in official if k.startswith("decode_head.")]
    for prefix in ("pixel_decoder.", "transformer_decoder.layers.0.", "transformer_decoder.post_norm.",
                   "level_embed", "cls_embed", "mask_embed.0.", "mask_embed.2.", "mask_embed.4.", "querys2feat."):
        assert any(k.startswith("decode_head." + prefix) for k in head_keys), prefix
    assert all(k.startswith(("backbone.reins.", "decode_head.")) for k in official)
    path = tmp_path / "rein_official.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": official}, path)

    imported = segmentor_from_official_rein(cfg, path).eval()
    again = export_official_rein(imported.method, imported.head)
    assert set(again) == set(official)
    for key in official:
        torch.testing.assert_close(again[key], official[key], rtol=0, atol=0, msg=key)
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(imported.inference(images), source.inference(images))


def test_model_files_full_and_rein_plus_head_load_with_one_call(tmp_path, dinov2_file):
    from dgss.tuning.rein_checkpoint import load_model_file, read_model_file_metadata, save_model_file

    cfg = tiny_experiment(dinov2_file)
    source = trained_segmentor(cfg)
    full = save_model_file(source, cfg, tmp_path / "full.safetensors")
    small = save_model_file(source, cfg, tmp_path / "rein_head.safetensors", include_backbone=False)
    meta = read_model_file_metadata(small)
    assert meta["contents"] == "rein+head" and meta["backbone"] == "dinov2_s" and meta["method"] == "rein"
    from safetensors import safe_open

    with safe_open(str(small), framework="pt") as f:
        keys = list(f.keys())
    assert "method.reins.learnable_tokens_a" in keys and any(k.startswith("head.") for k in keys)
    assert not any(k.startswith("backbone.model.") for k in keys)

    images = torch.randn(1, 3, 64, 64)
    expected = source.inference(images)
    dinov2_file.rename(tmp_path / "moved.pth")  # a full file needs no other file
    for model in (load_model_file(full), load_model_file(small, backbone_weights=str(tmp_path / "moved.pth"))):
        assert not model.training
        torch.testing.assert_close(model.inference(images), expected)
        for key, value in source.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(Exception, match="not found"):  # the recorded backbone file is gone
        load_model_file(small)


def test_segmentor_training_step_trains_rein_and_head_only(dinov2_file):
    from dgss.tuning.model import build_segmentor
    from dgss.tuning.rein import trainable_parameter_counts

    model = build_segmentor(tiny_experiment(dinov2_file)).train()
    assert not model.backbone.model.training  # frozen backbone stays in eval mode
    counts = trainable_parameter_counts(model.method, model.head)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["method"] == sum(p.numel() for p in model.method.reins.parameters())
    labels = torch.randint(0, 3, (2, 64, 64))
    model.loss(torch.randn(2, 3, 64, 64), labels)["loss"].backward()
    for name, p in model.method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.model.parameters())


def test_dgss_eval_takes_an_official_rein_file_with_the_config_it_was_trained_with(tmp_path, dinov2_file):
    import json

    from test_engine_support import tiny_config

    from dgss.cli import main
    from dgss.config import load_config
    from dgss.engine.distributed import DistContext
    from dgss.engine.evaluate import evaluate_datasets

    config = tiny_config(tmp_path, "rein_official", head="mask2former", method="rein", weights=str(dinov2_file))
    model = trained_segmentor(load_config(config))
    official = tmp_path / "rein_official.pth"
    torch.save({"meta": {}, "state_dict": export_official_rein(model.method, model.head)}, official)
    out = tmp_path / "eval_official"
    assert main(["eval", str(config), "--checkpoint", str(official), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = load_config(config)
    expected = evaluate_datasets(model, cfg.data.test, cfg, DistContext())  # the model the file came from
    assert set(results["datasets"]) == {r.name for r in expected}
    for r in expected:  # results.json rounds to 4 decimals
        assert results["datasets"][r.name]["miou"] == pytest.approx(r.miou, abs=1e-4), r.name
