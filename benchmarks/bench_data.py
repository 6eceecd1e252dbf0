"""Data pipeline against the training step that consumes it, measured in one run (not a test).

    python benchmarks/bench_data.py              # about a minute on 2 cores
    python benchmarks/bench_data.py --workers 4 --batches 60

Producer: ``dgss.data.build_train_loader`` over the synthetic "clean" domain (128 x 256 scenes, the
512 recipe scaled to 128 crops: random scale, crop, flip, photometric distortion, normalisation),
batch 4, ``--workers`` worker processes; batches per second drawn by a main process that does nothing
else. Consumer: the training step (``model.loss`` + backward + AdamW) of the tiny Rein model the demo
trains (a 6-block ViT of width 96 with a 64-channel Mask2Former), on the same batch size and crop,
with ``torch.set_num_threads(--threads)``. Target: producer >= 3 x consumer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dgss.config import ExperimentConfig, from_dict
from dgss.data import build_train_loader
from dgss.tuning.model import build_segmentor


def tiny_config(out_dir: str, workers: int, batch: int) -> ExperimentConfig:
    crop = 128
    return from_dict(ExperimentConfig, {
        "output_dir": out_dir,
        "model": {"backbone": "dinov2_s", "img_size": 128, "patch_size": 16,
                  "backbone_kwargs": {"depth": 6, "embed_dim": 96, "num_heads": 3},
                  "head": {"type": "mask2former", "hidden_dim": 64, "num_queries": 20, "num_heads": 4,
                           "pixel_decoder_layers": 1, "pixel_decoder_ffn_dim": 128, "decoder_layers": 3,
                           "decoder_ffn_dim": 128, "num_points_loss": 1024}},
        "method": {"name": "rein", "rein": {"num_tokens": 20, "lora_rank": 4, "query_dim": 64}},
        "data": {"train": [{"type": "synthetic", "name": "clean",
                            "options": {"domain": "clean", "num_images": 10_000, "size": [128, 256]}}],
                 "crop_size": [crop, crop], "scales": [crop, crop + crop // 4, crop + crop // 2, 2 * crop],
                 "num_workers": workers},
        "train": {"batch_size": batch, "device": "cpu"},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40, help="batches drawn (after warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (after 3 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(tmp, args.workers, args.batch)
        loader = iter(build_train_loader(cfg))
        for _ in range(2 * max(args.workers, 1)):  # warm-up: workers started, first batches ready
            batch = next(loader)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(loader)
        produce = args.batches / (time.perf_counter() - t0)
        del loader

        torch.manual_seed(0)
        model = build_segmentor(cfg).train()
        opt = torch.optim.AdamW(model.parameter_groups(1e-3, 0.05))
        times = []
        for i in range(3 + args.steps):
            t0 = time.perf_counter()
            loss = model.loss(batch["image"], batch["label"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        consume = 1 / statistics.median(times[3:])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} of 128 x 128 crops")
    print(f"data pipeline, {args.workers} workers: {produce:6.1f} batches/s")
    print(f"tiny Rein training step:       {consume:6.1f} batches/s")
    print(f"pipeline / consumption: {produce / consume:.2f} x (target >= 3)")


if __name__ == "__main__":
    main()
