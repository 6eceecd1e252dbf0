"""The `dgss` command line: one sub-command per task.

    dgss --version
    dgss backbones                       # the VFM zoo with parameter counts
    dgss config CONFIG [key=value ...]   # validate a config and print it fully resolved
    dgss train CONFIG [key=value ...] [--resume [CHECKPOINT] | --auto-resume]   # also under torchrun
    dgss eval CONFIG --checkpoint FILE [key=value ...]         # every data.test dataset
    dgss plan CONFIG [key=value ...] [--gpus N --gpu-memory 80GB] [--json]   # memory per process, fits?
    dgss convert CHECKPOINT --out FILE   # an FSDP checkpoint -> a plain model file
    dgss fisher CONFIG [key=value ...]   # FisherTune stages 1-2: DR-FIM scores, selection, plots
    dgss compare CONFIG --methods frozen,rein,lora [key=value ...] [--out DIR] [--no-run]
    dgss predict --checkpoint FILE INPUT... --out DIR [--format colour,overlay] [--tta flip]
    dgss export --checkpoint FILE --out model.onnx [--input-size H W]   # ONNX or TorchScript
    dgss demo [--quick] [--out DIR]      # the built-in end-to-end run on CPU (synthetic domains)

Each sub-command is a (help, add_arguments, run) triple in ``COMMANDS``; errors the user can fix
(bad config, missing file) print one clear line and exit with status 2 instead of a traceback.
``dgss train`` stopped by SIGTERM/SIGUSR1 exits with 75 after checkpointing (for requeue scripts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from . import __version__

__all__ = ["main", "COMMANDS"]


class UsageError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 model.backbone=dinov2_l")


def _load_checked_config(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """The config of ``args`` with its overrides, types and values checked (the checks of `dgss config`)."""
    from .config import load_config
    from .engine.config_check import check_config

    cfg = load_config(args.config, list(args.overrides) + list(extra))
    return check_config(cfg, args.config)


def _check_inputs(cfg, splits: tuple[str, ...]) -> None:
    """Files and folders the command reads, before any model is built: the backbone weights file and
    the roots of the datasets in ``splits`` (one line naming the key when one is missing)."""
    from .fileio import check_input_file

    if cfg.model.weights not in (None, "hub"):
        check_input_file(cfg.model.weights, "backbone weights file (model.weights)")
    for split in splits:
        for i, ds in enumerate(getattr(cfg.data, split)):
            if ds.type != "synthetic" and ds.root and not Path(ds.root).expanduser().is_dir():
                raise UsageError(f"data.{split}[{i}].root: dataset folder not found: {ds.root}")


def _check_output(path, what: str) -> Path:
    """Create the output folder ``path`` and make sure it is writable, before the expensive work."""
    from .fileio import check_output_dir

    return check_output_dir(path, what)


# ------------------------------------------------------------------------------------------------
# dgss backbones
# ------------------------------------------------------------------------------------------------


def _backbones_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=16)


def _backbones_run(args: argparse.Namespace) -> int:
    import torch

    from .models.backbones import BACKBONES, build_backbone

    print(f"{'name':<14} {'timm architecture':<32} {'params (M)':>10}  out indices  pyramid")
    for name, spec in sorted(BACKBONES.items()):
        with torch.device("meta"):  # no memory, no init cost: only shapes
            backbone = build_backbone(name, img_size=args.img_size, patch_size=args.patch_size)
        count = sum(p.numel() for p in backbone.model.parameters()) / 1e6
        indices = ",".join(str(i) for i in backbone.out_indices)
        print(f"{name:<14} {spec.timm_name:<32} {count:>10.2f}  {indices:<11}  {spec.pyramid}")
    return 0


# ------------------------------------------------------------------------------------------------
# dgss config
# ------------------------------------------------------------------------------------------------


def _config_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--save", metavar="PATH", help="also write the resolved config to PATH")


def _config_run(args: argparse.Namespace) -> int:
    import yaml

    from .config import save_config, to_dict

    cfg = _load_checked_config(args)  # names and values too, as train, eval and fisher check them
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if args.save:
        save_config(cfg, args.save)
        print(f"# written to {args.save}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# dgss plan
# ------------------------------------------------------------------------------------------------


def _plan_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run uses (default 1)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 80GB or 141GB (GB = GiB)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="plan a GPU run (default) or a CPU run (fp32, AdamW's CPU step)")
    parser.add_argument("--json", action="store_true", help="machine-readable: total_bytes, fits and every part")


def _plan_run(args: argparse.Namespace) -> int:
    from .engine.memory_plan import parse_memory
    from .plan import run_plan

    cfg = _load_checked_config(args)
    if args.gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {args.gpus}")
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    print(run_plan(cfg, source=args.config, gpus=args.gpus, gpu_memory=memory, as_json=args.json, device=args.device))
    return 0


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="an FSDP checkpoint: iter_N.dcp, its .fsdp.pt, or a run's checkpoints folder")
    parser.add_argument("--out", required=True, metavar="FILE", help="the model file to write (.safetensors)")
    parser.add_argument("--config", help="the run's config (default: RUN/config.yaml next to the checkpoints)")


def _convert_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.fsdp import convert_checkpoint

    cfg = load_config(args.config) if args.config else None
    print(f"wrote {convert_checkpoint(args.checkpoint, args.out, cfg)}")
    return 0


# ------------------------------------------------------------------------------------------------
# dgss fisher
# ------------------------------------------------------------------------------------------------


def _fisher_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--out", help="output folder (default: the run folder, output_dir/name)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--stability", action="store_true",
                        help="also estimate plain and variational on 2 x num_batches further batches and report "
                             "each ranking's split-half Jaccard (4 more estimates)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fisher_run(args: argparse.Namespace) -> int:
    from .tuning.fishertune.report import format_report, run_fisher

    cfg = _load_checked_config(args, ("method.name=fishertune",))
    _check_inputs(cfg, ("train",))
    out = _check_output(args.out or cfg.run_dir,
                        "output folder (--out)" if args.out else "run folder (output_dir/name)")
    written, report = run_fisher(cfg, device=args.device, out_dir=out, stability=args.stability,
                                 progress=cfg.train.progress_bar and not args.no_progress)
    print(format_report(report))
    for name, path in written.items():
        print(f"{name:<13} {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# dgss compare
# ------------------------------------------------------------------------------------------------


def _compare_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--methods", required=True,
                        help="comma-separated method names (dgss.tuning.METHODS) or config files, e.g. "
                        "frozen,rein,fishertune,lora")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for table.md, table.csv and miou.png (default: output_dir/compare_<protocol>)")
    parser.add_argument("--no-run", action="store_true",
                        help="only collect finished runs (RUN/eval/results.json); never train or evaluate")
    parser.epilog = ("A run found on disk (results, final model or checkpoints) is reused only when its saved "
                     "RUN/config.yaml matches the requested config: a difference in any key that changes the "
                     "experiment (all but where it writes, what it shows and how fast it runs: "
                     "dgss.config.NON_EXPERIMENT_KEYS) is refused with the keys named, before anything runs. "
                     "Delete that run folder to make it again, or give the new experiment another name=. An "
                     "interrupted run of the same config is resumed from its newest checkpoint.")


def _compare_run(args: argparse.Namespace) -> int:
    from .compare import compare, format_markdown_table
    from .config import load_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods names no method")
    out = args.out
    if out is None:
        protocol = load_config(args.config, args.overrides)
        out = str(Path(protocol.output_dir) / f"compare_{Path(args.config).stem}")
    _check_output(out, "output folder (--out)")
    runs, paths = compare(args.config, methods, overrides=args.overrides, out_dir=out, allow_run=not args.no_run)
    print(format_markdown_table(runs))
    missing = [f"{r.label} ({r.cfg.run_dir})" for r in runs if r.status == "missing"]
    if missing:
        print(f"\nnot run yet (--no-run): {', '.join(missing)}", file=sys.stderr)
    print("\n" + ", ".join(str(p) for p in paths.values()))
    return 1 if missing else 0


# ------------------------------------------------------------------------------------------------
# dgss demo
# ------------------------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the demo's outputs (default: demo_output)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute version (one seed, smaller budget, fewer images)")
    parser.add_argument("--methods", default="frozen,full,rein,fishertune",
                        help="comma-separated subset of frozen,full,rein,fishertune (default: all four)")
    parser.add_argument("--iters", type=int, metavar="N", help="iterations per method (default: 240, --quick 40)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="seeds 0..N-1 per method; the table shows mean ± std over them (default: 3, --quick 1)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="runs trained at the same time, one process each (default: 2 on 2 or more cores)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads per run (default: 1)")
    parser.add_argument("--foundation", metavar="FILE",
                        help="another foundation ViT file (default: the one shipped in dgss/assets)")
    parser.add_argument("--pretrain-foundation", metavar="OUT",
                        help="instead of the demo: pretrain the foundation ViT as the shipped file was made, "
                        "and write it to OUT")
    parser.add_argument("--pretrain-ssl", metavar="OUT",
                        help="instead of the demo: pretrain the DG testbed's label-free foundation ViT (DINO "
                        "self-distillation on the unlabeled pool, no labels) as the shipped file was made, write OUT and its manifest "
                        "(OUT with .json); resumable from OUT.ckpt")
    parser.add_argument("--device", default="cpu", help="with --pretrain-ssl: cpu (default) or cuda")
    parser.add_argument("--pool-version", type=int, metavar="N",
                        help="with --pretrain-ssl: the unlabeled pool's version (dgss.testbed.pool: 2, the shipped "
                        "file's and the default, adds dim scenes without night's look to 1)")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")


def _pretrain_ssl(args: argparse.Namespace) -> int:
    from .testbed.ssl_foundation import PRETRAIN_SSL, pretrain_ssl_foundation

    out = Path(args.pretrain_ssl)
    _check_output(out.parent, "folder of --pretrain-ssl")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device}")
    from .testbed.ssl_foundation import SHIPPED_POOL_VERSION
    from .testbed.pool import POOL_VERSIONS

    overrides = {"threads": args.threads} if args.threads else {}
    pool_version = SHIPPED_POOL_VERSION if args.pool_version is None else args.pool_version
    if pool_version not in POOL_VERSIONS:
        raise UsageError(f"--pool-version must be one of {', '.join(map(str, POOL_VERSIONS))}, got {pool_version}")
    overrides["pool_version"] = pool_version
    iters = args.iters or PRETRAIN_SSL["iters"]
    print(f"pretraining the testbed's label-free foundation ViT: {iters} iterations of "
          f"{PRETRAIN_SSL['batch_size']} unlabeled pool images (pool version {pool_version}) on {args.device} "
          f"(checkpoint: {out}.ckpt)", flush=True)
    path = pretrain_ssl_foundation(out, iters=args.iters, device=args.device, checkpoint=f"{out}.ckpt",
                                   progress=not args.no_progress, overrides=overrides)
    print(f"foundation ViT written to {path}, manifest {path.with_suffix('.json')}")
    return 0


def _demo_run(args: argparse.Namespace) -> int:
    import dataclasses

    import os

    from .demo import DEMO_SEEDS, FULL_BUDGET, METHODS, QUICK_BUDGET, pretrain_foundation, run_demo

    if args.pretrain_ssl:
        return _pretrain_ssl(args)
    if args.pool_version is not None:
        raise UsageError("--pool-version chooses the pool of --pretrain-ssl; give it with --pretrain-ssl OUT")
    if args.pretrain_foundation:
        import torch

        torch.set_num_threads(args.threads or 1)
        from .testbed.supervised_foundation import PRETRAIN

        _check_output(Path(args.pretrain_foundation).parent, "folder of --pretrain-foundation")
        print(f"pretraining the demo's foundation ViT: {args.iters or PRETRAIN['iters']} iterations "
              "(the shipped recipe: about 7 minutes on one core)", flush=True)
        path = pretrain_foundation(args.pretrain_foundation, iters=args.iters, progress=not args.no_progress)
        print(f"foundation ViT written to {path}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"the demo runs {', '.join(METHODS)}")
    if args.foundation and not Path(args.foundation).is_file():
        raise UsageError(f"--foundation: file not found: {args.foundation}")
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    if args.iters is not None:
        if args.iters < 1:
            raise UsageError("--iters must be >= 1")
        budget = dataclasses.replace(budget, iters=args.iters)
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    _check_output(args.out, "output folder (--out)")
    seeds = range(args.seeds) if args.seeds is not None else ((0,) if args.quick else DEMO_SEEDS)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    run_demo(out_dir=args.out, quick=args.quick, methods=methods, budget=budget, weights=args.foundation,
             progress=not args.no_progress, threads=args.threads, seeds=seeds, jobs=jobs)
    return 0


# ------------------------------------------------------------------------------------------------
# dgss train / dgss eval
# ------------------------------------------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue a run: the newest intact checkpoint in RUN/checkpoints, or the file/folder "
                        "given")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from the newest intact checkpoint when the run has one, else start it: the "
                        "same command for every attempt of a requeued or restarted (torchrun --max-restarts) job")
    parser.epilog = ("SIGTERM or SIGUSR1 (preemption, SLURM's --signal) makes every process finish its step; the "
                     "run writes a checkpoint of that iteration and exits with status 75 (resume with --resume or "
                     "--auto-resume). A save that finds the disk full stops with one line (status 2), the previous "
                     "checkpoint intact.")


def _train_run(args: argparse.Namespace) -> int:
    from .engine.checkpoint import CheckpointError, resolve_checkpoint
    from .engine.distributed import shutdown_distributed
    from .engine.preemption import TrainingPreempted
    from .engine.trainer import NonFiniteLossError, Trainer

    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)  # `--resume key=value`: a bare --resume followed by an override
        resume = True
    if args.auto_resume:
        if resume:
            raise UsageError("--resume and --auto-resume exclude each other")
        resume = "auto"
    cfg = _load_checked_config(args)
    # what the run reads and where it writes, before the model is built
    _check_inputs(cfg, ("train", "val"))
    if resume and resume != "auto":
        try:
            if cfg.train.parallel == "fsdp":  # iter_N.dcp checkpoints (dgss.engine.fsdp)
                from .engine.fsdp import latest_checkpoint

                latest_checkpoint(cfg.run_dir / "checkpoints" if resume is True else resume)
            else:
                resolve_checkpoint(None if resume is True else resume, cfg.run_dir / "checkpoints")
        except CheckpointError as err:
            raise UsageError(str(err)) from err
    _check_output(cfg.run_dir, "run folder (output_dir/name)")
    try:
        path = Trainer(cfg, resume=resume).train()
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    except NonFiniteLossError as err:
        print(f"dgss train: error: {err}", file=sys.stderr)
        return 1
    except TrainingPreempted as stop:  # the run logged its line; the status tells a requeue script
        return stop.code
    finally:
        shutdown_distributed()
    return 0 if path else 1


def _eval_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a dgss model file (RUN/model_final.safetensors or a training checkpoint), or an "
                             "official Rein / released SoMA .pth trained with this config")
    parser.add_argument("--out", metavar="DIR", help="folder for results.json/.md (default: RUN/eval)")


def _eval_run(args: argparse.Namespace) -> int:
    from .engine.checkpoint import CheckpointError, load_model_weights
    from .engine.distributed import init_distributed, shutdown_distributed
    from .engine.evaluate import evaluate_datasets, format_markdown, results_writer
    from .engine.trainer import seed_everything
    from .fileio import check_input_file
    from .tuning.model import build_segmentor
    from .predict.loading import is_dgss_model_file, load_segmentor

    cfg = _load_checked_config(args)
    if not cfg.data.test:
        raise UsageError(f"{args.config}: data.test lists no dataset to evaluate on")
    checkpoint = args.checkpoint
    if checkpoint.endswith(".state.pt"):  # the state half of a training checkpoint: use its model half
        checkpoint = checkpoint[: -len(".state.pt")] + ".safetensors"
    # what the evaluation reads and where it writes, before the model is built
    check_input_file(checkpoint, "checkpoint file")
    _check_inputs(cfg, ("test",))
    _check_output(args.out or cfg.run_dir / "eval", "output folder (--out)" if args.out else "output folder (RUN/eval)")
    ctx = init_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)
        try:
            if is_dgss_model_file(checkpoint):
                model = build_segmentor(cfg)
                load_model_weights(model, checkpoint)
            else:  # an official Rein or released SoMA file (or a plain state dict), with this config
                model = load_segmentor(checkpoint, config=cfg).model
        except CheckpointError as err:
            raise UsageError(str(err)) from err
        model = model.to(ctx.device)
        if cfg.eval.precise_bn_batches > 0:  # the statistics the benchmark's runs are evaluated with
            if ctx.world_size > 1:
                raise UsageError("eval.precise_bn_batches runs in one process: evaluate without torchrun")
            from .engine.precise_bn import recalibrate_batch_norm

            recalibrate_batch_norm(model, cfg, cfg.eval.precise_bn_batches)
        amp = cfg.train.amp if ctx.device.type == "cuda" else "none"
        out = Path(args.out) if args.out else cfg.run_dir / "eval"
        from tqdm import tqdm

        # each dataset's results are written and printed as it finishes: a later failure keeps them
        on_result = results_writer(out, checkpoint=str(checkpoint), echo=lambda line: tqdm.write(line))
        results = evaluate_datasets(model, cfg.data.test, cfg, ctx, amp=amp, progress=cfg.train.progress_bar,
                                    on_result=on_result)
        if ctx.is_main:
            print(format_markdown(results))
            print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
    finally:
        shutdown_distributed()
    return 0


# ------------------------------------------------------------------------------------------------
# dgss predict / dgss export
# ------------------------------------------------------------------------------------------------


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a dgss model file, a training checkpoint, a run folder, or an official Rein .pth")
    parser.add_argument("--config", metavar="YAML", help="experiment config, for checkpoints without one "
                        "(official Rein, plain state dicts)")
    parser.add_argument("--backbone-weights", metavar="FILE",
                        help="pretrained backbone file, for checkpoints that hold the method and head only")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def _load_predictor(args: argparse.Namespace):
    from .predict import CheckpointError, load

    try:
        predictor = load(args.checkpoint, config=args.config, backbone_weights=args.backbone_weights,
                         device=args.device)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    if Path(args.checkpoint).is_dir() and predictor.source.name != "model_final.safetensors":
        # a run without a final model: say which checkpoint stands in for it
        print(f"dgss {args.command}: {args.checkpoint} has no model_final.safetensors; using its newest "
              f"checkpoint {predictor.source}", file=sys.stderr)
    return predictor


def _predict_args(parser: argparse.ArgumentParser) -> None:
    from .predict.writers import FORMATS

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders (searched recursively), videos")
    _add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per format)")
    parser.add_argument("--format", default="colour", metavar="LIST",
                        help=f"comma-separated outputs: {', '.join(FORMATS)} (default: colour)")
    parser.add_argument("--tta", metavar="SPEC", help="test-time augmentation, e.g. flip or flip,scales=0.75,1.0,1.25")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="images (of one size) per forward pass")
    parser.add_argument("--mode", choices=["slide", "whole"], help="inference mode (default: the model's eval.mode)")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("W", "H"),
                        help="fit images into this box before inference (results keep the input size)")
    parser.add_argument("--opacity", type=float, default=0.5, help="colour weight of overlays (default 0.5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _predict_run(args: argparse.Namespace) -> int:
    from .predict import parse_tta
    from .predict.run import PredictOptions, predict_inputs
    from .predict.writers import parse_formats

    options = PredictOptions(formats=parse_formats(args.format), tta=parse_tta(args.tta), batch_size=args.batch,
                             mode=args.mode, resize=args.resize, opacity=args.opacity, progress=not args.no_progress)
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    _check_output(args.out, "output folder (--out)")  # before the model is loaded
    predictor = _load_predictor(args)
    from tqdm import tqdm

    report = predict_inputs(predictor, args.inputs, Path(args.out), options,  # tqdm.write: keeps the bars intact
                            on_error=lambda line: tqdm.write(f"dgss predict: {line}", file=sys.stderr))
    done = f"{report.images} images" + (f", {report.videos} videos ({report.frames} frames)" if report.videos else "")
    print(f"wrote {done} to {args.out} ({', '.join(options.formats)})")
    if report.errors:
        print(f"dgss predict: {len(report.errors)} input(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


def _export_args(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="model.onnx, or model.pt for TorchScript")
    parser.add_argument("--format", choices=["onnx", "torchscript"], help="default: from the suffix of --out")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="the fixed input size (default: the model's eval.crop_size)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16; default 17)")
    parser.add_argument("--no-merge", action="store_true", help="keep the tuning method as it is (no folding)")


def _export_run(args: argparse.Namespace) -> int:
    from .export import ExportError, export_format, export_model

    try:  # what --out can be, before the model is loaded
        export_format(args.out, args.format)
    except ExportError as err:
        raise UsageError(str(err)) from err
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; name the model file, e.g. {Path(args.out) / 'model.onnx'}")
    _check_output(Path(args.out).parent, "folder of --out")
    predictor = _load_predictor(args)
    try:
        result = export_model(predictor.model, predictor.cfg, args.out, fmt=args.format, input_size=args.input_size,
                              opset=args.opset, merge=not args.no_merge)
    except ExportError as err:
        print(f"dgss export: error: {err}", file=sys.stderr)
        return 1
    h, w = result.input_size
    print(f"wrote {result.path}: input 'images' B x 3 x {h} x {w} float32 RGB 0..255; outputs 'scores' "
          f"B x {predictor.num_classes} x {h} x {w}, 'labels' B x {h} x {w}")
    for note in result.notes:
        print(f"  {note}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "backbones": ("list the supported VFM backbones with parameter counts", _backbones_args, _backbones_run),
    "config": ("validate a config and print it fully resolved", _config_args, _config_run),
    "train": ("train a model (iterations, checkpoints, --resume; torchrun for several GPUs)", _train_args,
              _train_run),
    "eval": ("evaluate a model file on every data.test dataset (mIoU tables, JSON + Markdown)", _eval_args,
             _eval_run),
    "predict": ("segment images, folders and videos with a trained model (colour masks, overlays, ids)",
                _predict_args, _predict_run),
    "export": ("export a trained model to ONNX or TorchScript (fixed input size, methods folded)", _export_args,
               _export_run),
    "plan": ("memory per process of a config before it runs: fits or not, and the smallest change that fits",
             _plan_args, _plan_run),
    "convert": ("turn an FSDP checkpoint (train.parallel=fsdp) into a plain model file for eval and predict",
                _convert_args, _convert_run),
    "fisher": ("FisherTune stages 1-2 alone: DR-FIM scores, selection and plots", _fisher_args, _fisher_run),
    "compare": ("run or collect several methods on one protocol and write the comparison table", _compare_args,
                _compare_run),
    "demo": ("run the built-in end-to-end demo on CPU (synthetic domains)", _demo_args, _demo_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgss",
        description="Domain-generalized semantic segmentation with Vision Foundation Models "
        "(FisherTune, Rein and their baselines).",
    )
    parser.add_argument("--version", action="version", version=f"dgss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # overrides may also follow options (`dgss eval CFG --checkpoint F key=value`), which argparse's
    # positional matching alone would reject
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args)
    except Exception as err:  # noqa: BLE001 - user errors become one line, anything else a traceback
        if not isinstance(err, _user_error_types()) and not (isinstance(err, OSError) and err.filename):
            raise
        print(f"dgss {args.command}: error: {_error_line(err)}", file=sys.stderr)
        return 2


def _user_error_types() -> tuple[type, ...]:
    """Errors caused by the user's input. ValueError covers build-time value errors (unknown backbone,
    method, dataset type) and ConfigError; the library's own error types count once their module is loaded
    (an error of a module that was never imported cannot have been raised)."""
    types: list[type] = [UsageError, ValueError, FileNotFoundError]
    for module, name in (("dgss.models.backbone_weights", "BackboneWeightsError"),
                         ("dgss.engine.checkpoint", "CheckpointError"),
                         ("dgss.tuning.rein_checkpoint", "ReinCheckpointError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)


def _error_line(err: BaseException) -> str:
    """One line: a multi-line message (e.g. a weights file's missing and unexpected keys) joined with
    "; ", an OS error as "reason: file", and never torch's advice to load a file with weights_only=False."""
    from .fileio import describe_load_error

    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if "Weights only load failed" in text:  # a torch.load error passed on as it was
        head = text.split("Weights only load failed")[0].rstrip(" :;")
        text = f"{head}: {describe_load_error(RuntimeError(text))}" if head else describe_load_error(RuntimeError(text))
    return text


if __name__ == "__main__":
    sys.exit(main())
