"""Evaluation: mIoU per dataset (sliding window by default), reduced over processes; JSON and
Markdown reports (protocols.md "Evaluation").

    results = evaluate_datasets(model, cfg.data.test, cfg, ctx)   # every process calls it
    print(format_markdown(results))                              # per-class IoU, mIoU, mean
    write_results(results, "runs/exp/eval")                      # results.json + results.md

    # or written as each dataset finishes (a later failure keeps the finished ones on disk):
    evaluate_datasets(model, cfg.data.test, cfg, ctx, on_result=results_writer("runs/exp/eval", echo=print))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from ..config import DatasetConfig, ExperimentConfig
from ..data import build_eval_loader
from ..models.inference import scale_box, scale_folded
from ..precision import apply_tf32
from .distributed import DistContext
from .metrics import ConfusionMatrix

__all__ = ["DatasetResult", "evaluate_dataset", "evaluate_datasets", "autocast_context", "results_to_dict",
           "format_markdown", "write_results", "results_writer", "results_complete"]


@dataclass
class DatasetResult:
    """One dataset's scores, in percent; ``iou`` is NaN for classes absent from labels and predictions."""

    name: str
    classes: list[str]
    iou: list[float]
    miou: float  # nan-mean over ``eval_class_ids`` (all classes when None)
    pixel_accuracy: float
    num_images: int
    eval_class_ids: Optional[list[int]] = None
    # how the scores were made: eval.mode, eval.scale, the box the images were fitted into (after the
    # scale; None: their own size), the window and stride, and coarse_to_fine's settings
    inference: Optional[dict] = None


def autocast_context(amp: str, device: torch.device):
    """bf16/fp16 autocast on a GPU; nothing on the CPU (where training runs in fp32)."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_dataset(model, ds_cfg: DatasetConfig, cfg: ExperimentConfig, ctx: DistContext = DistContext(),
                     *, amp: str = "none", num_workers: Optional[int] = None, progress: bool = False) -> DatasetResult:
    """Scores of ``model`` (a Segmentor, inference as ``cfg.eval`` says) on one dataset. Each process
    evaluates its share of the images; the confusion matrices are summed over processes. ``progress``:
    a tqdm bar of the images on the main process (``dgss eval`` follows ``train.progress_bar``).

    ``model.eval_cfg.scale`` (``eval.scale``) scales a dataset's resize box (``resize``) when it has one
    (Cityscapes [1024, 512] at 2.0 reads its images at 2048 x 1024, resampled once from the originals,
    as mmseg's ``Resize(scale=(2048, 1024))``), else the images themselves (dgss.models.inference)."""
    eval_cfg = getattr(model, "eval_cfg", None)
    if eval_cfg is None:
        return _evaluate(model, ds_cfg, cfg, ctx, amp=amp, num_workers=num_workers, progress=progress)
    folded = eval_cfg.scale != 1.0 and ds_cfg.resize is not None
    if folded:
        ds_cfg = dataclasses.replace(ds_cfg, resize=scale_box(ds_cfg.resize, eval_cfg.scale))
    with _inference_settings(model, scale_folded(eval_cfg) if folded else eval_cfg):
        result = _evaluate(model, ds_cfg, cfg, ctx, amp=amp, num_workers=num_workers, progress=progress)
    result.inference = {"mode": eval_cfg.mode, "scale": eval_cfg.scale, "resize": ds_cfg.resize,
                        "crop_size": list(eval_cfg.crop_size), "stride": list(eval_cfg.stride)}
    if eval_cfg.mode == "coarse_to_fine":
        result.inference.update(coarse_scale=eval_cfg.coarse_scale, coarse_weight=eval_cfg.coarse_weight)
    return result


@contextlib.contextmanager
def _inference_settings(model, eval_cfg):
    """``model.eval_cfg`` replaced while one dataset is evaluated."""
    saved = model.eval_cfg
    model.eval_cfg = eval_cfg
    try:
        yield
    finally:
        model.eval_cfg = saved


def _evaluate(model, ds_cfg: DatasetConfig, cfg: ExperimentConfig, ctx: DistContext, *, amp: str,
              num_workers: Optional[int], progress: bool) -> DatasetResult:
    loader = build_eval_loader(ds_cfg, cfg.data, rank=ctx.rank, world_size=ctx.world_size, num_workers=num_workers)
    apply_tf32(cfg.train.tf32, ctx.device)  # train.tf32 holds for evaluation too (issue 38)
    dataset = loader.dataset
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(model.num_classes, ignore_index=model.ignore_index)
    count = torch.zeros(1, dtype=torch.int64)
    bar = tqdm(total=len(loader), desc=loader.name, unit="img", disable=not (progress and ctx.is_main),
               dynamic_ncols=True, file=sys.stderr, leave=False)
    for batch in _counted(loader, bar):
        if "label" not in batch:
            raise ValueError(f"dataset '{loader.name}' has no labels (with_labels: false): it cannot be evaluated")
        images = batch["image"].to(ctx.device, non_blocking=True)
        with autocast_context(amp, ctx.device):
            scores = model.inference(images, out_size=tuple(batch["label"].shape[-2:]))
        matrix.update(scores.argmax(1).cpu(), batch["label"])
        count += images.shape[0]
    bar.close()
    matrix.all_reduce()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.to(ctx.device) if torch.distributed.get_backend() == "nccl" else count
        torch.distributed.all_reduce(count)
    model.train(was_training)
    iou = matrix.iou()
    ids = getattr(dataset, "eval_class_ids", None)
    chosen = iou if ids is None else iou[list(ids)]
    return DatasetResult(name=loader.name, classes=list(dataset.classes), iou=[100 * float(v) for v in iou],
                         miou=100 * float(torch.nanmean(chosen)), pixel_accuracy=100 * matrix.pixel_accuracy(),
                         num_images=int(count.item()), eval_class_ids=None if ids is None else list(ids))


def _counted(batches, bar):
    """The batches, advancing ``bar`` by each batch's images once it has been processed."""
    for batch in batches:
        yield batch
        bar.update(batch["image"].shape[0])


def evaluate_datasets(model, datasets: Sequence[DatasetConfig], cfg: ExperimentConfig,
                      ctx: DistContext = DistContext(), *, amp: str = "none",
                      num_workers: Optional[int] = None, progress: bool = False,
                      on_result: Optional[Callable[[list[DatasetResult], list[str]], None]] = None
                      ) -> list[DatasetResult]:
    """:func:`evaluate_dataset` on each of ``datasets``; ``progress``: a bar of the datasets above each
    dataset's bar of images. ``on_result(results so far, names of the datasets still to do)`` is called
    on the main process as each dataset finishes (e.g. :func:`results_writer`)."""
    from ..data.builder import dataset_name

    results = []
    for i, ds in enumerate(tqdm(datasets, desc="evaluate", unit="dataset",
                                disable=not (progress and ctx.is_main and datasets), dynamic_ncols=True,
                                file=sys.stderr)):
        results.append(evaluate_dataset(model, ds, cfg, ctx, amp=amp, num_workers=num_workers, progress=progress))
        if on_result is not None and ctx.is_main:
            on_result(list(results), [dataset_name(d) for d in datasets[i + 1:]])
    return results


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def results_to_dict(results: Sequence[DatasetResult], *, checkpoint: Optional[str] = None,
                    pending: Sequence[str] = ()) -> dict:
    """JSON form: per dataset mIoU, pixel accuracy and per-class IoU (null for NaN), and the mean.
    ``pending``: datasets still being evaluated (a "pending" list, only while there are any)."""
    def number(v: float):
        return None if math.isnan(v) else round(v, 4)

    out = {"checkpoint": checkpoint, "datasets": {}, "mean_miou": number(_mean([r.miou for r in results]))}
    if pending:
        out["pending"] = list(pending)
    for r in results:
        out["datasets"][r.name] = {
            "miou": number(r.miou), "pixel_accuracy": number(r.pixel_accuracy), "num_images": r.num_images,
            "eval_class_ids": r.eval_class_ids, "iou": {c: number(v) for c, v in zip(r.classes, r.iou)},
        }
        if r.inference is not None:
            out["datasets"][r.name]["inference"] = r.inference
    return out


def format_markdown(results: Sequence[DatasetResult]) -> str:
    """A summary table (mIoU per dataset and their mean) and a per-class IoU table."""
    def cell(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    names = [r.name for r in results]
    lines = ["| " + " | ".join(["", *names, "mean"]) + " |", "|" + "---|" * (len(names) + 2),
             "| " + " | ".join(["mIoU", *(cell(r.miou) for r in results), cell(_mean([r.miou for r in results]))])
             + " |", "", "| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    classes = results[0].classes if results else []
    for c, name in enumerate(classes):
        row = [cell(r.iou[c]) if c < len(r.iou) else "-" for r in results]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(results: Sequence[DatasetResult], out_dir, *, stem: str = "results",
                  checkpoint: Optional[str] = None, pending: Sequence[str] = ()) -> tuple[Path, Path]:
    """``out_dir/<stem>.json`` and ``out_dir/<stem>.md``, each replaced atomically (a reader, or a kill,
    sees the previous complete file or the new one). ``pending``: datasets not evaluated yet."""
    from ..fileio import atomic_write

    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    text = json.dumps(results_to_dict(results, checkpoint=checkpoint, pending=pending), indent=2) + "\n"
    table = format_markdown(results) + "\n"
    if pending:
        table += f"\nstill being evaluated: {', '.join(pending)}\n"
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(table))
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))  # last: results.json complete means all is
    return json_path, md_path


def results_writer(out_dir, *, stem: str = "results", checkpoint: Optional[str] = None,
                   echo: Optional[Callable[[str], None]] = None):
    """An ``on_result`` for :func:`evaluate_datasets`: rewrites ``out_dir/<stem>.{json,md}`` after each
    dataset (with the datasets still to do as "pending") and ``echo``-es the dataset's mIoU line."""
    def write(results: list[DatasetResult], pending: list[str]) -> None:
        json_path, _ = write_results(results, out_dir, stem=stem, checkpoint=checkpoint, pending=pending)
        if echo is not None:
            last = results[-1]
            echo(f"{last.name}: mIoU {last.miou:.2f} ({last.num_images} images; {len(results)} of "
                 f"{len(results) + len(pending)} datasets written to {json_path})")

    return write


def results_complete(path) -> bool:
    """Whether the results file ``path`` exists and lists no dataset as still pending."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return not json.loads(path.read_text()).get("pending")
    except (ValueError, AttributeError):
        return False
