"""Noise diagnostic of finished DG benchmark runs (issue 22, precondition P4): each run's final model
scored again on more images per evaluated domain than the benchmark used, with the run's own config
(PreciseBN included), so the part of the spread over seeds that the evaluation sample makes can be told
apart from the part training makes.

    python benchmarks/bench_dg_rescore.py OUT/runs/fishertune-label/seed0 OUT/runs/fishertune-label/seed1 \
        OUT/runs/fishertune-label/seed2 [--images 128]

One JSON line per run (mIoU per domain, the target mean), then one line per row: its target means by
seed and their standard deviation. It selects nothing: it measures how much a run's score moves with
the evaluation sample (docs/figures/testbed_log.md, "FisherTune's seed 2").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch


def rescore(run: Path, images: int, domains: Optional[list[str]] = None) -> dict:
    """The final model of the finished run folder ``run`` evaluated on ``images`` images of its source val
    split, its validation family and its targets (or, given ``domains``, these synthetic domains instead
    of its targets: candidate shifts scored with the same models)."""
    from dgss.config import load_config
    from dgss.testbed.experiment import evaluate_model_file

    config, weights = run / "config.yaml", run / "model_final.safetensors"
    for path in (config, weights):
        if not path.is_file():
            raise SystemExit(f"bench_dg_rescore.py: error: {path} not found (a finished benchmark run folder)")
    cfg = load_config(config)
    for dataset in (*cfg.data.val, *cfg.data.test):
        if dataset.type != "synthetic":
            raise SystemExit(f"bench_dg_rescore.py: error: {config}: dataset '{dataset.name}' is not synthetic; "
                             "only the benchmark's generated domains can be given more images")
        dataset.options["num_images"] = images
    if domains:
        template = cfg.data.test[0] if cfg.data.test else cfg.data.val[0]
        cfg.data.test = [dataclasses.replace(template, name=d, options={**template.options, "domain": d})
                         for d in domains]
    results, _ = evaluate_model_file(cfg, weights)
    miou = {r.name: r.miou for r in results}
    targets = [d.name for d in cfg.data.test]
    return {"run": str(run), "row": run.parent.name, "seed": cfg.train.seed, "images": images, "miou": miou,
            "target_mean": sum(miou[t] for t in targets) / len(targets) if targets else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (OUT/runs/<row>/seed<k>)")
    parser.add_argument("--images", type=int, default=128, help="images per evaluated domain (default 128)")
    parser.add_argument("--domains", help="comma-separated synthetic domains scored instead of the run's targets "
                                           "(e.g. candidate severities; default: the run's targets)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    torch.set_num_threads(max(1, args.threads))
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    if domains:
        from dgss.data.synthetic import ALL_DOMAINS

        unknown = [d for d in domains if d not in ALL_DOMAINS]
        if unknown:
            parser.error(f"--domains: unknown synthetic domain(s) {', '.join(unknown)} (valid: {', '.join(ALL_DOMAINS)})")
    by_row: dict[str, list[dict]] = {}
    for run in args.runs:
        record = rescore(run, args.images, domains)
        print(json.dumps(record), flush=True)
        by_row.setdefault(record["row"], []).append(record)
    for row, records in by_row.items():
        means = [r["target_mean"] for r in records]
        spread = statistics.stdev(means) if len(means) > 1 else float("nan")
        print(f"{row}: target mean by seed {' / '.join(f'{m:.2f}' for m in means)}; sd {spread:.2f} "
              f"({args.images} images per domain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
