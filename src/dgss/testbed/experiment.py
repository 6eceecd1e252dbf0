"""The demo's experiments: one config per method, trained by the engine and evaluated like `dgss eval`.

Every method gets the same experiment (the foundation ViT, a small Mask2Former head, the source
domain's images, the augmentation recipe, AdamW + poly, the iteration budget and the seed); only
``method.name`` differs. Each run is a normal dgss run under ``OUT/runs/<method>/`` (config.yaml,
logs, model_final.safetensors, eval/results.{json,md} for the targets and their mean, eval/source.{json,md}
for the source val split), so ``dgss eval OUT/runs/rein/config.yaml --checkpoint
OUT/runs/rein/model_final.safetensors`` reproduces its row of the table.

With ``curve_points`` > 1 the engine also writes checkpoints at evenly spaced iterations
(:func:`curve_iterations`), and :func:`run_method` evaluates each of them the same way (the learning
curves of the seeded benchmark, :mod:`dgss.testbed.benchmark`).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import ExperimentConfig, apply_overrides, from_dict, parse_overrides
from .world import World

__all__ = ["SOURCE", "TARGETS", "METHODS", "DemoBudget", "FULL_BUDGET", "QUICK_BUDGET", "DEMO_SEEDS", "demo_config",
           "curve_iterations", "MethodResult", "run_method", "evaluate_model_file"]

SOURCE = "clean"  # flat colours, no texture or noise: the demo's "game" domain (GTAV's role)
TARGETS = ("textured", "night", "fog", "rain", "colorshift")  # never seen in fine-tuning
METHODS = ("frozen", "full", "rein", "fishertune")
IMAGE_SIZE = [128, 256]  # H, W of every synthetic image


@dataclass(frozen=True)
class DemoBudget:
    """The sizes of one demo flavour (the same for every method)."""

    iters: int  # optimizer steps of every method
    train_images: int  # distinct source scenes
    eval_images: int  # per domain (source val split and each target)
    fisher_batches: int  # FisherTune's DR-FIM estimate (each batch seen as x and as x')
    overlay_images: int  # per domain, in the overlay figures

    @property
    def fisher_warmup(self) -> int:  # FisherTune's head-only stage 1: an eighth of the budget
        return max(self.iters // 8, 2)


# `make demo`: 4 methods x 3 seeds (DEMO_SEEDS) in two processes within 10 minutes on 2 cores; the seeded
# benchmark (benchmarks/bench_dg.py, docs/testbed.md) runs the same experiment longer.
FULL_BUDGET = DemoBudget(iters=240, train_images=240, eval_images=24, fisher_batches=8, overlay_images=2)
DEMO_SEEDS = (0, 1, 2)
QUICK_BUDGET = DemoBudget(iters=40, train_images=64, eval_images=6, fisher_batches=4, overlay_images=1)


def _synthetic(domain: str, split: str, n: int, label_set: str = "cityscapes", objects: str = "plain") -> dict:
    options = {"domain": domain, "num_images": n, "size": IMAGE_SIZE}
    if label_set != "cityscapes":
        options["label_set"] = label_set
    if objects != "plain":
        options["objects"] = objects
    return {"type": "synthetic", "split": split, "name": domain, "options": options}


def curve_iterations(iters: int, points: int) -> list[int]:
    """The iterations at which a run is evaluated: every ``ceil(iters / points)`` iterations and the
    last one (at most ``points`` of them; exactly ``points`` when ``points`` divides ``iters``)."""
    if points <= 1:
        return [iters]
    interval = math.ceil(iters / points)
    return [*range(interval, iters, interval), iters]


def demo_config(method: str, *, budget: DemoBudget, out_dir: str | Path, weights: Optional[str],
                targets: Optional[Sequence[str]] = None, seed: int = 0, overrides: Sequence[str] = (),
                name: Optional[str] = None, device: str = "cpu", curve_points: int = 1,
                world: Optional[World] = None) -> ExperimentConfig:
    """The demo experiment of ``method``: the foundation ViT (6 blocks, width 96, patch 16) with a small
    Mask2Former (64 channels, 20 queries, 3 decoder layers), 128 x 128 crops of the source domain,
    batch 4, AdamW lr 1e-3 (full fine-tuning: backbone x 0.1, as the papers), whole-image evaluation.

    ``overrides``: dotted ``key=value`` items applied last (the benchmark's ablation rows); ``name``: the
    run folder under ``OUT/runs`` (default: ``method``); ``curve_points`` > 1: checkpoints (all kept)
    at :func:`curve_iterations`; ``world``: the synthetic world (:mod:`dgss.testbed.world`; default the
    demo's): source, validation family, the domains tested (unless ``targets`` is given: the world's
    targets and unseen looks), label set, foundation architecture and head. A ``model.weights`` override
    may name a foundation alias ("label-foundation", "ssl-foundation", "ssl-small") or null (random
    initialisation); the backbone takes the architecture written in the weights file's metadata."""
    from .world import DEMO_WORLD, foundation_architecture, resolve_weights

    world = world or DEMO_WORLD
    targets = tuple(targets) if targets is not None else world.tested
    # the world's overrides of this method's rows come first, so a row's own override wins
    override_items = parse_overrides([*world.method_overrides.get(method, ()), *overrides])
    for key, value in override_items:  # a row's own foundation (or none): its architecture follows the file
        if key == "model.weights":
            weights = value
    override_items = [(k, v) for k, v in override_items if k != "model.weights"]
    weights = resolve_weights(weights)
    arch = foundation_architecture(weights, world.foundation)
    crop = IMAGE_SIZE[0]
    interval = curve_iterations(budget.iters, curve_points)[0] if curve_points > 1 else 0
    raw = {
        "name": name or method,
        "output_dir": str(Path(out_dir) / "runs"),
        "model": {
            "backbone": arch["backbone"], "weights": weights, "img_size": arch["img_size"],
            "patch_size": arch["patch_size"], "backbone_kwargs": dict(arch["backbone_kwargs"]),
            "head": {**world.head, "num_classes": world.num_classes},
        },
        "method": {
            "name": method,
            "rein": {"num_tokens": world.head["num_queries"], "lora_rank": 4, "query_dim": 64},
            "fishertune": {"warmup_iters": budget.fisher_warmup, "num_batches": budget.fisher_batches,
                           "delta_min": 0.01, "delta_max": 0.05},
        },
        "data": {
            "train": [_synthetic(world.source, "train", budget.train_images, world.label_set, world.objects)],
            # the source val split, then the validation shift family (model and setting selection only)
            "val": [_synthetic(d, "val", budget.eval_images, world.label_set, world.objects)
                    for d in (world.source, *world.validation)],
            "test": [_synthetic(d, "val", budget.eval_images, world.label_set, world.objects) for d in targets],
            "crop_size": [crop, crop],
            "scales": [crop, crop + crop // 4, crop + crop // 2, 2 * crop],  # random short side, 1x-2x
            "num_workers": 0,
        },
        "train": {"iters": budget.iters, "batch_size": 4, "lr": world.lr,
                  "warmup_iters": min(world.warmup_iters, budget.iters // 8),  # short budgets: a shorter warm-up
                  "seed": seed, "device": device,
                  "eval_interval": 0, "checkpoint_interval": interval, "keep_checkpoints": 0,
                  "log_interval": max(budget.iters // 4, 1)},
        "eval": {"mode": "whole"},
    }
    if world.head_optim:
        raw["train"]["head_optim"] = dict(world.head_optim)
    if world.precise_bn_batches:
        raw["eval"]["precise_bn_batches"] = world.precise_bn_batches
    raw["train"]["lr_decay"] = world.lr_decay
    if override_items:
        raw = apply_overrides(raw, override_items)
    return from_dict(ExperimentConfig, raw, source="the demo's experiment" + (" with overrides" if override_items else ""))


@dataclass
class MethodResult:
    """One row of the table: trainable backbone parameters, mIoU (%) per dataset, time taken."""

    method: str
    run_dir: Path
    trainable: int
    miou: dict[str, float] = field(default_factory=dict)  # source val first, then the targets
    seconds: float = 0.0
    # iteration -> mIoU per dataset, at curve_iterations (the last one is ``miou``)
    curve: dict[int, dict[str, float]] = field(default_factory=dict)


def evaluate_model_file(cfg: ExperimentConfig, path: Path, *, ctx=None, progress: bool = False,
                        precise_bn: bool = True, ema_state: Optional[dict] = None):
    """Build ``cfg``'s model, load the model file ``path`` as `dgss eval` does (with
    ``eval.precise_bn_batches``, its BatchNorm statistics estimated again first, unless ``precise_bn`` is
    false: a file whose statistics were just estimated) and evaluate it on the source val split and every
    target. ``ema_state``: a training checkpoint's weight EMA (its state file's "ema"), put into the model
    before the statistics are estimated, so that a checkpoint is scored as the final model of a
    ``train.ema`` run is (the average). Returns (DatasetResults, source val first; the Segmentor)."""
    from tqdm import tqdm

    from ..engine.checkpoint import load_model_weights
    from ..engine.distributed import DistContext
    from ..engine.evaluate import evaluate_dataset
    from ..engine.trainer import seed_everything
    from ..tuning.model import build_segmentor

    ctx = ctx or DistContext()
    seed_everything(cfg.train.seed)
    model = build_segmentor(cfg)
    load_model_weights(model, path)  # frozen-backbone files re-attach the foundation ViT, fingerprint-checked
    if ema_state:
        from ..engine.ema import WeightEMA

        average = WeightEMA()
        average.load_state_dict(ema_state, model, source=str(path))  # checks names and shapes
        average.copy_to(model)
    model.to(ctx.device)
    if precise_bn and cfg.eval.precise_bn_batches > 0:
        from ..engine.precise_bn import recalibrate_batch_norm

        recalibrate_batch_norm(model, cfg, cfg.eval.precise_bn_batches)
    datasets = [*cfg.data.val, *cfg.data.test]
    results = [evaluate_dataset(model, ds, cfg, ctx, num_workers=0)
               for ds in tqdm(datasets, desc=f"evaluate {cfg.name}", disable=not progress, dynamic_ncols=True,
                              unit="domain")]
    return results, model


def run_method(cfg: ExperimentConfig, *, progress: bool = True, keep_fisher_scores: bool = True,
               keep_checkpoints: bool = False):
    """Train ``cfg`` with the engine, reload its model file as `dgss eval` does and evaluate it on the
    source val split and every target; the same for each checkpoint of the learning curve
    (``train.checkpoint_interval``), whose files are deleted afterwards unless ``keep_checkpoints``.
    Returns (MethodResult, the reloaded Segmentor, the Trainer)."""
    from ..engine.checkpoint import checkpoint_paths, load_training_state
    from ..engine.evaluate import write_results
    from ..engine.trainer import Trainer

    start = time.time()
    cfg.train.progress_bar = progress
    trainer = Trainer(cfg)
    if keep_fisher_scores and hasattr(trainer.model.method, "keep_scores"):
        trainer.model.method.keep_scores = True  # for the DR-FIM distribution plot
    final = trainer.train()

    curve = {}
    interval = cfg.train.checkpoint_interval
    checkpoints = range(interval, cfg.train.iters, interval) if interval > 0 else ()  # the last: the final model
    for iteration in checkpoints:
        model_path, state_path = checkpoint_paths(trainer.checkpoint_dir, iteration)
        # with train.ema the final model holds the average, so every point of the curve does
        ema_state = load_training_state(state_path).get("ema") if cfg.train.ema.enabled else None
        results, _ = evaluate_model_file(cfg, model_path, ctx=trainer.ctx, progress=progress, ema_state=ema_state)
        curve[iteration] = {r.name: r.miou for r in results}
    results, model = evaluate_model_file(cfg, final, ctx=trainer.ctx, progress=progress)
    curve[cfg.train.iters] = {r.name: r.miou for r in results}
    if not keep_checkpoints and cfg.train.checkpoint_interval > 0:
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)  # evaluated; the final model stays
    # eval/results.* hold the targets and their mean, as `dgss eval` writes them and as the demo's table
    # averages them; the source (model selection's domain, never a target) goes to eval/source.*
    num_source = len(cfg.data.val)
    write_results(results[num_source:], cfg.run_dir / "eval", checkpoint=str(final))
    write_results(results[:num_source], cfg.run_dir / "eval", stem="source", checkpoint=str(final))
    row = MethodResult(cfg.method.name, cfg.run_dir, int(model.method.num_trainable_backbone_parameters()),
                       {r.name: r.miou for r in results}, time.time() - start, curve)
    return row, model, trainer


def pick_threads(requested: Optional[int]) -> int:
    """Intra-op threads: the request, else 1. The demo's tensors are small; on a busy 2-core machine
    several threads per process mostly wait on each other."""
    threads = requested if requested else 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
