"""Released SoMA checkpoints (github ysj9909/SoMA, tools/extract_soma_weights.py's layout): a file the
test writes in that layout loads through dgss.load and `dgss eval`, computes W + s B A, and mismatches
are one clear error naming the key."""

import json

import pytest
import torch
from test_engine_support import tiny_config

from conftest import TINY_VIT
import dgss
from dgss.cli import main
from dgss.config import load_config
from dgss.engine.checkpoint import CheckpointError
from dgss.models.backbones import build_backbone
from dgss.tuning.model import build_segmentor
from dgss.predict.loading import load_segmentor
from dgss.tuning.soma_checkpoint import SoMACheckpointError, segmentor_from_official_soma

RANK, ALPHA, START = 4, 8.0, 1  # s = alpha / r = 2
SOMA = [f"method.soma.rank={RANK}", f"method.soma.alpha={ALPHA}", f"method.soma.start_block={START}"]
LAYERS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture
def pretrained(tmp_path):
    """A tiny DINOv2 file in the official layout (timm's names plus mask_token), and its tensors."""
    donor = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    state = {k: v.normal_(0, 0.2) for k, v in donor.model.state_dict().items()}
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save({**state, "mask_token": torch.zeros(1, 32)}, path)
    return path, state


def release_layout(pretrained_state, head_state, gen):
    """What extract_soma_weights.py keeps of a trained model, written from the public code's names: the
    factors of blocks >= start_lora_idx (q, k, v as separate layers), every backbone bias (the trained
    ones changed, the frozen ones the pretrained values, q/k/v split as its converter splits them),
    the mask token and the mmseg head."""
    state = {"backbone.model.mask_token": torch.zeros(1, 32)}
    for key, value in pretrained_state.items():
        if not key.endswith("bias"):
            continue
        if key.endswith("attn.qkv.bias"):
            for name, piece in zip("qkv", value.chunk(3)):
                state["backbone.model." + key.replace("qkv", name)] = piece.clone()
        else:
            state["backbone.model." + key] = value.clone()
    for block in range(START, 4):
        for layer in LAYERS:
            stem = f"backbone.model.blocks.{block}.{layer}"
            out_features, in_features = {"mlp.fc1": (128, 32), "mlp.fc2": (32, 128)}.get(layer, (32, 32))
            state[f"{stem}.lora_A.weight"] = torch.randn(RANK, in_features, generator=gen) * 0.2
            state[f"{stem}.lora_B.weight"] = torch.randn(out_features, RANK, generator=gen) * 0.2
            state[f"{stem}.bias"] = torch.randn(out_features, generator=gen) * 0.1  # trained
    state.update({"decode_head." + k: v.clone() for k, v in head_state.items()})  # mmdet names = dgss's
    return state


@pytest.fixture
def release(tmp_path, pretrained):
    """(config path, release file, {"state_dict": EMA weights, "ema_state_dict": raw ones}) as saved."""
    path, state = pretrained
    config = tiny_config(tmp_path, "soma_release", head="mask2former", method="soma", weights=str(path))
    cfg = load_config(config, SOMA)
    head = build_segmentor(load_config(config, [*SOMA, "method.name=frozen"])).head
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(5)
    ema = release_layout(state, head.state_dict(), gen)
    raw = release_layout(state, head.state_dict(), gen)  # other factors: the raw weights of the same run
    file = tmp_path / "soma_dinov2-L_g2cbm_best.pth"
    torch.save({"state_dict": ema, "ema_state_dict": {"module." + k: v for k, v in raw.items()}}, file)
    return config, cfg, file, ema, raw


def merged_reference(cfg, state):
    """tools/merge_soma_weights.py's result as a plain model: the pretrained backbone with W + s B A and
    the file's biases in its Linears (q/k/v fused back), and the file's head."""
    plain = build_segmentor(_frozen(cfg)).eval()
    model = plain.backbone.model
    with torch.no_grad():
        for block in range(START, 4):
            for layer in LAYERS:
                stem = f"backbone.model.blocks.{block}.{layer}"
                delta = (ALPHA / RANK) * state[f"{stem}.lora_B.weight"].double() @ state[f"{stem}.lora_A.weight"].double()
                name = layer.split(".")[1]
                if name in "qkv":
                    linear = model.blocks[block].attn.qkv
                    rows = slice("qkv".index(name) * 32, ("qkv".index(name) + 1) * 32)
                    linear.weight[rows] = (linear.weight[rows].double() + delta).float()
                    linear.bias[rows] = state[f"{stem}.bias"]
                else:
                    linear = model.get_submodule(f"blocks.{block}.{layer}")
                    linear.weight.copy_((linear.weight.double() + delta).float())
                    linear.bias.copy_(state[f"{stem}.bias"])
        plain.head.load_state_dict({k[len("decode_head."):]: v for k, v in state.items() if k.startswith("decode_head.")})
    return plain


def _frozen(cfg):
    import dataclasses

    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="frozen"))


def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_a_released_file_loads_folded_and_computes_w_plus_sba(release):
    config, cfg, file, ema, raw = release
    loaded = load_segmentor(file, config=config, overrides=SOMA, device="cpu")
    assert loaded.kind == "official-soma" and loaded.cfg.method.soma.init == "public_code"
    predictor = dgss.load(file, config=config, overrides=SOMA, device="cpu")
    assert predictor.cfg.method.soma.init == "public_code"
    model = predictor.model
    assert not list(model.method.parameters())  # folded: a plain ViT, no hooks
    reference = merged_reference(cfg, ema)  # the EMA weights: the file's state_dict
    for key, value in reference.backbone.model.state_dict().items():
        torch.testing.assert_close(model.backbone.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in reference.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    with torch.no_grad():
        x = images()
        torch.testing.assert_close(model.whole_inference(x), reference.whole_inference(x), rtol=0, atol=1e-5)
        # unfolded, the hooks compute the same; the raw weights are the file's ema_state_dict
        hooked = segmentor_from_official_soma(cfg, file, fold=False).eval()
        assert list(hooked.method.parameters())
        torch.testing.assert_close(hooked.whole_inference(x), reference.whole_inference(x), rtol=0, atol=1e-5)
        raw_model = segmentor_from_official_soma(cfg, file, raw=True).eval()
        torch.testing.assert_close(raw_model.whole_inference(x), merged_reference(cfg, raw).whole_inference(x),
                                   rtol=0, atol=1e-5)
        assert not torch.allclose(raw_model.whole_inference(x), reference.whole_inference(x), atol=1e-3)


def test_dgss_eval_evaluates_a_released_file(release, tmp_path, capsys):
    from dgss.engine.distributed import DistContext
    from dgss.engine.evaluate import evaluate_datasets

    config, cfg, file, ema, _ = release
    out = tmp_path / "eval_release"
    assert main(["eval", str(config), "--checkpoint", str(file), "--out", str(out), *SOMA]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"night", "fog"} and results["checkpoint"] == str(file)
    expected = evaluate_datasets(merged_reference(cfg, ema), cfg.data.test, cfg, DistContext())
    for r in expected:  # the scores of the merged model (results.json rounds to 4 decimals)
        assert results["datasets"][r.name]["miou"] == pytest.approx(r.miou, abs=1e-4), r.name


def test_mismatches_are_one_clear_error_naming_the_key(release, tmp_path):
    config, cfg, file, ema, _ = release
    with pytest.raises(SoMACheckpointError, match=r"shape mismatches: backbone.model.blocks.1.attn.q.lora_A.weight"):
        segmentor_from_official_soma(load_config(config, [*SOMA, "method.soma.rank=2"]), {"state_dict": ema})
    with pytest.raises(SoMACheckpointError, match=r"layers the config does not tune: blocks.1.attn.k.lora_A"):
        segmentor_from_official_soma(load_config(config, [*SOMA, "method.soma.start_block=2"]), ema)
    missing = {k: v for k, v in ema.items() if k != "backbone.model.blocks.3.mlp.fc2.lora_B.weight"}
    with pytest.raises(SoMACheckpointError, match=r"missing: backbone.model.blocks.3.mlp.fc2.lora_B.weight"):
        segmentor_from_official_soma(cfg, missing)
    wrong_backbone = dict(ema)
    wrong_backbone["backbone.model.blocks.0.norm1.bias"] = wrong_backbone["backbone.model.blocks.0.norm1.bias"] + 0.5
    with pytest.raises(SoMACheckpointError, match=r"different: blocks.0.norm1.bias \(max \|difference\| 0.5"):
        segmentor_from_official_soma(cfg, wrong_backbone)
    with pytest.raises(SoMACheckpointError, match="needs a SoMA config"):
        segmentor_from_official_soma(load_config(config, ["method.name=rein"]), ema)
    with pytest.raises(CheckpointError, match="needs a SoMA config"):
        dgss.load(file, config=config, overrides=["method.name=rein"], device="cpu")
    with pytest.raises(CheckpointError, match="pass the experiment config"):
        dgss.load(file, device="cpu")
    plain = tmp_path / "no_ema.pth"
    torch.save({"state_dict": ema}, plain)
    with pytest.raises(SoMACheckpointError, match="no 'ema_state_dict'"):
        segmentor_from_official_soma(cfg, plain, raw=True)
    # a SoMA built with the paper's init would subtract the pretrained minor components: refused
    from dgss.tuning.soma_checkpoint import load_official_soma

    paper = build_segmentor(cfg)
    with pytest.raises(SoMACheckpointError, match="init=paper"):
        load_official_soma(paper.method, ema, paper.head)
