"""The `dgss` command line: one sub-command per task.

    dgss --version
    dgss backbones                       # the VFM zoo with parameter counts
    dgss config CONFIG [key=value ...]   # validate a config and print it fully resolved
    dgss train CONFIG [key=value ...] [--resume [CHECKPOINT]]   # also under torchrun
    dgss eval CONFIG --checkpoint FILE [key=value ...]         # every data.test dataset
    dgss fisher CONFIG [key=value ...]   # FisherTune stages 1-2: DR-FIM scores, selection, plots
    dgss demo                            # the built-in end-to-end run on CPU

Each sub-command is a (help, add_arguments, run) triple in ``COMMANDS``; errors the user can fix
(bad config, missing file) print one clear line and exit with status 2 instead of a traceback.
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

    from .config import load_config, save_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if args.save:
        save_config(cfg, args.save)
        print(f"# written to {args.save}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# dgss fisher
# ------------------------------------------------------------------------------------------------


def _fisher_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--out", help="output folder (default: the run folder, output_dir/name)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def _fisher_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .tuning.fishertune.report import run_fisher

    cfg = load_config(args.config, args.overrides + ["method.name=fishertune"])
    for name, path in run_fisher(cfg, device=args.device, out_dir=args.out).items():
        print(f"{name:<13} {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# dgss demo
# ------------------------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the demo's outputs")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute version")


def _demo_run(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


# ------------------------------------------------------------------------------------------------
# dgss train / dgss eval
# ------------------------------------------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue a run: the newest checkpoint in RUN/checkpoints, or the file/folder given")


def _train_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.checkpoint import CheckpointError
    from .engine.distributed import shutdown_distributed
    from .engine.trainer import NonFiniteLossError, Trainer

    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)  # `--resume key=value`: a bare --resume followed by an override
        resume = True
    cfg = load_config(args.config, args.overrides)
    try:
        path = Trainer(cfg, resume=resume).train()
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    except NonFiniteLossError as err:
        print(f"dgss train: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0 if path else 1


def _eval_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a dgss model file: RUN/model_final.safetensors or a training checkpoint")
    parser.add_argument("--out", metavar="DIR", help="folder for results.json/.md (default: RUN/eval)")


def _eval_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.checkpoint import CheckpointError, load_model_weights
    from .engine.distributed import init_distributed, shutdown_distributed
    from .engine.evaluate import evaluate_datasets, format_markdown, write_results
    from .engine.trainer import seed_everything
    from .models.segmentor import build_segmentor

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.test:
        raise UsageError(f"{args.config}: data.test lists no dataset to evaluate on")
    checkpoint = args.checkpoint
    if checkpoint.endswith(".state.pt"):  # the state half of a training checkpoint: use its model half
        checkpoint = checkpoint[: -len(".state.pt")] + ".safetensors"
    ctx = init_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)
        model = build_segmentor(cfg).to(ctx.device)
        try:
            load_model_weights(model, checkpoint)
        except CheckpointError as err:
            raise UsageError(str(err)) from err
        amp = cfg.train.amp if ctx.device.type == "cuda" else "none"
        results = evaluate_datasets(model, cfg.data.test, cfg, ctx, amp=amp)
        if ctx.is_main:
            out = Path(args.out) if args.out else cfg.run_dir / "eval"
            json_path, md_path = write_results(results, out, checkpoint=str(checkpoint))
            print(format_markdown(results))
            print(f"\nresults: {json_path}, {md_path}")
    finally:
        shutdown_distributed()
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "backbones": ("list the supported VFM backbones with parameter counts", _backbones_args, _backbones_run),
    "config": ("validate a config and print it fully resolved", _config_args, _config_run),
    "train": ("train a model (iterations, checkpoints, --resume; torchrun for several GPUs)", _train_args,
              _train_run),
    "eval": ("evaluate a model file on every data.test dataset (mIoU tables, JSON + Markdown)", _eval_args,
             _eval_run),
    "fisher": ("FisherTune stages 1-2 alone: DR-FIM scores, selection and plots", _fisher_args, _fisher_run),
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
    from .config import ConfigError

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
    except (ConfigError, UsageError, FileNotFoundError) as err:
        print(f"dgss {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        # build-time value errors (unknown backbone, method, dataset type) are user errors too
        print(f"dgss {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
