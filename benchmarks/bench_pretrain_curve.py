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

``--unseen snow-1,snow-2``: the look no pool renders (:data:`dgss.testbed.pool.UNSEEN_FAMILIES`) as
its own column. Each frozen and scratch run's final model is scored on these domains as the run scored
its targets (the same images, PreciseBN), cached in OUT/unseen/<file stem or scratch>/seed<k>.json by the
model's content, and Frozen - Scratch on them is paired by seed like P6. A record without its model file
(the run was trained on another machine; only records are kept in git) is trained again here, under OUT.

Writes OUT/curve.json and OUT/curve.md, one row per foundation, sorted by images seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from dgss.engine.trainer import FINAL_MODEL_NAME
from dgss.fileio import atomic_write, file_sha256
from dgss.testbed.benchmark import RESULT_FILE, TESTBED_BUDGETS, clock, run_seeded
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


def evaluate_on(run: Path, domains) -> dict[str, float]:
    """mIoU of the finished run folder ``run``'s final model on the synthetic ``domains``, evaluated as the
    run evaluated its targets: its own config (images per domain, size, objects, PreciseBN)."""
    from dgss.config import load_config
    from dgss.testbed.experiment import evaluate_model_file

    cfg = load_config(run / "config.yaml")
    template = cfg.data.test[0]
    cfg.data.test = [dataclasses.replace(template, name=d, options={**template.options, "domain": d}) for d in domains]
    cfg.data.val = []  # scored by the run already (PreciseBN draws its batches from the training set)
    results, _ = evaluate_model_file(cfg, run / FINAL_MODEL_NAME)
    return {r.name: r.miou for r in results}


def unseen_scores(folder: Path, row: str, seeds, cache_dir: Path, domains) -> tuple[dict[int, dict], list[int]]:
    """(seed -> {domain: mIoU}, the seeds that cannot be scored) for ``folder``'s finished ``row`` runs:
    from ``cache_dir``/seed<k>.json when it holds these domains for the same model (the record's
    ``model_sha256``), else by evaluating the run's final model (and cached). A run with neither (its model
    stayed on the machine that trained it) cannot be scored."""
    scores, missing = {}, []
    for seed in seeds:
        run = folder / "runs" / row / f"seed{seed}"
        model_sha256 = json.loads((run / RESULT_FILE).read_text()).get("model_sha256")
        cache = cache_dir / f"seed{seed}.json"
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
        if saved.get("domains") == list(domains) and model_sha256 and saved.get("model_sha256") == model_sha256:
            scores[seed] = saved["miou"]
            continue
        if not (run / FINAL_MODEL_NAME).is_file():
            missing.append(seed)
            continue
        scores[seed] = evaluate_on(run, domains)
        text = json.dumps({"run": str(run), "model_sha256": model_sha256, "domains": list(domains),
                           "miou": scores[seed]}, indent=1) + "\n"
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: Path(tmp).write_text(text))
    return scores, missing


def trained_and_scored(row: str, seeds, folder: Path, cache_dir: Path, domains, runs: dict):
    """``row``'s runs in ``folder`` (finished ones reused) and their scores on ``domains``; a run whose
    record is here without its model file (nor a cached score) is trained again."""
    records = run_seeded([row], seeds, out_dir=folder, **runs)
    scores, missing = unseen_scores(folder, row, seeds, cache_dir, domains)
    if missing:
        for seed in missing:
            shutil.rmtree(folder / "runs" / row / f"seed{seed}")
        records = run_seeded([row], seeds, out_dir=folder, **runs)
        scores, missing = unseen_scores(folder, row, seeds, cache_dir, domains)
    return records, scores


def _mean_over(scores: dict[int, dict]) -> dict[int, float]:
    return {seed: sum(miou.values()) / len(miou) for seed, miou in scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (the frozen runs, curve.json, curve.md)")
    parser.add_argument("foundations", nargs="+", help="foundation ViT files (safetensors)")
    parser.add_argument("--scratch", required=True, help="a testbed run folder holding the scratch row's records")
    parser.add_argument("--seed-list", default="0,1,2", help="seeds of the frozen runs (default 0,1,2)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="test-sized frozen runs (a few iterations)")
    parser.add_argument("--unseen", help="comma-separated synthetic domains of a look no pool renders (e.g. "
                                         "snow-1,snow-2), scored as their own column")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seed_list.split(",")]
    unseen = [d.strip() for d in (args.unseen or "").split(",") if d.strip()]
    if unseen:
        from dgss.data.synthetic import ALL_DOMAINS

        unknown = [d for d in unseen if d not in ALL_DOMAINS]
        if unknown:
            parser.error(f"--unseen: unknown synthetic domain(s) {', '.join(unknown)} (valid: {', '.join(ALL_DOMAINS)})")
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
    runs = dict(budget=budget, world=TESTBED_WORLD, jobs=args.jobs, threads=1, quiet=True,
                curve_points=2 if args.smoke else 4)
    if unseen:  # Scratch's runs scored on the unseen look: the --scratch run's, or trained here
        scratch_unseen, missing = unseen_scores(Path(args.scratch), "scratch", seeds, out / "unseen" / "scratch", unseen)
        if missing:
            records, scratch_unseen = trained_and_scored("scratch", seeds, out / "scratch", out / "unseen" / "scratch",
                                                         unseen, runs)
            for r in records:  # the same computation on another machine: a difference is the machine's numerics
                if abs(r["target_mean"] - scratch[r["seed"]]) > 0.05:
                    print(f"note: scratch seed {r['seed']} trained here scores {r['target_mean']:.2f} on the targets, "
                          f"its record in --scratch {scratch[r['seed']]:.2f}; P6 keeps the record's", flush=True)
        scratch_means = _mean_over(scratch_unseen)
    rows = []
    for path in files:
        meta = file_metadata(path)
        # the testbed's own foundation: its frozen records are already in the --scratch run
        folder = Path(args.scratch) if file_sha256(str(path)) == testbed_sha256 else out / path.stem
        records = run_seeded(["frozen"], seeds, out_dir=folder, weights=str(path), **runs)
        frozen_unseen, missing = (unseen_scores(folder, "frozen", seeds, out / "unseen" / path.stem, unseen)
                                  if unseen else (None, []))
        if missing:  # the records came from another machine: trained again here
            records, frozen_unseen = trained_and_scored("frozen", seeds, out / path.stem, out / "unseen" / path.stem,
                                                        unseen, dict(runs, weights=str(path)))
        frozen = {r["seed"]: r["target_mean"] for r in records}
        source = t_interval([r["curve"][-1]["miou"][TESTBED_WORLD.source] for r in records])
        p6, targets = paired_difference(frozen, scratch), t_interval(list(frozen.values()))
        rows.append({"file": str(path), "images_seen": images_seen(meta), "iteration": meta.get("iteration"),
                     "probe": probe_row(path, meta), "frozen_source": source["mean"],
                     "frozen_targets": targets["mean"], "frozen_targets_sd": targets["sd"],
                     "scratch_targets": t_interval(list(scratch.values()))["mean"],
                     "P6": {k: p6[k] for k in ("mean", "low", "high", "n")}, "P6_pass": p6["mean"] >= P6_MIN,
                     "seconds": sum(r["seconds"] for r in records)})
        if unseen:
            frozen_means = _mean_over(frozen_unseen)
            on_unseen = paired_difference(frozen_means, scratch_means)
            rows[-1]["unseen"] = {
                "domains": unseen, "frozen": t_interval(list(frozen_means.values()))["mean"],
                "scratch": t_interval(list(scratch_means.values()))["mean"],
                "frozen_by_domain": {d: sum(m[d] for m in frozen_unseen.values()) / len(seeds) for d in unseen},
                "difference": {k: on_unseen[k] for k in ("mean", "low", "high", "n")}}
        print(f"{path}: {rows[-1]['images_seen']} images seen, frozen target mean {rows[-1]['frozen_targets']:.2f}, "
              f"P6 {p6['mean']:+.2f} [{p6['low']:+.2f}, {p6['high']:+.2f}] ({clock(rows[-1]['seconds'])})", flush=True)
    rows.sort(key=lambda r: (r["images_seen"] is None, r["images_seen"] or 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"seeds": seeds, "scratch_from": args.scratch, "budget": budget.iters,
                                                "P6_threshold": P6_MIN, "unseen": unseen, "rows": rows}, indent=1) + "\n")
    extra = f" | Frozen / Scratch on {', '.join(unseen)} | Frozen - Scratch there [95 %]" if unseen else ""
    lines = ["| foundation | images seen | k-NN clean / textured / blur-2 | Frozen source | Frozen targets "
             f"| Scratch targets | P6 = Frozen - Scratch [95 %]{extra} |", "|---|---|---|---|---|---|---|" + "---|" * (2 * bool(unseen))]
    for r in rows:
        knn = " / ".join(f"{r['probe'][f'knn_{d}']:.1f}" for d in ("clean", "textured", "blur-2")
                         if f"knn_{d}" in r["probe"]) or "-"
        p6 = r["P6"]
        lines.append(f"| {Path(r['file']).name} | {r['images_seen']:,} | {knn} | {r['frozen_source']:.1f} | "
                     f"{r['frozen_targets']:.1f} ± {r['frozen_targets_sd']:.1f} | {r['scratch_targets']:.1f} | "
                     f"{p6['mean']:+.1f} [{p6['low']:+.1f}, {p6['high']:+.1f}] |")
        if unseen:
            u, d = r["unseen"], r["unseen"]["difference"]
            lines[-1] += f" {u['frozen']:.1f} / {u['scratch']:.1f} | {d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] |"
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
