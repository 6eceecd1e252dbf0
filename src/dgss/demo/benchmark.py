"""The seeded domain-generalization benchmark: the demo's experiment for many methods and seeds.

    records = run_seeded(["frozen", "rein"], seeds=[0, 1, 2], budget=DEFAULT_BUDGET, out_dir="bench_dg")
    summary = summarize(records, SOURCE, TARGETS)          # dgss.demo.dg_stats
    write_report(records, summary, "bench_dg", meta)       # dgss.demo.dg_report

Each (row, seed) is :func:`dgss.demo.run.demo_config` with the row's method and overrides and that
seed, trained by the engine and evaluated at :func:`dgss.demo.run.curve_iterations` (source val split
and every target) by :func:`dgss.demo.run.run_method`, the code path of ``dgss demo``. A finished run
leaves ``OUT/runs/<row>/seed<k>/benchmark.json`` (written atomically) with its resolved config; a later
call with the same config and foundation file reads it instead of training again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import config_differences, to_dict
from ..tuning import METHODS as TUNING_METHODS
from .run import TARGETS, DemoBudget, demo_config, pick_threads, run_method

__all__ = ["ROWS", "SKIPPED_ROWS", "BUDGETS", "DEFAULT_BUDGET", "QUICK_BUDGET", "SMOKE_BUDGET", "CUDA_BUDGET",
           "RESULT_FILE", "run_seeded", "clock"]

# The benchmark's rows: name -> (method.name, dotted overrides of the demo experiment). A new row is one
# line here. FisherTune's ablations (Table 4, Fig. 5, Table 5 of the paper) are FisherTune with one
# option changed; "fishertune" itself keeps every default, so a changed default reaches it.
_ROWS: dict[str, tuple[str, list[str]]] = {
    "frozen": ("frozen", []),
    "full": ("full", []),
    "rein": ("rein", []),
    "fishertune": ("fishertune", []),
    "lora": ("lora", []),
    # the Rein authors' 150 prompts per layer sit next to DINOv2-L's 1024 patch tokens at 512 (15%);
    # the demo's 128 crops have 64 tokens, so 10 prompts keep that share (150 would drown the image)
    "vpt": ("vpt", ["method.vpt.num_tokens=10"]),
    # SoMA freezes blocks 0-7 of a 24-block ViT-L (a third); the demo's ViT has 6 blocks: 0-1 frozen
    "soma": ("soma", ["method.soma.start_block=2"]),
    "ft-random": ("fishertune", ["method.fishertune.selection=random"]),
    "ft-fim": ("fishertune", ["method.fishertune.selection=fisher"]),
    "ft-domain": ("fishertune", ["method.fishertune.selection=domain"]),
    "ft-plain": ("fishertune", ["method.fishertune.variational=false"]),
    # explicit 0.0: FisherTune's default may train on x' in some iterations; this row never does
    "ft-no-xprime": ("fishertune", ["method.fishertune.train_perturb_prob=0.0"]),
}
ROWS = {name: row for name, row in _ROWS.items() if row[0] in TUNING_METHODS}
SKIPPED_ROWS = {name: f"method.name '{row[0]}' is not in this dgss" for name, row in _ROWS.items()
                if name not in ROWS}

# Budgets (the sizes of every run; the same for every row). Measured (docs/dg_benchmark.md): a run costs
# about 0.24 (frozen) to 0.32 s (rein) per iteration on one thread, plus about 10 s per evaluation of
# the 6 domains. default: 12 rows x 3 seeds x (640 iterations + 4 evaluations) in 2 processes
# ~ 36 x 230 s / 2 ~ 70 min on the 2-core machine.
DEFAULT_BUDGET = DemoBudget(iters=640, train_images=640, eval_images=24, fisher_batches=16, overlay_images=0)
# quick: every row, 1 seed, about a minute: a check that everything runs, numbers too early to read
QUICK_BUDGET = DemoBudget(iters=16, train_images=16, eval_images=4, fisher_batches=2, overlay_images=0)
# smoke: the test suite's (a few iterations, tiny sets)
SMOKE_BUDGET = DemoBudget(iters=4, train_images=4, eval_images=2, fisher_batches=2, overlay_images=0)
# a GPU: 5 x the demo's iterations and source scenes, 4 x its evaluation images, 4 x FisherTune's batches
CUDA_BUDGET = DemoBudget(iters=2000, train_images=2000, eval_images=96, fisher_batches=32, overlay_images=0)
BUDGETS = {"default": DEFAULT_BUDGET, "quick": QUICK_BUDGET, "smoke": SMOKE_BUDGET, "cuda": CUDA_BUDGET}

RESULT_FILE = "benchmark.json"  # in each run folder: the run's numbers and the config that made them
# keys that do not change a run's numbers: where it is written, what it shows
_RESUME_IGNORED = ("name", "output_dir", "train.progress_bar", "train.log_interval", "data.num_workers")


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _seeded_name(row: str, seed: int) -> str:
    return f"{row}/seed{seed}"


def _print(line: str) -> None:
    print(line, flush=True)


def _finished_record(path: Path, config: dict, weights_sha256: str) -> Optional[dict]:
    """The record of a finished run at ``path`` when it was made by the same experiment, else None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("weights_sha256") != weights_sha256:
        return None
    if config_differences(saved.get("config") or {}, config, ignore=_RESUME_IGNORED):
        return None
    return saved


def _line(record: dict) -> str:
    last = record["curve"][-1]["miou"]
    scores = ", ".join(f"{name} {value:.1f}" for name, value in last.items())
    return f"mIoU {scores}; target mean {record['target_mean']:.1f}"


def _run_job(kwargs: dict) -> dict:
    """One (row, seed) in a worker process (see ``jobs`` of :func:`run_seeded`)."""
    (record,) = run_seeded(**kwargs, log=lambda line: None)
    return record


def _run_parallel(jobs: int, pairs: list[tuple[str, int]], kwargs: dict,
                  log: Callable[[str], None]) -> dict[tuple[str, int], dict]:
    """Train ``pairs`` in ``jobs`` worker processes (spawned: a clean torch in each); their records."""
    import concurrent.futures
    import multiprocessing

    start = time.time()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_job, {**kwargs, "methods": [row], "seeds": [seed]}): (row, seed)
                   for row, seed in pairs}
        records, run_seconds = {}, 0.0
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row, seed = futures[future]
            record = records[row, seed] = future.result()
            elapsed = time.time() - start
            run_seconds += record["seconds"]
            left = run_seconds / done * (len(pairs) - done) / jobs  # the runs left, ``jobs`` at a time
            how = "finished earlier, not run again" if record["skipped"] else clock(record["seconds"])
            log(f"[{done}/{len(pairs)}] {row} seed {seed}: {_line(record)} ({how}; "
                f"{clock(elapsed)} so far, about {clock(left)} to go)")
    return records


def run_seeded(methods: Sequence[str], seeds: Sequence[int], budget: DemoBudget, out_dir: str | Path,
               device: str = "cpu", threads: Optional[int] = None, curve_points: int = 4, *,
               weights: Optional[str] = None, targets: Sequence[str] = TARGETS, resume: bool = True,
               progress: bool = False, quiet: bool = False, keep_fisher_scores: bool = False,
               run_name: Callable[[str, int], str] = _seeded_name,
               on_run: Optional[Callable[[dict, object, object], None]] = None,
               log: Callable[[str], None] = _print, jobs: int = 1) -> list[dict]:
    """Train and evaluate every (row of ``methods``, seed) (see the module docstring); returns one
    record per run, in order: {"row", "method", "overrides", "seed", "run_dir", "trainable", "seconds",
    "skipped", "curve": [{"iteration", "miou": {dataset: mIoU %}}], "target_mean", "config", ...}.

    ``resume``: reuse finished runs of the same experiment (else every run starts afresh); ``quiet``:
    the engine's own lines go to ``RUN/stdout.log`` instead of the screen;
    ``run_name(row, seed)``: the run folder under ``OUT/runs``; ``on_run(record, model, trainer)``: called
    after each run trained here (the reloaded final model and the Trainer), e.g. for the demo's figures;
    with ``jobs`` > 1 it runs in the worker process, so it must be picklable (a module-level function
    or a ``functools.partial`` of one). ``jobs``: runs trained at the same time, each in its own
    process with ``threads`` threads (on a CPU, one process per core is faster than threads: the
    tensors are small). Every run is the same computation whichever process trains it.
    """
    from ..fileio import atomic_write
    from .foundation import foundation_weights


    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {', '.join(unknown)} (available: {', '.join(ROWS)})")
    if not seeds:
        raise ValueError("run_seeded needs at least one seed")
    if jobs > 1 and len(methods) * len(seeds) > 1:
        if device != "cpu":
            raise ValueError("jobs > 1 runs several processes on the CPU; on a GPU use jobs=1")
        kwargs = dict(budget=budget, out_dir=str(out_dir), device=device, threads=threads or 1,
                      curve_points=curve_points, weights=weights, targets=list(targets), resume=resume,
                      progress=False, quiet=True, keep_fisher_scores=keep_fisher_scores, run_name=run_name,
                      on_run=on_run)
        pairs = [(row, seed) for row in methods for seed in seeds]
        records = _run_parallel(jobs, pairs, kwargs, log)
        return [records[pair] for pair in pairs]
    pick_threads(threads)
    weights = str(weights or foundation_weights(progress=progress))
    weights_sha256 = _sha256(weights)
    out = Path(out_dir)
    jobs = [(row, seed) for row in methods for seed in seeds]
    records, start, trained_seconds, trained = [], time.time(), 0.0, 0
    for i, (row, seed) in enumerate(jobs):
        method, overrides = ROWS[row]
        cfg = demo_config(method, budget=budget, out_dir=out, weights=weights, targets=targets, seed=seed,
                          overrides=overrides, name=run_name(row, seed), device=device, curve_points=curve_points)
        config = to_dict(cfg)
        label = f"[{i + 1}/{len(jobs)}] {row}" + (f" seed {seed}" if len(seeds) > 1 else "")
        saved = _finished_record(cfg.run_dir / RESULT_FILE, config, weights_sha256) if resume else None
        if saved is not None:
            records.append({**saved, "skipped": True})
            log(f"{label}: finished earlier ({cfg.run_dir / RESULT_FILE}), not run again: {_line(saved)}")
            continue
        if cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)  # an unfinished or different run: start afresh (the engine refuses to mix)
        log(label)
        cfg.run_dir.mkdir(parents=True)
        with open(cfg.run_dir / "stdout.log", "w") if quiet else contextlib.nullcontext() as sink:
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                result, model, trainer = run_method(cfg, progress=progress, keep_fisher_scores=keep_fisher_scores)
        curve = [{"iteration": it, "miou": miou} for it, miou in sorted(result.curve.items())]
        last = curve[-1]["miou"]
        values = [last[t] for t in targets if last[t] == last[t]]  # NaN-free mean, as the demo's table
        record = {"row": row, "method": method, "overrides": list(overrides), "seed": seed,
                  "run_dir": str(cfg.run_dir), "trainable": result.trainable, "seconds": round(result.seconds, 2),
                  "curve": curve, "target_mean": sum(values) / len(values) if values else float("nan"),
                  "weights": weights, "weights_sha256": weights_sha256, "config": config}
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(cfg.run_dir / RESULT_FILE, lambda tmp: Path(tmp).write_text(text))
        records.append({**record, "skipped": False})
        if on_run is not None:
            on_run(records[-1], model, trainer)
        del model, trainer
        trained_seconds += result.seconds
        trained += 1
        left = trained_seconds / trained * (len(jobs) - i - 1)
        log(f"{label}: {_line(record)} ({clock(result.seconds)}; {clock(time.time() - start)} so far, "
            f"about {clock(left)} to go)")
    return records
