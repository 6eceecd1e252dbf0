"""The seeded domain-generalization benchmark: the demo's experiment for many methods and seeds.

    records = run_seeded(["frozen", "rein"], seeds=[0, 1, 2], budget=DEFAULT_BUDGET, out_dir="bench_dg")
    summary = summarize(records, SOURCE, TARGETS)          # dgss.testbed.stats
    write_report(records, summary, "bench_dg", meta)       # dgss.testbed.report

Each (row, seed) is :func:`dgss.testbed.experiment.demo_config` with the row's method and overrides and that
seed, trained by the engine and evaluated at :func:`dgss.testbed.experiment.curve_iterations` (source val split
and every target) by :func:`dgss.testbed.experiment.run_method`, the code path of ``dgss demo``. A finished run
leaves ``OUT/runs/<row>/seed<k>/benchmark.json`` (written atomically) with its resolved config; a later
call with the same config and foundation file reads it instead of training again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import ExperimentConfig, config_differences, to_dict
from ..engine.precise_bn import recalibrate_batch_norm
from ..fileio import file_sha256
from ..tuning import METHODS as TUNING_METHODS
from .experiment import DemoBudget, demo_config, pick_threads, run_method
from .world import World

__all__ = ["ROWS", "SKIPPED_ROWS", "TimeLimitReached", "ITERS_SCALE", "seeds_of", "DERIVED_ROWS", "BUDGETS", "TESTBED_BUDGETS", "DEFAULT_BUDGET", "QUICK_BUDGET", "SMOKE_BUDGET", "CUDA_BUDGET",
           "RESULT_FILE", "run_seeded", "clock"]

# The benchmark's rows: name -> (method.name, dotted overrides of the demo experiment). A new row is one
# line here. FisherTune's ablations (Table 4, Fig. 5, Table 5 of the paper) are FisherTune with one
# option changed; "fishertune" itself keeps every default, so a changed default reaches it.
LABEL_FOUNDATION_AT_PATCH_8 = ["model.weights=label-foundation", "model.patch_size=8", "model.patch_resize=timm"]
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
    # SoMA as its public code runs (issue 25): the minor components of a random nn.Linear draw on top of
    # the pretrained weights; no EMA (the public code's starts at 12,000 iterations, past any budget here)
    "soma-public": ("soma", ["method.soma.start_block=2", "method.soma.init=public_code"]),
    # GeCo (issue 40): soma-public + its consistency loss, started after 1/40 of the default testbed budget's
    # 1,920 iterations, as the public code starts at 1,000 of 40,000 (docs/methods/geco.md)
    "geco": ("soma", ["method.soma.start_block=2", "method.soma.init=public_code", "loss.geco.enabled=true",
                      "loss.geco.start_iter=48"]),
    # FADA (issue 40) sized and paced as the testbed's Rein (experiment.py's tokens, world.py's lr_mult)
    "fada": ("fada", ["method.fada.num_tokens=24", "method.fada.lora_rank=4", "method.fada.query_dim=64",
                      "method.fada.lr_mult=0.1"]),
    # FADA with the paper's spatial wavelet (layout "paper") beside the public code's arithmetic ("fada": its
    # reshape makes the Haar filters act on each token's channels, at the testbed's 16 x 16 tokens of width
    # 96 as at its published 32 x 32 of width 1024), as soma-public stands beside soma (docs/methods/fada.md)
    "fada-paper": ("fada", ["method.fada.num_tokens=24", "method.fada.lora_rank=4", "method.fada.query_dim=64",
                            "method.fada.lr_mult=0.1", "method.fada.layout=paper"]),
    "ft-random": ("fishertune", ["method.fishertune.selection=random"]),
    "ft-fim": ("fishertune", ["method.fishertune.selection=fisher"]),
    "ft-domain": ("fishertune", ["method.fishertune.selection=domain"]),
    "ft-plain": ("fishertune", ["method.fishertune.variational=false"]),
    # explicit 0.0: FisherTune's default may train on x' in some iterations; this row never does
    "ft-no-xprime": ("fishertune", ["method.fishertune.train_perturb_prob=0.0"]),
    # the testbed's controls (docs/testbed.md): LP-FT (P5), Full from random initialisation (P6), the
    # old label-pretrained foundation with two methods, and Frozen trained twice as long (P1)
    "lp-ft": ("lp-ft", []),
    "wise-ft": ("full", []),  # not trained: the average of Full's and the pretrained backbone (DERIVED_ROWS)
    "scratch": ("full", ["model.weights=null"]),
    # The label-pretrained file has patch 16: on the testbed's 128 crops an 8 x 8 token grid, which is the
    # demo world's failure these rows must not measure (a third of the classes thinner than a token). So
    # it runs at the testbed's token grid: patch 8, its patch kernel and position embedding resampled by
    # timm's checkpoint filter (FlexiViT's pseudo-inverse resize: the 16 px kernel's response to a 2x
    # upsampled patch). What differs from the label-free rows is then the pretraining alone.
    "frozen-label": ("frozen", LABEL_FOUNDATION_AT_PATCH_8),
    "fishertune-label": ("fishertune", LABEL_FOUNDATION_AT_PATCH_8),
    # Frozen and FisherTune on the label-free file of 16,000 images seen (issue 37): beside the same rows
    # on a longer-pretrained foundation they show what pretraining scale changes (until that file is the
    # testbed's, they are the "frozen" and "fishertune" rows again)
    "frozen-ssl-small": ("frozen", ["model.weights=ssl-small"]),
    "fishertune-ssl-small": ("fishertune", ["model.weights=ssl-small"]),
    "frozen-2x": ("frozen", []),  # ITERS_SCALE: twice the budget's iterations
}
ROWS = {name: row for name, row in _ROWS.items() if row[0] in TUNING_METHODS}
# rows trained for a multiple of the budget's iterations (P1: is Frozen's head converged?). P1 reads one
# seed, so these rows run the first seed only (``seeds_of``): with 3 seeds that saves two of the longest runs
ITERS_SCALE = {"frozen-2x": 2}


def seeds_of(row: str, seeds: Sequence[int]) -> list[int]:
    """The seeds ``row`` runs for: all of ``seeds``, or the first one for a row of ``ITERS_SCALE``."""
    return list(seeds[:1]) if row in ITERS_SCALE else list(seeds)


# rows made from another row's final model without training: WiSE-FT (Wortsman et al., CVPR'22) averages
# the fine-tuned and the pretrained backbone, alpha = 0.5 (the weight of the pretrained one)
DERIVED_ROWS = {"wise-ft": ("full", 0.5)}
# Averaged weights change the features' statistics, so the head's BatchNorm statistics (the linear head's)
# are estimated again on this many source training batches, as SWA does after averaging (Izmailov et al.,
# UAI'18); without it the testbed's WiSE-FT fell below Frozen with a seed spread of 3.4 points.
DERIVED_BN_BATCHES = 64
SKIPPED_ROWS = {name: f"method.name '{row[0]}' is not in this dgss" for name, row in _ROWS.items()
                if name not in ROWS}

# Budgets (the sizes of every run; the same for every row). Measured (docs/figures/testbed_log.md): a run costs
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
# The testbed's budgets (the same for every row). default: 1,920 iterations of batch 4 on 7,680 source scenes,
# each seen once. With the testbed's linear head at lr 1e-2, Frozen's source mIoU is 39.8 at 1,920 iterations
# and 39.2 at twice the iterations (P1 holds: 0.6; at 960 iterations 37.2 against 38.7, 1.5: the edge). Seed
# 0, 64 clean images. The scenes were 1,920 seen four times until the target screen (docs/figures/testbed_log.md,
# "Targets off the floor"): with 7,680 seen once, the seed spread of Full's blur-family mean fell from 1.26
# to 0.32 and of its source fit from 0.69 to 0.16 (4 seeds each); the scenes are rendered on the fly, so
# more of them cost nothing. The quick and GPU budgets keep the same rule (iterations x 4 scenes).
TESTBED_BUDGETS = {
    "default": DemoBudget(iters=1920, train_images=7680, eval_images=16, fisher_batches=16, overlay_images=0),
    "quick": DemoBudget(iters=40, train_images=160, eval_images=4, fisher_batches=2, overlay_images=0),
    "smoke": SMOKE_BUDGET,
    "cuda": DemoBudget(iters=4000, train_images=16000, eval_images=64, fisher_batches=32, overlay_images=0),
}

RESULT_FILE = "benchmark.json"  # in each run folder: the run's numbers and the config that made them
# keys that do not change a run's numbers: where it is written, what it shows
_RESUME_IGNORED = ("name", "output_dir", "train.progress_bar", "train.log_interval", "data.num_workers")


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class TimeLimitReached(RuntimeError):
    """``run_seeded`` stopped at its ``deadline``: the runs it finished are saved (``finished`` of
    ``total``), the others not started; the same call continues where it stopped."""

    def __init__(self, finished: int, total: int):
        super().__init__(f"time limit reached: {finished} of {total} runs finished; the same command continues "
                         f"(finished runs are reused)")
        self.finished, self.total = finished, total


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
    old = saved.get("config") or {}
    for key in config_differences(old, config, ignore=_RESUME_IGNORED):
        if key == "model.weights" and _same_weights(old["model"]["weights"], config["model"]["weights"], weights_sha256):
            continue
        if not _new_option_at_default(old, config, key):
            return None
    return saved


def _same_weights(old: Optional[str], new: Optional[str], run_sha256: str) -> bool:
    """The same weights file under another path (another checkout of the package, whose assets the
    foundation aliases resolve to): the same content, or, when the old path is gone, the same name and
    the content the run recorded (``weights_sha256``)."""
    if old is None or new is None or not Path(new).is_file():
        return old == new
    new_sha256 = file_sha256(new)
    if Path(old).is_file():
        return file_sha256(old) == new_sha256
    return Path(old).name == Path(new).name and new_sha256 == run_sha256


def _new_option_at_default(old: dict, new: dict, key: str) -> bool:
    """True when the dotted ``key`` is absent from the saved config ``old`` (the option did not exist
    when the run was made) and ``new`` gives it its default: the run ran as the option's default runs."""
    node, default = old, dataclasses.asdict(ExperimentConfig())
    value = new
    for part in key.split("."):
        if isinstance(value, list):  # options inside list items (datasets) have no one default here
            return False
        value = value.get(part) if isinstance(value, dict) else None
        default = default.get(part) if isinstance(default, dict) else None
        if isinstance(node, dict) and part not in node:
            return value == default
        node = node.get(part) if isinstance(node, dict) else None
    return False


def _line(record: dict) -> str:
    last = record["curve"][-1]["miou"]
    scores = ", ".join(f"{name} {value:.1f}" for name, value in last.items())
    return f"mIoU {scores}; target mean {record['target_mean']:.1f}"


def _run_job(kwargs: dict) -> dict:
    """One (row, seed) in a worker process (see ``jobs`` of :func:`run_seeded`)."""
    (record,) = _run_sequential(**kwargs, log=lambda line: None).values()
    return record


def _run_parallel(jobs: int, pairs: list[tuple[str, int]], kwargs: dict, log: Callable[[str], None],
                  deadline: Optional[float] = None) -> dict[tuple[str, int], dict]:
    """Train ``pairs`` in ``jobs`` worker processes (spawned: a clean torch in each); their records.
    Past ``deadline`` (``time.time()``) no further run starts; the running ones finish."""
    import concurrent.futures
    import multiprocessing

    start = time.time()
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    with _workers_die_with_this_process(pool):
        futures = {pool.submit(_run_job, {**kwargs, "rows": [row], "seeds": [seed]}): (row, seed)
                   for row, seed in pairs}
        records, run_seconds = {}, 0.0
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            if future.cancelled():
                continue
            row, seed = futures[future]
            record = records[row, seed] = future.result()
            elapsed = time.time() - start
            run_seconds += record["seconds"]
            left = run_seconds / done * (len(pairs) - done) / jobs  # the runs left, ``jobs`` at a time
            how = "finished earlier, not run again" if record["skipped"] else clock(record["seconds"])
            log(f"[{done}/{len(pairs)}] {row} seed {seed}: {_line(record)} ({how}; "
                f"{clock(elapsed)} so far, about {clock(left)} to go)")
            if deadline is not None and time.time() >= deadline:
                for pending in futures:
                    pending.cancel()  # only the runs not started yet: the running ones finish and are kept
    return records


@contextlib.contextmanager
def _workers_die_with_this_process(pool):
    """Run ``pool``; if this process is stopped (SIGTERM, Ctrl-C, an error), kill its workers rather than
    wait for them or leave them running as orphans (measured: a SIGTERM to the driver alone left both
    workers training). A run a worker had not finished is trained again by the next ``--resume``."""
    def kill_workers():
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()

    previous = None
    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            # exit at once: raising SystemExit here left the interpreter's exit joining the pool's manager
            # thread, which could hang on a worker killed mid-start (seen once under load: the driver
            # outlived the SIGTERM by 30 s). Finished runs are already on disk (atomic writes).
            kill_workers()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        kill_workers()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_seeded(methods: Sequence[str], seeds: Sequence[int], budget: DemoBudget, out_dir: str | Path,
               device: str = "cpu", threads: Optional[int] = None, curve_points: int = 4, *,
               weights: Optional[str] = None, targets: Optional[Sequence[str]] = None, resume: bool = True,
               progress: bool = False, quiet: bool = False, keep_fisher_scores: bool = False,
               run_name: Callable[[str, int], str] = _seeded_name,
               on_run: Optional[Callable[[dict, object, object], None]] = None,
               log: Callable[[str], None] = _print, jobs: int = 1, world: Optional[World] = None,
               deadline: Optional[float] = None) -> list[dict]:
    """Train and evaluate every (row of ``methods``, seed) (see the module docstring); returns one
    record per run, in order: {"row", "method", "overrides", "seed", "run_dir", "trainable", "seconds",
    "skipped", "curve": [{"iteration", "miou": {dataset: mIoU %}}], "target_mean", "config", ...}.

    ``world``: the synthetic world (:mod:`dgss.testbed.world`; default the demo's), which also gives the
    default foundation file and targets; ``resume``: reuse finished runs of the same experiment (else
    every run starts afresh); ``quiet``: the engine's own lines go to ``RUN/stdout.log`` instead of the
    screen; ``run_name(row, seed)``: the run folder under ``OUT/runs``; ``on_run(record, model,
    trainer)``: called after each run trained here (the reloaded final model and the Trainer), e.g. for
    the demo's figures; with ``jobs`` > 1 it runs in the worker process, so it must be picklable (a
    module-level function or a ``functools.partial`` of one). ``jobs``: runs trained at the same time,
    each in its own process with ``threads`` threads (on a CPU, one process per core is faster than
    threads: the tensors are small). Every run is the same computation whichever process trains it.
    Rows of ``DERIVED_ROWS`` (WiSE-FT) are made from their base row's run of the same seed, which runs
    first if it is not among ``methods``. ``deadline`` (a ``time.time()`` value): no run starts after it
    (with ``jobs`` > 1, the runs already handed to a worker process still run); if runs are left then,
    :class:`TimeLimitReached` is raised after the finished ones are saved (a run in chunks: a CPU
    session, a device call).
    """
    from .world import DEMO_WORLD

    world = world or DEMO_WORLD
    targets = tuple(targets) if targets is not None else world.targets
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {', '.join(unknown)} (available: {', '.join(ROWS)})")
    if not seeds:
        raise ValueError("run_seeded needs at least one seed")
    derived = [m for m in methods if m in DERIVED_ROWS]
    trained_rows = [m for m in methods if m not in DERIVED_ROWS]
    for m in derived:  # a derived row needs its base row's runs
        if DERIVED_ROWS[m][0] not in trained_rows:
            trained_rows.append(DERIVED_ROWS[m][0])
    weights = str(weights or _default_weights(world, progress))
    common = dict(budget=budget, out_dir=str(out_dir), device=device, curve_points=curve_points, weights=weights,
                  targets=list(targets), resume=resume, keep_fisher_scores=keep_fisher_scores, run_name=run_name,
                  world=world)
    pairs = [(row, seed) for row in trained_rows for seed in seeds_of(row, seeds)]
    if jobs > 1 and len(pairs) > 1:
        if device != "cpu":
            raise ValueError("jobs > 1 runs several processes on the CPU; on a GPU use jobs=1")
        records = _run_parallel(jobs, pairs, dict(common, threads=threads or 1, progress=False, quiet=True,
                                                  on_run=on_run), log, deadline)
    else:
        records = _run_sequential(trained_rows, seeds, threads=threads, progress=progress, quiet=quiet, on_run=on_run,
                                  log=log, deadline=deadline, **common)
    if len(records) < len(pairs):
        raise TimeLimitReached(len(records), len(pairs) + len(derived) * len(seeds))
    for row in derived:
        for seed in seeds:
            records[row, seed] = _derived_run(row, seed, records[DERIVED_ROWS[row][0], seed], log=log, **common)
    return [records[row, seed] for row in methods for seed in seeds_of(row, seeds)]


def _default_weights(world, progress: bool) -> str:
    from .supervised_foundation import foundation_weights
    from .world import resolve_weights

    if world.foundation_file == "label-foundation":
        return str(foundation_weights(progress=progress))  # pretrained and cached when not shipped
    from .ssl_foundation import ssl_foundation_weights

    return str(ssl_foundation_weights() if world.foundation_file == "ssl-foundation"
               else resolve_weights(world.foundation_file))


def _row_config(row: str, seed: int, *, budget: DemoBudget, out_dir: str, device: str, curve_points: int,
                weights: str, targets, run_name, world):
    method, overrides = ROWS[row]
    scale = ITERS_SCALE.get(row, 1)
    if scale != 1:
        budget = dataclasses.replace(budget, iters=budget.iters * scale)
    # the world's unseen looks are tested too; the record's target mean stays the targets' (_target_mean)
    tested = [*targets, *(d for d in world.unseen if d not in targets)]
    return demo_config(method, budget=budget, out_dir=Path(out_dir), weights=weights, targets=tested, seed=seed,
                       overrides=overrides, name=run_name(row, seed), device=device, curve_points=curve_points,
                       world=world)


def _save_record(cfg, record: dict) -> None:
    from ..fileio import atomic_write

    text = json.dumps(record, indent=1) + "\n"
    atomic_write(cfg.run_dir / RESULT_FILE, lambda tmp: Path(tmp).write_text(text))


def _run_sequential(rows: Sequence[str], seeds: Sequence[int], *, budget: DemoBudget, out_dir: str, device: str,
                    threads: Optional[int], curve_points: int, weights: str, targets, resume: bool, progress: bool,
                    quiet: bool, keep_fisher_scores: bool, run_name, on_run, log, world,
                    deadline: Optional[float] = None) -> dict:
    from ..engine.trainer import FINAL_MODEL_NAME

    pick_threads(threads)
    weights_sha256 = file_sha256(weights)
    jobs = [(row, seed) for row in rows for seed in seeds_of(row, seeds)]
    records, start, trained_seconds, trained = {}, time.time(), 0.0, 0
    for i, (row, seed) in enumerate(jobs):
        method, overrides = ROWS[row]
        cfg = _row_config(row, seed, budget=budget, out_dir=out_dir, device=device, curve_points=curve_points,
                          weights=weights, targets=targets, run_name=run_name, world=world)
        config = to_dict(cfg)
        label = f"[{i + 1}/{len(jobs)}] {row}" + (f" seed {seed}" if len(seeds) > 1 else "")
        saved = _finished_record(cfg.run_dir / RESULT_FILE, config, weights_sha256) if resume else None
        if saved is not None:
            records[row, seed] = {**saved, "skipped": True}
            log(f"{label}: finished earlier ({cfg.run_dir / RESULT_FILE}), not run again: {_line(saved)}")
            continue
        if deadline is not None and time.time() >= deadline:
            log(f"{label}: not started (time limit)")
            break
        if cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)  # an unfinished or different run: start afresh (the engine refuses to mix)
        log(label)
        cfg.run_dir.mkdir(parents=True)
        with open(cfg.run_dir / "stdout.log", "w") if quiet else contextlib.nullcontext() as sink:
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                result, model, trainer = run_method(cfg, progress=progress, keep_fisher_scores=keep_fisher_scores)
        curve = [{"iteration": it, "miou": miou} for it, miou in sorted(result.curve.items())]
        record = {"row": row, "method": method, "overrides": list(overrides), "seed": seed,
                  "run_dir": str(cfg.run_dir), "trainable": result.trainable, "seconds": round(result.seconds, 2),
                  "curve": curve, "target_mean": _target_mean(curve[-1]["miou"], targets),
                  "weights": weights, "weights_sha256": weights_sha256, "config": config,
                  # the final model's content: a derived row (WiSE-FT) made from it stays valid where only
                  # this record was kept (the model files stay on the machine that trained them)
                  "model_sha256": file_sha256(str(cfg.run_dir / FINAL_MODEL_NAME))}
        _save_record(cfg, record)
        records[row, seed] = {**record, "skipped": False}
        if on_run is not None:
            on_run(records[row, seed], model, trainer)
        del model, trainer
        trained_seconds += result.seconds
        trained += 1
        left = trained_seconds / trained * (len(jobs) - i - 1)
        log(f"{label}: {_line(record)} ({clock(result.seconds)}; {clock(time.time() - start)} so far, "
            f"about {clock(left)} to go)")
    return records


def _target_mean(miou: dict, targets) -> float:
    values = [miou[t] for t in targets if miou[t] == miou[t]]  # NaN-free mean, as the demo's table
    return sum(values) / len(values) if values else float("nan")


def _derived_run(row: str, seed: int, base: dict, *, budget: DemoBudget, out_dir: str, device: str,
                 curve_points: int, weights: str, targets, resume: bool, keep_fisher_scores: bool, run_name, world,
                 log) -> dict:
    """WiSE-FT of seed ``seed``: ``alpha`` x the pretrained backbone + (1 - ``alpha``) x the base row's
    fine-tuned one, with the base row's head; written as a model file and evaluated like a trained run
    (one curve point: the final iteration)."""
    import torch

    from ..engine.checkpoint import load_model_weights, save_model
    from ..engine.trainer import FINAL_MODEL_NAME
    from ..tuning.model import build_segmentor
    from .experiment import evaluate_model_file

    base_row, alpha = DERIVED_ROWS[row]
    cfg = _row_config(row, seed, budget=budget, out_dir=out_dir, device=device, curve_points=1, weights=weights,
                      targets=targets, run_name=run_name, world=world)
    base_model = Path(base["run_dir"]) / FINAL_MODEL_NAME
    base_sha256 = base.get("model_sha256") or file_sha256(str(base_model))  # older records: hash the file
    config = {**to_dict(cfg), "derived": {"from": base_row, "alpha": alpha, "bn_batches": DERIVED_BN_BATCHES,
                                          "base_sha256": base_sha256}}
    weights_sha256 = file_sha256(weights)
    saved = _finished_record(cfg.run_dir / RESULT_FILE, config, weights_sha256) if resume else None
    if saved is not None:
        return {**saved, "skipped": True}
    if not base_model.is_file():
        raise FileNotFoundError(f"{row} seed {seed} is made from {base_row}'s model file {base_model}, which is "
                                f"not here (only its record {base['run_dir']}/{RESULT_FILE} was kept): train "
                                f"{base_row} seed {seed} again (delete that record) to derive {row}")
    start = time.time()
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    cfg.run_dir.mkdir(parents=True)
    model = build_segmentor(cfg)  # the pretrained backbone, as the base row started from
    pretrained = {k: v.detach().clone() for k, v in model.backbone.model.state_dict().items()}
    load_model_weights(model, base_model)
    with torch.no_grad():
        for key, value in model.backbone.model.state_dict().items():
            if value.is_floating_point():
                value.copy_(alpha * pretrained[key] + (1.0 - alpha) * value)
    recalibrate_batch_norm(model, cfg, DERIVED_BN_BATCHES)
    path = cfg.run_dir / FINAL_MODEL_NAME
    save_model(model, cfg, path)
    results, _ = evaluate_model_file(cfg, path, precise_bn=False)  # its statistics are the estimated ones
    curve = [{"iteration": base["curve"][-1]["iteration"], "miou": {r.name: r.miou for r in results}}]
    record = {"row": row, "method": ROWS[row][0], "overrides": [], "seed": seed, "run_dir": str(cfg.run_dir),
              "trainable": base["trainable"], "seconds": round(time.time() - start, 2), "curve": curve,
              "target_mean": _target_mean(curve[0]["miou"], targets), "weights": weights,
              "weights_sha256": weights_sha256, "config": config}
    _save_record(cfg, record)
    log(f"{row} seed {seed}: {_line(record)} (from {base_row}, alpha {alpha})")
    return {**record, "skipped": False}
