"""The `dgss` command line: one sub-command per task.

    dgss --version
    dgss backbones                       # the VFM zoo with parameter counts
    dgss config CONFIG [key=value ...]   # validate a config and print it fully resolved
    dgss demo                            # the built-in end-to-end run on CPU

Each sub-command is a (help, add_arguments, run) triple in ``COMMANDS``; errors the user can fix
(bad config, missing file) print one clear line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
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
# dgss demo
# ------------------------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the demo's outputs")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute version")


def _demo_run(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "backbones": ("list the supported VFM backbones with parameter counts", _backbones_args, _backbones_run),
    "config": ("validate a config and print it fully resolved", _config_args, _config_run),
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
    args = parser.parse_args(argv)
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
