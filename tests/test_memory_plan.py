"""`dgss plan` (issue 24): the live-bytes tracker, the meta-device probe against the same step on real CPU
tensors, the scaling from shallow probes to full depth, the plan's arithmetic, and the command line.
(The planner against measured process memory is benchmarks/bench_plan.py, not a test.)"""

import json
import resource
from pathlib import Path

import pytest
import torch

from dgss.cli import main
from dgss.config import load_config
from dgss.engine.memory_plan import GIB, Planner, parse_memory, plan_memory, usable_memory
from dgss.engine.memory_probe import (EmulatedAutocast, LiveBytes, probe_estimate_pass,
                                      probe_training_step)

ROOT = Path(__file__).resolve().parents[1]
TINY_HEAD = ["model.head.hidden_dim=32", "model.head.num_queries=8", "model.head.num_heads=2",
             "model.head.num_points=2", "model.head.pixel_decoder_layers=1", "model.head.pixel_decoder_ffn_dim=32",
             "model.head.decoder_layers=2", "model.head.decoder_ffn_dim=32", "model.head.num_points_loss=64",
             "method.rein.num_tokens=8", "method.rein.query_dim=32"]


def tiny(method="rein", depth=4, *extra):
    return load_config(None, ["model.backbone=dinov2_s", f"model.backbone_kwargs={{depth: {depth}, embed_dim: 32, "
                              "num_heads: 2}", "model.img_size=64", "data.crop_size=[64,64]", "train.batch_size=2",
                              f"method.name={method}", "method.soma.start_block=1", *TINY_HEAD, *extra])


def test_live_bytes_counts_each_new_storage_once_until_it_is_freed():
    w = torch.randn(100, 50, requires_grad=True)  # existed before: never counted
    with LiveBytes() as tracker:
        x = torch.randn(8, 100)  # 3,200 B
        y = x @ w  # 1,600 B
        view = y.t()  # a view: nothing new
        y.relu_()  # in place: nothing new
        assert tracker.live == 3200 + 1600
        del x
        assert tracker.live == 3200 + 1600  # the graph keeps x for w's gradient
        y.sum().backward()
        tracker.mark_gradient(w.grad)
        assert tracker.grads == 20_000
        assert tracker.live == 1600 + 20_000  # the graph (and x) freed, y and w's gradient alive
        w.grad = None
        assert tracker.live == 1600 and tracker.grads == 0
    assert tracker.phases[0].total >= 3200 + 1600 + 20_000
    del view


def test_emulated_autocast_casts_as_cuda_autocast_does():
    lin = torch.nn.Linear(8, 8)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    mode = EmulatedAutocast()
    with mode:
        y = lin(x)
        # casts of leaves that require grad (x, weight, bias) are kept, as autocast's cache keeps them
        assert y.dtype == torch.bfloat16 and len(mode.cache) == 3
        frozen(x)
        assert len(mode.cache) == 3  # a frozen weight's cast is not
        assert torch.nn.functional.layer_norm(y, (8,)).dtype == torch.float32
        assert torch.softmax(y, -1).dtype == torch.float32 and (y * 2).dtype == torch.bfloat16
    assert not mode.cache


@pytest.mark.parametrize("method", ["frozen", "rein", "full", "fishertune", "soma"])
def test_the_meta_probe_equals_the_same_step_on_real_cpu_tensors(method):
    cfg = tiny(method)
    meta = probe_training_step(cfg, target="cpu")
    real = probe_training_step(cfg, device="cpu", target="cpu")
    assert meta == real
    assert meta.head.total > 0
    assert (meta.backbone.total > 0) == (method != "frozen")  # no gradient reaches a frozen backbone
    if method == "fishertune":
        assert probe_estimate_pass(cfg, target="cpu") == probe_estimate_pass(cfg, device="cpu", target="cpu")


@pytest.mark.parametrize("method,extra", [("full", []), ("rein", ["train.grad_checkpointing=true"]),
                                          ("soma", ["method.soma.start_block=2"])])
def test_shallow_probes_scale_to_the_full_depth_exactly(method, extra):
    cfg = tiny(method, 7, *extra)
    planner = Planner(cfg, device="cpu")
    assert planner.scalable and planner.depth == 7
    scaled = planner.step_peaks(cfg.train.amp, cfg.train.grad_checkpointing, cfg.train.batch_size)
    direct = probe_training_step(cfg, target="cpu")
    for phase in ("head", "backbone"):
        for part in ("total", "grads"):
            assert getattr(getattr(scaled, phase), part) == pytest.approx(getattr(getattr(direct, phase), part),
                                                                          rel=1e-3, abs=64), (phase, part)


def test_plan_arithmetic_ddp_fsdp_and_the_verdict():
    cfg = tiny("full")
    planner = Planner(cfg)
    params = sum(p.numel() * 4 for p in _meta_model(cfg).parameters())
    single = planner.plan()
    assert single.weights == params + planner.buffer_bytes and single.optimizer == 2 * planner.grad_bytes
    assert single.training_peak == (single.weights + single.optimizer + single.communication + single.gradients
                                    + single.activations + single.optimizer_step + single.workspaces
                                    + single.allocator)  # the allowances: tests/test_memory_plan_margins.py
    ddp = planner.plan(gpus=8, parallel="ddp")
    assert ddp.communication == planner.grad_bytes and ddp.training_peak > single.training_peak
    fsdp = planner.plan(gpus=8, parallel="fsdp")
    assert fsdp.optimizer == -(-2 * planner.grad_bytes // 8) and fsdp.weights < single.weights
    assert planner.plan(gpus=1, parallel="fsdp").parallel == "ddp"  # one process: nothing to shard
    # the weight EMA: one more copy of the trained tensors (for full fine-tuning, every parameter)
    with_ema = Planner(tiny("full", 4, "train.ema.enabled=true")).plan()
    assert single.ema == 0 and with_ema.ema == planner.grad_bytes == params
    assert with_ema.training_peak == single.training_peak + params
    # the verdict and the smallest change
    tight = plan_memory(cfg, gpu_memory=single.total_bytes * 21 // 20 + GIB, planner=planner)
    assert tight.fits and tight.change is None and len(tight.variants) == 4
    short = plan_memory(cfg, gpu_memory=(single.total_bytes + GIB) // 2, planner=planner, variants=False)
    assert short.fits is False and short.change
    assert parse_memory("80GB") == parse_memory("80 GiB") == 80 * GIB and parse_memory("141GB") == 141 * GIB
    assert usable_memory(80 * GIB) == 76 * GIB and usable_memory(10 * GIB) == 9 * GIB
    with pytest.raises(ValueError, match="80GB"):
        parse_memory("eighty")


def _meta_model(cfg):
    from dgss.tuning.model import build_segmentor

    with torch.device("meta"):
        return build_segmentor(cfg)


def test_fishertune_estimate_plan_counts_the_sums_theta_and_the_selection():
    cfg = tiny("fishertune")
    planner = Planner(cfg)
    n = planner.fishertune["eligible"]
    estimate = planner.plan().estimate
    assert estimate["sums"] == 8 * n and estimate["theta"] == 4 * n  # F(x), F(x') and theta: 4 bytes per entry
    assert estimate["peak"] >= planner.param_bytes + estimate["sums"] + estimate["theta"] + estimate["passes"]
    dense = Planner(tiny("fishertune", 4, "method.fishertune.estimate_memory=dense")).plan().estimate
    # every gradient, then every score, at once
    assert dense["passes"] >= estimate["passes"] and dense["selection"] > estimate["selection"]
    assert dense["peak"] >= estimate["peak"]


def test_dgss_plan_command_prints_the_table_and_json(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text((ROOT / "configs/rein/dinov2-l_gtav_512.yaml").read_text().replace(
        "_base_: [../", f"_base_: [{ROOT / 'configs'}/").replace(", ../", f", {ROOT / 'configs'}/"))
    args = ["plan", str(config), "model.backbone=dinov2_s", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
            "data.crop_size=[64,64]", "train.batch_size=1", *TINY_HEAD]
    assert main([*args, "--gpu-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "weights and buffers" in text and "fits" in text and "variants" in text
    assert main([*args, "--json", "--gpus", "8", "--gpu-memory", "0.01GB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["total_bytes"] > 0 and data["gpus"] == 8
    assert data["change"] and "estimate" not in data["change"]  # Rein has none
    assert len(data["variants"]) == 8  # fp32/bf16 x checkpointing x DDP/FSDP
    assert main([*args, "--gpu-memory", "lots"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_planning_dinov3_7b_fishertune_reads_no_weights_and_allocates_no_model(capsys):
    # the published-recipe config: its weights file does not exist here, the model is built on meta only
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config(ROOT / "configs/fishertune/dinov3-7b_gtav_512.yaml")
    assert not Path(cfg.model.weights).exists()
    planner = Planner(cfg)
    plan = plan_memory(cfg, gpu_memory=parse_memory("141GB"), variants=False, planner=planner)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 2 * GIB  # the 27 GB of weights were never allocated
    assert plan.weights > 6.7e9 * 4  # but they are counted
    assert plan.estimate_peak < usable_memory(parse_memory("141GB")) and plan.fits  # the estimate fits one H200
    on_80 = plan_memory(cfg, gpu_memory=parse_memory("80GB"), variants=False, planner=planner)
    assert on_80.fits is False and "estimate alone" in on_80.change


def test_probes_in_a_process_pool_give_what_they_give_in_this_process():
    cfg = tiny("fishertune", 6)
    keys = [("step", "none", False, 2), ("step", "none", True, 2), ("estimate",)]
    pooled, here = Planner(cfg), Planner(cfg)
    pooled.prefetch(keys, workers=2)
    here.prefetch(keys, workers=1)
    assert pooled._probes == here._probes and len(here._probes) == 3
