"""What GeCo's loss costs a training step, as ratios measured in one run (not a test).

    python benchmarks/bench_geco.py                 # a few minutes on 2 busy cores
    python benchmarks/bench_geco.py --repeats 3     # quicker, noisier

1. A training step (forward, backward, AdamW step) of a tiny SoMA segmentor (the demo's ViT: 6 blocks,
   width 96; Mask2Former with 64 channels and 20 queries; batch 4 of 128 crops) with ``loss.geco`` off
   and on (from iteration 0): the loss adds a head pass on the perturbed maps and the perturbation.
2. The perturbation alone at the 512 recipe's shape on DINOv2-L (batch 4, the stride-32 map of a 512
   crop: 16 x 16 = 256 tokens of width 1024), the k-nearest-neighbour search and the 8 x 8
   eigendecompositions included.

Medians of ``--repeats`` runs after ``--warmup``, the alternatives interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dgss.config import GeCoLossConfig, load_config
from dgss.models.geco import perturb_feature_map
from dgss.tuning.model import build_segmentor

from bench_inference import run_times

TINY = ["method.name=soma", "method.soma.rank=4", "method.soma.start_block=2", "model.backbone=dinov2_s",
        "model.img_size=128", "model.backbone_kwargs={depth: 6, embed_dim: 96, num_heads: 3}",
        "model.head.hidden_dim=64", "model.head.num_queries=20", "model.head.num_points_loss=1024",
        "train.device=cpu"]


def medians(fns: dict, warmup: int, repeats: int) -> dict:
    """Each function's median time (bench_inference.run_times: interleaved, in a rotating order)."""
    return {k: statistics.median(v) for k, v in run_times(fns, warmup, repeats).items()}


def training_step(args) -> None:
    images = torch.randn(4, 3, 128, 128)
    labels = torch.randint(0, 19, (4, 128, 128))
    steps = {}
    for label, extra in (("loss.geco off", []), ("loss.geco on", ["loss.geco.enabled=true", "loss.geco.start_iter=0"])):
        cfg = load_config(overrides=TINY + extra)
        torch.manual_seed(0)
        model = build_segmentor(cfg).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model.loss(images, labels, iteration=0)["loss"].backward()
            optimizer.step()

        steps[label] = step
    t = medians(steps, args.warmup, args.repeats)
    base = t["loss.geco off"]
    print("1. a training step of a tiny SoMA segmentor (batch 4 of 128 x 128):")
    for label, seconds in t.items():
        print(f"   {label:<14} {seconds:6.3f} s  {seconds / base:5.2f} x")


@torch.no_grad()
def perturbation(args) -> None:
    feature = torch.randn(4, 1024, 16, 16)
    cfg = GeCoLossConfig(enabled=True)
    t = medians({"perturbation": lambda: perturb_feature_map(feature, cfg)}, args.warmup, args.repeats)
    print(f"2. the perturbation of a 4 x 1024 x 16 x 16 map (DINOv2-L, 512 crops, batch 4): "
          f"{1000 * t['perturbation']:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    training_step(args)
    perturbation(args)


if __name__ == "__main__":
    main()
