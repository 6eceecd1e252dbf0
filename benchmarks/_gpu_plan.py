"""gpu_check.py's "plan" section (issue 24): the memory planner against torch.cuda.max_memory_allocated.

Each case builds a config's model on the GPU (random init, built there directly so that a 7B model
never passes through host memory), takes three training steps as the Trainer takes them (zero_grad,
forward under autocast, backward, AdamW step; the third with the optimizer state of the first two)
and records the peak ``max_memory_allocated`` over the case beside what ``dgss plan`` says for the same
config (``planned_mib``). What was allocated before the case (the check's own inputs, anything an
earlier section left) is recorded (``allocated_before_mib``) and taken off the peak: ``case_peak_mib``
is the case's own, and ``planned_x_measured`` is planned / case_peak_mib. The planner's target: never
below the measurement and at most 10% above it, planned / measured in [1.00, 1.10]. FisherTune's
estimate (stage 2, streamed) is measured the same way after one head step: for DINOv3-7B it is the
claim that the estimate fits one 141 GB GPU. The smoke run (CPU) computes the planned figures of toy
configs and times nothing but the planner.
"""

from __future__ import annotations

import contextlib

import torch

import _gpu_support as gs

# planned / measured: never below (a run that trusts the plan must not run out of memory), at most 10% above
TARGET = (1.00, 1.10)

# (name, overrides, amp, steps); the sizes of the 512 recipe, batch 4 unless said
FULL_CASES = [
    ("dinov3_7b/fishertune estimate", ["model.backbone=dinov3_7b", "method.name=fishertune",
                                       "method.fishertune.num_batches=1"], "fp32", "estimate"),
    ("dinov2_l/frozen/fp32", ["method.name=frozen"], "fp32", "train"),
    ("dinov2_l/rein/fp32", ["method.name=rein"], "fp32", "train"),
    ("dinov2_l/full/fp32", ["method.name=full"], "fp32", "train"),
    ("dinov2_l/fishertune/fp32", ["method.name=fishertune"], "fp32", "train"),
    ("dinov2_l/soma/fp32", ["method.name=soma", "method.soma.svd_dtype=float32"], "fp32", "train"),
    ("dinov2_l/rein/bf16", ["method.name=rein"], "bf16", "train"),
    ("dinov2_l/full/bf16", ["method.name=full"], "bf16", "train"),
    ("dinov2_l/full/fp32+ckpt", ["method.name=full", "train.grad_checkpointing=true"], "fp32", "train"),
    ("dinov2_l/fishertune estimate", ["method.name=fishertune", "method.fishertune.num_batches=2"], "fp32", "estimate"),
    ("dinov3_7b/rein/bf16+ckpt", ["model.backbone=dinov3_7b", "method.name=rein", "train.grad_checkpointing=true",
                                  "train.batch_size=2"], "bf16", "train"),
]
SMOKE_CASES = [case for case in FULL_CASES if case[0] in (
    "dinov2_l/frozen/fp32", "dinov2_l/rein/fp32", "dinov2_l/full/fp32", "dinov2_l/fishertune/fp32",
    "dinov2_l/fishertune estimate")]
SMOKE = ["model.backbone=dinov2_s", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
         "model.img_size=64", "data.crop_size=[64,64]", "train.batch_size=2", "model.head.hidden_dim=32",
         "model.head.num_queries=8", "model.head.num_heads=2", "model.head.num_points=2",
         "model.head.pixel_decoder_layers=1", "model.head.pixel_decoder_ffn_dim=32", "model.head.decoder_layers=2",
         "model.head.decoder_ffn_dim=32", "model.head.num_points_loss=64", "method.rein.num_tokens=8",
         "method.rein.query_dim=32", "method.soma.start_block=1"]


def _config(overrides: list[str], smoke: bool, amp: str):
    from dgss.config import load_config

    base = SMOKE if smoke else ["data.crop_size=[512,512]"]
    return load_config(None, [*overrides, *base, f"train.amp={'none' if amp == 'fp32' else amp}",
                              "method.fishertune.warmup_iters=0"])


def _labels(cfg, device):
    b, (h, w) = cfg.train.batch_size, cfg.data.crop_size
    return (torch.arange(w, device=device) * 19 // w).expand(b, h, w).contiguous()  # all 19 classes present


def _measure(cfg, kind: str, amp: str, device, section: gs.Section, name: str) -> dict:
    """One case, measured in a frame of its own: the model, its method and the closures that hold
    them all die when ``_measure_case`` returns, so the cycle collector frees them before the next
    case resets the peak. (Freeing inside that frame left the 7B estimate's weights allocated
    during the next case: DINOv2-L frozen measured 36.0 GiB against 7.3 GiB on the H200.)"""
    gs.free_memory(device)
    left_over = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    entry = _measure_case(cfg, kind, amp, device, section, name)
    gs.free_memory(device)
    if left_over:
        entry["allocated_before_mib"] = round(left_over / gs.MIB, 1)
    return entry


def _measure_case(cfg, kind: str, amp: str, device, section: gs.Section, name: str) -> dict:
    from dgss.engine.optim import build_optimizer
    from dgss.engine.speed import apply_speed_options
    from dgss.tuning.model import build_segmentor

    torch.manual_seed(0)
    with torch.device(device):
        model = build_segmentor(cfg)
    model.train()
    apply_speed_options(model, cfg.train)
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    images = torch.randn(cfg.train.batch_size, 3, *cfg.data.crop_size, device=device)
    labels = _labels(cfg, device)
    method = model.method

    def step():
        optimizer.zero_grad(set_to_none=True)
        with gs.autocast(amp, device) if amp != "fp32" else contextlib.nullcontext():
            loss = model(images, labels)["loss"]
        loss.backward()
        optimizer.step()

    if kind == "estimate":
        step()  # stage 1: the head's state and gradients exist when the estimate runs
        stream = ({"image": images, "label": labels} for _ in range(1000))

        def estimate():
            method.select(method.estimate(model, stream, seed=0), seed=0)

        entry = section.run({name: estimate}, warmup=0, repeats=1)[name]
    else:
        if method.name == "fishertune":
            method.select(None)
            method.num_active.fill_(method.capacity)
        entry = section.run({name: step}, warmup=2, repeats=1)[name]
    return entry


def plan_section(check, section: gs.Section) -> None:
    from dgss.engine.memory_plan import Planner

    smoke = check.args.cpu_smoke
    figures = section.data["figures"]
    ratios = []
    for name, overrides, amp, kind in (SMOKE_CASES if smoke else FULL_CASES):
        if amp == "bf16" and not gs.bf16_supported(check.device):
            continue
        if not section.can_start(name):
            continue
        cfg = _config(overrides, smoke, amp)
        planner = Planner(cfg, device="cpu" if smoke else "cuda")
        planned = planner.estimate_plan(1)["peak"] if kind == "estimate" else planner.plan().training_peak
        if smoke:  # nothing to compare with on a CPU: time the planner itself
            entry = section.run({name: lambda: Planner(cfg, device="cpu").plan()}, warmup=0, repeats=1)[name]
        else:
            entry = _measure(cfg, kind, amp, check.device, section, name)
        entry["planned_mib"] = round(planned / gs.MIB, 1)
        if "peak_mib" in entry:
            entry["case_peak_mib"] = round(entry["peak_mib"] - entry.get("allocated_before_mib", 0.0), 1)
            entry["planned_x_measured"] = round(entry["planned_mib"] / entry["case_peak_mib"], 3)
            ratios.append(entry["planned_x_measured"])
        section.record(name, **entry)
    if ratios:
        low, high = TARGET
        figures.update(worst_low=min(ratios), worst_high=max(ratios), target=f"[{low:.2f}, {high:.2f}]",
                       within_target=all(low <= r <= high for r in ratios))
    figures["cases_planned"] = sum(1 for e in section.data["cases"].values() if "planned_mib" in e)

