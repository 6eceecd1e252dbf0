"""Export a trained segmentor for deployment: ONNX, and TorchScript (``torch.jit.trace``).

    from dgss.export import export_onnx, export_torchscript
    predictor = dgss.load("runs/rein/model_final.safetensors")
    export_onnx(predictor.model, "rein.onnx", input_size=(512, 512), mean=cfg.data.mean, std=cfg.data.std)

The exported graph is a **fixed-size, whole-image** model: input ``images`` B x 3 x H x W float32
RGB 0..255 (H x W = ``input_size``; the normalisation is inside the graph), outputs ``scores``
B x K x H x W and ``labels`` B x H x W int64 (the argmax). Larger images are handled by the caller,
e.g. by running it on 512 x 512 windows, as sliding-window inference does. The batch axis is dynamic
in ONNX; TorchScript traces keep the traced batch size flexible as long as shapes do not change code.

What is folded before export (the model is copied; the caller's model is left alone):

* a method whose module offers ``merge_into_dense(segmentor)`` (FisherTune: theta_pt + delta written
  into the dense weights; LoRA-style baselines may offer the same) or whose object offers
  ``merge_into_backbone()``: the graph then holds plain weights and no method code;
* Rein cannot be folded: its refinement depends on the features of each input (attention of the
  features over learned tokens), so it is exported as part of the graph;
* ViT position embeddings are resampled once to the export size (``set_input_size``), so the graph
  needs no bicubic resampling (which ONNX cannot express exactly).
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["ExportError", "ExportResult", "ExportedSegmentor", "merge_method", "prepare_for_export",
           "export_onnx", "export_torchscript", "export_format", "export_model", "default_input_size",
           "DEFAULT_OPSET"]

DEFAULT_OPSET = 17  # GridSample (deformable attention) needs >= 16; 17 adds LayerNormalization
PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """A model or one of its parts cannot be exported; the message says which and why."""


@dataclass
class ExportResult:
    """Where the model was written, for which input size, and what was folded (one line each)."""

    path: Path
    input_size: tuple[int, int]
    notes: list[str]


class ExportedSegmentor(nn.Module):
    """RGB 0..255 images of one size in, (scores, labels) out: the graph that is exported."""

    def __init__(self, segmentor: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.segmentor = segmentor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.segmentor.predict((images - self.mean) / self.std)  # B x K x H x W
        return scores, scores.argmax(1)


def merge_method(segmentor: nn.Module) -> tuple[nn.Module, str]:
    """Fold the tuning method into plain weights where it allows it, in place.

    Returns (segmentor, what happened), e.g. ``"fishertune merged into dense weights"`` or
    ``"rein kept in the graph as it is (...)"``. The contract of a merge: fold the method into the
    backbone's dense tensors in place and leave a method with no parameters or hooks (e.g. Frozen).
    """
    method = segmentor.method
    hook = getattr(method, "merge_into_backbone", None)
    if callable(hook):
        hook()
        return segmentor, f"{method.name} merged into the backbone weights"
    module_merge = getattr(importlib.import_module(type(method).__module__), "merge_into_dense", None)
    if callable(module_merge):
        return module_merge(segmentor), f"{method.name} merged into dense weights"
    if any(True for _ in method.parameters()) or method.head_queries() is not None:
        return segmentor, (f"{method.name} kept in the graph as it is "
                           "(the method offers no merge into plain weights)")
    return segmentor, f"{method.name}: nothing to fold"


def _fix_input_size(segmentor: nn.Module, input_size: tuple[int, int]) -> None:
    """Resample a ViT's position embedding to the export size once, in PyTorch, instead of in the graph."""
    model = segmentor.backbone.model
    if getattr(model, "dynamic_img_size", False) and hasattr(model, "set_input_size"):
        try:
            model.set_input_size(img_size=tuple(input_size))
        except Exception as err:  # noqa: BLE001 - reported with what to do
            raise ExportError(f"cannot fix the backbone '{segmentor.backbone.name}' to the input size "
                              f"{tuple(input_size)}: {err}") from err


def prepare_for_export(segmentor: nn.Module, input_size: Sequence[int], *, mean: Sequence[float],
                       std: Sequence[float], merge: bool = True) -> tuple[ExportedSegmentor, list[str]]:
    """A CPU, eval-mode copy of ``segmentor`` with its method folded (when ``merge``) and its input size
    fixed, wrapped with the normalisation. Returns (module, notes on what was done)."""
    if len(input_size) != 2 or min(input_size) <= 0:
        raise ExportError(f"input_size must be (H, W) with positive sizes, got {list(input_size)}")
    patch = getattr(segmentor.backbone, "patch_size", 1)
    if input_size[0] % 32 or input_size[1] % 32 or input_size[0] % patch or input_size[1] % patch:
        raise ExportError(f"input_size {tuple(input_size)} must be a multiple of 32 (the coarsest feature "
                          f"stride) and of the patch size {patch}")
    model = copy.deepcopy(segmentor).cpu().float().eval()
    notes = []
    if merge:
        model, note = merge_method(model)
        notes.append(note)
    _fix_input_size(model, (int(input_size[0]), int(input_size[1])))
    return ExportedSegmentor(model, mean, std).eval(), notes


def _register_missing_symbolics(opset: int) -> None:
    """ONNX symbolics the TorchScript-based exporter lacks for ops our models use."""
    from torch.onnx import register_custom_op_symbolic

    # the in-place boolean OR of Mask2Former's attention masks (``allowed |= ...``)
    register_custom_op_symbolic("aten::__ior_", lambda g, a, b: g.op("Or", a, b), opset)


def export_onnx(segmentor: nn.Module, path: PathLike, *, input_size: Sequence[int], mean: Sequence[float],
                std: Sequence[float], batch_size: int = 1, opset: int = DEFAULT_OPSET, merge: bool = True,
                dynamic_batch: bool = True) -> ExportResult:
    """Write ``segmentor`` as an ONNX model for ``input_size`` = (H, W) images (see the module docstring).

    Raises:
        ExportError: an operator or part cannot be exported (names it), or the onnx package is missing.
    """
    if opset < 16:
        raise ExportError(f"opset {opset} is too old: the deformable attention needs GridSample (opset >= 16)")
    try:
        import onnx  # noqa: F401 - torch.onnx needs it; fail early with the install hint
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'dgss[export]'") from None
    module, notes = prepare_for_export(segmentor, input_size, mean=mean, std=std, merge=merge)
    example = torch.zeros(batch_size, 3, int(input_size[0]), int(input_size[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _register_missing_symbolics(opset)
    axes = {"images": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values: the size is fixed on purpose
            torch.onnx.export(module, (example,), str(path), opset_version=opset, input_names=["images"],
                              output_names=["scores", "labels"], dynamic_axes=axes, dynamo=False)
    except Exception as err:  # the exporter raises several types; one clear line for the user
        hint = ""
        if "_upsample_bicubic2d_aa" in str(err):
            hint = (f" (the backbone resizes its position embeddings inside the forward pass at this size; export at "
                    f"model.img_size = {getattr(segmentor.backbone.model.patch_embed, 'img_size', '?')} instead)")
        raise ExportError(f"ONNX export of the '{segmentor.backbone.name}' + '{segmentor.method.name}' + "
                          f"'{type(segmentor.head).__name__}' model failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0]}{hint}") from err
    _check_onnx_graph(path, segmentor)
    return ExportResult(path, (int(input_size[0]), int(input_size[1])), notes)


def _check_onnx_graph(path: Path, segmentor: nn.Module) -> None:
    """Strict ONNX shape inference: catches graphs that export but that no runtime would load."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as err:  # noqa: BLE001 - InferenceError and friends
        path.unlink(missing_ok=True)
        raise ExportError(f"the ONNX graph of the '{segmentor.backbone.name}' model is inconsistent and was not "
                          f"kept ({str(err).splitlines()[0]}); TorchScript export may still work") from err


def export_torchscript(segmentor: nn.Module, path: PathLike, *, input_size: Sequence[int], mean: Sequence[float],
                       std: Sequence[float], batch_size: int = 1, merge: bool = True) -> ExportResult:
    """Write a ``torch.jit.trace`` of ``segmentor`` for ``input_size`` images; load with ``torch.jit.load``."""
    module, notes = prepare_for_export(segmentor, input_size, mean=mean, std=std, merge=merge)
    example = torch.zeros(batch_size, 3, int(input_size[0]), int(input_size[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))
    except Exception as err:
        raise ExportError(f"TorchScript trace of the '{segmentor.backbone.name}' + '{segmentor.method.name}' "
                          f"model failed: {type(err).__name__}: {err}") from err
    return ExportResult(path, (int(input_size[0]), int(input_size[1])), notes)


def default_input_size(cfg) -> tuple[int, int]:
    """The export size when none is given: the sliding-window crop (what the network sees in slide mode)."""
    crop = cfg.eval.crop_size
    return int(crop[0]), int(crop[1])


# file suffix -> export format; any other suffix needs an explicit format
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}


def export_format(path: PathLike, fmt: Optional[str] = None) -> str:
    """The format ``path`` is written in: ``fmt`` when given, else the one its suffix names.

    Raises:
        ExportError: an unknown ``fmt``, or a suffix that names no format (``x.tflite`` is not
            silently written as TorchScript).
    """
    if fmt is not None:
        if fmt not in ("onnx", "torchscript"):
            raise ExportError(f"unknown export format '{fmt}' (onnx | torchscript)")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ExportError(f"cannot tell the export format from '{Path(path).name}': name the file .onnx (ONNX) or "
                          ".pt (TorchScript; also .ts, .torchscript), or pass --format")
    return SUFFIX_FORMATS[suffix]


def export_model(segmentor: nn.Module, cfg, path: PathLike, *, fmt: Optional[str] = None,
                 input_size: Optional[Sequence[int]] = None, opset: int = DEFAULT_OPSET,
                 merge: bool = True) -> ExportResult:
    """Export by file suffix (``.onnx`` -> ONNX, ``.pt``/``.ts``/``.torchscript`` -> TorchScript) or ``fmt``
    (:func:`export_format`; other suffixes need ``fmt``)."""
    path = Path(path)
    fmt = export_format(path, fmt)
    size = tuple(input_size) if input_size else default_input_size(cfg)
    options = dict(input_size=size, mean=cfg.data.mean, std=cfg.data.std, merge=merge)
    if fmt == "onnx":
        return export_onnx(segmentor, path, opset=opset, **options)
    if fmt == "torchscript":
        return export_torchscript(segmentor, path, **options)
    raise ExportError(f"unknown export format '{fmt}' (onnx | torchscript)")
