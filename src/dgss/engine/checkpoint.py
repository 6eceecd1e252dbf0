"""Training checkpoints: atomic, unpickling-free, and one loader for final models and checkpoints.

A checkpoint of iteration N in ``RUN/checkpoints`` is two files and a pointer:

* ``iter_0000N.safetensors``: the model, a dgss model file (:func:`dgss.tuning.rein_checkpoint.
  save_model_file`), so ``load_model_file`` opens it like a final model. For a method whose
  pretrained backbone stays frozen only the method's, neck's and head's tensors (parameters and
  buffers) are stored, with the backbone's identity: its name, weights file and a fingerprint of
  its tensors with the moments behind it, checked when the backbone is re-attached (equal within
  float32 rounding: :func:`same_backbone`). A backbone that trains, or one without a
  weights file (random init, e.g. in tests), is stored in full.
* ``iter_0000N.state.pt``: optimizer (by parameter name), GradScaler, RNG states (python, numpy,
  torch, cuda), the data position and the iteration; plain tensors and containers, read with
  ``torch.load(weights_only=True)``. Written first: its SHA-256 goes into the model file's metadata
  (``state_sha256``), since torch does not check a ``.pt`` file's contents when it reads one.
* ``last``: a small JSON file naming the newest complete checkpoint, replaced last.

Every file is written to a temporary name and renamed (``os.replace`` is atomic on POSIX), so a
process killed while saving leaves the previous checkpoint and pointer intact
(:func:`dgss.fileio.atomic_write`); the temporary files such a process leaves behind are deleted at the
next save. A save that runs out of disk space removes what it wrote and raises :class:`DiskFullError`
naming the folder and the bytes it needed; the previous checkpoint and ``last`` stay as they were.

Resuming reads the newest checkpoint whose files are intact (:func:`find_resumable`): the model file's
checksum (:func:`dgss.fileio.load_safetensors`), the state file's SHA-256 and the pair's iteration are
checked, and a damaged checkpoint is passed over for the one before it, each named; when none is
intact the resume is refused, never started from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

from ..fileio import (DamagedFileError, atomic_write, describe_load_error, file_sha256, is_out_of_space,
                      remove_stale_temp_files)
from ..tuning.rein_checkpoint import ReinCheckpointError, load_segmentor_state, read_model_file, save_model_file

__all__ = [
    "CheckpointError",
    "DamagedCheckpointError",
    "DiskFullError",
    "LoadedCheckpoint",
    "atomic_write",
    "backbone_fingerprint",
    "backbone_identity",
    "same_backbone",
    "DIVERGED_WEIGHT",
    "diverged_tensors",
    "stores_backbone",
    "save_model",
    "load_model_weights",
    "checkpoint_paths",
    "save_training_checkpoint",
    "latest_checkpoint",
    "checkpoint_candidates",
    "read_checkpoint",
    "find_resumable",
    "resolve_checkpoint",
    "out_of_space_as_error",
    "load_training_state",
    "capture_rng_state",
    "restore_rng_state",
]

PathLike = Union[str, os.PathLike]
POINTER_NAME = "last"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the file."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint or model file is truncated, bit-flipped or incomplete; the message names the file."""


class DiskFullError(CheckpointError):
    """A checkpoint or model file did not fit on its disk (or quota); the message names the folder and
    the bytes the save needed. What the save had written is removed; earlier files are untouched."""


class _ByteCounter:
    """A file object for torch.save that only counts what it is given."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.count += n
        return n

    def flush(self) -> None:
        pass


def _state_file_bytes(state: dict) -> int:
    """The exact size of ``torch.save(state)`` (serialised once more, into nothing: only after a failure)."""
    counter = _ByteCounter()
    torch.save(state, counter)
    return counter.count


def _stored(segmentor, full: bool) -> dict:
    """The tensors a model file of ``segmentor`` holds (without the pretrained backbone unless ``full``)."""
    return {k: v for k, v in segmentor.state_dict().items() if full or not k.startswith("backbone.model.")}


def _model_file_bytes(tensors: dict) -> int:
    """About the size of a model file of ``tensors``: their bytes, a header entry per tensor, and the
    metadata (the config, a few KiB)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return data + sum(len(name) + 80 for name in tensors) + 8192


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


@contextlib.contextmanager
def out_of_space_as_error(directory: Path, what: str, needed: Callable[[], int],
                          state_of_things: str) -> Iterator[None]:
    """Turn a write that failed for lack of space or quota into one :class:`DiskFullError` line naming
    ``directory``, what was being saved and the bytes it needed (``needed()``, asked only then; the
    outermost such context words it)."""
    try:
        yield
    except Exception as err:
        if not (isinstance(err, DiskFullError) or is_out_of_space(err)):
            raise
        try:
            free = f", {_size(shutil.disk_usage(directory).free)} free"
        except OSError:
            free = ""
        raise DiskFullError(f"no space left in {directory} for {what}: it needs about {_size(needed())}{free}; "
                            f"{state_of_things}") from err


# --------------------------------------------------------------------------------------------
# Model part
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _backbone_statistics(backbone) -> tuple[list[str], np.ndarray]:
    """(name:shape per pretrained tensor, sorted; their float64 sums and sums of squares, n x 2)."""
    names, stats = [], []
    for name, tensor in sorted(backbone.model.state_dict().items()):
        names.append(f"{name}:{tuple(tensor.shape)}")
        t = tensor.detach().double()
        stats.append(torch.stack([t.sum(), (t * t).sum()]))
    values = torch.stack(stats).cpu().numpy() if stats else np.zeros((0, 2))
    return names, values


def _fingerprint_of(names: list[str], values: np.ndarray) -> str:
    digest = hashlib.sha256("|".join(names).encode())
    if len(values):
        digest.update(np.round(values, 6).tobytes())  # rounding: sums differ in the last bits across devices
    return digest.hexdigest()[:16]


def backbone_fingerprint(backbone) -> str:
    """A short hash of the pretrained tensors (names, shapes, float64 sums and sums of squares): the
    same weights give the same string, another file or backbone almost surely does not."""
    return _fingerprint_of(*_backbone_statistics(backbone))


def backbone_identity(backbone) -> dict:
    """What a model file without the backbone records of the pretrained weights it was trained on: the
    fingerprint, and the moments behind it (``backbone_layout``: a hash of the names and shapes;
    ``backbone_moments``: per tensor, its sum and sum of squares).

    The moments let a file load where the same weights file gives tensors that differ in their last
    bits: a patch-embedding resize (``model.patch_resize=timm`` solves a least-squares problem whose
    float32 result depends on the BLAS thread count) or another device. The fingerprint alone,
    rounded, would reject such a backbone; :func:`same_backbone` compares the moments within
    :data:`MOMENT_RTOL` instead."""
    names, values = _backbone_statistics(backbone)
    return {"backbone_fingerprint": _fingerprint_of(names, values),
            "backbone_layout": hashlib.sha256("|".join(names).encode()).hexdigest()[:16],
            "backbone_moments": [[float(s), float(q)] for s, q in values]}


# Moments of tensors that differ only by float32 rounding agree to ~1e-7 relative; another weights file
# (another seed, another checkpoint, one fine-tuned step) differs by far more.
MOMENT_RTOL = 1e-5


def same_backbone(backbone, meta: dict) -> bool:
    """Whether ``backbone``'s pretrained tensors are those a model file's metadata ``meta`` records:
    its fingerprint equal, or (files that carry them) its moments equal within :data:`MOMENT_RTOL`
    (a sum is compared on the scale sqrt(numel x sum of squares), which bounds it)."""
    names, values = _backbone_statistics(backbone)
    if _fingerprint_of(names, values) == meta.get("backbone_fingerprint"):
        return True
    stored = meta.get("backbone_moments")
    if stored is None or meta.get("backbone_layout") != hashlib.sha256("|".join(names).encode()).hexdigest()[:16]:
        return False
    stored = np.asarray(stored, dtype=np.float64).reshape(-1, 2)
    if stored.shape != values.shape:
        return False
    numel = np.array([float(np.prod(t.shape)) for _, t in sorted(backbone.model.state_dict().items())])
    scale = np.sqrt(numel * np.maximum(values[:, 1], stored[:, 1]))
    sums_agree = np.abs(values[:, 0] - stored[:, 0]) <= MOMENT_RTOL * scale + 1e-12
    squares_agree = np.abs(values[:, 1] - stored[:, 1]) <= MOMENT_RTOL * np.maximum(values[:, 1], stored[:, 1]) + 1e-12
    return bool(sums_agree.all() and squares_agree.all())


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
               fingerprint: Optional[dict] = None) -> Path:
    """A dgss model file of ``segmentor`` (see the module docstring for what it holds). ``fingerprint``:
    the pretrained backbone's :func:`backbone_identity`, when computed before training (a trainer's)."""
    full = stores_backbone(segmentor, cfg)
    extra = dict(metadata or {})
    if not full:
        extra.update(fingerprint or backbone_identity(segmentor.backbone))
    path = Path(path)
    with out_of_space_as_error(path.parent, path.name, lambda: _model_file_bytes(_stored(segmentor, full)),
                               "no file was replaced: free space and save again (a run: continue with --resume)"):
        return save_model_file(segmentor, cfg, path, include_backbone=full, metadata=extra)


def read_model(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a dgss model file, its checksum verified (one line naming a damaged file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return read_model_file(path)
    except (DamagedFileError, ReinCheckpointError) as err:  # damaged, or no dgss metadata: both name the file
        raise DamagedCheckpointError(str(err)) from None
    except ValueError as err:  # dgss metadata that is not JSON
        raise DamagedCheckpointError(f"{path} is not a dgss model file: {err}") from None


def load_model_weights(segmentor, path: PathLike, *, check_backbone: bool = True,
                       contents: Optional[tuple[dict, dict]] = None) -> dict:
    """Load a dgss model file (final model or training checkpoint) into an existing ``segmentor``.

    The file's backbone must be the segmentor's (name, and for files without the backbone the
    fingerprint of the pretrained weights it was trained on). ``contents``: the file's (tensors,
    metadata) when already read (:func:`read_model`). Returns the file's metadata.
    """
    path = Path(path)
    tensors, meta = contents if contents is not None else read_model(path)
    name = segmentor.backbone.name
    if meta.get("backbone") != name:
        raise CheckpointError(f"{path} was trained with backbone '{meta.get('backbone')}', but the config builds "
                              f"'{name}' (model.backbone)")
    full = meta.get("contents") == "full"
    if not full and check_backbone and meta.get("backbone_fingerprint"):
        if not same_backbone(segmentor.backbone, meta):
            raise CheckpointError(
                f"{path} was trained on the '{name}' weights {meta.get('backbone_weights')!r}, which differ from the "
                f"backbone weights loaded now (model.weights); point model.weights at the file it was trained on")
    load_segmentor_state(segmentor, tensors, path, with_backbone=full,
                         error=CheckpointError, what="the model the config builds (model.*, method.*)")
    return meta


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_paths(directory: PathLike, iteration: int) -> tuple[Path, Path]:
    """(model file, state file) of iteration ``iteration`` in ``directory``."""
    stem = Path(directory) / f"iter_{iteration:07d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".state.pt")


class _HashingWriter:
    """A file object for torch.save that hashes every byte it passes on."""

    def __init__(self, file) -> None:
        self.file, self.name, self.digest = file, file.name, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _save_state(path: Path, state: dict) -> str:
    """torch.save ``state`` through atomic_write; returns the SHA-256 of the bytes written."""
    digests = []

    def write(tmp: str) -> None:
        # a file object rather than a path: a full disk then surfaces as OSError(ENOSPC), which torch's
        # own file writer reports as a bare RuntimeError
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            digests.append(writer.digest.hexdigest())

    atomic_write(path, write)
    return digests[-1]


def save_training_checkpoint(directory: PathLike, iteration: int, segmentor, cfg, state: dict, *,
                             fingerprint: Optional[dict] = None, keep: int = 0) -> Path:
    """Write the checkpoint after ``iteration`` completed iterations, then point ``last`` at it and
    delete the earlier ones but the ``keep - 1`` newest of them (0: keep all). Returns the model file's path.

    Raises:
        DiskFullError: the disk (or quota) was full; this save's files are removed, the previous
            checkpoint and ``last`` are untouched.
    """
    directory = Path(directory)
    remove_stale_temp_files(directory)  # what a save killed earlier left behind (dead writers only)
    model_path, state_path = checkpoint_paths(directory, iteration)
    state = {**state, "iteration": iteration}
    full = stores_backbone(segmentor, cfg)
    needed = lambda: _state_file_bytes(state) + _model_file_bytes(_stored(segmentor, full))  # noqa: E731
    try:
        previous = latest_checkpoint(directory)
    except CheckpointError:
        previous = None
    unchanged = (f"the previous checkpoint ({previous.name if previous else 'none'}) and '{POINTER_NAME}' are "
                 "unchanged: free space (or lower train.keep_checkpoints) and continue with --resume")
    keep_files = set() if previous is None else {previous.name, _state_path(previous).name}
    written = []
    try:
        with out_of_space_as_error(directory, f"the checkpoint of iteration {iteration}", needed, unchanged):
            written.append(state_path)  # from here on a failure leaves no state file of this iteration
            digest = _save_state(state_path, state)
            written.append(model_path)
            save_model(segmentor, cfg, model_path, metadata={"iteration": iteration, "state_sha256": digest},
                       fingerprint=fingerprint)
            pointer = json.dumps({"iteration": iteration, "model": model_path.name, "state": state_path.name})
            atomic_write(directory / POINTER_NAME, lambda tmp: Path(tmp).write_text(pointer + "\n"))
    except BaseException:
        for path in written:  # a half-made checkpoint `last` does not name: never a candidate for a resume
            if path.name not in keep_files:
                path.unlink(missing_ok=True)
        raise
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


def _state_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name[: -len(".safetensors")] + ".state.pt")


def checkpoint_candidates(directory: PathLike) -> list[tuple[Path, Path]]:
    """(model file, state file) pairs a resume may use, best first: the one ``last`` names, then the
    earlier ones, newest first. Without a readable ``last``: every ``iter_N.safetensors``, newest first.
    Later-numbered files than ``last`` names are another run's past (see save_training_checkpoint)."""
    directory = Path(directory)
    numbered = sorted(((n, p) for p in directory.glob("iter_*.safetensors")
                       if (n := _checkpoint_iteration(p)) is not None), reverse=True)
    try:
        named = latest_checkpoint(directory)
    except CheckpointError:  # a damaged pointer: the files themselves are the record
        named = None
    if named is None:
        return [(p, _state_path(p)) for _, p in numbered]
    newest = _checkpoint_iteration(named)
    older = [p for n, p in numbered if newest is not None and n < newest]
    return [(named, _state_path(named))] + [(p, _state_path(p)) for p in older]


@dataclass
class LoadedCheckpoint:
    """A checkpoint whose files were read and checked: the model's tensors and metadata, the state."""

    model_path: Path
    state_path: Path
    tensors: dict
    meta: dict
    state: dict


def read_checkpoint(model_path: PathLike, state_path: Optional[PathLike] = None) -> LoadedCheckpoint:
    """Read and check both files of a checkpoint: the model file's checksum, the state file's SHA-256
    recorded in it, and that both are of one iteration. Raises CheckpointError (DamagedCheckpointError
    for a damaged or missing file) naming the file."""
    model_path = Path(model_path)
    state_path = Path(state_path) if state_path is not None else _state_path(model_path)
    tensors, meta = read_model(model_path)
    if not state_path.is_file():
        raise DamagedCheckpointError(f"{model_path} has no training state next to it ({state_path} is missing)")
    expected = meta.get("state_sha256")
    if expected is not None and file_sha256(state_path) != expected:
        raise DamagedCheckpointError(f"{state_path} is damaged: its bytes do not match the checksum {model_path.name} "
                                     "records for it (flipped bits, a partial copy, or another checkpoint's state)")
    try:
        state = load_training_state(state_path)
    except CheckpointError as err:
        raise DamagedCheckpointError(str(err)) from None
    if meta.get("iteration") != state.get("iteration"):
        raise DamagedCheckpointError(f"{model_path} (iteration {meta.get('iteration')}) and {state_path} "
                                     f"(iteration {state.get('iteration')}) are not one checkpoint")
    return LoadedCheckpoint(model_path, state_path, tensors, meta, state)


def find_resumable(directory: PathLike) -> tuple[Optional[LoadedCheckpoint], list[str]]:
    """The newest intact checkpoint in ``directory`` (None when it has no checkpoint at all) and one
    "file: why" line for each damaged one passed over.

    Raises:
        CheckpointError: there are checkpoints, but none is intact (a resume must not start over).
    """
    candidates = checkpoint_candidates(directory)
    damaged = []
    for model_path, state_path in candidates:
        try:
            return read_checkpoint(model_path, state_path), damaged
        except CheckpointError as err:
            damaged.append(str(err))
    if damaged:
        raise DamagedCheckpointError(f"no intact checkpoint to resume from in {directory}: " + "; ".join(damaged)
                                     + ". dgss does not start over by itself: restore a checkpoint, or start a new "
                                     "run without --resume in another folder")
    return None, []


def resolve_checkpoint(spec: Optional[PathLike], directory: PathLike) -> tuple[Path, Path]:
    """(model file, state file) to resume from: ``spec`` (either file of a pair) or, when None, the
    best candidate in ``directory`` (:func:`checkpoint_candidates`; only that files exist is checked)."""
    if spec is None:
        candidates = checkpoint_candidates(directory)
        if not candidates:
            raise CheckpointError(f"no checkpoint to resume from in {directory}; start without --resume")
        return candidates[0]
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
