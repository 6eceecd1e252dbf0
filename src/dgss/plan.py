"""``dgss plan CONFIG [overrides] [--gpus N --gpu-memory 80GB] [--json]``: will this run fit?

Prints the per-process memory of the config as it is (weights, gradients, optimizer state,
activations, communication buffers, FisherTune's estimate), a table of its variants (fp32/bf16 x
activation checkpointing x DDP/FSDP), the verdict for the GPU given, and the smallest change that makes
it fit. Nothing is read or allocated: the model is built on the meta device
(:mod:`dgss.engine.memory_plan`).
"""

from __future__ import annotations

import json
from typing import Optional

from .engine.memory_plan import GIB, MemoryPlan, Planner, plan_memory, usable_memory

__all__ = ["run_plan", "format_plan"]


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: MemoryPlan, planner: Planner, cfg, source: str = "") -> str:
    """The human-readable report (GiB)."""
    crop = "x".join(str(s) for s in cfg.data.crop_size)
    amp = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(plan.amp, plan.amp)
    lines = [
        f"dgss plan: {source}" if source else "dgss plan",
        f"model: {cfg.model.backbone} ({planner.parameters:,} parameters, {planner.depth} blocks), method "
        f"{cfg.method.name} ({planner.trainable:,} trainable)",
        f"per process: batch {plan.batch_size} at {crop}, {amp}, activation checkpointing "
        f"{'on' if plan.grad_checkpointing else 'off'}, {plan.gpus} process(es)"
        + (f" ({plan.parallel})" if plan.gpus > 1 else ""),
        "",
        "memory per process (GiB)",
        f"  weights and buffers  {_gib(plan.weights)}",
        f"  gradients            {_gib(plan.gradients)}   (alive at the peak)",
        f"  optimizer state      {_gib(plan.optimizer)}   (AdamW, fp32)",
        f"  activations          {_gib(plan.activations)}   (measured at small depth on the meta device, "
        f"scaled to {planner.depth} blocks)",
    ]
    if plan.communication:
        lines.append(f"  communication        {_gib(plan.communication)}   "
                     + ("(DDP buckets)" if plan.parallel == "ddp" else "(FSDP: unsharded root, 2 gathered blocks)"))
    if plan.optimizer_step:
        lines.append(f"  optimizer step       {_gib(plan.optimizer_step)}   (foreach AdamW temporary: the step is the peak)")
    if plan.ema:
        lines.append(f"  weight EMA           {_gib(plan.ema)}   (train.ema: a copy of the trained tensors)")
    lines.append(f"  training peak        {_gib(plan.training_peak)}")
    if plan.estimate:
        e = plan.estimate
        lines.append(f"  FisherTune estimate  {_gib(e['peak'])}   (stage 2: weights + F sums {e['sums'] / GIB:.2f} + "
                     f"theta {e['theta'] / GIB:.2f} + max(pass {e['passes'] / GIB:.2f}, data scale "
                     f"{e['data_scale'] / GIB:.2f}, selection {e['selection'] / GIB:.2f}); method.fishertune.estimate_memory="
                     f"{cfg.method.fishertune.estimate_memory})")
    lines.append(f"  total                {_gib(plan.total_bytes)}")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"on {plan.gpus} x {plan.gpu_memory / GIB:g} GB GPU(s) (usable "
                     f"{usable_memory(plan.gpu_memory) / GIB:.1f} GiB each): {verdict}")
        if plan.change:
            lines.append(f"smallest change that fits: {plan.change}")
    if plan.variants:
        lines += ["", "variants (GiB per process)", "  amp   ckpt  parallel   training   estimate      total  fits"]
        for v in plan.variants:
            fits = "-" if v["fits"] is None else ("yes" if v["fits"] else "no")
            lines.append(f"  {('fp32' if v['amp'] == 'none' else v['amp']):<5} {('on' if v['grad_checkpointing'] else 'off'):<5} "
                         f"{v['parallel']:<8} {v['training_peak'] / GIB:10.2f} {v['estimate_peak'] / GIB:10.2f} "
                         f"{v['total_bytes'] / GIB:10.2f}  {fits}")
    return "\n".join(lines)


def run_plan(cfg, *, source: str = "", gpus: int = 1, gpu_memory: Optional[int] = None, as_json: bool = False,
             device: str = "cuda") -> str:
    """The report of ``cfg`` (text, or JSON with ``total_bytes`` and ``fits``)."""
    planner = Planner(cfg, device=device)
    plan = plan_memory(cfg, gpus=gpus, gpu_memory=gpu_memory, device=device, planner=planner)
    if as_json:
        data = plan.to_dict()
        data.update(config=source, backbone=cfg.model.backbone, method=cfg.method.name, parameters=planner.parameters,
                    trainable=planner.trainable, depth=planner.depth, crop_size=list(cfg.data.crop_size))
        return json.dumps(data, indent=2)
    return format_plan(plan, planner, cfg, source)
