"""The `dgss` command line: one sub-command per task.

    dgss --version
    dgss backbones                       # the VFM zoo with parameter counts
    dgss config CONFIG [key=value ...]   # validate a config and print it fully resolved
    dgss train CONFIG [key=value ...] [--resume [CHECKPOINT] | --auto-resume]   # also under torchrun
    dgss eval CONFIG --checkpoint FILE|RUN [key=value ...]     # every data.test dataset
    dgss plan CONFIG [key=value ...] [--gpus N --gpu-memory 80GB] [--json]   # memory per process, fits?
    dgss convert --checkpoint CKPT|RUN --out FILE   # an FSDP checkpoint -> a plain model file
    dgss configs list|show|copy [NAME]   # the configs that ship with dgss
    dgss fisher CONFIG [key=value ...]   # FisherTune stages 1-2: DR-FIM scores, selection, plots
    dgss compare CONFIG --methods frozen,rein,lora [key=value ...] [--out DIR] [--no-run]
    dgss predict --checkpoint FILE INPUT... --out DIR [--format colour,overlay] [--tta flip]
    dgss export --checkpoint FILE --out model.onnx [--input-size H W]   # ONNX or TorchScript
    dgss demo [--quick] [--out DIR]      # the built-in end-to-end run on CPU (synthetic domains)

Each sub-command is a (help, add_arguments, run) triple in ``COMMANDS``; its description and examples
are in :mod:`dgss.cli_help`. One convention for all: ``--checkpoint`` takes a file or a run folder;
every command that runs a model takes ``--device`` and ``--no-progress``, and shows no progress bar when
its output is not a terminal (log lines instead). Errors the user can fix
(bad config, missing file) print one clear line and exit with status 2 instead of a traceback.
``dgss train`` stopped by SIGTERM/SIGUSR1 exits with 75 after checkpointing (for requeue scripts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .cli_help import DESCRIPTIONS, SUMMARIES, epilog

__all__ = ["main", "COMMANDS"]


class UsageError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file, or the name of a shipped config (dgss configs list)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, also after the options (e.g. data.test.0.root=/data/bdd100k)")


def _add_device_progress_args(parser: argparse.ArgumentParser, device_help: str) -> None:
    """The two flags of every command that runs a model (the CLI convention)."""
    parser.add_argument("--device", metavar="DEVICE", help=device_help)
    parser.add_argument("--no-progress", action="store_true",
                        help="log lines instead of progress bars (automatic when the output is not a terminal)")


_CONFIG_DEVICE_HELP = "auto, cuda or cpu: sets train.device (default: the config's, auto = the GPU when there is one)"
_TORCH_DEVICE_HELP = "cuda, cuda:N or cpu (default: cuda when available)"


def _interactive() -> bool:
    """Progress bars only on a terminal: piped to a file (a SLURM log) their carriage returns are noise."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _show_progress(args: argparse.Namespace, configured: bool = True) -> bool:
    """Bars when the config allows them and --no-progress is not given: on a terminal, or anywhere when the
    command line asks for them (train.progress_bar=true)."""
    asked = any(o.replace(" ", "").lower() == "train.progress_bar=true" for o in getattr(args, "overrides", []))
    return configured and not args.no_progress and (_interactive() or asked)


def _runtime_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """--device and --no-progress (or a non-terminal output) as the config keys they stand for."""
    extra = []
    if args.device is not None:
        if args.device not in ("auto", "cuda", "cpu"):
            raise UsageError(f"--device must be auto, cuda or cpu (train.device; one GPU per process under "
                             f"torchrun), got {args.device}")
        extra.append(f"train.device={args.device}")
    if not _show_progress(args):
        extra.append("train.progress_bar=false")
    return tuple(extra)


def _load_checked_config(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """The config of ``args`` with its overrides, types and values checked (the checks of `dgss config`)."""
    from .config import load_config
    from .engine.config_check import check_config

    cfg = load_config(args.config, list(args.overrides) + list(extra))
    return check_config(cfg, args.config)


def _check_inputs(cfg, splits: tuple[str, ...]) -> None:
    """Files and folders the command reads, before any model is built: the backbone weights file and
    the roots of the datasets in ``splits`` (one line naming the key when one is missing)."""
    from .fileio import UnusablePathError, check_input_file
    from .models.weight_sources import download_hint

    if cfg.model.weights not in (None, "hub"):
        try:
            check_input_file(cfg.model.weights, "backbone weights file (model.weights)")
        except UnusablePathError as err:
            raise UsageError(f"{err}{download_hint(cfg.model.backbone, cfg.model.weights)}") from err
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
    parser.add_argument("--check-files", action="store_true",
                        help="also check the files dgss train reads first: the backbone weights and every "
                        "dataset root (train, val, test)")


def _config_run(args: argparse.Namespace) -> int:
    import yaml

    from .config import save_config, to_dict

    cfg = _load_checked_config(args)  # names and values too, as train, eval and fisher check them
    if args.check_files:  # and the files, as `dgss train` checks them before it builds the model
        _check_inputs(cfg, ("train", "val", "test"))
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
    parser.add_argument("--checkpoint", metavar="CKPT|RUN",
                        help="an FSDP checkpoint: iter_N.dcp, its .fsdp.pt, a checkpoints folder or a run folder "
                        "(their newest)")
    # the older form `dgss convert CKPT --out FILE` keeps working for existing scripts; not shown in the usage
    parser.add_argument("positional_checkpoint", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, metavar="FILE", help="the model file to write (.safetensors)")
    parser.add_argument("--config", help="the run's config (default: RUN/config.yaml next to the checkpoints)")


def _convert_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.fsdp import convert_checkpoint

    if args.checkpoint and args.positional_checkpoint:
        raise UsageError(f"two checkpoints given ({args.positional_checkpoint} and --checkpoint {args.checkpoint}): "
                         "give --checkpoint only")
    spec = Path(args.checkpoint or args.positional_checkpoint or "")
    if not str(spec) or str(spec) == ".":
        raise UsageError("--checkpoint is required (an iter_N.dcp folder, its .fsdp.pt, or a run folder)")
    if spec.is_dir() and spec.suffix != ".dcp" and (spec / "checkpoints").is_dir():
        spec = spec / "checkpoints"  # a run folder: its checkpoints, as eval, predict and export take a run
    cfg = load_config(args.config) if args.config else None
    print(f"wrote {convert_checkpoint(spec, args.out, cfg)}")
    return 0


# ------------------------------------------------------------------------------------------------
# dgss configs
# ------------------------------------------------------------------------------------------------


def _configs_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "show", "copy"),
                        help="list: the shipped configs (under FOLDER); show: print NAME; copy: copy NAMEs (files or "
                        "folders) with their _base_ files")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="a shipped config or folder, e.g. rein/dinov2-l_gtav_512.yaml or rein")
    parser.add_argument("--to", default="configs", metavar="DIR",
                        help="with copy: the folder to copy into, keeping the relative paths (default: ./configs)")
    parser.add_argument("--force", action="store_true", help="with copy: overwrite files that differ")


def _configs_run(args: argparse.Namespace) -> int:
    from .config_files import copy_configs, list_configs, shipped_config

    if args.action == "list":
        if len(args.names) > 1:
            raise UsageError("list takes at most one folder, e.g. `dgss configs list rein`")
        for name in list_configs(args.names[0] if args.names else ""):
            print(name)
        return 0
    if not args.names:
        raise UsageError(f"{args.action} needs a config name, e.g. `dgss configs {args.action} rein/dinov2-l_gtav_512.yaml`")
    if args.action == "show":
        for name in args.names:
            path = shipped_config(name)
            if path.is_dir():
                raise UsageError(f"{name} is a folder of configs: `dgss configs list {name}` names them")
            if len(args.names) > 1:
                print(f"# {name}")
            print(path.read_text(), end="")
        return 0
    _check_output(args.to, "folder of --to")
    for path in copy_configs(args.names, args.to, force=args.force):
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------
# dgss fisher
# ------------------------------------------------------------------------------------------------


def _fisher_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--out", help="output folder (default: the run folder, output_dir/name)")
    parser.add_argument("--stability", action="store_true",
                        help="also estimate plain and variational on 2 x num_batches further batches and report "
                             "each ranking's split-half Jaccard (4 more estimates)")
    _add_device_progress_args(parser, _TORCH_DEVICE_HELP)


def _fisher_run(args: argparse.Namespace) -> int:
    from .tuning.fishertune.report import format_report, run_fisher

    cfg = _load_checked_config(args, ("method.name=fishertune",))
    _check_inputs(cfg, ("train",))
    out = _check_output(args.out or cfg.run_dir,
                        "output folder (--out)" if args.out else "run folder (output_dir/name)")
    written, report = run_fisher(cfg, device=args.device, out_dir=out, stability=args.stability,
                                 progress=_show_progress(args, cfg.train.progress_bar))
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
    _add_device_progress_args(parser, _CONFIG_DEVICE_HELP)


def _compare_run(args: argparse.Namespace) -> int:
    from .compare import compare, format_markdown_table
    from .config import load_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods names no method")
    overrides = list(args.overrides) + list(_runtime_overrides(args))
    out = args.out
    if out is None:
        protocol = load_config(args.config, overrides)
        out = str(Path(protocol.output_dir) / f"compare_{Path(args.config).stem}")
    _check_output(out, "output folder (--out)")
    runs, paths = compare(args.config, methods, overrides=overrides, out_dir=out, allow_run=not args.no_run)
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
    parser.add_argument("--device", default="cpu", help="with --pretrain-ssl: cpu (default) or cuda (the demo "
                        "itself runs on the CPU)")
    parser.add_argument("--pool-version", type=int, metavar="N",
                        help="with --pretrain-ssl: the unlabeled pool's version (dgss.testbed.pool: 2, the shipped "
                        "file's and the default, adds dim scenes without night's look to 1; 3 adds night's "
                        "look, snow alone held out)")
    parser.add_argument("--no-progress", action="store_true",
                        help="log lines instead of progress bars (automatic when the output is not a terminal)")


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
                                   progress=_show_progress(args), overrides=overrides)
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
        path = pretrain_foundation(args.pretrain_foundation, iters=args.iters, progress=_show_progress(args))
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
             progress=_show_progress(args), threads=args.threads, seeds=seeds, jobs=jobs)
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
    _add_device_progress_args(parser, _CONFIG_DEVICE_HELP)


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
    cfg = _load_checked_config(args, _runtime_overrides(args))
    # what the run reads and where it writes, before the model is built: the test sets too, whose wrong
    # root would otherwise be found by `dgss eval` after the whole run
    _check_inputs(cfg, ("train", "val", "test"))
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
    parser.add_argument("--checkpoint", required=True, metavar="FILE|RUN",
                        help="a dgss model file (RUN/model_final.safetensors or a training checkpoint), a run "
                             "folder (its final model, else its newest checkpoint), or an official Rein / released "
                             "SoMA .pth trained with this config")
    parser.add_argument("--out", metavar="DIR", help="folder for results.json/.md (default: RUN/eval)")
    _add_inference_args(parser, "the config's")
    _add_device_progress_args(parser, _CONFIG_DEVICE_HELP)


def _add_inference_args(parser: argparse.ArgumentParser, source: str) -> None:
    """--mode and --scale (eval.mode, eval.scale: dgss.models.inference, docs/inference.md)."""
    parser.add_argument("--mode", choices=["slide", "whole", "coarse_to_fine"],
                        help=f"inference mode (default: {source} eval.mode)")
    parser.add_argument("--scale", type=float, metavar="S",
                        help="resize the images by S before inference, the scores back to the output size "
                             f"(default: {source} eval.scale; 2 runs a 1024 x 512 protocol at 2048 x 1024)")


def _inference_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """--mode and --scale as the config keys they stand for."""
    return ((f"eval.mode={args.mode}",) if args.mode else ()) + \
        ((f"eval.scale={args.scale}",) if args.scale is not None else ())


def _eval_run(args: argparse.Namespace) -> int:
    from .engine.checkpoint import CheckpointError, load_model_weights
    from .engine.distributed import init_distributed, shutdown_distributed
    from .engine.evaluate import evaluate_datasets, format_markdown, results_writer
    from .engine.trainer import seed_everything
    from .fileio import check_input_file
    from .tuning.model import build_segmentor
    from .predict.loading import is_dgss_model_file, load_segmentor, resolve_model_file

    cfg = _load_checked_config(args, _runtime_overrides(args) + _inference_overrides(args))
    if not cfg.data.test:
        raise UsageError(f"{args.config}: data.test lists no dataset to evaluate on")
    try:  # a run folder, either half of a training checkpoint, or the file itself (as predict and export)
        checkpoint = str(resolve_model_file(args.checkpoint))
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    if Path(args.checkpoint).is_dir():
        print(f"dgss eval: evaluating {checkpoint}", file=sys.stderr)
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
    parser.add_argument("--checkpoint", required=True, metavar="FILE|RUN",
                        help="a dgss model file, a training checkpoint, a run folder, or an official Rein .pth")
    parser.add_argument("--config", metavar="YAML", help="experiment config, for checkpoints without one "
                        "(official Rein, plain state dicts)")
    parser.add_argument("--backbone-weights", metavar="FILE",
                        help="pretrained backbone file, for checkpoints that hold the method and head only")
    _add_device_progress_args(parser, _TORCH_DEVICE_HELP)


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
    _add_inference_args(parser, "the model's")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("W", "H"),
                        help="fit images into this box before inference (results keep the input size)")
    parser.add_argument("--opacity", type=float, default=0.5, help="colour weight of overlays (default 0.5)")


def _predict_run(args: argparse.Namespace) -> int:
    from .predict import parse_tta
    from .predict.run import PredictOptions, predict_inputs
    from .predict.writers import parse_formats

    options = PredictOptions(formats=parse_formats(args.format), tta=parse_tta(args.tta), batch_size=args.batch,
                             mode=args.mode, resize=args.resize, opacity=args.opacity, progress=_show_progress(args),
                             scale=args.scale)
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.scale is not None and not args.scale > 0:
        raise UsageError(f"--scale must be above 0 (a resize factor), got {args.scale}")
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

_HANDLERS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "backbones": (_backbones_args, _backbones_run),
    "config": (_config_args, _config_run),
    "configs": (_configs_args, _configs_run),
    "train": (_train_args, _train_run),
    "eval": (_eval_args, _eval_run),
    "predict": (_predict_args, _predict_run),
    "export": (_export_args, _export_run),
    "plan": (_plan_args, _plan_run),
    "convert": (_convert_args, _convert_run),
    "fisher": (_fisher_args, _fisher_run),
    "compare": (_compare_args, _compare_run),
    "demo": (_demo_args, _demo_run),
}
COMMANDS: dict[str, Command] = {name: (SUMMARIES[name], *handlers) for name, handlers in _HANDLERS.items()}

# Commands that build and run a model: each takes --device and --no-progress (tests/test_cli_convention.py).
MODEL_COMMANDS = ("train", "eval", "predict", "export", "fisher", "compare", "demo")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps the description like argparse does, and keeps the examples block as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgss",
        description="Domain-generalized semantic segmentation with Vision Foundation Models "
        "(FisherTune, Rein and their baselines).",
        epilog="`dgss COMMAND --help` describes a command, with examples.",
    )
    parser.add_argument("--version", action="version", version=f"dgss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name], epilog=epilog(name),
                                formatter_class=_HelpFormatter))
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
        status = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a closed pipe shows here, in the handler below, not at the interpreter's exit
        return status
    except BrokenPipeError:  # `dgss configs list | head`: the reader stopped reading, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
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
