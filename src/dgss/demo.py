"""`dgss demo`: the domain-generalization story end to end on a CPU, with synthetic domains.

A tiny ViT is fine-tuned on one synthetic domain with each tuning method, using the real segmentor,
head, data pipeline and mIoU code (only the sizes are small), then evaluated on the source domain and
on unseen target domains. The numbers are a synthetic sanity check, not the papers' benchmarks.

This is the interim demo of the foundation issues; the full demo (a pretrained "foundation" ViT,
FisherTune, plots and overlays) builds on the engine and FisherTune.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import DatasetConfig, ExperimentConfig, from_dict, save_config
from .data import build_eval_loader, build_train_loader
from .engine.metrics import ConfusionMatrix
from .models.segmentor import build_segmentor

__all__ = ["run_demo", "demo_config"]

SOURCE = "textured"
TARGETS = ("night", "fog", "colorshift")


def demo_config(method: str, *, quick: bool, out_dir: str) -> ExperimentConfig:
    """A tiny but complete experiment: DINOv2-shaped ViT (4 blocks, width 64), small Mask2Former."""
    size = [96, 192] if quick else [128, 256]

    def synthetic(domain: str, split: str, n: int) -> dict:
        return {"type": "synthetic", "split": split, "name": domain,
                "options": {"domain": domain, "num_images": n, "size": size}}

    raw = {
        "name": f"demo_{method}",
        "output_dir": out_dir,
        "model": {
            "backbone": "dinov2_s",
            "img_size": size[0],
            "backbone_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 4},
            "head": {"hidden_dim": 64, "num_queries": 20, "num_heads": 4, "pixel_decoder_layers": 1,
                     "pixel_decoder_ffn_dim": 128, "decoder_layers": 3, "decoder_ffn_dim": 128,
                     "num_points_loss": 1024},
        },
        "method": {"name": method, "rein": {"num_tokens": 20, "lora_rank": 4, "query_dim": 64}},
        "data": {
            "train": [synthetic(SOURCE, "train", 64)],
            "val": [synthetic(SOURCE, "val", 8)],
            "test": [synthetic(d, "val", 8) for d in TARGETS],
            "crop_size": [size[0], size[0]],
            "scales": [size[0], size[0] + size[0] // 4, size[0] + size[0] // 2],
            "num_workers": 0,
        },
        "train": {"iters": 40 if quick else 200, "batch_size": 4, "lr": 1e-3, "seed": 0},
        "eval": {"mode": "whole"},
    }
    return from_dict(ExperimentConfig, raw)


def evaluate(model, ds_cfg: DatasetConfig, cfg: ExperimentConfig) -> float:
    cm = ConfusionMatrix(cfg.model.head.num_classes)
    model.eval()
    with torch.no_grad():
        for batch in build_eval_loader(ds_cfg, cfg.data, num_workers=0):
            if batch is None:
                continue
            for image, label in zip(batch["image"], batch["label"]):
                scores = model.inference(image[None], out_size=label.shape[-2:])
                cm.update(scores.argmax(1)[0], label)
    return 100 * cm.miou()


def train(model, cfg: ExperimentConfig) -> float:
    torch.manual_seed(cfg.train.seed)
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.train.lr, cfg.train.weight_decay))
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.train.iters, power=0.9)
    loader = build_train_loader(cfg, num_workers=0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(cfg.train.iters):
        batch = next(loader)
        loss = model.loss(batch["image"], batch["label"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, cfg.train.iters // 5) == 0:
            print(f"  step {step + 1:4d}/{cfg.train.iters}  loss {loss.item():.3f}", flush=True)
    return float(loss.detach())


def run_demo(out_dir: str = "demo_output", quick: bool = False, methods=("frozen", "rein", "full")) -> list[dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    rows = []
    for method in methods:
        cfg = demo_config(method, quick=quick, out_dir=out_dir)
        save_config(cfg, cfg.run_dir / "config.yaml")
        torch.manual_seed(0)
        model = build_segmentor(cfg)
        trainable = model.method.num_trainable_backbone_parameters()
        print(f"[{method}] training {cfg.train.iters} iterations on '{SOURCE}' "
              f"({trainable:,} trainable backbone parameters)", flush=True)
        train(model, cfg)
        row = {"method": method, "trainable": trainable, "source": evaluate(model, cfg.data.val[0], cfg)}
        for ds_cfg in cfg.data.test:
            row[ds_cfg.name] = evaluate(model, ds_cfg, cfg)
        row["mean"] = sum(row[t] for t in TARGETS) / len(TARGETS)
        rows.append(row)
    table = format_table(rows)
    print("\n" + table)
    path = Path(out_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")
    print(f"\nsynthetic sanity check, not the papers' benchmarks; {time.time() - start:.0f} s; table in {path}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["method", "trainable backbone params", f"{SOURCE} (source)", *TARGETS, "mean (targets)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['trainable']:,}", f"{r['source']:.1f}", *(f"{r[t]:.1f}" for t in TARGETS), f"{r['mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
