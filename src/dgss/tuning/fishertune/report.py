"""What a FisherTune selection is made of, and `dgss fisher` (stages 1-2 alone: files, plots, report).

    stats = selection_statistics(method)            # per block and per module type: (selected, total)
    report = selection_report(method)               # overlaps with the ablations' sets, shares, prior
    write_fisher_outputs(method, out_dir)           # scores, selection, stats, report.json, plots
    run_fisher(cfg, stability=True)                 # warm the head up, estimate, write, print

The report is the window onto the method (fishertune.md §3.6): how much of the chosen top-delta_max set
the FIM-only, the Delta-F-only and a random ranking of the same estimate would also choose (Jaccard),
where the budget lands (per block; per q, k, v, proj, fc1, fc2, norm, embed, beside the paper's Fig. 6
claim), where the prior still dominates the posterior, and, on request, how reproducible each ranking
is from disjoint data (split-half Jaccard).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .drfim import SCORE_MODES, FisherEstimate, selection_scores
from .plots import plot_score_distribution, plot_selection_fractions

__all__ = ["MODULE_TYPES", "module_type", "block_label", "top_positions", "jaccard", "selection_positions",
           "group_counts", "selection_statistics", "fig6_summary", "selection_report", "split_half_stability",
           "write_fisher_outputs", "format_report", "run_fisher"]

MODULE_TYPES = ("q", "k", "v", "proj", "fc1", "fc2", "norm", "embed", "other")
# The paper's Fig. 6, in words, for the report to stand beside.
FIG6_CLAIM = "domain-sensitive parameters lie mainly in Q, K and FFN weights of deeper blocks; Q and K above V"
_EMBED = re.compile(r"^(patch_embed|pos_embed|cls_token|reg_token|register_tokens|mask_token|rope|stem)")


def module_type(name: str) -> str:
    """The module type of a ViT parameter name (a fused qkv is split into thirds by :func:`group_counts`)."""
    if re.search(r"(^|\.)(q_proj|k_proj|v_proj)\.", name):
        return name.split(".")[-2][0]
    if ".attn.proj." in name:
        return "proj"
    if re.search(r"\.mlp\.(fc1|fc1_g|fc1_x|w1|w2|w12)\.", name):
        return "fc1"
    if re.search(r"\.mlp\.(fc2|w3)\.", name):
        return "fc2"
    if re.search(r"(^|\.)norm\w*\.", name) or name.startswith("norm."):
        return "norm"
    if _EMBED.match(name):
        return "embed"
    return "other"


def block_label(name: str) -> str:
    match = re.match(r"blocks\.(\d+)\.", name) or re.match(r"stages\.(\d+)\.", name)
    return f"block {int(match.group(1)):02d}" if match else "embed/other"


# ---------------------------------------------------------------------------------------------- sets


def top_positions(scores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The global flat positions (over the tensors in order) of the k highest scores, sorted."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    return torch.topk(flat, k, sorted=False).indices.sort().values


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A n B| / |A u B| of two sets of distinct positions."""
    inter = int(torch.isin(a, b.to(a.device)).sum())
    union = a.numel() + b.numel() - inter
    return inter / union if union else 1.0


def selection_positions(method, num_active: Optional[int] = None) -> torch.Tensor:
    """The global flat positions of the method's (active) selected entries, sorted."""
    sel = method.selection()
    sizes = torch.tensor([t.numel for t in method.tensors], dtype=torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    tensor_id = torch.repeat_interleave(torch.arange(len(method.tensors)), sel.counts)
    positions = starts[tensor_id] + sel.index.cpu()
    if num_active is not None:
        positions = positions[sel.rank.cpu() < num_active]
    return positions.sort().values


def group_counts(tensors, positions: torch.Tensor) -> dict:
    """Selected / total entries per block and per module type for a set of global positions.
    A fused ``qkv`` tensor (3C rows) is split into its q, k and v thirds by row."""
    positions = positions.cpu()
    per_block: dict[str, list[int]] = {}
    per_type: dict[str, list[int]] = {t: [0, 0] for t in MODULE_TYPES}
    start = 0
    for tensor in tensors:
        lo, hi = torch.searchsorted(positions, torch.tensor([start, start + tensor.numel]))
        index = positions[lo:hi] - start
        start += tensor.numel
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
    return {"per_block": {k: tuple(v) for k, v in blocks.items()},
            "per_type": {k: tuple(v) for k, v in per_type.items() if v[1]}}


def selection_statistics(method, num_active: Optional[int] = None) -> dict:
    """Selected / total entries per block and per module type (q, k, v, proj, fc1, fc2, norm, embed,
    other) of the method's selection; ``num_active``: only the top ``num_active`` (default: all K)."""
    positions = selection_positions(method, num_active)
    return {"selected": int(positions.numel()), "eligible": method.num_eligible,
            **group_counts(method.tensors, positions)}


def fig6_summary(stats: dict) -> dict:
    """The figures the paper's Fig. 6 claim is about: the fraction selected of the q, k, v and FFN
    entries, and the share of the block budget in the deeper half of the blocks."""
    per_type, blocks = stats["per_type"], [(k, v) for k, v in stats["per_block"].items() if k.startswith("block")]

    def fraction(*kinds):
        sel = sum(per_type.get(k, (0, 0))[0] for k in kinds)
        total = sum(per_type.get(k, (0, 0))[1] for k in kinds)
        return sel / total if total else None

    in_blocks = sum(s for _, (s, _) in blocks)
    deeper = sum(s for _, (s, _) in blocks[len(blocks) // 2:])
    qk, v, ffn = fraction("q", "k"), fraction("v"), fraction("fc1", "fc2")
    return {"claim": FIG6_CLAIM, "fraction_qk": qk, "fraction_v": v, "fraction_ffn": ffn,
            "fraction_all": stats["selected"] / stats["eligible"] if stats["eligible"] else None,
            "deeper_half_share": deeper / in_blocks if in_blocks else None,
            "qk_above_v": None if qk is None or v is None else qk > v}


# ---------------------------------------------------------------------------------------------- report


def _shares(groups: dict) -> tuple[dict, dict]:
    selected = sum(s for s, _ in groups.values())
    share = {k: (s / selected if selected else 0.0) for k, (s, _) in groups.items()}
    fraction = {k: (s / t if t else 0.0) for k, (s, t) in groups.items()}
    return share, fraction


def selection_report(method, estimate: Optional[FisherEstimate] = None, *, seed: int = 0) -> dict:
    """The report of the method's selection (top delta_max). ``estimate``: the estimate it came from
    (default ``method.last_estimate``); the overlaps with the FIM-only and Delta-F-only sets are taken
    from the same estimate (None where it has no shifted half, e.g. ``selection=fisher``)."""
    from .selection import random_scores

    estimate = estimate if estimate is not None else method.last_estimate
    cfg, k = method.cfg, method.capacity
    chosen = selection_positions(method)
    shapes = [t.shape for t in method.tensors]

    def overlap(mode):
        if estimate is None or (mode == "domain" and estimate.fisher_shifted is None):
            return None
        scores = selection_scores(estimate, mode, method.drfim_options(), cfg.delta_max)
        return jaccard(chosen, top_positions([scores[t.name] for t in method.tensors], k))

    stats = selection_statistics(method)
    share_block, fraction_block = _shares(stats["per_block"])
    share_type, fraction_type = _shares(stats["per_type"])
    return {
        "selection": cfg.selection, "variational": bool(cfg.variational), "per_sample": bool(cfg.per_sample),
        "domain_balance": cfg.domain_balance, "normalization": cfg.normalization,
        "selected": stats["selected"], "eligible": stats["eligible"], "delta_max": cfg.delta_max,
        "estimation_passes": method.estimation_passes,
        "overlap_fim": overlap("fisher"), "overlap_domain": overlap("domain"),
        "overlap_random": jaccard(chosen, top_positions(random_scores(shapes, seed + 7), k)),
        "share_by_block": share_block, "share_by_type": share_type,
        "fraction_by_block": fraction_block, "fraction_by_type": fraction_type,
        "fig6": fig6_summary(stats),
        "prior_dominated_share": None if estimate is None else estimate.prior_dominated_share(),
    }


def split_half_stability(method, segmentor, batches: Iterator[dict], *, seed: int = 0,
                         progress=None) -> dict[str, float]:
    """Split-half stability of every ranking: two estimates of ``num_batches`` batches each from
    disjoint parts of ``batches``, plain and variational, and the top-delta_max Jaccard between the two
    halves' sets, per mode ("fisher", "domain", "drfim" of the plain and of the variational estimate)."""
    base = method.drfim_options()
    sets: dict[str, list[torch.Tensor]] = {}
    for half in range(2):
        for variational in (False, True):
            options = dataclasses.replace(base, variational=variational)
            estimate = method.run_estimate(segmentor, batches, options, seed=seed + half, progress=progress)
            for mode in SCORE_MODES:
                scores = selection_scores(estimate, mode, options, method.cfg.delta_max)
                key = f"{mode}_{'variational' if variational else 'plain'}"
                sets.setdefault(key, []).append(top_positions([scores[t.name] for t in method.tensors],
                                                              method.capacity))
    return {key: jaccard(a, b) for key, (a, b) in sets.items()}


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(report: dict) -> str:
    """The report as the few lines `dgss fisher` prints."""
    kind = "variational" if report["variational"] else "plain"
    name = {"drfim": f"{kind} DR-FIM", "fisher": f"{kind} FIM", "domain": f"{kind} Delta F",
            "random": "random"}[report["selection"]]
    lines = [f"selection: {name}, top {_percent(report['delta_max'])} = {report['selected']:,} of "
             f"{report['eligible']:,} backbone entries ({report['estimation_passes']} passes)"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"overlap (Jaccard of the top sets): FIM-only {fmt(report['overlap_fim'])}, Delta-F-only "
                 f"{fmt(report['overlap_domain'])}, random {fmt(report['overlap_random'])}")
    lines.append("share of the budget by type: " + ", ".join(
        f"{k} {_percent(v)}" for k, v in report["share_by_type"].items()))
    lines.append("share of the budget by block: " + ", ".join(
        f"{k.replace('block ', '')} {_percent(v)}" for k, v in report["share_by_block"].items()))
    fig6 = report["fig6"]
    lines.append(f"paper's Fig. 6 ({fig6['claim']}): selected of q+k {_percent(fig6['fraction_qk'])}, of v "
                 f"{_percent(fig6['fraction_v'])}, of fc1+fc2 {_percent(fig6['fraction_ffn'])}; deeper half of "
                 f"the blocks {_percent(fig6['deeper_half_share'])} of the block budget")
    if report.get("prior_dominated_share") is not None:
        lines.append(f"prior dominates the posterior in {_percent(report['prior_dominated_share'])} of the entries")
    if report.get("stability"):
        lines.append("split-half stability (Jaccard): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.3f}" for k, v in report["stability"].items()))
    return "\n".join(lines)


def write_fisher_outputs(method, out_dir, *, plots: bool = True, report: Optional[dict] = None) -> dict[str, Path]:
    """Write the scores, the selection and the report of a FisherTune method that has estimated and selected.

    Files: ``scores.safetensors`` (one float32 tensor per eligible parameter, by name; only when the
    method kept its scores), ``selection.safetensors`` (``tensor_counts``, ``entry_index``,
    ``entry_rank``; the tensor names and shapes in its metadata), ``selection_stats.json``,
    ``report.json`` (:func:`selection_report`, or ``report``) and, with ``plots``,
    ``selection_per_block.png``, ``selection_per_type.png``, ``drfim_distribution.png``.
    """
    from ...fileio import atomic_write
    from ...fileio import save_safetensors as save_file  # atomic, and the umask's mode (not safetensors' 0600)

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
    for name, content in (("selection_stats.json", stats), ("report.json", report or selection_report(method))):
        text = json.dumps(content, indent=1)
        atomic_write(out / name, lambda tmp: Path(tmp).write_text(text))
    written["stats"] = out / "selection_stats.json"
    written["report"] = out / "report.json"
    if plots:
        overall = stats["selected"] / stats["eligible"]
        written["per_block"] = plot_selection_fractions(stats["per_block"], out / "selection_per_block.png",
                                                        "FisherTune: fraction selected per block", overall)
        written["per_type"] = plot_selection_fractions(stats["per_type"], out / "selection_per_type.png",
                                                       "FisherTune: fraction selected per module type", overall)
        if scores is not None:
            written["distribution"] = plot_score_distribution(scores, out / "drfim_distribution.png",
                                                              threshold=_kth_score(method, scores))
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
        # the estimate's passes take the run's autocast, as in training (a CPU runs fp32)
        self.amp = cfg.train.amp if torch.device(device).type == "cuda" else "none"

    def next_batch(self) -> dict:
        batch = next(self.loader)
        return {"image": batch["image"].to(self.device), "label": batch["label"].to(self.device)}


def run_fisher(cfg, *, device: Optional[str] = None, out_dir=None, stability: bool = False,
               progress: bool = True) -> tuple[dict[str, Path], dict]:
    """Stages 1-2 alone: train the head for ``warmup_iters`` on the frozen backbone (AdamW, the config's
    lr and weight decay, poly decay over the warm-up), estimate the DR-FIM, rank, and write the scores,
    the selection, ``report.json`` and the plots to ``out_dir`` (default ``cfg.run_dir``).
    ``stability``: also estimate twice more, plain and variational, on the next 2 x ``num_batches``
    batches, and report each ranking's split-half Jaccard. Returns (written files, the report)."""
    from tqdm import tqdm

    from ...data.loader import build_train_loader
    from ...precision import apply_tf32
    from ..model import build_segmentor
    from .method import FisherTune

    if cfg.method.name != "fishertune":
        raise ValueError(f"dgss fisher needs method.name: fishertune, got '{cfg.method.name}'")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    apply_tf32(cfg.train.tf32, device)  # the estimate's passes under the run's precision settings
    torch.manual_seed(cfg.train.seed)
    model = build_segmentor(cfg).to(device)
    method: FisherTune = model.method
    method.keep_scores = True
    cfg.train.progress_bar = progress  # the estimate's own bar follows the trainer's setting
    trainer = _HeadWarmupTrainer(cfg, model, build_train_loader(cfg), device)
    warmup = cfg.method.fishertune.warmup_iters
    lr_mult = 1.0 if cfg.method.backbone_lr_mult is None else cfg.method.backbone_lr_mult
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.train.lr, cfg.train.weight_decay, lr_mult),
                                  betas=tuple(cfg.train.betas))
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(warmup, 1), power=cfg.train.poly_power)
    model.train()
    for iteration in tqdm(range(warmup), desc="head warm-up (stage 1)", unit="it", disable=not progress,
                          dynamic_ncols=True, leave=False):
        method.on_train_iteration(iteration, trainer)
        batch = trainer.next_batch()
        loss = model.loss(batch["image"], batch["label"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    method.on_train_iteration(warmup, trainer)  # stage 2
    report = selection_report(method, seed=cfg.train.seed)
    if stability:
        num = cfg.method.fishertune.num_batches
        with tqdm(total=8 * num, desc="split-half stability", unit="batch", disable=not progress,
                  dynamic_ncols=True, leave=False) as bar:
            report["stability"] = _stability(method, model, trainer, cfg.train.seed, lambda _: bar.update(1))
    written = write_fisher_outputs(method, out_dir if out_dir is not None else cfg.run_dir, report=report)
    return written, report


def _stability(method, model, trainer, seed: int, progress) -> dict[str, float]:
    """Split-half stability on fresh batches: the two halves are consecutive ``num_batches`` chunks of
    the source stream, each estimated plain and variational on the same batches."""
    from .method import _batches

    num = method.cfg.num_batches
    stream = _batches(trainer)
    halves = [[next(stream) for _ in range(num)] for _ in range(2)]
    replay = (batch for half in halves for _ in range(2) for batch in half)
    return split_half_stability(method, model, replay, seed=seed, progress=progress)
