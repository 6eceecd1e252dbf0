"""FisherTune as a tuning method: the three stages with a stand-in trainer, exact resume across the
stage boundaries, the ablation modes, the small checkpoint, and `dgss fisher`'s outputs."""

import copy
import json

import pytest
import torch

from dgss.config import load_config
from dgss.data.synthetic import generate
from dgss.tuning.model import build_segmentor
from dgss.tuning import METHODS
from dgss.tuning.fishertune import FisherTune
from dgss.tuning.fishertune.report import selection_statistics

TINY = [
    "model.backbone=dinov2_s", "model.img_size=64", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
    "model.head.type=fpn", "model.head.num_classes=19", "model.head.hidden_dim=32",
    "method.name=fishertune", "method.fishertune.num_batches=4",
    "method.fishertune.warmup_iters=2", "train.iters=10",
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
    assert method.is_selected and method.estimation_passes == 16  # 2 x num_batches x batch 2 (per image)
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
    ("fisher", True, 8), ("domain", True, 16), ("random", True, 0), ("drfim", False, 16)])  # per image: batch 2
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
    assert {"q", "k", "v", "proj", "fc1", "fc2", "norm", "embed"} <= set(stats["per_type"])
    assert stats["per_type"]["q"][1] == stats["per_type"]["k"][1] == 4 * (32 * 32 + 32)


def test_dgss_fisher_writes_scores_selection_report_and_plots(tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    from dgss.cli import main

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fisher", "output_dir": str(tmp_path),
        "data": {"train": [{"type": "synthetic", "split": "train",
                            "options": {"domain": "textured", "num_images": 8, "size": [64, 64]}}],
                 "crop_size": [64, 64], "scales": [64], "num_workers": 0},
        "train": {"batch_size": 2},
    }))
    overrides = [o for o in TINY if not o.startswith("method.name")]
    assert main(["fisher", str(config), *overrides, "method.fishertune.warmup_iters=1",
                 "method.fishertune.num_batches=2", "--device", "cpu", "--stability", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "fisher"
    for name in ("selection.safetensors", "scores.safetensors", "selection_stats.json", "report.json",
                 "selection_per_block.png", "selection_per_type.png", "drfim_distribution.png"):
        assert (out / name).is_file() and str(out / name) in printed
    selection = load_file(str(out / "selection.safetensors"))
    scores = load_file(str(out / "scores.safetensors"))
    assert selection["entry_index"].numel() == round(0.05 * sum(s.numel() for s in scores.values()))
    stats = json.loads((out / "selection_stats.json").read_text())
    assert stats["selected"] == selection["entry_index"].numel()
    report = json.loads((out / "report.json").read_text())
    for key in ("overlap_fim", "overlap_domain", "overlap_random", "share_by_block", "share_by_type",
                "prior_dominated_share", "stability", "fig6"):
        assert key in report, key
    assert 0 <= report["overlap_random"] < report["overlap_fim"] <= 1 and 0 <= report["overlap_domain"] <= 1
    assert set(report["share_by_type"]) >= {"q", "k", "v", "proj", "fc1", "fc2", "norm", "embed"}
    assert sum(report["share_by_type"].values()) == pytest.approx(1.0)
    assert sum(report["share_by_block"].values()) == pytest.approx(1.0)
    assert 0 < report["prior_dominated_share"] < 1
    assert set(report["stability"]) == {f"{m}_{k}" for m in ("drfim", "fisher", "domain") for k in ("plain", "variational")}
    assert all(0 <= v <= 1 for v in report["stability"].values())
    assert "overlap (Jaccard of the top sets): FIM-only" in printed and "split-half stability" in printed
    assert "Fig. 6" in printed and "prior dominates the posterior" in printed


def test_the_report_counts_what_the_selection_holds():
    """share_by_type / fraction_by_type from the selection itself (a fused qkv split by rows), the overlap
    of a selection with its own ranking is 1, and a random selection's Jaccard with another ~ k / (2N - k)."""
    from dgss.tuning.fishertune.report import jaccard, selection_report, top_positions

    cfg, model, _ = build()
    method = model.method
    k = method.capacity
    scores = {t.name: torch.zeros(t.shape) for t in method.tensors}
    scores["blocks.1.attn.qkv.weight"][:32] = 1.0 + torch.rand(32, 32)  # the q third of block 1's qkv: 1024
    scores["blocks.2.mlp.fc1.weight"].view(-1)[:k - 1024] = 1.0  # and the rest in block 2's fc1
    method.select(scores)
    report = selection_report(method, estimate=None)
    assert report["share_by_type"]["q"] == pytest.approx(1024 / k)
    assert report["share_by_type"]["fc1"] == pytest.approx((k - 1024) / k)
    assert report["fraction_by_type"]["q"] == pytest.approx(1024 / (4 * 32 * 33))  # 4 blocks of q rows + bias
    assert report["share_by_block"] == pytest.approx({**{b: 0.0 for b in report["share_by_block"]},
                                                      "block 01": 1024 / k, "block 02": (k - 1024) / k})
    assert report["overlap_fim"] is None and report["prior_dominated_share"] is None  # no estimate given
    n = method.num_eligible
    assert report["overlap_random"] == pytest.approx(k / (2 * n - k), abs=0.03)
    own = top_positions([scores[t.name] for t in method.tensors], k)
    assert jaccard(own, own) == 1.0


def test_on_the_demo_vit_the_drfim_differs_from_both_of_its_terms():
    """fishertune.md §3.2 on a small pretrained model (the demo's foundation ViT, its FisherTune
    experiment with a short head warm-up): the default DR-FIM set is neither the FIM-only nor the
    Delta-F-only set (Jaccard < 0.9 with each), and overlaps each far more than a random set does."""
    from dgss.testbed.supervised_foundation import FOUNDATION_FILE
    from dgss.testbed.experiment import QUICK_BUDGET, demo_config
    from dgss.tuning.fishertune.report import _HeadWarmupTrainer, selection_report
    from dgss.data.loader import build_train_loader

    cfg = demo_config("fishertune", budget=QUICK_BUDGET, out_dir="unused", weights=str(FOUNDATION_FILE))
    cfg.method.fishertune.num_batches = 4
    cfg.method.fishertune.warmup_iters = 100  # the 8 iterations below stay in stage 1
    torch.manual_seed(0)
    model = build_segmentor(cfg)
    trainer = _HeadWarmupTrainer(cfg, model, build_train_loader(cfg), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.train.lr, cfg.train.weight_decay))
    cfg.train.progress_bar = False
    run_iterations(model, trainer, optimizer, range(8))  # a short head warm-up (stage 1 sees no backbone)
    model.method.keep_scores = True
    model.method.estimate_and_select(trainer)
    report = selection_report(model.method)
    assert report["overlap_fim"] < 0.9 and report["overlap_domain"] < 0.9
    assert min(report["overlap_fim"], report["overlap_domain"]) > 3 * report["overlap_random"]
    assert 0.5 < report["prior_dominated_share"] < 1  # the prior still dominates most entries, not all
