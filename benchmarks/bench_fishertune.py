"""FisherTune figures (not a test): selection stability, estimation cost, step time and memory.

    python benchmarks/bench_fishertune.py                 # small ViT on CPU, about two minutes
    python benchmarks/bench_fishertune.py --backbone dinov2_l --img 512 --batch 4 --device cuda --full-size

1. Stability (the paper's claim for the variational estimate): the top-5% sets estimated from two
   disjoint halves of the source data, compared by Jaccard overlap, for plain Fisher, plain DR-FIM and
   the variational DR-FIM (at the median and the 0.9 quantile for tau^-2).
2. Estimation cost: the whole stage-2 estimate in training iterations (one FisherTune stage-3 step),
   and as a share of a 40k-iteration schedule.
3. Step time (and CUDA peak memory) of FisherTune against Rein and full fine-tuning, same backbone
   and input; optimizer state bytes of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dgss.config import load_config
from dgss.data.synthetic import generate
from dgss.models.segmentor import build_segmentor

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def make_config(args, method: str, **fishertune):
    # A randomly initialised DINOv2 has LayerScale 1e-5: every block is nearly the identity and the
    # Fisher of its weights nearly zero (median ~1e-18), far below the ratio's eps. init_values 1
    # gives the stand-in backbone gradients of a realistic size.
    tiny = [] if args.full_size else [f"model.backbone_kwargs={{depth: {args.depth}, embed_dim: {args.width}, "
                                      "num_heads: 4, init_values: 1.0}"]
    head = ["model.head.type=fpn", "model.head.hidden_dim=64"] if args.head == "fpn" else []
    overrides = [f"model.backbone={args.backbone}", f"model.img_size={args.img}", f"method.name={method}",
                 f"method.fishertune.num_batches={args.num_batches}", f"method.fishertune.n_eff={args.images}",
                 "method.rein.num_tokens=100" if args.head != "fpn" else "method.rein.query_dim=64",
                 *tiny, *head]
    overrides += [f"method.fishertune.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fishertune.items()]
    return load_config(overrides=overrides)


_RENDERED: dict = {}


def rendered(seed: int, img: int):
    """One synthetic image and label, rendered once (rendering must not count as estimation time)."""
    if (seed, img) not in _RENDERED:
        image, label = generate("textured", seed, (img, img))
        _RENDERED[seed, img] = ((torch.from_numpy(image).permute(2, 0, 1).float() - MEAN) / STD,
                                torch.from_numpy(label).long())
    return _RENDERED[seed, img]


class Source:
    """Synthetic source images (textured domain), indices [start, start + count), cycled."""

    def __init__(self, start, count, batch, img, device):
        self.start, self.count, self.batch, self.img, self.device, self.next = start, count, batch, img, device, 0
        for i in range(count):
            rendered(start + i, img)

    def __call__(self):
        pairs = [rendered(self.start + (self.next + i) % self.count, self.img) for i in range(self.batch)]
        self.next += self.batch
        return {"image": torch.stack([p[0] for p in pairs]).to(self.device),
                "label": torch.stack([p[1] for p in pairs]).to(self.device)}


class Trainer:
    def __init__(self, cfg, model, source, device):
        self.cfg, self.model, self.next_batch, self.device = cfg, model, source, device
        self.total_iters, self.rank, self.world_size = 40000, 0, 1


def warm_head(model, source, iters):
    """Stage 1 (shared by every estimate below): the head trains on the frozen backbone."""
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    model.train()
    for _ in range(iters):
        batch = source()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def selection_set(method) -> set:
    sel = method.selection()
    starts = torch.cumsum(torch.tensor([t.numel for t in method.tensors]), 0) - torch.tensor([t.numel for t in method.tensors])
    tensor_id = torch.repeat_interleave(torch.arange(len(method.tensors)), sel.counts)
    return set((starts[tensor_id] + sel.index.cpu()).tolist())


def stability(args, device):
    base = make_config(args, "fishertune")
    torch.manual_seed(0)
    model = build_segmentor(base).to(device)
    warm_head(model, Source(10_000, args.images, args.batch, args.img, device), args.warmup)
    head_state = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.method.keep_scores = True
    settings = {
        "plain Fisher (ChildTune-D)": dict(selection="fisher", variational=False),
        "plain DR-FIM": dict(selection="drfim", variational=False),
        "variational DR-FIM, tau at median": dict(selection="drfim", variational=True, tau_quantile=0.5),
        "variational DR-FIM, tau at q0.9": dict(selection="drfim", variational=True, tau_quantile=0.9),
    }
    half = args.images // 2
    print(flush=True)
    print(f"1. stability: top-5% sets from two disjoint halves of {args.images} images "
          f"({args.num_batches} batches of {args.batch} each)")
    for label, options in settings.items():
        sets, seconds = [], 0.0
        for start in (0, half):
            method = model.method
            method.cfg = dataclasses.replace(base.method.fishertune, **options)
            model.head.load_state_dict(head_state)
            source = Source(start, half, args.batch, args.img, device)
            t0 = time.perf_counter()
            method.estimate_and_select(Trainer(base, model, source, device))
            seconds += time.perf_counter() - t0
            sets.append(selection_set(method))
        jaccard = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
        tau = model.method.last_estimate.tau_inv_sq if model.method.last_estimate is not None else None
        floor = f", tau^-2 {tau:.2e} (ratio eps {base.method.fishertune.ratio_eps:.0e})" if tau is not None else ""
        print(f"   {label:<36} Jaccard {jaccard:.3f}   ({seconds / 2:.1f} s per estimate{floor})")


def timed_steps(model, source, steps, device, before=None):
    opt = torch.optim.AdamW(model.parameter_groups(1e-4, 0.05))
    model.train()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        if before is not None:
            before(i)
        batch = source()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and k != "step")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times[1:])[len(times[1:]) // 2], state, peak


def costs(args, device):
    print(f"\n2-3. cost on {args.backbone} ({'full size' if args.full_size else f'{args.depth} blocks x {args.width}'}), "
          f"{args.img} x {args.img}, batch {args.batch}, {device}")
    results = {}
    for name in ("fishertune", "rein", "full"):
        cfg = make_config(args, name, warmup_iters=0)
        torch.manual_seed(0)
        model = build_segmentor(cfg).to(device)
        source = Source(0, args.images, args.batch, args.img, device)
        estimate_s = None
        if name == "fishertune":
            trainer = Trainer(cfg, model, source, device)
            t0 = time.perf_counter()
            model.method.on_train_iteration(0, trainer)  # stage 2
            estimate_s = time.perf_counter() - t0
            model.method.num_active.fill_(model.method.capacity)  # worst case: all of delta_max active
        step, state, peak = timed_steps(model, source, args.steps, device)
        results[name] = (step, state, peak)
        if estimate_s is not None:
            iters = estimate_s / step
            print(f"   estimate: {estimate_s:.1f} s = {iters:.0f} training iterations "
                  f"= {100 * iters / 40000:.2f}% of a 40k schedule ({2 * args.num_batches} passes)")
    for name, (step, state, peak) in results.items():
        rel = step / results["rein"][0]
        mem = f", peak {peak:.2f} GiB ({peak / results['rein'][2]:.2f} x rein)" if device.type == "cuda" else ""
        print(f"   {name:<11} step {1000 * step:7.1f} ms ({rel:.2f} x rein), optimizer state "
              f"{state / 2**20:8.2f} MiB ({state / results['full'][1]:.3f} x full){mem}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_s")
    parser.add_argument("--full-size", action="store_true", help="the backbone's real depth and width")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--head", default="fpn", choices=["fpn", "mask2former"])
    parser.add_argument("--images", type=int, default=160, help="source images (two halves for stability)")
    parser.add_argument("--num-batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-stability", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.skip_stability:
        stability(args, device)
    costs(args, device)


if __name__ == "__main__":
    main()
