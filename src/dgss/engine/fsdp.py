"""FSDP (``train.parallel: fsdp``): parameters, gradients and AdamW state sharded over the processes with
torch's own FSDP2 (``torch.distributed.fsdp.fully_shard``), checkpoints through
``torch.distributed.checkpoint`` (DCP).

    shard_segmentor(model)                     # every backbone block one unit, the rest the root unit

Each backbone block is one FSDP unit (gathered for its forward and again for its backward, then
freed), the segmentor the root unit (embeddings, neck, method and head). Gradients are reduce-scattered
and averaged over the processes, as DDP averages them, so a step equals DDP's (tests/test_engine_fsdp.py).
Full fine-tuning shards the whole model and its state; frozen-backbone methods (Rein, SoMA,
FisherTune's stage 3) shard the frozen weights too, which is what a 7B backbone needs on 80 GB GPUs.

A checkpoint of iteration N under FSDP is ``iter_000000N.dcp/`` (model and optimizer, each process
writing its shards), ``iter_000000N.fsdp.pt`` (the rest of the training state: data position, RNG
states, counters; read with ``weights_only=True``) and the pointer ``last_fsdp``; a resume needs
``train.parallel: fsdp`` again (any process count: DCP reshards). The final model is a plain dgss model
file (gathered to rank 0), and :func:`convert_checkpoint` turns any FSDP checkpoint into one, in one
process without torch.distributed, for ``dgss eval``/``predict`` (``dgss convert``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["shard_segmentor", "check_supported", "save_checkpoint", "latest_checkpoint", "has_checkpoint",
           "read_training_state", "load_sharded", "gathered_state_dict", "write_model_file", "diverged_tensors",
           "convert_checkpoint", "POINTER_NAME"]

POINTER_NAME = "last_fsdp"


def check_supported(cfg) -> None:
    """What FSDP cannot do in dgss, refused with one line before anything is built."""
    if getattr(getattr(cfg.train, "ema", None), "enabled", False):
        raise ValueError("train.ema: the weight EMA does not run under train.parallel=fsdp; use ddp or turn EMA off")
    if cfg.train.compile:
        raise ValueError("train.compile with train.parallel=fsdp is not supported by dgss; set train.compile=false")


def shard_segmentor(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every backbone block, then the segmentor (in place); returns it."""
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# ------------------------------------------------------------------ checkpoints


def _names(directory: Path, iteration: int) -> tuple[Path, Path]:
    stem = directory / f"iter_{iteration:07d}"
    return stem.with_suffix(".dcp"), stem.with_suffix(".fsdp.pt")


def save_checkpoint(trainer, state: dict, keep: int = 0) -> Path:
    """Every process: its shards of the model and optimizer into ``iter_N.dcp``; rank 0: the training
    state, then the pointer (last), then old checkpoints beyond ``keep`` are deleted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..fileio import atomic_write

    directory, iteration = Path(trainer.checkpoint_dir), trainer.iteration
    folder, state_path = _names(directory, iteration)
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    if trainer.ctx.is_main and folder.exists():
        shutil.rmtree(folder)  # a killed save of the same iteration
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    if trainer.ctx.is_main:
        atomic_write(state_path, lambda tmp: torch.save({**state, "iteration": iteration, "dcp": folder.name}, tmp))
        pointer = json.dumps({"iteration": iteration, "dcp": folder.name, "state": state_path.name})
        atomic_write(directory / POINTER_NAME, lambda tmp: Path(tmp).write_text(pointer + "\n"))
        if keep > 0:
            older = sorted(int(m[1]) for p in directory.glob("iter_*.dcp")
                           if (m := re.fullmatch(r"iter_(\d+)\.dcp", p.name)) and int(m[1]) < iteration)
            for old in older[:max(len(older) - (keep - 1), 0)]:
                old_folder, old_state = _names(directory, old)
                shutil.rmtree(old_folder, ignore_errors=True)
                old_state.unlink(missing_ok=True)
    dist.barrier()
    return folder


def has_checkpoint(directory) -> bool:
    return (Path(directory) / POINTER_NAME).is_file()


def latest_checkpoint(spec) -> tuple[Path, Path]:
    """(``iter_N.dcp`` folder, state file) of ``spec``: a checkpoints folder (its ``last_fsdp``), the
    ``.dcp`` folder or its ``.fsdp.pt`` file."""
    from .checkpoint import CheckpointError

    spec = Path(spec)
    if spec.is_dir() and spec.suffix != ".dcp":
        pointer = spec / POINTER_NAME
        if not pointer.is_file():
            ddp = " (it holds a DDP checkpoint: resume with train.parallel=ddp)" if (spec / "last").is_file() else ""
            raise CheckpointError(f"no FSDP checkpoint to resume from in {spec}{ddp}")
        try:
            entry = json.loads(pointer.read_text())
            folder, state = spec / entry["dcp"], spec / entry["state"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint pointer {pointer} is unreadable: {err}") from err
    elif spec.suffix == ".dcp":
        folder, state = spec, spec.with_suffix(".fsdp.pt")
    elif spec.name.endswith(".fsdp.pt"):
        folder, state = spec.with_name(spec.name[: -len(".fsdp.pt")] + ".dcp"), spec
    else:
        raise CheckpointError(f"{spec} is not an FSDP checkpoint (iter_N.dcp or iter_N.fsdp.pt); under "
                              "train.parallel=fsdp a run resumes from the checkpoints it wrote")
    for path in (folder, state):
        if not path.exists():
            raise CheckpointError(f"FSDP checkpoint part not found: {path}")
    return folder, state


def read_training_state(path) -> dict:
    from .checkpoint import load_training_state

    return load_training_state(path)


def load_sharded(folder, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a ``.dcp`` checkpoint into a sharded model and its optimizer, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint import CheckpointError

    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optimizer": optim_state}
    # partial: AdamW state exists only for tensors that got a gradient (a ViT's unused final norm has none),
    # while the state dict of a fresh optimizer has zero state for every trainable tensor
    planner = DefaultLoadPlanner(allow_partial_load=True)
    try:
        dcp.load(target, checkpoint_id=str(folder), planner=planner)
    except Exception as err:  # noqa: BLE001 - named with the folder, one line
        raise CheckpointError(f"cannot load FSDP checkpoint {folder}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def gathered_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict on rank 0's CPU (empty on the other ranks); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _Gathered:
    """What :func:`dgss.engine.checkpoint.save_model` reads of a segmentor: its backbone and state dict."""

    def __init__(self, model, state: dict):
        self.backbone, self._state = model.backbone, state

    def state_dict(self) -> dict:
        return self._state


def write_model_file(trainer, path, metadata: dict) -> Optional[Path]:
    """The final model as a plain dgss model file, written by rank 0 (every process calls it)."""
    from . import checkpoint as ckpt

    state = gathered_state_dict(trainer.model)
    written = None
    if trainer.ctx.is_main:
        written = ckpt.save_model(_Gathered(trainer.model, state), trainer.cfg, path, metadata=metadata,
                                  fingerprint=trainer._fingerprint)
    dist.barrier()
    return written


@torch.no_grad()
def diverged_tensors(model: torch.nn.Module) -> list[str]:
    """:func:`dgss.engine.checkpoint.diverged_tensors` of a sharded model: each process checks its
    shards, and the names found anywhere are returned on every process."""
    from torch.distributed.tensor import DTensor

    from .checkpoint import DIVERGED_WEIGHT

    bad = []
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point() and local.numel() and not bool((local.abs() <= DIVERGED_WEIGHT).all()):
            bad.append(name)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, bad)
    return sorted({n for names in gathered for n in names})


def convert_checkpoint(spec, out, cfg=None) -> Path:
    """An FSDP checkpoint (``iter_N.dcp``, its ``.fsdp.pt`` or a checkpoints folder) -> a plain dgss model
    file at ``out``, in this process without torch.distributed. ``cfg``: the run's config (default: the
    ``config.yaml`` of the run folder the checkpoint is in)."""
    import torch.distributed.checkpoint as dcp

    from ..config import load_config
    from ..tuning.model import build_segmentor
    from . import checkpoint as ckpt

    folder, state_path = latest_checkpoint(spec)
    if cfg is None:
        run_config = folder.parent.parent / "config.yaml"
        if not run_config.is_file():
            raise ckpt.CheckpointError(f"no config for {folder}: {run_config} not found; pass the run's config")
        cfg = load_config(run_config)
    shapes = copy.deepcopy(cfg)
    shapes.model.weights = None  # every tensor comes from the checkpoint
    model = build_segmentor(shapes)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    except Exception as err:  # noqa: BLE001
        raise ckpt.CheckpointError(f"cannot read FSDP checkpoint {folder} for the config's model: "
                                   f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    model.load_state_dict(state["model"])
    iteration = int(read_training_state(state_path).get("iteration", 0))
    fingerprint = None if ckpt.stores_backbone(model, cfg) else ckpt.backbone_identity(model.backbone)
    return ckpt.save_model(model, cfg, out, metadata={"iteration": iteration, "converted_from": folder.name},
                           fingerprint=fingerprint)
