"""The memory planner (`dgss plan`) against measured memory on this CPU (not a test).

    python benchmarks/bench_plan.py                     # every case below, about 30 minutes on 2 cores
    python benchmarks/bench_plan.py --cases dinov2_s/full --out /tmp/plan   # a subset
    python benchmarks/bench_plan.py --table             # the planner's table of billion-scale configs
    python benchmarks/bench_plan.py --selection         # FisherTune streamed vs dense selection, real sizes
    python benchmarks/bench_plan.py --gpu-results benchmarks/results/gpu_h200/gpu_check_run2.json
                                                        # today's planner against a recorded GPU run's peaks

For each case the planner's per-process figure for a CPU run (``dgss plan --device cpu``: fp32, AdamW's
per-tensor CPU step) is compared with what a fresh process really uses: its peak resident memory
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up step) minus its resident memory
before the model was built. glibc is told to return every allocation above 64 KiB to the system when it
is freed (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows the tensors alive. (``tracemalloc``
sees only Python's own allocations, not torch's.) Measured: the third training step (the optimizer
state exists, as in any step after the first), and for FisherTune its estimate and selection (stage 2)
after one head warm-up step. Labels hold all 19 classes, so the matcher assigns as many masks as the
planner assumes. The target: planned / measured in [1.00, 1.10] (never below: a plan is trusted to fit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# name -> (backbone, method, batch, crop, extra overrides)
HEAD_256 = ["model.head.num_points_loss=3136"]  # 56 x 56 points: the 512 recipe's share of a 256 crop
CASES = {
    "dinov2_s/frozen": ("dinov2_s", "frozen", 2, 256, []),
    "dinov2_s/rein": ("dinov2_s", "rein", 2, 256, []),
    "dinov2_s/full": ("dinov2_s", "full", 2, 256, []),
    "dinov2_s/full+ckpt": ("dinov2_s", "full", 2, 256, ["train.grad_checkpointing=true"]),
    "dinov2_s/soma": ("dinov2_s", "soma", 2, 256, ["method.soma.start_block=4"]),
    "dinov2_s/fishertune": ("dinov2_s", "fishertune", 2, 256, []),
    "dinov2_b/rein": ("dinov2_b", "rein", 2, 256, []),
    "dinov2_b/full": ("dinov2_b", "full", 2, 256, []),
    "dinov2_b/fishertune": ("dinov2_b", "fishertune", 1, 256, []),
    "dinov3_b/rein+ckpt": ("dinov3_b", "rein", 2, 256, ["train.grad_checkpointing=true"]),
    "dinov2_l/frozen": ("dinov2_l", "frozen", 1, 256, []),
    "dinov2_l/rein": ("dinov2_l", "rein", 1, 256, []),
    "dinov2_l/fishertune": ("dinov2_l", "fishertune", 1, 256, []),
}


def overrides(case: str) -> list[str]:
    backbone, method, batch, crop, extra = CASES[case]
    return [f"model.backbone={backbone}", f"method.name={method}", f"train.batch_size={batch}",
            f"data.crop_size=[{crop},{crop}]", f"model.img_size={crop}", "method.fishertune.num_batches=2",
            *HEAD_256, *extra]


# ------------------------------------------------------------------ the measuring process


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _batch(cfg, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, (h, w) = cfg.train.batch_size, cfg.data.crop_size
    images = torch.randn(b, 3, h, w, generator=gen)
    stripes = torch.arange(w) * 19 // w  # every class present
    labels = stripes.expand(b, h, w).roll(seed, dims=-1).contiguous()
    return {"image": images, "label": labels}


def measure(case: str) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    from dgss.config import load_config
    from dgss.engine.optim import build_optimizer
    from dgss.engine.speed import apply_speed_options
    from dgss.tuning.model import build_segmentor

    torch.manual_seed(0)
    cfg = load_config(None, overrides(case))
    # initialise the kernels' libraries before the baseline (their buffers are not the run's)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    y = F.grid_sample(F.conv2d(x, torch.randn(8, 8, 3, 3)), torch.rand(1, 4, 4, 2) * 2 - 1, align_corners=False)
    (y.sum() + (x.flatten(1) @ torch.randn(2048, 4)).sum()).backward()
    del x, y
    gc.collect()
    baseline = _status()["VmRSS"]
    model = build_segmentor(cfg).train()
    apply_speed_options(model, cfg.train)
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    method = model.method
    out = {"case": case}
    if method.name == "fishertune":  # stage 2 after one head step, then stage 3 with every entry active
        step(model, optimizer, _batch(cfg, 0))
        _reset_peak()
        stream = (_batch(cfg, 10 + i) for i in range(1000))
        scores = method.estimate(model, stream, seed=0)
        method.select(scores, seed=0)
        del scores
        gc.collect()
        out["estimate_peak"] = _status()["VmHWM"] - baseline
        method.num_active.fill_(method.capacity)
    for i in range(2):
        step(model, optimizer, _batch(cfg, 1 + i))
    gc.collect()
    _reset_peak()
    step(model, optimizer, _batch(cfg, 3))
    out["training_peak"] = _status()["VmHWM"] - baseline
    return out


def step(model, optimizer, batch) -> None:
    """The trainer's step (dgss.engine.trainer.Trainer.train_step, one micro-batch, fp32)."""
    optimizer.zero_grad(set_to_none=True)
    losses = model(batch["image"], batch["label"])
    losses["loss"].backward()
    del losses
    optimizer.step()


# ------------------------------------------------------------------ the driver


def planned(case: str) -> dict:
    from dgss.config import load_config
    from dgss.engine.memory_plan import Planner

    cfg = load_config(None, overrides(case))
    plan = Planner(cfg, device="cpu").plan()
    return {"training_peak": plan.training_peak, "estimate_peak": plan.estimate_peak}


def run_case(case: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="2",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--measure", case], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = planned(case)
    row = {"case": case, "seconds": round(time.time() - started, 1)}
    for key in ("training_peak", "estimate_peak"):
        if key in measured:
            row[key] = {"planned": plan[key], "measured": measured[key],
                        "ratio": round(plan[key] / measured[key], 3)}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| case | phase | planned (MiB) | measured (MiB) | planned / measured |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | error: {row['error'][:80]} | | | |")
            continue
        for key in ("training_peak", "estimate_peak"):
            if key in row:
                r = row[key]
                lines.append(f"| {row['case']} | {key.replace('_peak', '')} | {r['planned'] / 2**20:,.0f} | "
                             f"{r['measured'] / 2**20:,.0f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the planner's table (docs/performance.md)

TABLE_BACKBONES = {"dinov2_l": "configs/{method}/dinov2-l_gtav_512.yaml", "dinov2_g": "configs/{method}/dinov2-l_gtav_512.yaml",
                   "dinov3_hplus": "configs/{method}/dinov2-l_gtav_512.yaml", "dinov3_7b": "configs/{method}/dinov3-7b_gtav_512.yaml"}
TABLE_METHODS = ("frozen", "rein", "fishertune", "soma", "full")


def table_config(backbone: str, method: str):
    from dgss.config import load_config
    from dgss.models.backbones import BACKBONES

    root = Path(__file__).resolve().parents[1]
    path = root / TABLE_BACKBONES[backbone].format(method=method)
    if not path.exists():  # full fine-tuning of DINOv3-7B: the DINOv2-L recipe with the 7B backbone
        path = root / TABLE_BACKBONES["dinov2_l"].format(method=method)
    depth = BACKBONES[backbone].out_indices[-1] + 1
    overrides = [f"model.backbone={backbone}", "model.weights=null"]
    if method == "soma":  # the first third of the blocks frozen, as SoMA's 8 of 24
        overrides.append(f"method.soma.start_block={round(depth / 3)}")
    return load_config(path, overrides)


def plan_table(backbones, methods) -> str:
    """Per-process GiB of the 512 recipe (batch 4 per process, fp32 unless said): one GPU, one GPU with
    activation checkpointing, 8 GPUs with FSDP (+ checkpointing), FisherTune's estimate; whether each fits
    80 / 141 GB, and the smallest change that fits one 80 GB GPU."""
    from dgss.engine.memory_plan import GIB, Planner, parse_memory, plan_memory, usable_memory

    def cell(total):
        fit80, fit141 = total <= usable_memory(parse_memory("80GB")), total <= usable_memory(parse_memory("141GB"))
        return f"{total / GIB:.1f} {'✓✓' if fit80 else ('·✓' if fit141 else '··')}"

    lines = ["| backbone | method | trainable | 1 GPU | 1 GPU + ckpt | 8 GPUs FSDP | 8 GPUs FSDP + ckpt | "
             "estimate (stage 2) | smallest change for 1 x 80 GB |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for backbone in backbones:
        for method in methods:
            cfg = table_config(backbone, method)
            planner = Planner(cfg)
            one, ckpt = planner.plan(), planner.plan(grad_checkpointing=True)
            fsdp = planner.plan(gpus=8, parallel="fsdp")
            fsdp_ckpt = planner.plan(gpus=8, parallel="fsdp", grad_checkpointing=True)
            change = plan_memory(cfg, gpu_memory=parse_memory("80GB"), variants=False, planner=planner).change
            estimate = f"{one.estimate_peak / GIB:.1f}" if one.estimate else "–"
            lines.append(f"| {backbone} | {method} | {planner.trainable / 1e6:,.1f} M | {cell(one.training_peak)} | "
                         f"{cell(ckpt.training_peak)} | {cell(fsdp.training_peak)} | {cell(fsdp_ckpt.training_peak)} | "
                         f"{estimate} | {change or 'fits as configured'} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ------------------------------------------------------------------ the streamed estimate's selection at real size


def selection_agreement(backbones=("dinov2_s", "dinov2_b", "dinov2_l")) -> list[dict]:
    """FisherTune's streamed estimate against the dense fp32 reference at the backbones' real widths and
    depths (crop 256, 2 batches of 2, the same seed): the Jaccard of the two selections."""
    import torch

    from dgss.config import load_config
    from dgss.tuning.model import build_segmentor
    from dgss.tuning.fishertune.report import jaccard, selection_positions

    rows = []
    for backbone in backbones:
        chosen = {}
        for memory in ("dense", "streamed"):
            torch.manual_seed(0)
            cfg = load_config(None, [f"model.backbone={backbone}", "method.name=fishertune", "train.batch_size=2",
                                     "data.crop_size=[256,256]", "model.img_size=256", *HEAD_256,
                                     "method.fishertune.num_batches=2", f"method.fishertune.estimate_memory={memory}"])
            model = build_segmentor(cfg).train()
            stream = (_batch(cfg, 10 + i) for i in range(1000))
            model.method.select(model.method.estimate(model, stream, seed=0), seed=0)
            chosen[memory] = selection_positions(model.method)
        rows.append({"backbone": backbone, "selected": int(chosen["dense"].numel()),
                     "jaccard": jaccard(chosen["dense"], chosen["streamed"]),
                     "identical": bool(torch.equal(chosen["dense"], chosen["streamed"]))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ a recorded GPU run against today's planner


def left_by_case(name: str) -> int:
    """Bytes that gpu_check's plan section as it was until 2026-12-04 (commit d223fe4) left allocated after
    case ``name``, through the next case: the model died in the case's own frame, but a model whose method
    hooks its blocks (Rein, SoMA, FisherTune) is a reference cycle, so its backbone and method lived until
    the collector ran at the end of the next case. Emulated on the meta device: the case's three steps,
    then every tensor still alive once its frame returned."""
    import gc
    import weakref

    import torch

    import _gpu_plan as gp
    from dgss.engine.memory_probe import planning_matcher, prepare_method
    from dgss.engine.optim import build_optimizer
    from dgss.tuning.model import build_segmentor

    def alive() -> int:  # bytes of the meta storages the collector can reach, each once
        found = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
                for t in (obj, obj.grad) if obj.is_leaf else (obj,):
                    if t is not None:
                        found[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return sum(found.values())

    def case(cfg, refs):  # the old harness's frame: model, its method, optimizer, inputs, the step's closure
        with torch.device("meta"):
            model = build_segmentor(cfg)
        model.train()
        optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
        images = torch.zeros(cfg.train.batch_size, 3, *cfg.data.crop_size, device="meta")
        labels = torch.zeros(cfg.train.batch_size, *cfg.data.crop_size, dtype=torch.long, device="meta")
        method = model.method  # a local of the frame until it returns, as it was: the collector inside the
        prepare_method(model)  # frame cannot free the cycle (backbone -> hooks -> method -> backbone) yet

        def step():
            optimizer.zero_grad(set_to_none=True)
            with planning_matcher():
                loss = model(images, labels)["loss"]
            loss.backward()
            optimizer.step()

        for _ in range(3):
            step()
        refs.append(weakref.ref(method))
        del model, optimizer
        gc.collect()

    _, overrides, amp, _ = {c[0]: c for c in gp.FULL_CASES}[name]
    cfg = gp._config(overrides, False, amp)
    cfg.train.fused_adamw = False
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        before = alive()
        case(cfg, [])
        left = alive() - before
    finally:
        gc.collect()
        if enabled:
            gc.enable()
    return left


def gpu_results(paths: list[str], probes: Optional[dict] = None) -> list[dict]:
    """Today's planner for every measured case of the "plan" section of recorded ``gpu_check.py`` runs,
    configured as those runs were (foreach AdamW: ``train.fused_adamw`` did not exist yet), beside their
    peaks. Runs before the harness measured each case in its own frame (d223fe4) carry what the case
    before left allocated: :func:`left_by_case`, taken off the peak, and the check's own inputs (a batch
    of 4 images and labels at 512, 20 MiB). ``probes``: {case: Planner._probes} already computed."""
    import _gpu_plan as gp
    from dgss.engine.memory_plan import Planner

    rows, left_cache = [], {}
    mib = 2**20
    for path in paths:
        data = json.loads(Path(path).read_text())
        cases = data["sections"]["plan"]["cases"]
        names = list(cases)
        specs = {c[0]: c for c in gp.FULL_CASES}
        for i, name in enumerate(names):
            entry = cases[name]
            if "peak_mib" not in entry or name not in specs:
                continue
            _, overrides, amp, kind = specs[name]
            cfg = gp._config(overrides, False, amp)
            cfg.train.fused_adamw = False
            planner = Planner(cfg, device="cuda")
            if probes and name in probes:
                planner._probes.update(probes[name])
            if kind == "estimate":
                estimate = planner.estimate_plan(1)
                planned, allowances = estimate["peak"], estimate["workspaces"] + estimate["allocator"]
            else:
                plan = planner.plan()
                planned, allowances = plan.training_peak, plan.workspaces + plan.allocator
            before = names[i - 1] if i else None
            left = 0
            if before in specs and specs[before][3] == "train":
                if before not in left_cache:
                    left_cache[before] = left_by_case(before)
                left = left_cache[before]
            inputs = 20 * mib  # the check's own batch (Check.images, Check.labels), allocated throughout
            own = entry["peak_mib"] * mib - inputs - left
            rows.append({"run": Path(path).stem, "case": name, "peak_mib": entry["peak_mib"],
                         "old_planned_mib": entry.get("planned_mib"), "case_before": before,
                         "left_by_case_before_mib": round(left / mib, 1), "own_peak_mib": round(own / mib, 1),
                         "planned_mib": round(planned / mib, 1), "planned_x_own_peak": round(planned / own, 3),
                         # the plan of the code that ran (Rein's leaner path came later) with today's allowances
                         "allowances_mib": round(allowances / mib, 1)})
            if entry.get("planned_mib") is not None:
                then = entry["planned_mib"] * mib + allowances
                rows[-1].update(then_planned_with_allowances_mib=round(then / mib, 1),
                                then_planned_with_allowances_x_own_peak=round(then / own, 3))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--out", default="bench_plan_output", help="folder for plan.json and plan.md")
    parser.add_argument("--table", action="store_true",
                        help="print the planner's table of DINOv2-L/g, DINOv3-H+/7B x methods (no measurement)")
    parser.add_argument("--selection", action="store_true",
                        help="FisherTune's streamed selection against the dense reference at real sizes")
    parser.add_argument("--gpu-results", nargs="+", metavar="JSON",
                        help="today's planner against the plan section of recorded gpu_check.py runs (no measurement)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        rows = gpu_results(args.gpu_results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_results.json").write_text(json.dumps(rows, indent=2))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.selection:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "selection.json").write_text(json.dumps(selection_agreement(), indent=2))
        return 0
    if args.table:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = plan_table(list(TABLE_BACKBONES), TABLE_METHODS)
        (out / "plan_table.md").write_text(text + "\n")
        print(text)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        rows.append(run_case(case))
        print(json.dumps(rows[-1]), flush=True)
        (out / "plan.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "plan.md").write_text(table + "\n")
    print(table)
    ratios = [row[k]["ratio"] for row in rows for k in ("training_peak", "estimate_peak") if k in row]
    if ratios:
        print(f"\nworst planned/measured: {min(ratios):.3f} .. {max(ratios):.3f} (target 1.00 .. 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
