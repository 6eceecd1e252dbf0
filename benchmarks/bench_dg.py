"""The DG benchmark (issues 16 and 22): does the papers' ordering appear, in a world where it can?

    python benchmarks/bench_dg.py                          # the testbed: every required row, 3 seeds
    python benchmarks/bench_dg.py --core                   # frozen, full, lp-ft, rein, fishertune (+ frozen-2x): P1-P4
    python benchmarks/bench_dg.py --quick                  # every row, 1 seed, a small budget (minutes)
    python benchmarks/bench_dg.py --world demo             # the old demo world (issue 16's benchmark)
    python benchmarks/bench_dg.py --methods frozen,full,rein,fishertune --seeds 5
    python benchmarks/bench_dg.py --device cuda            # the GPU budget (more iterations, images)
    python benchmarks/bench_dg.py --smoke                  # test-sized: a few iterations, tiny sets

The testbed (``--world testbed``, the default; :mod:`dgss.testbed.world`): the label-free foundation ViT
(patch 8) fine-tuned on 'clean', evaluated on its val split, the blur validation family and four
target families at two severities. Each (row, seed) is trained by the engine and evaluated at several
iterations (the learning curve); ``--jobs`` runs train in parallel processes (default 2 on a CPU with 2
or more cores). Writes OUT/results.json and results.md: the preconditions P1-P6 first (a failing P1-P4
makes every verdict "not interpretable"), mean ± std per row and domain, paired differences to Frozen
with 95% t-intervals, the papers' claims with verdicts, the selection-bias table; and curves.png.
Finished runs (OUT/runs/<row>/seed<k>/benchmark.json) are reused when the config is unchanged, so an
interrupted run continues with ``--resume`` (the default; --fresh: run everything again). See
docs/testbed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from dgss.testbed.benchmark import (BUDGETS, ROWS, SKIPPED_ROWS, TESTBED_BUDGETS, TimeLimitReached, clock, run_seeded,
                                    seeds_of)
from dgss.testbed.report import machine_info, write_report
from dgss.testbed.stats import CORE_ROWS, REQUIRED_ROWS, summarize
from dgss.testbed.world import WORLDS

# the old demo world's rows (issue 16)
DEMO_ROWS = ("frozen", "full", "rein", "fishertune", "lora", "vpt", "soma", "ft-random", "ft-fim", "ft-domain",
             "ft-plain", "ft-no-xprime")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=tuple(WORLDS), default="testbed",
                        help="testbed (default: the faithful miniature of docs/testbed.md) or demo (issue 16's)")
    parser.add_argument("--methods", help=f"comma-separated rows (default: the world's required rows; "
                                          f"available: {','.join(ROWS)})")
    parser.add_argument("--core", action="store_true",
                        help=f"the core rows ({','.join(CORE_ROWS)}), enough to decide P1-P4")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 (default: 3; --quick and --smoke: 1)")
    seeds.add_argument("--seed-list", metavar="S,S,...", help="these seeds, e.g. 0,1,2,7")
    parser.add_argument("--out", default="bench_dg_output", help="output folder (default: bench_dg_output)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick budget (about a minute on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="test-sized: a few iterations, 2-4 images")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: train and evaluate on the GPU, with the larger GPU budget unless --quick/--smoke")
    parser.add_argument("--budget", choices=("default", "quick", "smoke", "cuda"),
                        help="the budget by name, whatever the device (default: cuda with --device cuda, else "
                             "default; --quick and --smoke name theirs); e.g. --device cuda --budget default runs "
                             "the CPU run's sizes on a GPU")
    parser.add_argument("--iters", type=int, metavar="N", help="iterations per run (overrides the budget's)")
    parser.add_argument("--train-images", type=int, metavar="N",
                        help="distinct source scenes (overrides the budget's; the iterations stay)")
    parser.add_argument("--curve-points", type=int, metavar="N",
                        help="evaluated iterations per run, the last included (default: 4; --smoke: 2)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads per run (default: 1)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="runs trained at the same time, one process each (default: 2 on a CPU with 2 or more "
                             "cores, else 1; the GPU budget: 1)")
    parser.add_argument("--foundation", metavar="FILE", help="another foundation ViT file")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="start no run after this many seconds; if runs are left, exit with status 3 and no "
                             "report (the same command continues: finished runs are reused). For a run in chunks: "
                             "a CPU session, a device call")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="reuse finished runs of the same config (default)")
    resume.add_argument("--fresh", dest="resume", action="store_false", help="train every run again")
    parser.add_argument("--progress", action="store_true",
                        help="show each run's bars and log lines (default: OUT/runs/<method>/seed<k>/stdout.log)")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace):
    """(rows, seeds, budget name, budget, curve points) from the arguments; SystemExit(2) with one line
    on bad input."""
    def fail(message: str):
        print(f"bench_dg.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    if args.core and args.methods:
        fail("--core and --methods: give one of them")
    default = CORE_ROWS if args.core else (REQUIRED_ROWS if args.world == "testbed" else DEMO_ROWS)
    methods = [m.strip() for m in (args.methods or ",".join(default)).split(",") if m.strip()]
    unknown = [m for m in methods if m not in ROWS]
    if unknown or not methods:
        skipped = [f"{m} ({SKIPPED_ROWS[m]})" for m in unknown if m in SKIPPED_ROWS]
        fail(f"--methods: unknown row(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(ROWS)}"
             + (f"; not available here: {', '.join(skipped)}" if skipped else ""))
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            fail(f"--seed-list: not a comma-separated list of integers: {args.seed_list}")
        if not seeds or len(set(seeds)) != len(seeds):
            fail(f"--seed-list: give distinct seeds, got {args.seed_list!r}")
    else:
        count = args.seeds if args.seeds is not None else (1 if args.quick or args.smoke else 3)
        if count < 1:
            fail(f"--seeds must be >= 1, got {count}")
        seeds = list(range(count))
    if args.budget and (args.quick or args.smoke):
        fail("--budget and --quick/--smoke: give one of them")
    name = args.budget or ("smoke" if args.smoke else "quick" if args.quick else "cuda" if args.device == "cuda"
                           else "default")
    budget = (TESTBED_BUDGETS if args.world == "testbed" else BUDGETS)[name]
    if args.iters is not None:
        if args.iters < 2:
            fail(f"--iters must be >= 2, got {args.iters}")
        budget = dataclasses.replace(budget, iters=args.iters)
    if args.train_images is not None:
        if args.train_images < 1:
            fail(f"--train-images must be >= 1, got {args.train_images}")
        budget = dataclasses.replace(budget, train_images=args.train_images)
    points = args.curve_points if args.curve_points is not None else (2 if args.smoke else 4)
    if not 1 <= points <= budget.iters:
        fail(f"--curve-points must be in [1, {budget.iters}] (the iterations), got {points}")
    return methods, seeds, name, budget, points


def main(argv=None) -> int:
    args = parse_args(argv)
    methods, seeds, name, budget, points = plan(args)
    if args.foundation:
        from pathlib import Path

        if not Path(args.foundation).is_file():
            print(f"bench_dg.py: error: --foundation: file not found: {args.foundation}", file=sys.stderr)
            return 2
    from dgss.testbed.experiment import pick_threads

    threads = pick_threads(args.threads)
    jobs = args.jobs if args.jobs is not None else (min(2, os.cpu_count() or 1) if args.device == "cpu" else 1)
    if jobs < 1 or (jobs > 1 and args.device != "cpu"):
        print(f"bench_dg.py: error: --jobs must be >= 1 (and 1 with --device cuda), got {jobs}", file=sys.stderr)
        return 2
    runs = sum(len(seeds_of(m, seeds)) for m in methods)  # frozen-2x: the first seed only (P1 reads one)
    world = WORLDS[args.world]
    print(f"bench_dg ({world.name} world): {len(methods)} method(s) x {len(seeds)} seed(s) = {runs} runs, budget '{name}' "
          f"({budget.iters} iterations, {budget.train_images} source scenes, {budget.eval_images} images per "
          f"domain, {points} curve points), {args.device}, {jobs} job(s) x {threads} thread(s) -> {args.out}/",
          flush=True)
    for row, why in SKIPPED_ROWS.items():
        print(f"row '{row}' skipped: {why}", flush=True)
    start = time.time()
    deadline = None if args.time_limit is None else start + args.time_limit
    try:
        records = run_seeded(methods, seeds, budget, args.out, args.device, threads, points, weights=args.foundation,
                             resume=args.resume, progress=args.progress, quiet=not args.progress, jobs=jobs,
                             world=world, deadline=deadline)
    except TimeLimitReached as stop:
        print(f"bench_dg.py: {stop} ({clock(time.time() - start)})", flush=True)
        return 3
    wall = time.time() - start
    summary = summarize(records, world.source, world.targets, gated=world.gated, unseen=world.unseen)
    meta = {"world": world.name, "source": world.source, "validation": list(world.validation),
            "targets": list(world.targets), "unseen": list(world.unseen), "budget_name": name, "jobs": jobs, "budget": dataclasses.asdict(budget), "seeds": seeds,
            "methods": methods,
            "curve_points": points, "rows": {m: {"method": ROWS[m][0], "overrides": ROWS[m][1]} for m in methods},
            "skipped_rows": SKIPPED_ROWS, "machine": machine_info(threads, args.device),
            "wall_seconds": round(wall, 1), "wall_time": clock(wall),
            "runs_trained": sum(not r["skipped"] for r in records), "runs_reused": sum(r["skipped"] for r in records),
            "command": " ".join(["benchmarks/bench_dg.py", *(argv if argv is not None else sys.argv[1:])])}
    paths = write_report(records, summary, args.out, meta)
    print("\n" + (paths["md"].read_text().split("\n\n", 1)[1]).rstrip() + "\n")
    print(f"written ({clock(wall)}): {paths['md']}, {paths['json']}, {paths['curves']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
