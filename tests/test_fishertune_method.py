"""FisherTune as a tuning method: the three stages with a stand-in trainer, exact resume across the
stage boundaries, the ablation modes, the small checkpoint, and `dgss fisher`'s outputs."""

import copy
import json

import pytest
import torch

from dgss.config import load_config
from dgss.data.synthetic import generate
from dgss.models.segmentor import build_segmentor
from dgss.tuning import METHODS
from dgss.tuning.fishertune import FisherTune
from dgss.tuning.fishertune.report import selection_statistics

TINY = [
    "model.backbone=dinov2_s", "model.img_size=64", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
    "model.head.type=fpn", "model.head.num_classes=19", "model.head.hidden_dim=32",
    "method.name=fishertune", "method.fishertune.num_batches=4", "method.fishertune.rounds=2",
    "method.fishertune.warmup_iters=2", "method.fishertune.n_eff=64", "train.iters=10",
]
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


class StandInTrainer:
    """The attributes of the training engine's trainer that FisherTune uses."""

    def __init__(self, cfg, model, seed=0):
        self.cfg, self.model, self.total_iters = cfg, model, cfg.train.iters
        self.device, self.rank, self.world_size = torch.device("cpu"), 0, 1
        self.seed, self.batches_drawn = seed, 0

    def next_batch(self):
        images, labels = [], []
        for i in range(2):
            image, label = generate("textured", self.seed + 2 * self.batches_drawn + i, (64, 64))
            images.append((torch.from_numpy(image).permute(2, 0, 1).float() - MEAN) / STD)
            labels.append(torch.from_numpy(label).long())
        self.batches_drawn += 1
        return {"image": torch.stack(images), "label": torch.stack(labels)}


def run_iterations(model, trainer, optimizer, iterations):
    model.train()
    for it in iterations:
        model.method.on_train_iteration(it, trainer)
        batch = trainer.next_batch()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def build(*extra):
    cfg = load_config(overrides=TINY + list(extra))
    torch.manual_seed(0)
    model = build_segmentor(cfg)
    return cfg, model, torch.optim.AdamW(model.parameter_groups(1e-3, 0.05))


def test_registered_and_counts_its_selection():
    assert "fishertune" in METHODS
    cfg, model, _ = build()
    method = model.method
    assert isinstance(method, FisherTune) and method.capacity == round(0.05 * method.num_eligible)
    assert not any(p.requires_grad for p in model.backbone.model.parameters())
    groups = model.parameter_groups(1e-3, 0.05, backbone_lr_mult=0.5)
    delta_group = next(g for g in groups if any(p is method.delta for p in g["params"]))
    assert delta_group["lr"] == pytest.approx(5e-4) and delta_group["weight_decay"] == 0.05


def test_three_stages_with_a_growing_selection_and_an_exact_resume():
    cfg, model, optimizer = build()
    method = model.method
    trainer = StandInTrainer(cfg, model)
    pretrained = {n: p.detach().clone() for n, p in model.backbone.model.named_parameters()}
    run_iterations(model, trainer, optimizer, range(2))  # stage 1: head only
    assert not method.is_selected and method.delta.grad is None and trainer.batches_drawn == 2
    counts = []
    for it in range(2, 6):  # stage 2 at iteration 2, then stage 3
        run_iterations(model, trainer, optimizer, [it])
        counts.append(int(method.num_active))
    assert method.is_selected and method.estimation_passes == 8  # 2 x num_batches
    assert trainer.batches_drawn == 2 + 4 + 4
    assert counts[0] == round(0.01 * method.num_eligible) and counts == sorted(counts) and counts[-1] > counts[0]
    assert float(method.delta.detach().abs().sum()) > 0
    for name, p in model.backbone.model.named_parameters():
        assert torch.equal(p, pretrained[name])

    # resume after iteration 5: a new model from the state dict continues identically, no re-estimate
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())  # load_state_dict would share the moments
    small = {k: v for k, v in state.items() if not k.startswith("backbone.model.")}
    assert set(k.split(".")[0] for k in small) == {"method", "head"}  # the FisherTune checkpoint
    _, resumed, resumed_opt = build()
    resumed.load_state_dict(state)
    resumed_opt.load_state_dict(optimizer_state)
    resumed_trainer = StandInTrainer(cfg, resumed, seed=0)
    resumed_trainer.batches_drawn = trainer.batches_drawn
    run_iterations(model, trainer, optimizer, range(6, 9))
    run_iterations(resumed, resumed_trainer, resumed_opt, range(6, 9))
    assert resumed_trainer.batches_drawn == trainer.batches_drawn  # no estimate after the resume
    assert int(resumed.method.num_active) == int(method.num_active)
    torch.testing.assert_close(resumed.method.delta, method.delta, rtol=0, atol=0)
    batch = trainer.next_batch()
    model.eval(), resumed.eval()
    torch.testing.assert_close(resumed(batch["image"]), model(batch["image"]), rtol=0, atol=0)


@pytest.mark.parametrize("selection,variational,passes", [
    ("fisher", True, 4), ("domain", True, 8), ("random", True, 0), ("drfim", False, 8)])
def test_ablation_modes(selection, variational, passes):
    cfg, model, _ = build(f"method.fishertune.selection={selection}",
                          f"method.fishertune.variational={str(variational).lower()}")
    trainer = StandInTrainer(cfg, model)
    model.train()
    model.method.on_train_iteration(2, trainer)
    assert model.method.is_selected and model.method.estimation_passes == passes
    assert trainer.batches_drawn == (0 if selection == "random" else 4)
    assert int(model.method.num_active) == round(0.01 * model.method.num_eligible)


def test_selection_statistics_split_qkv_and_count_everything():
    cfg, model, _ = build()
    method = model.method
    method.select(None, seed=0)
    stats = selection_statistics(method)
    assert stats["selected"] == method.capacity
    assert sum(s for s, _ in stats["per_block"].values()) == method.capacity
    assert sum(t for _, t in stats["per_type"].values()) == method.num_eligible
    assert {"q", "k", "v", "proj", "fc1", "fc2", "norms"} <= set(stats["per_type"])
    assert stats["per_type"]["q"][1] == stats["per_type"]["k"][1] == 4 * (32 * 32 + 32)


def test_dgss_fisher_writes_scores_selection_and_plots(tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    from dgss.cli import main

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fisher", "output_dir": str(tmp_path),
        "data": {"train": [{"type": "synthetic", "split": "train",
                            "options": {"domain": "textured", "num_images": 4, "size": [64, 64]}}],
                 "crop_size": [64, 64], "scales": [64], "num_workers": 0},
        "train": {"batch_size": 2},
    }))
    overrides = [o for o in TINY if not o.startswith("method.name")]
    assert main(["fisher", str(config), *overrides, "method.fishertune.warmup_iters=1",
                 "method.fishertune.num_batches=2", "--device", "cpu"]) == 0
    out = tmp_path / "fisher"
    for name in ("selection.safetensors", "scores.safetensors", "selection_stats.json", "selection_per_block.png",
                 "selection_per_type.png", "drfim_distribution.png"):
        assert (out / name).is_file() and str(out / name) in capsys.readouterr().out + str(out / name)
    selection = load_file(str(out / "selection.safetensors"))
    scores = load_file(str(out / "scores.safetensors"))
    assert selection["entry_index"].numel() == round(0.05 * sum(s.numel() for s in scores.values()))
    stats = json.loads((out / "selection_stats.json").read_text())
    assert stats["selected"] == selection["entry_index"].numel()
