"""FisherTune figures (not a test): what the ranking selects, how reproducible it is, what it costs.

    python benchmarks/bench_fishertune.py                      # the demo ViT on CPU, about 15 minutes
    python benchmarks/bench_fishertune.py --quick              # fewer batches, about 3 minutes
    python benchmarks/bench_fishertune.py --skip-ranking --backbone dinov2_l --full-size --img 512   # cost only

1. Ranking, on the shipped demo foundation ViT (`dgss demo`'s FisherTune experiment: its head warm-up,
   its source data): two estimates of ``--num-batches`` batches each on disjoint halves of the source
   stream, plain and variational. For every ranking (FIM, Delta F, DR-FIM of each estimate, and random):
   the split-half Jaccard of the top-delta_max sets (stability), the overlap of the DR-FIM set with the
   FIM-only, Delta-F-only and random sets, where the DR-FIM set lands (share of the budget per module
   type; the fraction of q + k, v and FFN entries selected, as the paper's Fig. 6 states it), and the
   share of entries where the prior dominates the posterior. ``--balance`` / ``--normalization`` /
   ``--prior-quantile`` re-score the same estimates with other settings (the defaults' choice).
2. Cost: the estimate (per-sample Fisher, x and x') against FisherTune's own training step, as a share
   of a 40k-iteration schedule. A few passes are timed and the configured ``num_batches`` are
   extrapolated (on a CPU a full DINOv2-L estimate takes hours; the ratio does not need it).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dgss.config import load_config
from dgss.tuning.model import build_segmentor
from dgss.tuning.fishertune.drfim import SCORE_MODES, selection_scores
from dgss.tuning.fishertune.report import _HeadWarmupTrainer, fig6_summary, group_counts, jaccard, top_positions
from dgss.tuning.fishertune.selection import random_scores


def demo_model(num_batches: int):
    """The demo's FisherTune experiment: model, a trainer-like source stream, and the head warmed up."""
    from dgss.data.loader import build_train_loader
    from dgss.testbed.supervised_foundation import foundation_weights
    from dgss.testbed.experiment import FULL_BUDGET, demo_config

    cfg = demo_config("fishertune", budget=FULL_BUDGET, out_dir="/tmp/bench_fishertune",
                      weights=str(foundation_weights(progress=False)))
    cfg.method.fishertune.num_batches = num_batches
    torch.manual_seed(cfg.train.seed)
    model = build_segmentor(cfg)
    trainer = _HeadWarmupTrainer(cfg, model, build_train_loader(cfg), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameter_groups(cfg.train.lr, cfg.train.weight_decay))
    model.train()
    for _ in range(cfg.method.fishertune.warmup_iters):
        batch = trainer.next_batch()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return cfg, model, trainer


def settings(args) -> list[dict]:
    """The score settings to compare: the method's defaults first, then each variation asked for."""
    out = [{}]
    out += [{"domain_balance": b} for b in args.balance]
    out += [{"normalization": n} for n in args.normalization]
    out += [{"prior_quantile": q} for q in args.prior_quantile]
    return out


def ranking(args) -> None:
    cfg, model, trainer = demo_model(args.num_batches)
    method = model.method
    base = method.drfim_options()
    k, names = method.capacity, [t.name for t in method.tensors]
    halves = [[trainer.next_batch() for _ in range(args.num_batches)] for _ in range(2)]
    print(f"1. ranking on the demo ViT ({method.num_eligible:,} eligible entries, top {100 * cfg.method.fishertune.delta_max:g}% "
          f"= {k:,}); two halves of {args.num_batches} batches x {cfg.train.batch_size} images; defaults {base}",
          flush=True)
    cache: dict = {}

    def estimate(half: int, variational: bool, options):
        # The estimate depends on the options only through the posterior (variational: prior quantile and
        # the per-tensor or global data scale); re-scoring the same estimate covers the rest.
        key = (half, variational, options.prior_quantile if variational else None,
               options.normalization if variational else None)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = method.run_estimate(model, iter(halves[half]), dataclasses.replace(options, variational=variational),
                                             seed=half)
            cache[key, "s"] = time.perf_counter() - t0
        return cache[key]

    def top(est, mode, options):
        scores = selection_scores(est, mode, options, cfg.method.fishertune.delta_max)
        return top_positions([scores[n] for n in names], k)

    random_sets = [top_positions(random_scores([t.shape for t in method.tensors], seed), k) for seed in (1, 2)]
    header = (f"   {'setting':<30} {'estimate':<12} {'stab DR-FIM':>11} {'stab FIM':>9} {'stab dF':>8} "
              f"{'ov FIM':>7} {'ov dF':>6} {'ov rnd':>7} {'embed':>6} {'q+k':>5} {'v':>5} {'ffn':>5} {'deep':>5} {'prior':>6}")
    print(header)
    for change in settings(args):
        options = dataclasses.replace(base, **change)
        label = ", ".join(f"{key}={value}" for key, value in change.items()) or "defaults"
        for variational in (True, False):
            if not variational and "prior_quantile" in change:
                continue  # the plain estimate has no prior
            sets = {mode: [top(estimate(h, variational, options), mode, options) for h in range(2)] for mode in SCORE_MODES}
            chosen = sets["drfim"][0]
            stats = group_counts(method.tensors, chosen)
            stats.update(selected=k, eligible=method.num_eligible)
            fig6 = fig6_summary(stats)
            embed = stats["per_type"].get("embed", (0, 1))[0] / k
            prior = estimate(0, variational, options).prior_dominated_share()
            print(f"   {label:<30} {'variational' if variational else 'plain':<12} "
                  f"{jaccard(*sets['drfim']):>11.3f} {jaccard(*sets['fisher']):>9.3f} {jaccard(*sets['domain']):>8.3f} "
                  f"{jaccard(chosen, sets['fisher'][0]):>7.3f} {jaccard(chosen, sets['domain'][0]):>6.3f} "
                  f"{jaccard(chosen, random_sets[0]):>7.3f} {embed:>6.1%} {fig6['fraction_qk']:>5.1%} "
                  f"{fig6['fraction_v']:>5.1%} {fig6['fraction_ffn']:>5.1%} {fig6['deeper_half_share']:>5.1%} "
                  f"{'-' if prior is None else f'{prior:.1%}':>6}", flush=True)
    print(f"   random (two seeds): stability {jaccard(*random_sets):.3f}")
    seconds = [v for key, v in cache.items() if isinstance(key, tuple) and key[-1] == "s"]
    print(f"   one estimate of {args.num_batches} batches: {sum(seconds) / len(seconds):.1f} s on average")
    print("   stab: split-half Jaccard of the top sets; ov: Jaccard of the DR-FIM set with the FIM-only, Delta-F-only "
          "and random sets (half 1); embed: share of the DR-FIM budget in patch/position embeddings; q+k, v, ffn: "
          "fraction of those entries selected; deep: share of the block budget in the deeper half of the blocks; "
          "prior: entries where the prior dominates the posterior")


def costs(args) -> None:
    tiny = [] if args.full_size else [f"model.backbone_kwargs={{depth: {args.depth}, embed_dim: {args.width}, "
                                      "num_heads: 4, init_values: 1.0}"]
    cfg = load_config(overrides=[f"model.backbone={args.backbone}", f"model.img_size={args.img}", "method.name=fishertune",
                                 "method.fishertune.warmup_iters=0", *tiny])
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_segmentor(cfg).to(device)
    method = model.method
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    labels = torch.randint(0, 19, (args.batch, args.img, args.img), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = iter([{"image": images, "label": labels}] * 10_000)
    saved = method.cfg.num_batches
    method.cfg.num_batches = args.cost_batches
    if device.type == "cuda":
        method.estimate(model, batches, seed=0)  # warms the kernels up
        sync()
    t0 = time.perf_counter()
    method.select(method.estimate(model, batches, seed=0))
    sync()
    estimate_s = (time.perf_counter() - t0) / args.cost_batches * saved
    method.cfg.num_batches = saved
    method.num_active.fill_(method.capacity)  # the stage-3 step at delta_max (its most expensive)
    opt = torch.optim.AdamW(model.parameter_groups(1e-4, 0.05))
    model.train()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = model.loss(images, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    step = sorted(times[1:])[len(times[1:]) // 2]
    passes = 2 * saved * (args.batch if cfg.method.fishertune.per_sample else 1)
    shape = "full size" if args.full_size else f"{args.depth} blocks x {args.width}"
    print(f"\n2. cost on {args.backbone} ({shape}), {args.img} x {args.img}, batch {args.batch}, {device}, per-sample Fisher: "
          f"{args.cost_batches} of {saved} batches timed")
    print(f"   estimate {estimate_s:.1f} s ({passes} passes, {1000 * estimate_s / passes:.0f} ms each) = "
          f"{estimate_s / step:.0f} FisherTune training steps ({1000 * step:.0f} ms) = "
          f"{100 * estimate_s / step / 40000:.2f}% of a 40k schedule")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 batches per half, a small cost model")
    parser.add_argument("--num-batches", type=int, default=40, help="batches per estimate (per half)")
    parser.add_argument("--balance", type=float, nargs="*", default=[], help="other domain_balance values")
    parser.add_argument("--normalization", nargs="*", default=[], choices=["global", "tensor"])
    parser.add_argument("--prior-quantile", type=float, nargs="*", default=[])
    parser.add_argument("--skip-ranking", action="store_true")
    parser.add_argument("--backbone", default="dinov2_s")
    parser.add_argument("--full-size", action="store_true", help="the backbone's real depth and width")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--img", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cost-batches", type=int, default=2, help="batches actually timed for the cost")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the cost section's device (the ranking runs on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.num_batches = min(args.num_batches, 12)
    if not args.skip_ranking:
        ranking(args)
    costs(args)


if __name__ == "__main__":
    main()
