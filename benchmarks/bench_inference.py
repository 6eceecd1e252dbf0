"""Inference costs, as ratios measured in one run (not a test).

    python benchmarks/bench_inference.py            # ViT-L width, 4 blocks, 512; a few minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # 2 blocks, smaller inputs
    python benchmarks/bench_inference.py --quick --only modes   # the inference modes (docs/inference.md)

1. Sliding-window evaluation: ``Segmentor.slide_inference`` on a 512 x 1024 image (3 windows of 512,
   stride 341) against ``Segmentor.predict`` of the identical windows stacked in one batch.
2. Rein at inference: the Rein backbone's forward against the frozen backbone's (same weights), through
   Rein's inference path and through its training-time equations, and the whole ``predict`` of each
   (Rein's head takes Rein's queries).
3. Multi-scale deformable attention at the pixel decoder's 512 shapes (levels 16^2, 32^2, 64^2, 8 heads
   of 32, 4 points, N_q = N_v = 5376): the single-``grid_sample`` default, the per-level form, the
   Python-loop reference (timed on a few queries, scaled to all) and ``torch.compile`` of the default.
4. Inference modes (``eval.mode``, ``eval.scale``; dgss.models.inference): time per image of
   ``Segmentor.inference`` on the Cityscapes protocol's geometry at ``--img`` (an img x 2 img image,
   windows of img at stride 2/3 img: 3 windows; labels at twice that, as Cityscapes' 2048 x 1024),
   for slide, whole, slide at scale 2 (18 windows) and coarse-to-fine at scales 1 and 2, as ratios to
   the plain sliding window.

Medians of ``--repeats`` runs after ``--warmup`` runs, alternatives interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from dgss.config import load_config
from dgss.models.mask2former.deformable_attention import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_per_level,
)
from dgss.models.segmentor import sliding_windows
from dgss.tuning.model import build_segmentor
from dgss.tuning import rein as rein_module


def run_times(fns: dict, warmup: int, repeats: int) -> dict:
    """Each function's times after the warm-up; all run once per repeat, in an order that rotates every
    repeat (so that none always pays for what the one before it left behind: allocator, caches)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for rep in range(warmup + repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: v[warmup:] for k, v in times.items()}


def median_times(fns: dict, warmup: int, repeats: int) -> dict:
    return {k: statistics.median(v) for k, v in run_times(fns, warmup, repeats).items()}


def build(args, method: str):
    cfg = load_config(overrides=[f"method.name={method}", "model.backbone=dinov2_l", f"model.img_size={args.img}",
                                 f"model.backbone_kwargs={{depth: {args.depth}}}",
                                 f"eval.crop_size=[{args.img},{args.img}]", f"eval.stride=[{args.img * 2 // 3},{args.img * 2 // 3}]"])
    torch.manual_seed(0)
    return build_segmentor(cfg).eval()


@torch.no_grad()
def sliding(args) -> None:
    model = build(args, "rein")
    image = torch.randn(1, 3, args.img, 2 * args.img)
    crop, stride = model.eval_cfg.crop_size, model.eval_cfg.stride
    boxes = sliding_windows(args.img, 2 * args.img, crop, stride)
    windows = torch.stack([image[0, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    t = median_times({"slide": lambda: model.slide_inference(image), "batched": lambda: model.predict(windows)},
                     args.warmup, args.repeats)
    print(f"1. sliding window, {len(boxes)} windows of {crop[0]} (stride {stride[0]}) on 1 x {args.img} x {2 * args.img}:")
    print(f"   slide_inference {t['slide']:.2f} s, batched predict of the same windows {t['batched']:.2f} s: "
          f"throughput {t['batched'] / t['slide']:.3f} x the batched forward (target >= 0.9)")


@torch.no_grad()
def rein_overhead(args) -> None:
    frozen, rein = build(args, "frozen"), build(args, "rein")
    rein.backbone.model.load_state_dict(frozen.backbone.model.state_dict())
    x = torch.randn(1, 3, args.img, args.img)
    def equations_path():
        """The Rein backbone through ``Reins.refine``'s training-time equations (no cached operands)."""
        with mock.patch.object(rein_module, "_inference_only", lambda: False):
            return rein.backbone(x)

    raw = run_times({"frozen backbone": lambda: frozen.backbone(x), "rein backbone": lambda: rein.backbone(x),
                     "rein backbone, equations": equations_path,
                     "frozen predict": lambda: frozen.predict(x), "rein predict": lambda: rein.predict(x),
                     "rein queries": lambda: rein.method.head_queries()}, args.warmup, args.repeats)
    t = {k: statistics.median(v) for k, v in raw.items()}
    fastest = {k: min(v) for k, v in raw.items()}  # the least disturbed run, for a loaded machine

    def overhead(name, base):
        return (f"overhead {100 * (t[name] / t[base] - 1):+.1f}% by medians, "
                f"{100 * (fastest[name] / fastest[base] - 1):+.1f}% by fastest runs")

    print(f"2. Rein at inference ({args.depth} blocks of width 1024, 1 x {args.img} x {args.img}):")
    print(f"   backbone forward: frozen {t['frozen backbone']:.3f} s, rein {t['rein backbone']:.3f} s: "
          f"{overhead('rein backbone', 'frozen backbone')} (target <= 5%)")
    print(f"   the same through the training-time equations: {t['rein backbone, equations']:.3f} s: "
          f"{overhead('rein backbone, equations', 'frozen backbone')}")
    print(f"   whole predict:    frozen {t['frozen predict']:.3f} s, rein {t['rein predict']:.3f} s: "
          f"{overhead('rein predict', 'frozen predict')}")
    print(f"   head_queries() in eval mode: {1e6 * t['rein queries']:.0f} us per call")

    # Per layer, where the backbone's noise does not reach: one block against Rein's refinement of its
    # output and against the refinement's floor, the C x C product of mlp_delta_f over every token.
    tokens = torch.randn(1, 1 + (args.img // 16) ** 2, 1024)
    block, reins = frozen.backbone.blocks[1], rein.method.reins
    patches = tokens[:, 1:].reshape(-1, 1024)
    floor_weight = reins._inference_operands(torch.float32)[2]
    layer = run_times({"block": lambda: block(tokens),
                       "refine": lambda: rein.method._refine_block_output(0, 1, block, (tokens,), tokens),
                       "floor": lambda: patches @ floor_weight}, args.warmup, 5 * args.repeats)
    lt = {k: statistics.median(v) for k, v in layer.items()}
    print(f"   per layer: block {1000 * lt['block']:.1f} ms, Rein's refinement (hook) {1000 * lt['refine']:.2f} ms "
          f"= {100 * lt['refine'] / lt['block']:.1f}% of the block; its floor, the C x C product alone, "
          f"{1000 * lt['floor']:.2f} ms = {100 * lt['floor'] / lt['block']:.1f}%")


def deformable(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_mask2former import reference_deformable_attention

    scale = args.img // 512
    shapes = [(16 * scale, 16 * scale), (32 * scale, 32 * scale), (64 * scale, 64 * scale)] if scale else \
        [(args.img // 32,) * 2, (args.img // 16,) * 2, (args.img // 8,) * 2]
    n = sum(h * w for h, w in shapes)
    torch.manual_seed(0)
    value = torch.randn(1, n, 8, 32, requires_grad=True)
    locations = (torch.rand(1, n, 8, 3, 4, 2) * 1.2 - 0.1).requires_grad_(True)
    weights = torch.rand(1, n, 8, 3, 4).softmax(-1).requires_grad_(True)
    grad = torch.randn(1, n, 256)

    def fwd_bwd(fn):
        def run():
            out = fn(value, shapes, locations, weights)
            torch.autograd.backward(out, grad)
        return run

    fns = {"default (one grid_sample)": multi_scale_deformable_attention,
           "per level": multi_scale_deformable_attention_per_level}
    compiled = None
    if not args.skip_compile:
        try:
            compiled = torch.compile(multi_scale_deformable_attention, dynamic=False)
            t0 = time.perf_counter()
            fwd_bwd(compiled)()
            torch.testing.assert_close(compiled(value, shapes, locations, weights),
                                       multi_scale_deformable_attention(value, shapes, locations, weights),
                                       atol=1e-4, rtol=1e-4)  # fp32 re-association only
            print(f"   (torch.compile: first call {time.perf_counter() - t0:.0f} s)")
            fns["torch.compile(default)"] = compiled
        except Exception as exc:  # noqa: BLE001 (a benchmark reports what happened)
            print(f"   torch.compile failed on this machine: {type(exc).__name__}: {str(exc)[:200]}")
    with torch.no_grad():
        fwd = median_times({k: (lambda f=f: f(value, shapes, locations, weights)) for k, f in fns.items()},
                           args.warmup, args.repeats)
    both = median_times({k: fwd_bwd(f) for k, f in fns.items()}, args.warmup, args.repeats)
    # The loop reference on a few queries, scaled to all N_q (it is linear in the number of queries).
    few = args.reference_queries
    t0 = time.perf_counter()
    with torch.no_grad():
        reference_deformable_attention(value.detach()[:, :], shapes, locations.detach()[:, :few], weights.detach()[:, :few])
    ref = (time.perf_counter() - t0) * n / few
    print(f"3. deformable attention, levels {shapes}, N_q = N_v = {n}, 8 heads x 32, 4 points, batch 1:")
    base_f, base_b = fwd["default (one grid_sample)"], both["default (one grid_sample)"]
    for k in fns:
        print(f"   {k:<26} forward {1000 * fwd[k]:7.1f} ms ({fwd[k] / base_f:4.2f} x default), "
              f"forward + backward {1000 * both[k]:7.1f} ms ({both[k] / base_b:4.2f} x default)")
    print(f"   {'loop reference':<26} forward {ref:7.0f} s   ({ref / base_f:,.0f} x default; timed on {few} queries)")


MODES = [  # (label, eval overrides)
    ("slide (scale 1)", dict(mode="slide", scale=1.0)),
    ("whole (scale 1)", dict(mode="whole", scale=1.0)),
    ("slide, scale 2", dict(mode="slide", scale=2.0)),
    ("coarse_to_fine (coarse 0.5, fine 1)", dict(mode="coarse_to_fine", scale=1.0, coarse_scale=0.5)),
    ("coarse_to_fine (coarse 0.5, fine 2)", dict(mode="coarse_to_fine", scale=2.0, coarse_scale=0.5)),
]


@torch.no_grad()
def modes(args) -> None:
    import dataclasses

    # a tiny model (the demo's: a DINOv2-shaped ViT of 6 blocks, width 96; Mask2Former with 64 channels and
    # 20 queries): the ratios are those of the number of windows and pixels, the absolute times a CPU's
    cfg = load_config(overrides=["method.name=frozen", "model.backbone=dinov2_s", f"model.img_size={args.img}",
                                 "model.backbone_kwargs={depth: 6, embed_dim: 96, num_heads: 3}",
                                 "model.head.hidden_dim=64", "model.head.num_queries=20",
                                 f"eval.crop_size=[{args.img},{args.img}]",
                                 f"eval.stride=[{args.img * 2 // 3},{args.img * 2 // 3}]"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    image = torch.randn(1, 3, args.img, 2 * args.img)
    labels = (2 * args.img, 4 * args.img)
    base = model.eval_cfg

    def timed(changes):
        def run():
            model.eval_cfg = dataclasses.replace(base, **changes)
            return model.inference(image, out_size=labels)
        return run

    t = median_times({label: timed(changes) for label, changes in MODES}, args.warmup, args.repeats)
    plain = t[MODES[0][0]]
    print(f"4. inference modes (a ViT of 6 blocks, width 96; Mask2Former head), one {args.img} x {2 * args.img} "
          f"image, windows {base.crop_size[0]} / stride {base.stride[0]}, scores to {labels[0]} x {labels[1]}:")
    for label, _ in MODES:
        print(f"   {label:<38} {t[label]:7.2f} s per image  {t[label] / plain:5.2f} x slide")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--img", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-queries", type=int, default=4)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--only", choices=["sliding", "rein", "deformable", "modes"])
    parser.add_argument("--quick", action="store_true", help="2 blocks at 256, 1 warm-up, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.img, args.warmup, args.repeats = 2, 256, 1, 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name, fn in (("sliding", sliding), ("rein", rein_overhead), ("deformable", deformable), ("modes", modes)):
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
