"""Source-only probes of the DG testbed (issue 22): the numbers behind docs/figures/testbed_log.md's world designs.

    python benchmarks/bench_dg_probe.py OUT frozen,full                       # 960 iterations, 960 scenes
    python benchmarks/bench_dg_probe.py OUT frozen --scale 2 --same-scenes    # P1: twice the iterations
    python benchmarks/bench_dg_probe.py OUT frozen model.head.type=fpn train.lr=0.01

One seed (0), one thread, 64 images of the source and the blur family, and no target: a probe may choose
a world setting, so it never sees a target. ``--scale K`` trains K x 960 iterations on K x 960 scenes, or
on 960 with ``--same-scenes`` (the benchmark's frozen-2x), or on ``--scenes N``. Extra arguments are
dotted config overrides added to every row. Prints one line per row: its seconds and its mIoU per domain.
"""

from __future__ import annotations

import argparse

from dgss.testbed import benchmark
from dgss.testbed.benchmark import DemoBudget
from dgss.testbed.world import TESTBED_WORLD


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("rows", help="comma-separated rows of dgss.testbed.benchmark.ROWS")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.head.type=fpn")
    parser.add_argument("--scale", type=int, default=1, help="K x 960 iterations (default 1)")
    scenes = parser.add_mutually_exclusive_group()
    scenes.add_argument("--same-scenes", action="store_true", help="960 source scenes whatever the scale")
    scenes.add_argument("--scenes", type=int, help="this many source scenes")
    parser.add_argument("--smoke", action="store_true", help="test-sized: a few iterations, 2 images")
    args = parser.parse_args(argv)
    iters = 960 * args.scale
    train_images = args.scenes or (960 if args.same_scenes else iters)
    budget = (benchmark.SMOKE_BUDGET if args.smoke else
              DemoBudget(iters=iters, train_images=train_images, eval_images=64, fisher_batches=16, overlay_images=0))
    names = []
    for row in args.rows.split(","):
        if row not in benchmark.ROWS:
            parser.error(f"unknown row '{row}' (available: {', '.join(benchmark.ROWS)})")
        method, overrides = benchmark.ROWS[row]
        name = row if args.scale == 1 else f"{row}-x{args.scale}" + ("i" if train_images != iters else "")
        benchmark.ROWS[name] = (method, [*overrides, *args.overrides])
        names.append(name)
    records = benchmark.run_seeded(names, [0], budget, args.out, "cpu", 1, 1, world=TESTBED_WORLD, targets=[],
                                   quiet=True)
    for record in records:
        print(record["row"], round(record["seconds"]),
              {k: round(v, 1) for k, v in record["curve"][-1]["miou"].items()}, flush=True)


if __name__ == "__main__":
    main()
