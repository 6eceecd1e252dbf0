"""Training checkpoints: atomic, unpickling-free, and one loader for final models and checkpoints.

A checkpoint of iteration N in ``RUN/checkpoints`` is two files and a pointer:

* ``iter_0000N.safetensors``: the model, a dgss model file (:func:`dgss.tuning.rein_checkpoint.
  save_model_file`), so ``load_model_file`` opens it like a final model. For a method whose
  pretrained backbone stays frozen only the method's, neck's and head's tensors (parameters and
  buffers) are stored, with the backbone's identity: its name, weights file and a fingerprint of
  its tensors, checked when the backbone is re-attached. A backbone that trains, or one without a
  weights file (random init, e.g. in tests), is stored in full.
* ``iter_0000N.state.pt``: optimizer (by parameter name), GradScaler, RNG states (python, numpy,
  torch, cuda), the data position and the iteration; plain tensors and containers, read with
  ``torch.load(weights_only=True)``.
* ``last``: a small JSON file naming the newest complete checkpoint, replaced last.

Every file is written to a temporary name and renamed (``os.replace`` is atomic on POSIX), so a
process killed while saving leaves the previous checkpoint and pointer intact
(:func:`dgss.fileio.atomic_write`); the temporary files such a process leaves behind are deleted at the
next save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file

from ..fileio import atomic_write, describe_load_error, remove_stale_temp_files
from ..tuning.rein_checkpoint import load_segmentor_state, read_model_file_metadata, save_model_file

__all__ = [
    "CheckpointError",
    "atomic_write",
    "backbone_fingerprint",
    "DIVERGED_WEIGHT",
    "diverged_tensors",
    "stores_backbone",
    "save_model",
    "load_model_weights",
    "checkpoint_paths",
    "save_training_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_training_state",
    "capture_rng_state",
    "restore_rng_state",
]

PathLike = Union[str, os.PathLike]
POINTER_NAME = "last"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------
# Model part
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def backbone_fingerprint(backbone) -> str:
    """A short hash of the pretrained tensors (names, shapes, float64 sums and sums of squares): the
    same weights give the same string, another file or backbone almost surely does not."""
    names, stats = [], []
    for name, tensor in sorted(backbone.model.state_dict().items()):
        names.append(f"{name}:{tuple(tensor.shape)}")
        t = tensor.detach().double()
        stats.append(torch.stack([t.sum(), (t * t).sum()]))
    digest = hashlib.sha256("|".join(names).encode())
    if stats:
        values = torch.stack(stats).cpu().numpy()
        digest.update(np.round(values, 6).tobytes())  # rounding: sums differ in the last bits across devices
    return digest.hexdigest()[:16]


# A weight whose square overflows float32 (|w| > 1.8e19) makes every fp32 sum of squares through it
# (LayerNorm's variance, a norm, an attention logit) infinite: the model is diverged even while each
# entry is still finite, as the ~1e30 weights a run reaches a step before its loss turns NaN.
DIVERGED_WEIGHT = math.sqrt(torch.finfo(torch.float32).max)


@torch.no_grad()
def diverged_tensors(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding NaN, inf or an entry beyond
    :data:`DIVERGED_WEIGHT` in magnitude (empty: the weights are usable)."""
    bad = []
    for name, tensor in module.state_dict().items():
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel() \
                and not bool((tensor.abs() <= DIVERGED_WEIGHT).all()):  # NaN compares False
            bad.append(name)
    return bad


def stores_backbone(segmentor, cfg) -> bool:
    """Whether a model file must hold the pretrained backbone: it trains, or it has no weights file
    to be rebuilt from."""
    trains = any(p.requires_grad for p in segmentor.backbone.model.parameters())
    return trains or cfg.model.weights is None


def save_model(segmentor, cfg, path: PathLike, *, metadata: Optional[dict] = None,
               fingerprint: Optional[str] = None) -> Path:
    """A dgss model file of ``segmentor`` (see the module docstring for what it holds)."""
    full = stores_backbone(segmentor, cfg)
    extra = dict(metadata or {})
    if not full:
        extra["backbone_fingerprint"] = fingerprint or backbone_fingerprint(segmentor.backbone)
    return save_model_file(segmentor, cfg, path, include_backbone=full, metadata=extra)


def load_model_weights(segmentor, path: PathLike, *, check_backbone: bool = True) -> dict:
    """Load a dgss model file (final model or training checkpoint) into an existing ``segmentor``.

    The file's backbone must be the segmentor's (name, and for files without the backbone the
    fingerprint of the pretrained weights it was trained on). Returns the file's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        meta = read_model_file_metadata(path)
    except Exception as err:
        raise CheckpointError(f"{path} is not a dgss model file: {err}") from err
    name = segmentor.backbone.name
    if meta.get("backbone") != name:
        raise CheckpointError(f"{path} was trained with backbone '{meta.get('backbone')}', but the config builds "
                              f"'{name}' (model.backbone)")
    full = meta.get("contents") == "full"
    if not full and check_backbone and meta.get("backbone_fingerprint"):
        current = backbone_fingerprint(segmentor.backbone)
        if current != meta["backbone_fingerprint"]:
            raise CheckpointError(
                f"{path} was trained on the '{name}' weights {meta.get('backbone_weights')!r}, which differ from the "
                f"backbone weights loaded now (model.weights); point model.weights at the file it was trained on")
    load_segmentor_state(segmentor, load_file(str(path), device="cpu"), path, with_backbone=full,
                         error=CheckpointError, what="the model the config builds (model.*, method.*)")
    return meta


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_paths(directory: PathLike, iteration: int) -> tuple[Path, Path]:
    """(model file, state file) of iteration ``iteration`` in ``directory``."""
    stem = Path(directory) / f"iter_{iteration:07d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".state.pt")


def save_training_checkpoint(directory: PathLike, iteration: int, segmentor, cfg, state: dict, *,
                             fingerprint: Optional[str] = None, keep: int = 0) -> Path:
    """Write the checkpoint after ``iteration`` completed iterations, then point ``last`` at it and
    delete the earlier ones but the ``keep - 1`` newest of them (0: keep all). Returns the model file's path."""
    directory = Path(directory)
    remove_stale_temp_files(directory)  # what a save killed earlier left behind (dead writers only)
    model_path, state_path = checkpoint_paths(directory, iteration)
    save_model(segmentor, cfg, model_path, metadata={"iteration": iteration}, fingerprint=fingerprint)
    atomic_write(state_path, lambda tmp: torch.save({**state, "iteration": iteration}, tmp))
    pointer = json.dumps({"iteration": iteration, "model": model_path.name, "state": state_path.name})
    atomic_write(directory / POINTER_NAME, lambda tmp: Path(tmp).write_text(pointer + "\n"))
    if keep > 0:
        # Only checkpoints before this one are candidates, so the file `last` now names is never deleted.
        # Later-numbered ones (left when a run is resumed from an earlier checkpoint) are not this run's
        # past: they are left alone and overwritten as the run reaches their iterations.
        older = sorted((n, p) for p in directory.glob("iter_*.safetensors")
                       if (n := _checkpoint_iteration(p)) is not None and n < iteration)
        for _, old_model in older[:max(len(older) - (keep - 1), 0)]:
            old_model.unlink(missing_ok=True)
            old_model.with_suffix(".state.pt").unlink(missing_ok=True)
    return model_path


def _checkpoint_iteration(path: Path) -> Optional[int]:
    """N of ``iter_N.safetensors`` (a number, not the name: sorting names breaks past 7 digits)."""
    match = re.fullmatch(r"iter_(\d+)\.safetensors", path.name)
    return int(match[1]) if match else None


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The model file the ``last`` pointer names, or None when there is no checkpoint."""
    pointer = Path(directory) / POINTER_NAME
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["model"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint pointer {pointer} is unreadable: {err}") from err
    return Path(directory) / name


def resolve_checkpoint(spec: Optional[PathLike], directory: PathLike) -> tuple[Path, Path]:
    """(model file, state file) to resume from: ``spec`` (either file of a pair) or, when None, the
    newest checkpoint in ``directory``."""
    if spec is None:
        model_path = latest_checkpoint(directory)
        if model_path is None:
            raise CheckpointError(f"no checkpoint to resume from in {directory}; start without --resume")
    else:
        spec = Path(spec)
        if spec.is_dir():
            return resolve_checkpoint(None, spec)
        name = spec.name
        if name.endswith(".state.pt"):
            model_path = spec.with_name(name[: -len(".state.pt")] + ".safetensors")
        else:
            model_path = spec
    state_path = model_path.with_name(model_path.name[: -len(".safetensors")] + ".state.pt") \
        if model_path.name.endswith(".safetensors") else None
    if not model_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {model_path}")
    if state_path is None or not state_path.is_file():
        raise CheckpointError(f"{model_path} has no training state next to it ({state_path}): a final model "
                              "cannot be resumed, only evaluated or used as model weights")
    return model_path, state_path


def load_training_state(path: PathLike) -> dict:
    """The state file's contents; nothing but tensors and plain containers is unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training state {path}: {describe_load_error(err)}") from err


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
