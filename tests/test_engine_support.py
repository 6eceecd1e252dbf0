"""Shared helpers of the engine tests (tiny configs, subprocess runs), and the engine's small units:
the lr schedule and the optimizer state kept by parameter name."""

import math
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VIT
from safetensors.torch import load_file

from dgss.config import ConfigError, TrainConfig, load_config
from dgss.engine.optim import build_optimizer, load_optimizer_state_by_name, optimizer_state_by_name
from dgss.engine.schedule import PolySchedule

SIZE = [64, 96]  # synthetic images (H, W); every pixel is labelled
TINY_M2F = dict(num_classes=19, num_queries=6, hidden_dim=16, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32,
                num_heads=2, num_points=2, decoder_layers=2, decoder_ffn_dim=32, num_points_loss=64)


def synthetic(domain, split, n):
    return {"type": "synthetic", "split": split, "name": domain,
            "options": {"domain": domain, "num_images": n, "size": SIZE}}


def tiny_config(tmp_path, name="run", *, head="fpn", method="full", weights=None, **train):
    """A YAML experiment: DINOv2-shaped ViT (4 blocks, width 32), 64 x 64 crops, CPU."""
    raw = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"backbone": "dinov2_s", "img_size": 64, "weights": weights, "backbone_kwargs": dict(TINY_VIT),
                  "head": {"type": "fpn", "hidden_dim": 16} if head == "fpn" else dict(TINY_M2F)},
        "method": {"name": method, "rein": {"num_tokens": 6, "lora_rank": 4, "query_dim": 16}},
        "data": {"train": [synthetic("clean", "train", 16)], "val": [synthetic("clean", "val", 2)],
                 "test": [synthetic("night", "val", 2), synthetic("fog", "val", 2)],
                 "crop_size": [64, 64], "scales": [64, 80], "num_workers": 0},
        "train": {"iters": 4, "batch_size": 2, "lr": 1e-3, "eval_interval": 0, "checkpoint_interval": 0,
                  "log_interval": 1, "device": "cpu", "progress_bar": False, **train},
        "eval": {"mode": "whole"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def backbone_weights_file(tmp_path, name="dinov2_tiny.pth", std=0.2):
    """A tiny pretrained-backbone file in timm's layout (for frozen-backbone checkpoints)."""
    from dgss.models.backbones import build_backbone

    donor = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    path = tmp_path / name
    torch.save({k: v.normal_(0, std) for k, v in donor.model.state_dict().items()}, path)
    return path


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_python(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


# Runs `dgss train CONFIG ARGS...` (under torchrun too) after making the trainer kill its own process
# (SIGKILL: no cleanup, no flush) right before the given 0-based iteration's step.
KILL_AT_ITERATION = """
import os, signal, sys
from dgss.cli import main
from dgss.engine.trainer import Trainer

kill_at = int(sys.argv[1])
original = Trainer.train_step

def train_step(self, iteration):
    if iteration == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, iteration)

Trainer.train_step = train_step
sys.exit(main(["train", *sys.argv[2:]]))
"""


def weights(path):
    return load_file(str(path))


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def test_poly_schedule_reaches_zero_and_warms_up_linearly():
    poly = PolySchedule(total_iters=100, power=0.9)
    assert poly.factor(0) == 1.0
    assert poly.factor(50) == pytest.approx(0.5**0.9)
    assert poly.factor(100) == 0.0
    warm = PolySchedule(total_iters=40, power=1.0, warmup_iters=10, warmup_start_factor=0.0)
    assert [warm.factor(i) for i in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert warm.factor(25) == pytest.approx(0.5)  # poly over the 30 iterations after the warm-up
    floored = PolySchedule.from_config(TrainConfig(iters=10, lr=1e-3, min_lr=1e-4))
    assert floored.factor(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_iters"):
        PolySchedule(total_iters=10, warmup_iters=10)


def test_cosine_decay_follows_half_a_cosine_after_the_warm_up():
    cosine = PolySchedule.from_config(TrainConfig(iters=110, lr=1e-2, warmup_iters=10, lr_decay="cosine"))
    assert cosine.factor(10) == pytest.approx(1.0)
    assert cosine.factor(35) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine.factor(60) == pytest.approx(0.5)
    assert cosine.factor(110) == pytest.approx(0.0, abs=1e-12)
    # the reason to choose it: more of the run at a small lr than poly 0.9 (iterations below lr / 10)
    poly = PolySchedule(total_iters=110, power=0.9, warmup_iters=10)
    low = [sum(s.factor(i) < 0.1 for i in range(110)) for s in (cosine, poly)]
    assert low[0] > 2.4 * low[1]
    floored = PolySchedule.from_config(TrainConfig(iters=10, lr=1e-3, min_lr=1e-4, lr_decay="cosine"))
    assert floored.factor(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        PolySchedule(total_iters=10, decay="linear")
    with pytest.raises(ConfigError, match="lr_decay"):
        load_config(None, ["train.lr_decay=linear"])


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)

    def parameter_groups(self, lr, weight_decay, backbone_lr_mult=1.0):
        groups = [{"params": [p for p in self.b.parameters() if p.requires_grad], "lr": lr}]
        return groups + [{"params": [p for p in self.a.parameters() if p.requires_grad], "lr": lr * backbone_lr_mult}]


def _step(model, optimizer):
    optimizer.zero_grad()
    model.b(model.a(torch.ones(2, 3))).sum().backward()
    optimizer.step()


def test_optimizer_state_follows_parameter_names_through_rebuilds():
    model = _TwoLayers()
    model.a.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1), backbone_lr_mult=0.1)
    _step(model, optimizer)
    saved = copy.deepcopy(optimizer_state_by_name(optimizer, model))
    assert sorted(saved["state"]) == ["b.bias", "b.weight"]
    # a method starts training "a": "b" keeps its moments, "a" starts fresh; groups carry initial_lr
    model.a.requires_grad_(True)
    rebuilt = build_optimizer(model, TrainConfig(lr=0.1), backbone_lr_mult=0.1)
    pending = load_optimizer_state_by_name(rebuilt, model, saved)
    assert pending == {}
    assert [g["initial_lr"] for g in rebuilt.param_groups] == pytest.approx([0.1, 0.01])
    torch.testing.assert_close(rebuilt.state[model.b.weight]["exp_avg"], saved["state"]["b.weight"]["exp_avg"])
    assert model.a.weight not in rebuilt.state
    # state of a parameter that does not train (yet) is handed back, not dropped silently
    model.b.requires_grad_(False)
    only_a = build_optimizer(model, TrainConfig(lr=0.1), backbone_lr_mult=1.0)
    assert sorted(load_optimizer_state_by_name(only_a, model, saved)) == ["b.bias", "b.weight"]


class _BodyAndHead(torch.nn.Module):
    """A 'method' layer and a 'head' layer, grouped as the segmentor groups them (head groups marked)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def parameter_groups(self, lr, weight_decay, backbone_lr_mult=1.0):
        return [{"params": list(self.body.parameters()), "lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
                {"params": [self.head.weight], "lr": lr, "weight_decay": weight_decay, "head": True},
                {"params": [self.head.bias], "lr": lr, "weight_decay": 0.0, "head": True}]

    def loss(self, x):
        return self.head(torch.tanh(self.body(x))).pow(2).sum()


def test_an_sgd_head_steps_as_torch_sgd_and_the_rest_as_torch_adamw():
    """Oracle: train.head_optim.optimizer=sgd gives the head torch.optim.SGD's updates (momentum, coupled
    decay) and every other group torch.optim.AdamW's, over several steps; its lr and decay follow the rule."""
    from dgss.config import HeadOptimConfig
    from dgss.engine.optim import AdamWWithSGDGroups

    torch.manual_seed(0)
    model = _BodyAndHead()
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=0.01, weight_decay=0.05,
                      head_optim=HeadOptimConfig(optimizer="sgd", lr_mult=20.0, momentum=0.9, weight_decay=1e-3))
    optimizer = build_optimizer(model, cfg, backbone_lr_mult=0.1)
    assert isinstance(optimizer, AdamWWithSGDGroups)
    assert [(g["initial_lr"], g["weight_decay"], g.get("sgd", False)) for g in optimizer.param_groups] == \
        [(pytest.approx(1e-3), 0.05, False), (pytest.approx(0.2), 1e-3, True), (pytest.approx(0.2), 0.0, True)]
    adamw = torch.optim.AdamW(reference.body.parameters(), lr=1e-3, weight_decay=0.05)
    sgd = torch.optim.SGD([{"params": [reference.head.weight], "weight_decay": 1e-3},
                           {"params": [reference.head.bias], "weight_decay": 0.0}], lr=0.2, momentum=0.9)
    for _ in range(4):
        x = torch.randn(8, 4)
        optimizer.zero_grad(), adamw.zero_grad(), sgd.zero_grad()
        model.loss(x).backward()
        reference.loss(x).backward()
        optimizer.step()
        adamw.step()
        sgd.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, msg=name)
    # the momentum buffers travel by name with the checkpoint, and only AdamW's groups hold moments
    saved = optimizer_state_by_name(optimizer, model)
    assert set(saved["state"]["head.weight"]) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq"} <= set(saved["state"]["body.weight"])
    rebuilt = build_optimizer(model, cfg, backbone_lr_mult=0.1)
    load_optimizer_state_by_name(rebuilt, model, saved)
    torch.testing.assert_close(rebuilt.state[model.head.weight]["momentum_buffer"],
                               sgd.state[reference.head.weight]["momentum_buffer"])
    # the default keeps the papers' recipe: one AdamW, the head at train.lr and train.weight_decay
    plain = build_optimizer(_BodyAndHead(), TrainConfig(lr=0.01, weight_decay=0.05), backbone_lr_mult=0.1)
    assert type(plain) is torch.optim.AdamW
    assert [(g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(pytest.approx(1e-3), 0.05), (0.01, 0.05), (0.01, 0.0)]
    with pytest.raises(ValueError, match="train.head_optim.momentum"):
        build_optimizer(_BodyAndHead(), TrainConfig(head_optim=HeadOptimConfig(momentum=1.0)), backbone_lr_mult=1.0)
