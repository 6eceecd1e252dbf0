"""The testbed's target screen on a lent GPU (issue 22, P3-P4): many seeds of the core rows trained at the
CPU run's sizes, each final model then scored on the world's targets and on candidate severities.

    python benchmarks/gpu_dg_screen.py --out $OUT [--deadline 520] [--parallel 10] [--images 64]
    python benchmarks/gpu_dg_screen.py --out /tmp/screen --device cpu --budget smoke   # a dry run on a CPU
    python benchmarks/gpu_dg_screen.py --summarize benchmarks/results/gpu_h200/dg_screen/scenes1920/rescore.jsonl

Training sees the source only, so the targets a world is scored on can be screened after training,
with the same models: every (row, seed) of JOBS is ``bench_dg.py --budget default --methods ROW
--seed-list SEED`` in its own process (several at once on one GPU), then ``bench_dg_rescore.py
--domains`` on its final model. It writes OUT/<row>-seed<k>.json (the run's record, without model files)
and OUT/<row>-seed<k>.rescore.jsonl as each finishes (with ``--pack``, one archive OUT/screen.tgz of
them all instead), and stops launching at the deadline, so a run cut
by the device's time limit still returns what finished. It selects nothing: the rule that picks the
severities reads Frozen alone (docs/figures/testbed_log.md, "Targets off the floor").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# in priority order: the rule's Frozen seeds first, then the adapting rows whose spread decides P4
JOBS = [("frozen", s) for s in (0, 1, 2)] + [(row, s) for s in (0, 1, 2) for row in ("full", "lp-ft", "fishertune")] \
    + [(row, s) for s in (3, 4) for row in ("full", "lp-ft", "fishertune", "frozen")] + [("rein", s) for s in (0, 1, 2)]
# the world's targets at the screen, and the set the rule written before it chose (on Frozen alone)
TARGET_SETS = {
    "world": ("night-1", "night-2", "fog-1", "fog-2", "rain-1", "rain-2", "colorshift-1", "colorshift-2"),
    "rule": ("night-a", "night-c", "fog-1", "fog-2", "rain-1", "rain-2", "colorshift-1", "colorshift-a"),
}
# every domain a final model is re-scored on: the world's targets, then the candidate severities
DOMAINS = (*TARGET_SETS["world"], "night-a", "night-b", "night-c", "colorshift-a", "colorshift-b")


def summarize(path: Path) -> str:
    """The tables of docs/figures/testbed_log.md from re-scoring lines: Frozen's retention per domain (its mIoU
    over its source mIoU, mean over seeds), then per row and target set the target mean by seed and its
    standard deviation, beside the source and blur-family spreads."""
    import statistics

    records = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    by_row: dict[str, dict[int, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["seed"]] = r["miou"]
    lines = []
    if "frozen" in by_row:
        frozen = list(by_row["frozen"].values())
        source = statistics.mean(m["clean"] for m in frozen)
        lines.append("frozen retention: " + ", ".join(f"{d} {statistics.mean(m[d] for m in frozen) / source:.2f}"
                                                       for d in frozen[0] if d != "clean"))
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
    for row, seeds in by_row.items():
        runs = [seeds[k] for k in sorted(seeds)]
        source = [m["clean"] for m in runs]
        blur = [(m["blur-1"] + m["blur-2"]) / 2 for m in runs]
        parts = [f"{row} (seeds {','.join(map(str, sorted(seeds)))}): source sd {sd(source):.2f}, blur sd {sd(blur):.2f}"]
        for name, targets in TARGET_SETS.items():
            means = [statistics.mean(m[t] for t in targets) for m in runs]
            parts.append(f"{name} {' / '.join(f'{x:.2f}' for x in means)} (sd {sd(means):.2f})")
        lines.append("; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", type=Path, metavar="JSONL", help="print the tables of a finished screen")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dg_screen"), help="run folders (model files)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="default")
    parser.add_argument("--deadline", type=float, default=520.0, help="seconds: no launch after, kill at")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="images per domain in the re-scoring")
    parser.add_argument("--limit", type=int, help="only the first N jobs")
    parser.add_argument("--rows", help="comma-separated rows, each at every seed of --seeds (default: JOBS)")
    parser.add_argument("--seeds", default="0,1,2", help="with --rows (default 0,1,2)")
    parser.add_argument("--pack", action="store_true",
                        help="keep OUT to screen.log and one archive, screen.tgz (the device returns few files)")
    parser.add_argument("--extra", default="", help="more bench_dg.py arguments, e.g. '--train-images 7680'")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.out is None:
        parser.error("--out is required (or --summarize)")
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    jobs = ([(row, int(seed)) for seed in args.seeds.split(",") for row in args.rows.split(",")] if args.rows
            else JOBS)
    pending, running, finished = list(jobs[:args.limit] if args.limit else jobs), {}, []
    args.work.mkdir(parents=True, exist_ok=True)
    log = (args.out / "screen.log").open("a")

    def say(line):
        line = f"[{time.time() - start:6.1f}s] {line}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    while pending or running:
        elapsed = time.time() - start
        while pending and len(running) < args.parallel and elapsed < args.deadline - 60:
            row, seed = pending.pop(0)
            work = args.work / f"{row}-seed{seed}"
            run_dir = work / "runs" / row / f"seed{seed}"
            command = (f"{sys.executable} {HERE / 'bench_dg.py'} --device {args.device} --budget {args.budget} "
                       f"--methods {row} --seed-list {seed} --jobs 1 {args.extra} --out {work} > {work}.train.log 2>&1; "
                       # the report's figure needs matplotlib, which a bare GPU machine may lack: the run's
                       # record is written before it, so the re-scoring goes on whatever the report did
                       f"test -f {run_dir}/benchmark.json && {sys.executable} {HERE / 'bench_dg_rescore.py'} {run_dir} --images {args.images} "
                       f"--domains {','.join(DOMAINS)} > {work}.rescore.jsonl 2> {work}.rescore.err")
            running[row, seed] = (subprocess.Popen(command, shell=True, env=env, start_new_session=True), run_dir, work)
            say(f"launched {row} seed {seed}")
        for key, (proc, run_dir, work) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            name = f"{key[0]}-seed{key[1]}"
            record = run_dir / "benchmark.json"
            if args.pack:  # one archive of every record so far: a device may return only a few files
                subprocess.run(f"cd {args.work} && tar czf {args.out / 'screen.tgz'} *.rescore.jsonl "
                               f"*/runs/*/seed*/benchmark.json", shell=True, check=False)
            else:
                if record.is_file():
                    shutil.copy(record, args.out / f"{name}.json")
                for suffix in (".rescore.jsonl", ".train.log", ".rescore.err"):  # the training log if it failed
                    path = Path(f"{work}{suffix}")
                    if path.is_file() and (suffix != ".train.log" or proc.returncode or not record.is_file()):
                        shutil.copy(path, args.out / f"{name}{suffix}")
            finished.append(name)
            say(f"finished {name} rc {proc.returncode}")
        if time.time() - start > args.deadline:
            for key, (proc, _, _) in running.items():
                os.killpg(proc.pid, 9)
                say(f"killed {key[0]} seed {key[1]} at the deadline")
            break
        time.sleep(1.0)
    say(f"done: {len(finished)} finished, {len(pending)} not launched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
