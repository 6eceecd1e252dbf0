"""What more label-free pretraining buys: P6 and the dense k-NN probe against images seen (issue 37).

    python benchmarks/bench_pretrain_curve.py OUT FOUNDATION [FOUNDATION ...] --scratch benchmarks/results/testbed

Each FOUNDATION is a foundation ViT file (a snapshot of a long pretraining run,
``benchmarks/results/ssl_pretrain/<run>/snapshots/iter_NNNNNN.safetensors``, the shipped file, or the
run's starting point ``iter_000000``). For each, the testbed's ``frozen`` row is trained on it for the
given seeds (the testbed's default budget; runs reused when finished, under OUT/<file stem>/), and set
against the ``scratch`` row of the testbed run named by ``--scratch`` (Full from a random initialisation,
which no foundation changes): P6 = Frozen - Scratch on the target mean, paired by seed, with its 95 %
t-interval; P6 passes at >= +10. The probe (patch k-NN mIoU on the source look, a pool look and the
validation family, never a target) is read from the file's metadata (or the run's state or manifest),
and computed on the file where none recorded it (a run's starting point).

Writes OUT/curve.json and OUT/curve.md, one row per foundation, sorted by images seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from dgss.fileio import file_sha256
from dgss.testbed.benchmark import TESTBED_BUDGETS, clock, run_seeded
from dgss.testbed.stats import P6_MIN, paired_difference, t_interval
from dgss.testbed.world import TESTBED_WORLD


def file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def images_seen(meta: dict) -> Optional[int]:
    """Images the foundation saw: a snapshot records them; a finished file, its recipe's iters x batch."""
    if "images_seen" in meta:
        return int(meta["images_seen"])
    recipe = json.loads(meta.get("recipe", "null") or "null")
    return int(recipe["iters"]) * int(recipe["batch_size"]) if recipe else None


def probe_row(path: Path, meta: dict) -> dict:
    """The dense k-NN monitor's values at this file's iteration, from its metadata, else from the run's
    state or manifest beside the snapshot folder; {} when none recorded it (a random start has none)."""
    if "monitor" in meta:
        row = json.loads(meta["monitor"])
    else:
        iteration = int(meta.get("iteration", -1))
        history = []
        for source in (path.parent.parent / "state.pt", path.parent.parent / "foundation.json",
                       path.with_suffix(".json")):
            if source.suffix == ".pt" and source.is_file():
                import torch

                history = json.loads(torch.load(source, map_location="cpu", weights_only=True)["history"])
            elif source.suffix == ".json" and source.is_file():
                history = json.loads(source.read_text()).get("monitor", [])
            if history:
                break
        if iteration < 0 and history:
            iteration = history[-1]["iteration"]
        row = next((r for r in history if r["iteration"] == iteration), {})
    found = {k: v for k, v in row.items() if k.startswith("knn_")}
    if not found:  # none recorded (a run's start, a file made before snapshots): the same probe, here
        from dgss.testbed.ssl_foundation import build_ssl_backbone, dense_knn_probe

        found = {f"knn_{d}": round(v, 2) for d, v in dense_knn_probe(build_ssl_backbone(str(path)).model).items()}
    return found


def scratch_target_means(folder: Path, seeds) -> dict[int, float]:
    means = {}
    for seed in seeds:
        record = folder / "runs" / "scratch" / f"seed{seed}" / "benchmark.json"
        if not record.is_file():
            raise FileNotFoundError(f"--scratch: {record} is missing; run `benchmarks/bench_dg.py --out {folder} "
                                    f"--methods scratch --seed-list {','.join(map(str, seeds))}` first")
        means[seed] = json.loads(record.read_text())["target_mean"]
    return means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (the frozen runs, curve.json, curve.md)")
    parser.add_argument("foundations", nargs="+", help="foundation ViT files (safetensors)")
    parser.add_argument("--scratch", required=True, help="a testbed run folder holding the scratch row's records")
    parser.add_argument("--seed-list", default="0,1,2", help="seeds of the frozen runs (default 0,1,2)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="test-sized frozen runs (a few iterations)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seed_list.split(",")]
    files = [Path(f) for f in args.foundations]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"bench_pretrain_curve.py: error: foundation file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    scratch = scratch_target_means(Path(args.scratch), seeds)
    frozen_record = Path(args.scratch) / "runs" / "frozen" / f"seed{seeds[0]}" / "benchmark.json"
    testbed_sha256 = json.loads(frozen_record.read_text())["weights_sha256"] if frozen_record.is_file() else None
    out = Path(args.out)
    budget = TESTBED_BUDGETS["smoke" if args.smoke else "default"]
    rows = []
    for path in files:
        meta = file_metadata(path)
        # the testbed's own foundation: its frozen records are already in the --scratch run
        folder = Path(args.scratch) if file_sha256(str(path)) == testbed_sha256 else out / path.stem
        records = run_seeded(["frozen"], seeds, budget, folder, weights=str(path), world=TESTBED_WORLD,
                             jobs=args.jobs, threads=1, quiet=True, curve_points=2 if args.smoke else 4)
        frozen = {r["seed"]: r["target_mean"] for r in records}
        source = t_interval([r["curve"][-1]["miou"][TESTBED_WORLD.source] for r in records])
        p6, targets = paired_difference(frozen, scratch), t_interval(list(frozen.values()))
        rows.append({"file": str(path), "images_seen": images_seen(meta), "iteration": meta.get("iteration"),
                     "probe": probe_row(path, meta), "frozen_source": source["mean"],
                     "frozen_targets": targets["mean"], "frozen_targets_sd": targets["sd"],
                     "scratch_targets": t_interval(list(scratch.values()))["mean"],
                     "P6": {k: p6[k] for k in ("mean", "low", "high", "n")}, "P6_pass": p6["mean"] >= P6_MIN,
                     "seconds": sum(r["seconds"] for r in records)})
        print(f"{path}: {rows[-1]['images_seen']} images seen, frozen target mean {rows[-1]['frozen_targets']:.2f}, "
              f"P6 {p6['mean']:+.2f} [{p6['low']:+.2f}, {p6['high']:+.2f}] ({clock(rows[-1]['seconds'])})", flush=True)
    rows.sort(key=lambda r: (r["images_seen"] is None, r["images_seen"] or 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"seeds": seeds, "scratch_from": args.scratch, "budget": budget.iters,
                                                "P6_threshold": P6_MIN, "rows": rows}, indent=1) + "\n")
    lines = ["| foundation | images seen | k-NN clean / textured / blur-2 | Frozen source | Frozen targets "
             "| Scratch targets | P6 = Frozen - Scratch [95 %] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        knn = " / ".join(f"{r['probe'][f'knn_{d}']:.1f}" for d in ("clean", "textured", "blur-2")
                         if f"knn_{d}" in r["probe"]) or "-"
        p6 = r["P6"]
        lines.append(f"| {Path(r['file']).name} | {r['images_seen']:,} | {knn} | {r['frozen_source']:.1f} | "
                     f"{r['frozen_targets']:.1f} ± {r['frozen_targets_sd']:.1f} | {r['scratch_targets']:.1f} | "
                     f"{p6['mean']:+.1f} [{p6['low']:+.1f}, {p6['high']:+.1f}] |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
