"""The demo's experiments: one config per method, trained by the engine and evaluated like `dgss eval`.

Every method gets the same experiment (the foundation ViT, a small Mask2Former head, the source
domain's images, the augmentation recipe, AdamW + poly, the iteration budget and the seed); only
``method.name`` differs. Each run is a normal dgss run under ``OUT/runs/<method>/`` (config.yaml,
logs, model_final.safetensors, eval/results.{json,md}), so ``dgss eval OUT/runs/rein/config.yaml
--checkpoint OUT/runs/rein/model_final.safetensors`` reproduces its row of the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import ExperimentConfig, from_dict
from .foundation import FOUNDATION

__all__ = ["SOURCE", "TARGETS", "METHODS", "DemoBudget", "FULL_BUDGET", "QUICK_BUDGET", "demo_config",
           "MethodResult", "run_method"]

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


FULL_BUDGET = DemoBudget(iters=400, train_images=400, eval_images=24, fisher_batches=8, overlay_images=2)
QUICK_BUDGET = DemoBudget(iters=40, train_images=64, eval_images=6, fisher_batches=4, overlay_images=1)


def _synthetic(domain: str, split: str, n: int) -> dict:
    return {"type": "synthetic", "split": split, "name": domain,
            "options": {"domain": domain, "num_images": n, "size": IMAGE_SIZE}}


def demo_config(method: str, *, budget: DemoBudget, out_dir: str | Path, weights: Optional[str],
                targets: Sequence[str] = TARGETS, seed: int = 0) -> ExperimentConfig:
    """The demo experiment of ``method``: the foundation ViT (6 blocks, width 96, patch 16) with a small
    Mask2Former (64 channels, 20 queries, 3 decoder layers), 128 x 128 crops of the source domain,
    batch 4, AdamW lr 1e-3 (full fine-tuning: backbone x 0.1, as the papers), whole-image evaluation."""
    crop = IMAGE_SIZE[0]
    raw = {
        "name": method,
        "output_dir": str(Path(out_dir) / "runs"),
        "model": {
            "backbone": FOUNDATION["backbone"], "weights": weights, "img_size": FOUNDATION["img_size"],
            "patch_size": FOUNDATION["patch_size"], "backbone_kwargs": dict(FOUNDATION["backbone_kwargs"]),
            "head": {"type": "mask2former", "hidden_dim": 64, "num_queries": 20, "num_heads": 4,
                     "pixel_decoder_layers": 1, "pixel_decoder_ffn_dim": 128, "decoder_layers": 3,
                     "decoder_ffn_dim": 128, "num_points_loss": 1024},
        },
        "method": {
            "name": method,
            "rein": {"num_tokens": 20, "lora_rank": 4, "query_dim": 64},
            "fishertune": {"warmup_iters": budget.fisher_warmup, "num_batches": budget.fisher_batches,
                           "rounds": 2, "delta_min": 0.01, "delta_max": 0.05},
        },
        "data": {
            "train": [_synthetic(SOURCE, "train", budget.train_images)],
            "val": [_synthetic(SOURCE, "val", budget.eval_images)],
            "test": [_synthetic(d, "val", budget.eval_images) for d in targets],
            "crop_size": [crop, crop],
            "scales": [crop, crop + crop // 4, crop + crop // 2, 2 * crop],  # random short side, 1x-2x
            "num_workers": 0,
        },
        "train": {"iters": budget.iters, "batch_size": 4, "lr": 1e-3, "seed": seed, "device": "cpu",
                  "eval_interval": 0, "checkpoint_interval": 0, "log_interval": max(budget.iters // 4, 1)},
        "eval": {"mode": "whole"},
    }
    return from_dict(ExperimentConfig, raw)


@dataclass
class MethodResult:
    """One row of the table: trainable backbone parameters, mIoU (%) per dataset, time taken."""

    method: str
    run_dir: Path
    trainable: int
    miou: dict[str, float] = field(default_factory=dict)  # source val first, then the targets
    seconds: float = 0.0


def run_method(cfg: ExperimentConfig, *, progress: bool = True, keep_fisher_scores: bool = True):
    """Train ``cfg`` with the engine, reload its model file as `dgss eval` does and evaluate it on the
    source val split and every target. Returns (MethodResult, the reloaded Segmentor, the Trainer)."""
    from tqdm import tqdm

    from ..engine.checkpoint import load_model_weights
    from ..engine.evaluate import evaluate_dataset, write_results
    from ..engine.trainer import Trainer, seed_everything
    from ..models.segmentor import build_segmentor

    start = time.time()
    cfg.train.progress_bar = progress
    trainer = Trainer(cfg)
    if keep_fisher_scores and hasattr(trainer.model.method, "keep_scores"):
        trainer.model.method.keep_scores = True  # for the DR-FIM distribution plot
    final = trainer.train()

    seed_everything(cfg.train.seed)
    model = build_segmentor(cfg)
    load_model_weights(model, final)  # frozen-backbone files re-attach the foundation ViT, fingerprint-checked
    datasets = [*cfg.data.val, *cfg.data.test]
    results = []
    for ds in tqdm(datasets, desc=f"evaluate {cfg.method.name}", disable=not progress, dynamic_ncols=True,
                   unit="domain"):
        results.append(evaluate_dataset(model, ds, cfg, num_workers=0))
    write_results(results, cfg.run_dir / "eval", checkpoint=str(final))
    row = MethodResult(cfg.method.name, cfg.run_dir, int(model.method.num_trainable_backbone_parameters()),
                       {r.name: r.miou for r in results}, time.time() - start)
    return row, model, trainer


def pick_threads(requested: Optional[int]) -> int:
    """Intra-op threads: the request, else 1. The demo's tensors are small; on a busy 2-core machine
    several threads per process mostly wait on each other."""
    threads = requested if requested else 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
