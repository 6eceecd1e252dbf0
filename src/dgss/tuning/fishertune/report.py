"""Where the selected entries are, and `dgss fisher` (stages 1-2 alone, files and plots).

    stats = selection_statistics(method)          # per block and per module type: (selected, total)
    write_fisher_outputs(method, cfg.run_dir)     # scores.safetensors, selection.safetensors, stats, plots
    run_fisher(cfg)                               # warm the head up, estimate, write
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from .plots import plot_score_distribution, plot_selection_fractions

__all__ = ["module_type", "block_label", "selection_statistics", "write_fisher_outputs", "run_fisher"]

MODULE_TYPES = ("q", "k", "v", "proj", "fc1", "fc2", "norms", "other")


def module_type(name: str) -> str:
    """The module type of a ViT parameter name (fused qkv is split by :func:`selection_statistics`)."""
    if re.search(r"(^|\.)(q_proj|k_proj|v_proj)\.", name):
        return name.split(".")[-2][0]
    if ".attn.proj." in name:
        return "proj"
    if re.search(r"\.mlp\.(fc1|fc1_g|fc1_x|w1|w2|w12)\.", name):
        return "fc1"
    if re.search(r"\.mlp\.(fc2|w3)\.", name):
        return "fc2"
    if re.search(r"(^|\.)norm\w*\.", name):
        return "norms"
    return "other"


def block_label(name: str) -> str:
    match = re.match(r"blocks\.(\d+)\.", name) or re.match(r"stages\.(\d+)\.", name)
    return f"block {int(match.group(1)):02d}" if match else "embed/other"


def selection_statistics(method, num_active: Optional[int] = None) -> dict:
    """Selected / total entries per block and per module type (q, k, v, proj, fc1, fc2, norms, other).

    ``num_active``: count only the top ``num_active`` (default: all K candidates, i.e. delta_max).
    A fused ``qkv`` tensor (3C rows) is split into its q, k and v thirds by row.
    """
    sel = method.selection()
    num_active = sel.size if num_active is None else num_active
    active = sel.rank < num_active
    per_block: dict[str, list[int]] = {}
    per_type: dict[str, list[int]] = {t: [0, 0] for t in MODULE_TYPES}
    start = 0
    for tensor, count in zip(method.tensors, sel.counts.tolist()):
        index = sel.index[start:start + count][active[start:start + count]]
        start += count
        block = per_block.setdefault(block_label(tensor.name), [0, 0])
        block[0] += int(index.numel())
        block[1] += tensor.numel
        if re.search(r"\.qkv\.(weight|bias)$", tensor.name) and tensor.shape[0] % 3 == 0:
            row_size = tensor.numel // tensor.shape[0]
            part = torch.div(index, row_size, rounding_mode="floor") // (tensor.shape[0] // 3)
            for i, kind in enumerate("qkv"):
                per_type[kind][0] += int((part == i).sum())
                per_type[kind][1] += tensor.numel // 3
        else:
            kind = module_type(tensor.name)
            per_type[kind][0] += int(index.numel())
            per_type[kind][1] += tensor.numel
    blocks = dict(sorted(per_block.items(), key=lambda kv: (kv[0] == "embed/other", kv[0])))
    return {
        "selected": int(active.sum()),
        "eligible": method.num_eligible,
        "per_block": {k: tuple(v) for k, v in blocks.items()},
        "per_type": {k: tuple(v) for k, v in per_type.items() if v[1]},
    }


def write_fisher_outputs(method, out_dir, *, plots: bool = True) -> dict[str, Path]:
    """Write the scores and the selection of a FisherTune method that has estimated and selected.

    Files: ``scores.safetensors`` (one float32 tensor per eligible parameter, by name; only when the
    method kept its scores), ``selection.safetensors`` (``tensor_counts``, ``entry_index``,
    ``entry_rank``; the tensor names and shapes in its metadata), ``selection_stats.json`` and, with
    ``plots``, ``selection_per_block.png``, ``selection_per_type.png``, ``drfim_distribution.png``.
    """
    from safetensors.torch import save_file

    if not method.is_selected:
        raise RuntimeError("the method has no selection yet: run the estimate first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    meta = {"tensors": json.dumps([[t.name, list(t.shape)] for t in method.tensors]),
            "capacity": str(method.capacity), "selection": method.cfg.selection}
    sel = method.selection()
    save_file({"tensor_counts": sel.counts.contiguous(), "entry_index": method.entry_index.cpu().contiguous(),
               "entry_rank": method.entry_rank.cpu().contiguous()}, str(out / "selection.safetensors"), metadata=meta)
    written["selection"] = out / "selection.safetensors"
    scores = method.last_scores
    if scores is not None:
        save_file({n: s.detach().float().cpu().contiguous() for n, s in scores.items()},
                  str(out / "scores.safetensors"), metadata=meta)
        written["scores"] = out / "scores.safetensors"
    stats = selection_statistics(method)
    (out / "selection_stats.json").write_text(json.dumps(stats, indent=1))
    written["stats"] = out / "selection_stats.json"
    if plots:
        overall = stats["selected"] / stats["eligible"]
        written["per_block"] = plot_selection_fractions(stats["per_block"], out / "selection_per_block.png",
                                                        "FisherTune: fraction selected per block", overall)
        written["per_type"] = plot_selection_fractions(stats["per_type"], out / "selection_per_type.png",
                                                       "FisherTune: fraction selected per module type", overall)
        if scores is not None:
            flat_rank0 = _kth_score(method, scores)
            written["distribution"] = plot_score_distribution(scores, out / "drfim_distribution.png",
                                                              threshold=flat_rank0)
    return written


def _kth_score(method, scores: dict[str, torch.Tensor]) -> float:
    """The lowest selected score (the selection threshold)."""
    sel = method.selection()
    worst = int(torch.argmax(sel.rank))
    tensor_id = int(torch.searchsorted(torch.cumsum(sel.counts, 0), torch.tensor(worst), right=True))
    tensor = method.tensors[tensor_id]
    return float(scores[tensor.name].reshape(-1)[int(sel.index[worst])])


class _HeadWarmupTrainer:
    """What FisherTune needs from a trainer, for ``dgss fisher`` without the training engine: the
    model, a source batch stream and the schedule length."""

    def __init__(self, cfg, model, loader, device):
        self.cfg, self.model, self.loader, self.device = cfg, model, loader, device
        self.total_iters, self.rank, self.world_size = cfg.train.iters, 0, 1
        self.num_train_images = sum(len(d) for d in loader.datasets)

    def next_batch(self) -> dict:
        batch = next(self.loader)
        return {"image": batch["image"].to(self.device), "label": batch["label"].to(self.device)}


def run_fisher(cfg, *, device: Optional[str] = None, out_dir=None) -> dict[str, Path]:
    """Stages 1-2 alone: train the head for ``warmup_iters`` on the frozen backbone (AdamW, the config's
    lr and weight decay, poly decay over the warm-up), estimate the DR-FIM, rank, and write the scores,
    the selection and the plots to ``out_dir`` (default ``cfg.run_dir``)."""
    from ...data.loader import build_train_loader
    from ...models.segmentor import build_segmentor
    from .method import FisherTune

    if cfg.method.name != "fishertune":
        raise ValueError(f"dgss fisher needs method.name: fishertune, got '{cfg.method.name}'")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)
    model = build_segmentor(cfg).to(device)
    method: FisherTune = model.method
    method.keep_scores = True
    trainer = _HeadWarmupTrainer(cfg, model, build_train_loader(cfg), device)
    warmup = cfg.method.fishertune.warmup_iters
    lr_mult = 1.0 if cfg.method.backbone_lr_mult is None else cfg.method.backbone_lr_mult
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.train.lr, cfg.train.weight_decay, lr_mult),
                                  betas=tuple(cfg.train.betas))
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(warmup, 1), power=cfg.train.poly_power)
    model.train()
    for iteration in range(warmup):
        method.on_train_iteration(iteration, trainer)
        batch = trainer.next_batch()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    method.on_train_iteration(warmup, trainer)  # stage 2
    return write_fisher_outputs(method, out_dir if out_dir is not None else cfg.run_dir)
