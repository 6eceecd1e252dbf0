"""``dgss plan CONFIG [overrides] [--gpus N --gpu-memory 80GB] [--json]``: will this run fit?

Prints the trainable parameters (the backbone's, as the papers count them, and the head's apart), the
per-process memory of training the config as it is (weights, gradients, optimizer state, activations,
communication buffers, named allowances for what no shape shows: library workspaces, the allocator, a CPU
process's own memory; FisherTune's estimate), the verdict for the GPU given and the smallest change that
makes it fit, the memory of evaluating it (whole image and sliding window at its eval settings:
:mod:`dgss.engine.eval_memory`), and a table of its training variants (fp32/bf16 x activation
checkpointing x DDP/FSDP). Every figure has one line saying what it is. Nothing is read or allocated: the
model is built on the meta device (:mod:`dgss.engine.memory_plan`).
"""

from __future__ import annotations

import json
from typing import Optional

from .engine.eval_memory import EvalMemory, eval_image_size, plan_eval_memory
from .engine.memory_plan import GIB, MemoryPlan, Planner, plan_memory, usable_memory

__all__ = ["run_plan", "format_plan"]


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f}"


_AMP_NAMES = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
_MODE_NAMES = {"whole": "whole image", "slide": "sliding window", "coarse_to_fine": "coarse to fine"}

# one line per column of the variants table
VARIANT_COLUMNS = (
    ("amp", "the precision of the step: fp32, or bf16 autocast (train.amp)"),
    ("ckpt", "activation checkpointing: blocks recompute their activations in backward (train.grad_checkpointing)"),
    ("parallel", "how --gpus processes share the model: ddp (replicas) or fsdp (shards; train.parallel)"),
    ("training", "the peak of one training step, as 'training peak' above"),
    ("estimate", "the peak of FisherTune's stage-2 estimate (0.00 for every other method)"),
    ("total", "the larger of training and estimate: what one GPU must hold"),
    ("fits", "total within the usable memory of --gpu-memory (- when none is given)"),
)


def _counts_line(planner: Planner, backbone_trainable: int, cfg) -> str:
    head = planner.trainable - backbone_trainable
    return (f"trainable: {backbone_trainable:,} in the backbone (method {cfg.method.name}, the count the papers "
            f"give) + {head:,} in the head and neck = {planner.trainable:,}")


def _gradients_note(plan: MemoryPlan) -> str:
    if plan.gradients == 0:
        return "gradients alive at the peak: none, the peak comes before the backward pass writes one"
    if plan.optimizer_step:
        return "gradients alive at the peak: all of them, the optimizer step is the peak"
    return "gradients alive at the peak (the backward pass has written these)"


def format_evaluation(evals: list[EvalMemory], cfg, gpu_memory: Optional[int], image_from: Optional[str]) -> list[str]:
    """The evaluation section: one line per inference mode."""
    if not evals:
        return []
    h, w = evals[0].image_size
    amp = _AMP_NAMES.get(cfg.train.amp, cfg.train.amp)
    if image_from:
        where = f"the largest resize box of data.test, {image_from}'s" + (
            f", scaled by eval.scale {cfg.eval.scale:g}" if cfg.eval.scale != 1.0 else "")
    else:
        where = f"no data.test resize box; eval.scale {cfg.eval.scale:g}"
    lines = ["", f"memory of evaluating one image of {h}x{w} ({where}; {amp}) (GiB)"]
    for e in evals:
        name = _MODE_NAMES.get(e.mode, e.mode)
        if e.error:
            lines.append(f"  {name:<19}       -   cannot run at this size: {e.error}")
            continue
        if e.mode == "whole":
            what = "one pass over the whole image"
        elif e.mode == "slide":
            crop, stride = (f"{a}x{b}" for a, b in (cfg.eval.crop_size, cfg.eval.stride))
            what = f"{crop} windows, stride {stride}, {cfg.eval.batch_windows} per pass (eval.batch_windows)"
        else:
            what = f"a whole pass at {cfg.eval.coarse_scale:g} and the sliding window, fused"
        fits = ""
        if gpu_memory is not None:
            fits = ", fits" if e.peak <= usable_memory(gpu_memory) else ", does NOT fit"
        mark = "; eval.mode" if e.configured else ""
        lines.append(f"  {name:<19} {_gib(e.peak)}   weights {e.weights / GIB:.2f} + activations and scores "
                     f"{e.activations / GIB:.2f}: {what}{mark}{fits}")
    lines.append("  (not counted: the scores resized to the label's resolution, 4 x classes x its pixels bytes)")
    return lines


def format_plan(plan: MemoryPlan, planner: Planner, cfg, source: str = "", *, backbone_trainable: Optional[int] = None,
                evals: Optional[list[EvalMemory]] = None, image_from: Optional[str] = None) -> str:
    """The human-readable report (GiB)."""
    crop = "x".join(str(s) for s in cfg.data.crop_size)
    amp = _AMP_NAMES.get(plan.amp, plan.amp)
    lines = [
        f"dgss plan: {source}" if source else "dgss plan",
        f"model: {cfg.model.backbone} ({planner.parameters:,} parameters, {planner.depth} blocks), method "
        f"{cfg.method.name}",
    ]
    if backbone_trainable is not None:
        lines.append(_counts_line(planner, backbone_trainable, cfg))
    else:
        lines.append(f"trainable: {planner.trainable:,} (backbone and head)")
    lines += [
        f"per process: batch {plan.batch_size} at {crop}, {amp}, activation checkpointing "
        f"{'on' if plan.grad_checkpointing else 'off'}, {plan.gpus} process(es)"
        + (f" ({plan.parallel})" if plan.gpus > 1 else ""),
        "",
        "memory of training, per process (GiB)",
        f"  weights and buffers  {_gib(plan.weights)}   every parameter and buffer of the model, fp32",
        f"  gradients            {_gib(plan.gradients)}   {_gradients_note(plan)}",
        f"  optimizer state      {_gib(plan.optimizer)}   AdamW's two moments of every trainable entry, fp32",
        f"  activations          {_gib(plan.activations)}   what the step keeps for backward and its temporaries, "
        f"measured at small depth on the meta device and scaled to {planner.depth} blocks",
    ]
    if plan.communication:
        lines.append(f"  communication        {_gib(plan.communication)}   "
                     + ("(DDP buckets)" if plan.parallel == "ddp" else "(FSDP: unsharded root, 2 gathered blocks)"))
    if plan.optimizer_step:
        lines.append(f"  optimizer step       {_gib(plan.optimizer_step)}   (foreach AdamW temporary: the step is the peak)")
    if plan.ema:
        lines.append(f"  weight EMA           {_gib(plan.ema)}   (train.ema: a copy of the trained tensors)")
    if plan.grad_accum > 1:
        lines.append(f"  (train.grad_accum {plan.grad_accum}: every gradient is alive through each micro-batch after the first)")
    if plan.workspaces:
        lines.append(f"  workspaces           {_gib(plan.workspaces)}   " + (
            "allowance: the process's own memory besides its tensors (kernel scratch, allocator, Python)"
            if planner.device == "cpu" else "allowance: cuBLAS's workspaces, one per thread (forward, backward)"))
    if plan.allocator:
        lines.append(f"  allocator            {_gib(plan.allocator)}   allowance: the CUDA caching allocator's "
                     "rounding and kernels' own buffers, 1% of the step's allocations")
    lines.append(f"  training peak        {_gib(plan.training_peak)}   the sum: the most one training step holds at once")
    if plan.estimate:
        e = plan.estimate
        lines.append(f"  FisherTune estimate  {_gib(e['peak'])}   (stage 2: weights + F sums {e['sums'] / GIB:.2f} + "
                     f"theta {e['theta'] / GIB:.2f} + max(pass {e['passes'] / GIB:.2f}, data scale "
                     f"{e['data_scale'] / GIB:.2f}, selection {e['selection'] / GIB:.2f}) + allowances "
                     f"{(e['workspaces'] + e['allocator']) / GIB:.2f}; method.fishertune.estimate_memory="
                     f"{cfg.method.fishertune.estimate_memory})")
    lines.append(f"  total                {_gib(plan.total_bytes)}   the larger of the training peak and "
                 "FisherTune's estimate: what one GPU must hold")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"on {plan.gpus} x {plan.gpu_memory / GIB:g} GB GPU(s) (usable "
                     f"{usable_memory(plan.gpu_memory) / GIB:.1f} GiB each: 5% or at least 1 GiB held back): {verdict}")
        if plan.change:
            lines.append(f"smallest change that fits: {plan.change}")
    lines += format_evaluation(evals or [], cfg, plan.gpu_memory, image_from)
    if plan.variants:
        lines += ["", "training variants (GiB per process)", "  amp   ckpt  parallel   training   estimate      total  fits"]
        for v in plan.variants:
            fits = "-" if v["fits"] is None else ("yes" if v["fits"] else "no")
            lines.append(f"  {('fp32' if v['amp'] == 'none' else v['amp']):<5} {('on' if v['grad_checkpointing'] else 'off'):<5} "
                         f"{v['parallel']:<8} {v['training_peak'] / GIB:10.2f} {v['estimate_peak'] / GIB:10.2f} "
                         f"{v['total_bytes'] / GIB:10.2f}  {fits}")
        lines += [f"  {name + ':':<10}{text}" for name, text in VARIANT_COLUMNS]
    return "\n".join(lines)


def run_plan(cfg, *, source: str = "", gpus: int = 1, gpu_memory: Optional[int] = None, as_json: bool = False,
             device: str = "cuda") -> str:
    """The report of ``cfg`` (text, or JSON with ``total_bytes``, ``fits``, the trainable counts and
    ``evaluation``: one entry per inference mode)."""
    from .compare import trainable_backbone_parameters

    planner = Planner(cfg, device=device)
    plan = plan_memory(cfg, gpus=gpus, gpu_memory=gpu_memory, device=device, planner=planner)
    backbone_trainable = trainable_backbone_parameters(cfg)
    evals = plan_eval_memory(cfg, target=device)
    image_from = eval_image_size(cfg)[1]
    if as_json:
        data = plan.to_dict()
        data.update(config=source, backbone=cfg.model.backbone, method=cfg.method.name, parameters=planner.parameters,
                    trainable=planner.trainable, backbone_trainable=backbone_trainable,
                    head_trainable=planner.trainable - backbone_trainable, depth=planner.depth,
                    crop_size=list(cfg.data.crop_size),
                    evaluation=[dict(e.to_dict(), fits=None if gpu_memory is None or e.error else
                                     e.peak <= usable_memory(gpu_memory)) for e in evals])
        return json.dumps(data, indent=2)
    return format_plan(plan, planner, cfg, source, backbone_trainable=backbone_trainable, evals=evals,
                       image_from=image_from)
