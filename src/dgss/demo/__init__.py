"""`dgss demo`: the domain-generalization story end to end on a CPU, with synthetic domains.

    rows = run_demo("demo_output", seeds=DEMO_SEEDS, jobs=2)   # `dgss demo`: under 10 minutes on 2 CPU cores
    rows = run_demo("demo_output", quick=True)                  # about 1 minute

1. The "foundation" ViT (:mod:`dgss.testbed.supervised_foundation`): a small DINOv2-shaped model that dgss pretrained
   on every synthetic domain (on scenes no demo split uses), shipped in ``dgss/assets`` with the
   command that made it; the stand-in for DINOv2.
2. It is fine-tuned on one source domain ("clean") with Frozen, Full, Rein and FisherTune, the same
   experiment for each (:mod:`dgss.testbed.experiment`): the real segmentor, Mask2Former head, augmentation,
   training engine and checkpoint files; only the sizes are small.
3. Each model is evaluated on the source val split and on five target domains it was never
   fine-tuned on (textured, night, fog, rain, colour shift), and the demo writes the table, a bar
   chart, prediction overlays and FisherTune's selection plots (:mod:`dgss.demo.outputs`).

The runs are the seeded benchmark's (:func:`dgss.testbed.benchmark.run_seeded`, ``benchmarks/bench_dg.py``):
one code path, with the demo's methods, budget and seeds.

The numbers are a synthetic sanity check of the code paths and of the story, not the papers'
benchmarks; seeds are fixed, so a second run prints the same table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from ..testbed.supervised_foundation import FOUNDATION_FILE, foundation_weights, pretrain_command, pretrain_foundation
from .outputs import format_table, plot_miou, summary_rows, write_overlays, write_table
from ..testbed.experiment import (DEMO_SEEDS, FULL_BUDGET, METHODS, QUICK_BUDGET, SOURCE, TARGETS, DemoBudget, demo_config,
                  pick_threads)

__all__ = ["run_demo", "demo_config", "SOURCE", "TARGETS", "METHODS", "DemoBudget", "FULL_BUDGET", "QUICK_BUDGET",
           "DEMO_SEEDS", "FOUNDATION_FILE", "foundation_weights", "pretrain_foundation", "pretrain_command", "format_table"]


def _flat_run_name(row: str, seed: int) -> str:
    return row  # one seed: OUT/runs/<method>/, as `dgss eval` commands in the README name them


def _seeded_run_name(row: str, seed: int) -> str:
    return f"{row}/seed{seed}"


def _write_fisher_figures(record: dict, model, trainer, *, out: Path, first_seed: int) -> None:
    """``on_run`` of the demo (runs in the process that trained): FisherTune's selection plots and report
    from the first seed's run."""
    if record["seed"] == first_seed and record["method"] == "fishertune":
        from ..tuning.fishertune.report import write_fisher_outputs

        write_fisher_outputs(trainer.model.method, out / "fishertune")


def _final_models(records: list[dict], first_seed: int) -> dict:
    """The first seed's final models, reloaded from their run folders (`dgss.load` of a run folder)."""
    from ..predict.loading import load_segmentor

    return {r["row"]: load_segmentor(r["run_dir"]).model for r in records if r["seed"] == first_seed}


def run_demo(out_dir: str | Path = "demo_output", quick: bool = False, methods: Sequence[str] = METHODS, *,
             budget: Optional[DemoBudget] = None, targets: Sequence[str] = TARGETS, weights: Optional[str] = None,
             overlays: bool = True, progress: bool = True, threads: Optional[int] = None,
             seeds: Sequence[int] = (0,), jobs: int = 1) -> list[dict]:
    """Fine-tune the foundation ViT on ``SOURCE`` with each method, evaluate on the source and the
    targets, print the table and write everything to ``out_dir``. Returns the table's rows
    ({"method", "trainable", "source", <target>..., "mean"}, mIoU in %; with several seeds the mean
    over them, plus "seeds" and "sd", the sample std of each column).

    ``budget`` overrides the sizes (default: ``QUICK_BUDGET`` with ``quick``, else ``FULL_BUDGET``);
    ``weights`` another foundation file; ``threads`` torch's intra-op threads per run (default 1);
    ``seeds``: one run per method and seed (one seed: ``runs/<method>/``; several:
    ``runs/<method>/seed<k>/``; overlays and FisherTune's plots from the first seed; `dgss demo` runs
    ``DEMO_SEEDS``); ``jobs``: runs trained at the same time, one process each.
    """
    import functools

    from ..testbed.benchmark import clock, run_seeded
    from ..testbed.stats import summarize

    start = time.time()
    seeds = list(seeds)
    out = Path(out_dir)
    budget = budget or (QUICK_BUDGET if quick else FULL_BUDGET)
    threads = pick_threads(threads)
    weights = str(weights or foundation_weights(progress=progress))
    per_seed = f", {len(seeds)} seeds" if len(seeds) > 1 else ""
    print(f"dgss demo{' --quick' if quick else ''}: fine-tune a pretrained foundation ViT on '{SOURCE}' with "
          f"{', '.join(methods)} ({budget.iters} iterations each{per_seed}), then evaluate on '{SOURCE}' and on "
          f"{len(targets)} unseen domains: {', '.join(targets)}", flush=True)
    print(f"foundation ViT: {weights}  |  outputs: {out}/  |  {jobs} job(s) x {threads} thread(s)", flush=True)

    # a fresh run every time (resume=False): the figures need FisherTune's scores, kept in memory
    figures = functools.partial(_write_fisher_figures, out=out, first_seed=seeds[0])
    records = run_seeded(methods, seeds, budget, out, "cpu", threads, curve_points=1, weights=weights,
                         targets=targets, resume=False, progress=progress and jobs == 1, quiet=jobs > 1,
                         keep_fisher_scores=True, run_name=_flat_run_name if len(seeds) == 1 else _seeded_run_name,
                         on_run=figures, jobs=jobs)
    fisher_dir = out / "fishertune"
    fisher_paths = {name: fisher_dir / file for name, file in (
        ("per_block", "selection_per_block.png"), ("per_type", "selection_per_type.png"),
        ("distribution", "drfim_distribution.png"), ("report", "report.json")) if (fisher_dir / file).is_file()}

    rows = summary_rows(summarize(records, SOURCE, targets))
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_table(rows, SOURCE, targets, out)
    chart = plot_miou(rows, SOURCE, targets, out / "miou.png")
    overlay_paths = []
    if overlays and budget.overlay_images > 0:
        cfg = demo_config(methods[0], budget=budget, out_dir=out, weights=weights, targets=targets)
        overlay_paths = write_overlays(_final_models(records, seeds[0]), [*cfg.data.val, *cfg.data.test], cfg,
                                       out / "overlays", budget.overlay_images)

    table = format_table(rows, SOURCE, targets)
    over = f", mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    print(f"\nmIoU (%), fine-tuned on '{SOURCE}' only, {budget.iters} iterations per method{over}:\n\n{table}\n")
    print("A synthetic sanity check of the code and of the story (a frozen pretrained model generalizes; "
          "how much each way of fine-tuning keeps of it), not the papers' benchmarks."
          + (" Differences within about two standard deviations are seed noise." if len(seeds) > 1 else "")
          + " The seeded benchmark (benchmarks/bench_dg.py, docs/testbed.md) runs this experiment longer, "
          "for more methods, with intervals.\n")
    print(f"written ({clock(time.time() - start)} in all):")
    print(f"  table         {md}, {csv_path}")
    print(f"  bar chart     {chart}")
    if overlay_paths:
        print(f"  overlays      {out / 'overlays'}/<domain>.png (image, ground truth, each method), "
              f"{out / 'overlays'}/<method>/")
    if fisher_paths:
        print(f"  FisherTune    {', '.join(str(p) for p in fisher_paths.values())}")
    layout = "<method>/" if len(seeds) == 1 else "<method>/seed<k>/"
    print(f"  runs          {out / 'runs'}/{layout} (config.yaml, logs/, model_final.safetensors, eval/results.json)")
    return rows
