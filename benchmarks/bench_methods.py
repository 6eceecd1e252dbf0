"""Training-step cost of every tuning method, as ratios measured in one run (not a test).

    python benchmarks/bench_methods.py                   # ViT-L width (1024, 16 heads), 4 blocks, 512, batch 1
    python benchmarks/bench_methods.py --batch 2         # the issue's batch (about twice the time)
    python benchmarks/bench_methods.py --quick           # 2 blocks at 256: a smoke run of a minute or two
    python benchmarks/bench_methods.py --methods full,rein --grad-checkpointing      # a subset, checkpointed
    python benchmarks/bench_methods.py --methods full,full+ckpt,rein,rein+ckpt       # on/off interleaved
    python benchmarks/bench_methods.py --methods rein,rein+compile --skip-memory     # torch.compile on/off
    python benchmarks/bench_methods.py --ema             # whole steps also update the weight EMA (train.ema)

Methods: Frozen, Rein, FisherTune (random selection, all of delta_max active: its worst case), LoRA,
VPT-deep, SoMA (the last two thirds of the blocks, as 8-23 of 24) and Full, on a DINOv2-L-shaped backbone (random weights; speed does not depend on them) with
the real Mask2Former head. For each:

* backbone part: ``forward_features`` + backward of the features with a fixed random cotangent (what
  the head would send) + the optimizer step of the method's own and trainable backbone tensors;
* whole step: ``model.loss`` + backward + AdamW over every trainable tensor (the head included);
* "limit": the floor for any adapter on a frozen backbone, measured in the same run: the backbone
  forward + a backward that computes activation gradients only (every backbone parameter has
  requires_grad False; the input image requires grad, so the gradient flows through every block).

Speed options (``train.grad_checkpointing``, ``train.compile``): ``--grad-checkpointing`` and ``--compile``
apply to every method of the run; a method written ``NAME+ckpt`` / ``NAME+compile`` (or both) gets the
option alone, so that on and off are measured interleaved in one run. Compilation happens in the
warm-up runs (``--warmup`` must be >= 1 with compile).

Times are medians of ``--repeats`` runs after ``--warmup`` runs, the methods interleaved within each
repeat (so a load change hits all of them alike). Peak memory (CPU) is measured in a fresh subprocess
per method: the peak resident set (VmHWM, reset through /proc/self/clear_refs once the model, optimizer
and inputs are built) after two backbone parts (then after two whole steps) minus the resident set at
that reset; it therefore counts activations, gradients
and optimizer state, not the weights. On a GPU (``--device cuda``) ``max_memory_allocated`` is used.

Weight EMA (``train.ema``): the table gives the size of the EMA copy for every method (one copy of the
tensors the whole step trains, :class:`dgss.engine.ema.WeightEMA`, whether or not ``--ema`` is given);
with ``--ema`` the whole step also updates it, so its time and the whole-step peak include it (the copy
is made after the peak's reset, so it counts there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

from dgss.config import load_config
from dgss.engine.ema import WeightEMA
from dgss.engine.speed import apply_speed_options
from dgss.tuning.model import build_segmentor

METHODS = ("frozen", "rein", "fishertune", "lora", "vpt", "soma", "full")
OPTIONS = ("ckpt", "compile")


def parse_spec(spec: str) -> tuple[str, set[str]]:
    """"rein+ckpt+compile" -> ("rein", {"ckpt", "compile"})."""
    name, *options = spec.split("+")
    if name not in METHODS or not set(options) <= set(OPTIONS):
        raise SystemExit(f"unknown method '{spec}': NAME[+ckpt][+compile], NAME one of {', '.join(METHODS)}")
    return name, set(options)


def build(args, spec: str, device):
    method, options = parse_spec(spec)
    overrides = [f"method.name={method}", f"model.backbone={args.backbone}", f"model.img_size={args.img}",
                 f"model.backbone_kwargs={{depth: {args.depth}}}", "method.fishertune.selection=random",
                 # SoMA's recipe tunes blocks 8-23 of 24: the same two thirds of the benchmark's blocks
                 f"method.soma.start_block={args.depth // 3}",
                 f"train.grad_checkpointing={args.grad_checkpointing or 'ckpt' in options}",
                 f"train.compile={args.compile or 'compile' in options}",
                 f"train.compile_mode={args.compile_mode}", f"train.compile_backend={args.compile_backend}"]
    overrides += list(getattr(args, "overrides", ()))  # later keys win (gpu_check.py: sizes, head, eval)
    torch.manual_seed(0)
    cfg = load_config(overrides=overrides)
    model = build_segmentor(cfg).to(device)
    if method == "fishertune":
        model.method.select(None)  # random top-K (the ranking's cost is the estimate, measured elsewhere)
        model.method.num_active.fill_(model.method.capacity)  # worst case: all of delta_max active
    model.train()
    apply_speed_options(model, cfg.train)  # as the Trainer does
    head_ids = {id(p) for p in model.head.parameters()}
    groups = model.parameter_groups(1e-4, 0.05)
    backbone_groups = [dict(g, params=[p for p in g["params"] if id(p) not in head_ids]) for g in groups]
    backbone_groups = [g for g in backbone_groups if g["params"]]
    whole_opt = torch.optim.AdamW(groups)
    backbone_opt = torch.optim.AdamW(backbone_groups) if backbone_groups else None
    return model, whole_opt, backbone_opt


def inputs(args, device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img, generator=gen).to(device)
    labels = torch.randint(0, 19, (args.batch, args.img, args.img), generator=gen).to(device)
    return images, labels


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def backbone_part(model, opt, images, cotangents):
    feats = model.forward_features(images)
    if feats[0].requires_grad:
        torch.autograd.backward(feats, cotangents)
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def limit_part(model, images, cotangents):
    """Forward + activation-gradient-only backward of the frozen backbone (the adapter floor)."""
    x = images.detach().requires_grad_(True)
    feats = model.backbone(x)
    torch.autograd.backward(feats, cotangents)


def whole_step(model, opt, images, labels, autocast=contextlib.nullcontext, ema=None):
    """One training step as the Trainer takes it (``autocast``: around the forward pass only; ``ema``: a
    :class:`WeightEMA` updated after the step, as with ``train.ema``)."""
    opt.zero_grad(set_to_none=True)  # before the forward, as the Trainer: no gradient lives through it
    with autocast():
        loss = model.loss(images, labels)["loss"]
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update(model, iteration=2)  # past begin_iter: the averaging update


def make_ema(model, opt) -> WeightEMA:
    """The weight EMA the Trainer keeps: a copy of every tensor ``opt`` trains."""
    ema = WeightEMA()
    ema.track(model, [p for g in opt.param_groups for p in g["params"]])
    return ema


def ema_bytes(opt) -> int:
    """The size of the weight EMA's copy: the tensors ``opt`` trains."""
    return sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])


def optimizer_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k != "step")


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rss_bytes(field: str = "VmRSS") -> int:
    """The resident set ("VmRSS") or its high-water mark ("VmHWM") of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0), so that the build's own peak does not
    count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(args) -> None:
    """One method in this (fresh) process: peak memory over the built model, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = args.memory_child
    if name == "limit":
        model, whole_opt, backbone_opt = build(args, "frozen", device)
    else:
        model, whole_opt, backbone_opt = build(args, name, device)
    images, labels = inputs(args, device)
    with torch.no_grad():
        cotangents = [torch.randn_like(f) for f in model.backbone(images)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak = lambda: torch.cuda.max_memory_allocated() - base  # noqa: E731
    else:
        reset_peak_rss()
        base = rss_bytes()
        peak = lambda: rss_bytes("VmHWM") - base  # noqa: E731
    result = {}
    for _ in range(2):
        if name == "limit":
            limit_part(model, images, cotangents)
        else:
            backbone_part(model, backbone_opt, images, cotangents)
    result["backbone"] = peak()
    if name != "limit":
        ema = make_ema(model, whole_opt) if args.ema else None
        for _ in range(2):
            whole_step(model, whole_opt, images, labels, ema=ema)
        result["whole"] = peak()
        result["state_whole"] = optimizer_state_bytes(whole_opt)
        result["state_backbone"] = optimizer_state_bytes(backbone_opt) if backbone_opt is not None else 0
        result["ema"] = ema_bytes(whole_opt)
    print("RESULT " + json.dumps(result))


def measure_memory(args) -> dict:
    out = {}
    for name in ("limit",) + tuple(args.methods):
        cmd = [sys.executable, __file__, "--memory-child", name, *args.forward]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        out[name] = json.loads(line[len("RESULT "):])
        print(f"   memory {name:<11} done", flush=True)
    return out


def measure_time(args) -> dict:
    device = torch.device(args.device)
    models = {name: build(args, name, device) for name in args.methods}
    limit_model = models["frozen"][0] if "frozen" in models else build(args, "frozen", device)[0]
    images, labels = inputs(args, device)
    with torch.no_grad():
        cotangents = [torch.randn_like(f) for f in limit_model.backbone(images)]
    backbone = {name: [] for name in ("limit",) + tuple(args.methods)}
    whole = {name: [] for name in args.methods}
    emas = {name: make_ema(model, opt) if args.ema else None for name, (model, opt, _) in models.items()}
    for rep in range(args.warmup + args.repeats):
        backbone["limit"].append(timed(lambda: limit_part(limit_model, images, cotangents), device))
        for name, (model, _, opt) in models.items():
            backbone[name].append(timed(lambda: backbone_part(model, opt, images, cotangents), device))
        print(f"   backbone parts, run {rep + 1}/{args.warmup + args.repeats}", flush=True)
    for rep in range(args.warmup + args.repeats):
        for name, (model, opt, _) in models.items():
            whole[name].append(timed(lambda: whole_step(model, opt, images, labels, ema=emas[name]), device))
        print(f"   whole steps, run {rep + 1}/{args.warmup + args.repeats}", flush=True)
    med = lambda xs: statistics.median(xs[args.warmup:])  # noqa: E731
    return {"backbone": {k: med(v) for k, v in backbone.items()}, "whole": {k: med(v) for k, v in whole.items()},
            "raw_backbone": backbone, "raw_whole": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_l")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--img", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 blocks at 256, 1 warm-up, 2 repeats")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset, each NAME[+ckpt][+compile] (default: all methods)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="train.grad_checkpointing for every method of the run")
    parser.add_argument("--compile", action="store_true", help="train.compile for every method of the run")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--ema", action="store_true", help="whole steps also update the weight EMA (train.ema)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.depth, args.img, args.warmup, args.repeats = 2, 256, 1, 2
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for spec in args.methods:
        parse_spec(spec)
    args.forward = ["--backbone", args.backbone, "--depth", str(args.depth), "--img", str(args.img),
                    "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device,
                    "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend]
    args.forward += ["--grad-checkpointing"] * args.grad_checkpointing + ["--compile"] * args.compile
    args.forward += ["--ema"] * args.ema
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    options = [o for o, on in (("grad checkpointing", args.grad_checkpointing),
                                (f"compile ({args.compile_backend}, {args.compile_mode})", args.compile),
                                ("weight EMA", args.ema)) if on]
    print(f"{args.backbone} width, {args.depth} blocks, {args.img} x {args.img}, batch {args.batch}, Mask2Former head, "
          f"{args.device}, {args.threads} threads, torch {torch.__version__}"
          + (f", {' + '.join(options)} for every method" if options else ""), flush=True)
    times = measure_time(args)
    memory = None if args.skip_memory else measure_memory(args)

    b, w = times["backbone"], times["whole"]
    ref = "full" if "full" in args.methods else None  # ratios "x full" need the plain Full in the run

    def vs_full(table, name):
        return f"{table[name] / table[ref]:5.2f} x full" if ref else " " * 12

    print("\nmethod       backbone part                      whole step             peak mem backbone / whole"
          "       optimizer state                                 EMA copy")
    print(f"{'limit':<12} {b['limit']:6.2f} s {vs_full(b, 'limit')}"
          + (f"   {'':32}{memory['limit']['backbone'] / 2**20:8.0f} MiB" if memory else ""))
    for name in args.methods:
        line = (f"{name:<12} {b[name]:6.2f} s {vs_full(b, name)} {b[name] / b['limit']:5.2f} x limit"
                f"   {w[name]:6.2f} s {vs_full(w, name)}")
        if memory:
            m = memory[name]
            f = memory[ref] if ref else None
            def rel(key, fmt="4.2f"):
                return f" ({m[key] / max(f[key], 1):{fmt}})" if f else ""

            line += (f"   {m['backbone'] / 2**20:7.0f} MiB{rel('backbone')} / "
                     f"{m['whole'] / 2**20:6.0f} MiB{rel('whole')}"
                     f"   backbone {m['state_backbone'] / 2**20:6.1f} MiB{rel('state_backbone', '.3f')},"
                     f" whole {m['state_whole'] / 2**20:6.1f} MiB{rel('state_whole', '.3f')}"
                     f"   {m['ema'] / 2**20:6.1f} MiB")
        print(line)
    variants = [(spec, parse_spec(spec)[0]) for spec in args.methods if "+" in spec]
    variants = [(spec, base) for spec, base in variants if base in args.methods]
    if variants:
        print("\noption on / off (same method, interleaved):")
        for spec, base in variants:
            line = f"   {spec:<20} time: backbone part {b[spec] / b[base]:.2f} x, whole step {w[spec] / w[base]:.2f} x"
            if memory:
                m, o = memory[spec], memory[base]
                line += (f"; peak memory: backbone part {m['backbone'] / o['backbone']:.2f} x, "
                         f"whole step {m['whole'] / o['whole']:.2f} x")
            print(line)
    targets = []
    if "rein" in args.methods:
        targets.append(f"   rein backbone part <= 1.05 x limit: {b['rein'] / b['limit']:.2f}")
    if memory and {"rein", "fishertune", "full"} <= set(args.methods):
        r, ft, f = memory["rein"], memory["fishertune"], memory["full"]
        targets += [
            f"   rein peak <= 0.6 x full: backbone part {r['backbone'] / f['backbone']:.2f}, "
            f"whole {r['whole'] / f['whole']:.2f}",
            f"   fishertune peak <= 1.15 x rein: backbone part {ft['backbone'] / r['backbone']:.2f}, "
            f"whole {ft['whole'] / r['whole']:.2f}",
            f"   fishertune optimizer state <= 0.06 x full: backbone part "
            f"{ft['state_backbone'] / f['state_backbone']:.3f}, whole {ft['state_whole'] / f['state_whole']:.3f}"]
    if targets:
        print("\ntargets:")
        print("\n".join(targets))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"times": times, "memory": memory, "args": args.forward}, fh, indent=1)


if __name__ == "__main__":
    main()
