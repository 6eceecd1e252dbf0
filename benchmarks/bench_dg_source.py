"""Source-only diagnostic of finished DG benchmark runs (issue 22, precondition P2): each run's final model
re-evaluated on more `clean` val images than the benchmark uses, with the testbed's classes and with
car, truck, bus and train merged into one "vehicle" class after the argmax (Cityscapes' category).

    python benchmarks/bench_dg_source.py OUT/runs/frozen/seed0 OUT/runs/full/seed0 [--images 64]

One JSON line per run: mIoU over the run's classes and over them with the vehicles merged, and each
class's IoU (%). Source images only: it never looks at a target domain, so it may inform the world's
design (docs/figures/testbed_log.md, "P2 next").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VEHICLES = ("car", "truck", "bus", "train")


def confusion(pred: torch.Tensor, label: torch.Tensor, k: int) -> torch.Tensor:
    keep = label != 255
    return torch.bincount(label[keep] * k + pred[keep], minlength=k * k).view(k, k).double()


def iou(matrix: torch.Tensor) -> tuple[float, list[float]]:
    """(mIoU over the classes present in the labels, every class's IoU), in percent."""
    inter = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - inter
    present = matrix.sum(1) > 0
    return float((inter[present] / union[present]).mean() * 100), [float(v) * 100 for v in inter / union]


def merge(matrix: torch.Tensor, classes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The confusion matrix with the ``VEHICLES`` classes summed into one "vehicle" class."""
    merged = list(dict.fromkeys("vehicle" if name in VEHICLES else name for name in classes))
    position = [merged.index("vehicle" if name in VEHICLES else name) for name in classes]
    out = torch.zeros(len(merged), len(merged), dtype=matrix.dtype)
    for a, row in enumerate(position):
        for b, col in enumerate(position):
            out[row, col] += matrix[a, b]
    return out, merged


def evaluate(run: Path, images: int) -> dict:
    from dgss.config import load_config
    from dgss.data.builder import build_dataset
    from dgss.engine.checkpoint import load_model_weights
    from dgss.tuning.model import build_segmentor

    config, weights = run / "config.yaml", run / "model_final.safetensors"
    for path in (config, weights):
        if not path.is_file():
            raise SystemExit(f"bench_dg_source.py: error: {path} not found (a finished benchmark run folder)")
    cfg = load_config(config)
    source = cfg.data.val[0]  # the source val split comes first (dgss.testbed.experiment.demo_config)
    source.options["num_images"] = images
    dataset = build_dataset(source, cfg.data, train=False)
    model = build_segmentor(cfg)
    load_model_weights(model, weights)
    model.eval()
    classes = list(dataset.classes)
    matrix = torch.zeros(len(classes), len(classes), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            scores = model.inference(sample["image"][None], out_size=tuple(sample["label"].shape[-2:]))
            matrix += confusion(scores.argmax(1)[0].flatten(), sample["label"].flatten().long(), len(classes))
    miou, per_class = iou(matrix)
    merged, names = merge(matrix, classes)
    merged_miou, merged_per_class = iou(merged)
    return {"run": str(run), "domain": source.name, "images": images, "miou": round(miou, 2),
            "miou_vehicle_merged": round(merged_miou, 2),
            "iou": {c: round(v, 1) for c, v in zip(classes, per_class)},
            "iou_vehicle_merged": {c: round(v, 1) for c, v in zip(names, merged_per_class)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (OUT/runs/<row>/seed<k>)")
    parser.add_argument("--images", type=int, default=64, help="source val images (default 64; the benchmark: 16)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    torch.set_num_threads(args.threads)
    for run in args.runs:
        print(json.dumps(evaluate(run, args.images)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
