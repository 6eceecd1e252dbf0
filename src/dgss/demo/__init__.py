"""`dgss demo`: the domain-generalization story end to end on a CPU, with synthetic domains.

    rows = run_demo("demo_output")                 # about 10 minutes on 2 CPU cores
    rows = run_demo("demo_output", quick=True)     # about 1 minute

1. The "foundation" ViT (:mod:`dgss.demo.foundation`): a small DINOv2-shaped model that dgss pretrained
   on every synthetic domain (on scenes no demo split uses), shipped in ``dgss/assets`` with the
   command that made it; the stand-in for DINOv2.
2. It is fine-tuned on one source domain ("clean") with Frozen, Full, Rein and FisherTune, the same
   experiment for each (:mod:`dgss.demo.run`): the real segmentor, Mask2Former head, augmentation,
   training engine and checkpoint files; only the sizes are small.
3. Each model is evaluated on the source val split and on five target domains it was never
   fine-tuned on (textured, night, fog, rain, colour shift), and the demo writes the table, a bar
   chart, prediction overlays and FisherTune's selection plots (:mod:`dgss.demo.outputs`).

The numbers are a synthetic sanity check of the code paths and of the story, not the papers'
benchmarks; seeds are fixed, so a second run prints the same table.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from .foundation import FOUNDATION_FILE, foundation_weights, pretrain_command, pretrain_foundation
from .outputs import format_table, plot_miou, table_rows, write_overlays, write_table
from .run import FULL_BUDGET, METHODS, QUICK_BUDGET, SOURCE, TARGETS, DemoBudget, demo_config, pick_threads, run_method

__all__ = ["run_demo", "demo_config", "SOURCE", "TARGETS", "METHODS", "DemoBudget", "FULL_BUDGET", "QUICK_BUDGET",
           "FOUNDATION_FILE", "foundation_weights", "pretrain_foundation", "pretrain_command", "format_table"]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_demo(out_dir: str | Path = "demo_output", quick: bool = False, methods: Sequence[str] = METHODS, *,
             budget: Optional[DemoBudget] = None, targets: Sequence[str] = TARGETS, weights: Optional[str] = None,
             overlays: bool = True, progress: bool = True, threads: Optional[int] = None) -> list[dict]:
    """Fine-tune the foundation ViT on ``SOURCE`` with each method, evaluate on the source and the
    targets, print the table and write everything to ``out_dir``. Returns the table's rows
    ({"method", "trainable", "source", <target>..., "mean"}, mIoU in %).

    ``budget`` overrides the sizes (default: ``QUICK_BUDGET`` with ``quick``, else ``FULL_BUDGET``);
    ``weights`` another foundation file; ``threads`` torch's intra-op threads (default 1).
    """
    start = time.time()
    out = Path(out_dir)
    budget = budget or (QUICK_BUDGET if quick else FULL_BUDGET)
    threads = pick_threads(threads)
    weights = str(weights or foundation_weights(progress=progress))
    print(f"dgss demo{' --quick' if quick else ''}: fine-tune a pretrained foundation ViT on '{SOURCE}' with "
          f"{', '.join(methods)} ({budget.iters} iterations each), then evaluate on '{SOURCE}' and on "
          f"{len(targets)} unseen domains: {', '.join(targets)}", flush=True)
    print(f"foundation ViT: {weights}  |  outputs: {out}/  |  {threads} thread(s)", flush=True)

    results, models, fisher_paths = [], {}, {}
    for i, method in enumerate(methods):
        cfg = demo_config(method, budget=budget, out_dir=out, weights=weights, targets=targets)
        if cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)  # a fresh run every time (the engine appends to an existing log)
        print(f"\n[{i + 1}/{len(methods)}] {method}", flush=True)
        result, model, trainer = run_method(cfg, progress=progress)
        results.append(result)
        models[method] = model
        if method == "fishertune":
            from ..tuning.fishertune.report import write_fisher_outputs

            fisher_paths = write_fisher_outputs(trainer.model.method, out / "fishertune")
        scores = ", ".join(f"{name} {value:.1f}" for name, value in result.miou.items())
        elapsed = time.time() - start
        left = elapsed / (i + 1) * (len(methods) - i - 1)
        print(f"[{i + 1}/{len(methods)}] {method}: mIoU {scores} ({_clock(result.seconds)}; "
              f"{_clock(elapsed)} so far, about {_clock(left)} to go)", flush=True)

    rows = table_rows(results, SOURCE, targets)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_table(rows, SOURCE, targets, out)
    chart = plot_miou(rows, SOURCE, targets, out / "miou.png")
    overlay_paths = []
    if overlays and budget.overlay_images > 0:
        cfg = demo_config(methods[0], budget=budget, out_dir=out, weights=weights, targets=targets)
        overlay_paths = write_overlays(models, [*cfg.data.val, *cfg.data.test], cfg, out / "overlays",
                                       budget.overlay_images)

    table = format_table(rows, SOURCE, targets)
    print(f"\nmIoU (%), fine-tuned on '{SOURCE}' only, {budget.iters} iterations per method:\n\n{table}\n")
    print("A synthetic sanity check of the code and of the story (a frozen pretrained model generalizes; "
          "how much each way of fine-tuning keeps of it), not the papers' benchmarks.\n")
    print(f"written ({_clock(time.time() - start)} in all):")
    print(f"  table         {md}, {csv_path}")
    print(f"  bar chart     {chart}")
    if overlay_paths:
        print(f"  overlays      {out / 'overlays'}/<domain>.png (image, ground truth, each method), "
              f"{out / 'overlays'}/<method>/")
    if fisher_paths:
        print(f"  FisherTune    {fisher_paths.get('per_block')}, {fisher_paths.get('per_type')}, "
              f"{fisher_paths.get('distribution', '')}".rstrip(", "))
    print(f"  runs          {out / 'runs'}/<method>/ (config.yaml, logs/, model_final.safetensors, eval/results.json)")
    return rows
