"""How much memory evaluating a config takes, before it runs: the evaluation part of ``dgss plan``.

    plans = plan_eval_memory(cfg)        # one EvalMemory per inference mode: whole image, sliding window
    plans[0].peak                        # bytes: weights and buffers + the pass's activations and scores

Measured, not modelled: the segmentor is built at full size on the meta device (nothing allocated) and
one image goes through ``Segmentor.inference`` in each mode, as ``dgss eval`` runs it, while
:class:`~dgss.engine.memory_probe.LiveBytes` counts every tensor created. The image is the largest
``resize`` box of ``data.test`` (a fitted image fills at most its box) scaled by ``eval.scale`` as the
evaluation scales it (the box, then inference at scale 1: :func:`dgss.models.inference.scale_box`); the
sliding window's crop, stride and ``batch_windows`` are ``eval``'s. Attention runs the target's fused kernel and bf16/fp16 ``train.amp`` is emulated on a GPU, as
the training probe does. Not counted: the resize of the scores to the label's resolution (K x H x W x 4
bytes more at the label size) and memory a kernel allocates and frees inside itself.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .memory_probe import EmulatedAutocast, FusedAttention, LiveBytes

__all__ = ["EvalMemory", "eval_image_size", "plan_eval_memory", "DEFAULT_EVAL_IMAGE"]

# (h, w) planned when no data.test entry gives a resize box: a full Cityscapes image
DEFAULT_EVAL_IMAGE = (1024, 2048)


@dataclass(frozen=True)
class EvalMemory:
    """Memory of evaluating one image in one inference mode (bytes)."""

    mode: str  # "whole" | "slide" | "coarse_to_fine"
    image_size: tuple[int, int]  # (h, w) the loader gives (before eval.scale)
    weights: int  # parameters and buffers
    activations: int  # the pass's largest live set: image, features, head outputs, scores
    configured: bool  # the config's eval.mode
    error: str = ""  # why the pass cannot run at this size (e.g. a side the backbone cannot take); then 0s

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    def to_dict(self) -> dict:
        return {"mode": self.mode, "image_size": list(self.image_size), "weights": self.weights,
                "activations": self.activations, "peak": self.peak, "configured": self.configured,
                "error": self.error}


def eval_image_size(cfg) -> tuple[tuple[int, int], Optional[str]]:
    """((h, w), dataset name) of the largest ``resize`` box of ``data.test`` (by area) scaled by
    ``eval.scale`` as the evaluation scales it, or (:data:`DEFAULT_EVAL_IMAGE`, None) when no test set is
    resized (then ``eval.scale`` resizes inside the inference)."""
    from ..data.builder import dataset_name
    from ..models.inference import scale_box

    boxes = [(scale_box(ds.resize, cfg.eval.scale), dataset_name(ds)) for ds in cfg.data.test if ds.resize]
    if not boxes:
        return DEFAULT_EVAL_IMAGE, None
    (w, h), name = max(boxes, key=lambda box: box[0][0] * box[0][1])
    return (h, w), name


@contextlib.contextmanager
def _autocast_queries_on_meta(dtype: Optional[torch.dtype]):
    """``torch.is_autocast_enabled("meta")`` and ``torch.get_autocast_dtype("meta")`` answer as a GPU
    under ``dtype``'s autocast (None: off) instead of raising (PyTorch has no autocast for the meta
    device): code that asks, as Rein does, takes the branch it takes on the GPU."""
    enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_enabled(*args, **kwargs):
        return dtype is not None if args and args[0] == "meta" else enabled(*args, **kwargs)

    def autocast_dtype(*args, **kwargs):
        return (dtype or torch.bfloat16) if args and args[0] == "meta" else get_dtype(*args, **kwargs)

    torch.is_autocast_enabled, torch.get_autocast_dtype = is_enabled, autocast_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, get_dtype


def _probe(model, images_shape: Sequence[int], amp: str, target: str) -> int:
    """The largest live set of one ``inference`` pass. It runs with autograd on and every parameter frozen,
    which records nothing for backward, so it holds what a ``no_grad`` pass holds; the methods' no-grad fast
    paths (Rein's) are not taken, as they would build meta-device autocast regions PyTorch refuses, and
    their transients are the same size as the plain path's."""
    from ..models.inference import run_inference
    from ..models.segmentor import Segmentor

    tracker = LiveBytes()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = EmulatedAutocast(dtype) if dtype is not None else contextlib.nullcontext()
    slide = Segmentor.slide_inference.__wrapped__  # the method without its no_grad decorator
    with _autocast_queries_on_meta(dtype), torch.enable_grad(), tracker, FusedAttention(target), autocast:
        images = torch.zeros(*images_shape, device="meta")
        scores = run_inference(model.predict, lambda x: slide(model, x), images, model.eval_cfg)
        del scores, images
    return max(p.total for p in tracker.phases)


def plan_eval_memory(cfg, *, target: str = "cuda", image_size: Optional[Sequence[int]] = None,
                     modes: Sequence[str] = ("whole", "slide")) -> list[EvalMemory]:
    """One :class:`EvalMemory` per mode of ``modes`` (and the config's own ``eval.mode`` when it is not
    among them), for one image of ``image_size`` (the loader's size; default :func:`eval_image_size`, the
    scaled box, with the scale folded into it as the evaluation folds it). ``target``: "cuda"
    (``train.amp`` applies, as ``dgss eval`` runs it on a GPU) or "cpu" (fp32)."""
    from ..tuning.model import build_segmentor

    shapes = copy.deepcopy(cfg)
    shapes.model.weights = None  # shapes only: no file is read
    with torch.device("meta"):
        model = build_segmentor(shapes)
    model.eval().requires_grad_(False)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    from ..models.inference import scale_folded

    size, boxed = (tuple(image_size), False) if image_size is not None else (eval_image_size(cfg)[0], True)
    boxed = boxed and any(ds.resize for ds in cfg.data.test)
    # a resize box takes eval.scale (dgss.engine.evaluate), so the inference runs at scale 1
    eval_cfg = scale_folded(cfg.eval) if boxed and cfg.eval.scale != 1.0 else cfg.eval
    amp = cfg.train.amp if target == "cuda" else "none"
    configured = cfg.eval.mode
    plans = []
    for mode in dict.fromkeys([*modes, configured]):
        model.eval_cfg = copy.deepcopy(eval_cfg)
        model.eval_cfg.mode = mode
        try:
            activations, error = _probe(model, (1, 3, *size), amp, target), ""
        except (AssertionError, RuntimeError, ValueError) as err:  # the pass itself refuses this size
            activations, error = 0, (str(err).strip().splitlines() or [type(err).__name__])[0]
        plans.append(EvalMemory(mode, (int(size[0]), int(size[1])), weights, activations, mode == configured, error))
    return plans
