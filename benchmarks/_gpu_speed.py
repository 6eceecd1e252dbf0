"""gpu_check.py's "speed" section (issue 38): every ratio of the issue's table, before and after its changes,
measured in one run (interleaved where two variants share a model), with the targets beside them.

"before" restores dgss's behaviour before issue 38 for the comparison, and nothing else:

* TF32 off (train.tf32=false, torch's defaults);
* Rein's per-layer refinement as it was (:func:`legacy_refine`: the tokens' products, the cache key and the
  operand casts once per layer, fp32 softmax, inner sizes M and M - 1), hooked in place of today's;
* checkpointing applied to a backbone that runs without gradients (Frozen);
* FisherTune's quantiles by ``kthvalue``, its passes in fp32 without TF32;
* foreach AdamW (torch's default on CUDA) instead of fused.

Rows (targets of the issue): fp32 step / bf16 step (Full, Rein; <= 1.25 after); Rein's backbone part /
its FLOP floor (<= 1.02; the floor = the frozen limit's time x Rein's FLOPs / the limit's, counted by
torch's FlopCounterMode on the same inputs); Rein bf16 predict / Frozen bf16 predict (<= 1.15);
checkpointed / plain bf16 step per method (adapters <= Full's + 0.1; Frozen 1.00 +- 0.03); one estimate
pass / a Full step in the same precision (<= 1.5) and the paper's 200-pass estimate in seconds (<= 60);
the bf16 estimate's selection against fp32's (Jaccard, decides method.fishertune.estimate_precision);
fused / foreach AdamW step; torch.compile'd / eager bf16 step per method (decides train.compile). And, on
CUDA, the anatomy of Full's fp32 peak (which code allocated what is alive then): the planner's gap to the
H200's measurements (1.2-1.4 GiB on Full and FisherTune) is to be read from it.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch

import _gpu_support as gs
import bench_methods as bm

COMPILE_METHODS = ("frozen", "rein", "fishertune", "full")


# ----------------------------------------------------------------------------------------- before

def legacy_refine(reins, feats: torch.Tensor, layer: int) -> torch.Tensor:
    """Rein's refinement before issue 38 (dgss at c677172): rein.md's equations per layer with autograd;
    without it, operands folded per call from a cache keyed per layer, products in the autocast dtype."""
    from dgss.tuning.rein import _inference_only, parameter_state

    if _inference_only():
        key = (feats.dtype, parameter_state(reins))  # rebuilt at every layer, as it was
        cached = getattr(reins, "_legacy_cache", None)
        if cached is None or cached[0] != key:
            tokens = reins.tokens()
            logits_t = (tokens * reins.embed_dim**-0.5).transpose(1, 2)
            w, b, s = reins.mlp_delta_f.weight, reins.mlp_delta_f.bias, reins.scale
            values = s * (reins.mlp_token2feat(tokens[:, 1:]) @ w.t())
            cached = reins._legacy_cache = (key, tuple(t.to(feats.dtype).contiguous()
                                                       for t in (logits_t, values, s * w.t(), s * b)))
        logits_t, values, weight_t, bias = cached[1]
        shape = feats.shape
        flat = feats.reshape(-1, shape[-1])
        attention = torch.softmax(flat @ logits_t[layer], dim=-1)
        if torch.is_autocast_enabled(feats.device.type):
            delta = torch.addmm(bias, flat, weight_t)
            delta.addmm_(attention[:, 1:].to(delta.dtype), values[layer].to(delta.dtype))
            return feats + delta.view(shape)
        out = torch.addmm(flat, flat, weight_t)
        out.addmm_(attention[:, 1:], values[layer]).add_(bias)
        return out.view(shape)
    tokens = reins.tokens(layer)
    attention = torch.softmax(feats @ tokens.t() * reins.embed_dim**-0.5, dim=-1)
    delta_bar = attention[..., 1:] @ reins.mlp_token2feat(tokens[1:])
    return feats + reins.scale * reins.mlp_delta_f(delta_bar + feats)


@contextlib.contextmanager
def legacy_rein(method):
    """Rein's hooks as before issue 38 inside the block; today's hooks again afterwards."""
    from dgss.tuning.rein import refine_in_layout

    backbone = method.backbone
    method.detach_hooks()
    handles = []
    for group, site in enumerate(method.sites):
        for layer, block_index in enumerate(site.block_indices):
            refine = functools.partial(legacy_refine, method.reins_groups[group], layer=layer)

            def hook(module, inputs, output, refine=refine):
                return refine_in_layout(refine, output, method.token_layout, method.num_prefix_tokens)

            handles.append(backbone.blocks[block_index].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        method.attach(backbone)


@contextlib.contextmanager
def tf32(enabled: bool, device):
    from dgss.precision import apply_tf32, tf32_state

    before = tf32_state()
    apply_tf32(enabled, device)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before["matmul"], before["cudnn"]


@contextlib.contextmanager
def kthvalue_quantiles():
    from dgss.tuning.fishertune import quantile

    original = quantile.kth_smallest
    with mock.patch.object(quantile, "kth_smallest", lambda flat, k, method="auto": original(flat, k, "kthvalue")):
        yield


def within(context_factory, fn):
    def run():
        with context_factory():
            return fn()
    return run


# ----------------------------------------------------------------------------------------- section

class Rows:
    """figures["rows"]: {row: {"before": x, "after": y, "target": text}} (tabled by :func:`speed_table`)."""

    def __init__(self, section: gs.Section):
        self.rows = section.data["figures"].setdefault("rows", {})

    def add(self, row: str, *, before=None, after=None, target: str = "", **extra):
        self.rows[row] = {"before": before, "after": after, "target": target, **extra}


def speed_section(check, section: gs.Section) -> None:
    rows, device = Rows(section), check.device
    amps = list(check.amps(section))
    bf16 = "bf16" if "bf16" in amps else "fp32"
    step = check.step_fn
    models: dict = {}

    # Frozen: checkpointing of a no-grad backbone, bf16 predict, the limit of Rein's backbone part
    built = check.build(section, "frozen")
    if built is not None:
        model, opt, _ = built
        models["frozen"] = model
        _checkpointing(check, section, rows, "frozen", model, opt, bf16)
        _predict(check, section, "frozen", model, bf16, contextlib.nullcontext)
        with torch.no_grad():
            cotangents = [torch.randn_like(f) for f in model.backbone(check.images)]
        models["cotangents"] = cotangents
        models["frozen"] = model.cpu()  # parked: not in Rein's peak
        del opt
        gs.free_memory(device)

    for method in ("full", "rein"):
        built = check.build(section, method)
        if built is None:
            continue
        model, opt, backbone_opt = built
        before = (lambda: legacy_rein(model.method)) if method == "rein" else None
        _precision(check, section, rows, method, model, opt, amps)
        _checkpointing(check, section, rows, method, model, opt, bf16, before=before)
        if method == "full":
            _optimizer(check, section, rows, model)
            _memory_anatomy(check, section, model, opt, "fp32")
        if method == "rein":
            _predict(check, section, "rein", model, bf16, before)
            _rein_floor(check, section, rows, model, backbone_opt, models)
        del model, opt, backbone_opt
        gs.free_memory(device)
    models.clear()

    built = check.build(section, "fishertune")
    if built is not None:
        model, opt, _ = built
        _checkpointing(check, section, rows, "fishertune", model, opt, bf16)
        _estimate(check, section, rows, model, opt, bf16)
        del model, opt
        gs.free_memory(device)
    _ratios(section, rows, bf16)
    _compile(check, section, rows, bf16)


def _precision(check, section, rows, method, model, opt, amps) -> None:
    """fp32 without TF32 (before), fp32 with TF32 (after) and bf16: the step's precision ratios."""
    device = check.device
    fns = {f"precision/{method}/fp32": within(lambda: tf32(False, device), check.step_fn(model, opt, "fp32")),
           f"precision/{method}/fp32+tf32": within(lambda: tf32(True, device), check.step_fn(model, opt, "fp32"))}
    if "bf16" in amps:
        fns[f"precision/{method}/bf16"] = within(lambda: tf32(True, device), check.step_fn(model, opt, "bf16"))
    section.run(fns, warmup=check.warmup, repeats=check.repeats)


def _checkpointing(check, section, rows, method, model, opt, amp, before=None) -> None:
    """The step without checkpointing and with it (bf16), as now ("after": checkpointing_where_needed, Rein's
    operands outside the blocks) and as before issue 38 ("before": always checkpointed; Rein's per-layer
    hooks, without and with checkpointing, when ``before`` restores them)."""
    from dgss.engine.speed import checkpointing_where_needed, set_checkpointing

    backbone = model.backbone
    plain = check.step_fn(model, opt, amp)

    def checkpointed(context, mode="replay"):
        def run():
            set_checkpointing(backbone, mode)
            try:
                with context():
                    plain()
            finally:
                set_checkpointing(backbone, None)
        return run

    name = f"checkpointing/{method}/{amp}"
    fns = {f"{name}/none": plain, f"{name}/ckpt-after": checkpointed(lambda: checkpointing_where_needed(model)),
           f"{name}/ckpt-before": checkpointed(before or contextlib.nullcontext)}
    if before is not None:
        fns[f"{name}/none-before"] = within(before, plain)
    if method == "rein":  # train.checkpoint_hooks=keep: Rein's hooks outside the recomputed region
        fns[f"{name}/ckpt-keep"] = checkpointed(lambda: checkpointing_where_needed(model), "keep")
    section.run(fns, warmup=check.warmup, repeats=check.repeats)
    if method == "rein":  # the peaks (one function per run): what "keep" costs in memory against "replay"
        for mode in ("replay", "keep"):
            section.run({f"{name}/ckpt-{mode}/peak": checkpointed(contextlib.nullcontext, mode)}, warmup=0, repeats=1)


def _predict(check, section, method, model, amp, before) -> None:
    """dgss predict's whole-image path (tta_inference) on one image in ``amp``, before and after for Rein."""
    from dgss.predict.predictor import tta_inference

    model.eval()
    single = check.images[:1]

    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(gs.autocast(amp, check.device))
        return stack

    fn = lambda: tta_inference(model, single, mode="whole")  # noqa: E731
    fns = {f"predict/{method}/{amp}": fn}
    if method == "rein":
        fns[f"predict/rein/{amp}/before"] = within(before, fn)
    section.run(fns, warmup=1, repeats=check.repeats, context=context)
    model.train()


def _rein_floor(check, section, rows, model, backbone_opt, models) -> None:
    """Rein's backbone part (forward, backward, Rein's AdamW step) against the frozen limit (forward and
    input-gradient backward of the same backbone) and against its FLOP floor."""
    from torch.utils.flop_counter import FlopCounterMode

    limit_model, cotangents = models.get("frozen"), models.get("cotangents")
    if limit_model is None or not section.can_start("backbone part"):
        return
    limit_model.to(check.device)
    limit = lambda: bm.limit_part(limit_model, check.images, cotangents)  # noqa: E731
    after = lambda: bm.backbone_part(model, backbone_opt, check.images, cotangents)  # noqa: E731
    parts = section.run({"backbone part/limit": limit, "backbone part/rein": after,
                         "backbone part/rein/before": within(lambda: legacy_rein(model.method), after)},
                        warmup=check.warmup, repeats=check.repeats)
    flops = {}
    for name, fn in (("limit", limit), ("rein", after)):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        flops[name] = counter.get_total_flops()
    floor = flops["rein"] / flops["limit"]
    limit_entry = parts["backbone part/limit"]
    rows.add("Rein backbone part / its FLOP floor", target="<= 1.02", floor_x_limit=round(floor, 4),
             before=_over(gs.ratio(parts["backbone part/rein/before"], limit_entry), floor),
             after=_over(gs.ratio(parts["backbone part/rein"], limit_entry), floor))
    limit_model.cpu()


def _over(value, floor):
    return round(value / floor, 4) if value is not None else None


def _optimizer(check, section, rows, model) -> None:
    """AdamW's step alone over Full's trainable tensors: foreach (before) against fused (after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"foreach": {"foreach": True}, "fused": {"fused": True}}  # torch has a fused CPU kernel too
    optimizers = {k: torch.optim.AdamW([{"params": params}], lr=1e-8, **kw) for k, kw in kinds.items()}
    section.run({f"optimizer/{k}": opt.step for k, opt in optimizers.items()}, warmup=1, repeats=check.repeats)
    cases = section.data["cases"]
    rows.add("AdamW step, fused / foreach (Full)", before=1.0,
             after=gs.ratio(cases.get("optimizer/fused"), cases.get("optimizer/foreach")), target="< 1")
    for p in params:
        p.grad = None
    del optimizers
    gs.free_memory(check.device)


def _estimate(check, section, rows, model, opt, amp) -> None:
    """One estimate (2 batches: 4 passes) before (kthvalue, fp32 without TF32) and after (TF32; and bf16),
    the selections' agreement, and a Full-sized step of this model in the same precisions."""
    import dataclasses

    from dgss.tuning.fishertune.report import jaccard, selection_positions

    method = model.method
    # per-batch gradients, as the H200's 1.48 s per pass (issue 38's "4-5 x a training step") was measured
    method.cfg = dataclasses.replace(method.cfg, selection="drfim", num_batches=2, per_sample=False)

    selections = {}

    def estimate(dtype, key):
        def run():
            torch.manual_seed(0)  # the same loss samples (Mask2Former's points) in every variant: only precision differs
            method.estimate_autocast = dtype
            method.select(method.estimate(model, gs.alternating_batches(check), seed=0), seed=0)
            selections[key] = selection_positions(method).cpu()
        return run

    device = check.device
    fns = {"estimate/before": within(lambda: _both(tf32(False, device), kthvalue_quantiles()),
                                     estimate(None, "before")),
           "estimate/after": within(lambda: tf32(True, device), estimate(None, "after"))}
    if amp == "bf16":
        fns["estimate/after/bf16"] = within(lambda: tf32(True, device), estimate(torch.bfloat16, "bf16"))
    entries = section.run(fns, warmup=1, repeats=max(1, check.repeats // 2))
    passes = 4
    for entry in entries.values():
        if gs.ok(entry):
            entry["s_per_pass"] = entry["median_s"] / passes
            entry["paper_estimate_s"] = round(entry["s_per_pass"] * 200, 2)
    if "bf16" in selections and "after" in selections:
        rows.add("bf16 estimate's selection vs fp32's (Jaccard)", after=round(jaccard(selections["bf16"],
                                                                                   selections["after"]), 4),
                 target=">= 0.99 to make bf16 the default")
    if "before" in selections and "after" in selections:
        section.data["figures"]["estimate before/after selection Jaccard (TF32)"] = round(
            jaccard(selections["before"], selections["after"]), 4)
    method.estimate_autocast = None


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def _ratios(section, rows, amp) -> None:
    cases = section.data["cases"]
    r = lambda a, b: gs.ratio(cases.get(a), cases.get(b))  # noqa: E731
    for method in ("full", "rein"):
        rows.add(f"fp32 step / bf16 step ({method})", target="<= 1.25",
                 before=r(f"precision/{method}/fp32", f"precision/{method}/bf16"),
                 after=r(f"precision/{method}/fp32+tf32", f"precision/{method}/bf16"))
    rows.add("Rein bf16 predict / Frozen bf16 predict", target="<= 1.15",
             before=r(f"predict/rein/{amp}/before", f"predict/frozen/{amp}"),
             after=r(f"predict/rein/{amp}", f"predict/frozen/{amp}"))
    for method in ("frozen", "rein", "fishertune", "full"):
        rows.add(f"{amp} step checkpointed / plain ({method})",
                 target="1.00 +- 0.03" if method == "frozen" else ("Full's + 0.1" if method != "full" else ""),
                 before=r(f"checkpointing/{method}/{amp}/ckpt-before", f"checkpointing/{method}/{amp}/none-before"
                         if f"checkpointing/{method}/{amp}/none-before" in cases else f"checkpointing/{method}/{amp}/none"),
                 after=r(f"checkpointing/{method}/{amp}/ckpt-after", f"checkpointing/{method}/{amp}/none"))
    rows.add(f"{amp} step checkpointed / plain (rein, checkpoint_hooks=keep)", target="decides its default",
             after=r(f"checkpointing/rein/{amp}/ckpt-keep", f"checkpointing/rein/{amp}/none"))
    # an estimate pass against a Full step in the same precision (Full: the precision cases above)
    for kind, full_case in (("after", "precision/full/fp32+tf32"), ("before", "precision/full/fp32"),
                            ("after/bf16", "precision/full/bf16")):
        entry, full = cases.get(f"estimate/{kind}"), cases.get(full_case)
        if gs.ok(entry) and gs.ok(full):
            section.data["figures"][f"estimate pass ({kind}) / Full step"] = round(entry["s_per_pass"]
                                                                                  / full["median_s"], 3)
    figures = section.data["figures"]
    rows.add("estimate pass / Full step, same precision", target="<= 1.5",
             before=figures.get("estimate pass (before) / Full step"),
             after=figures.get("estimate pass (after) / Full step"),
             bf16=figures.get("estimate pass (after/bf16) / Full step"))
    seconds = {k: cases.get(f"estimate/{k}", {}).get("paper_estimate_s") for k in ("before", "after", "after/bf16")}
    rows.add("paper's 100-batch estimate, s", target="<= 60", before=seconds["before"], after=seconds["after"],
             bf16=seconds["after/bf16"])


def _compile(check, section, rows, amp) -> None:
    """Whole-model torch.compile (train.compile: backbone and head, as the Trainer compiles) per method:
    the first step's seconds and the compiled / eager step ratio (eager: this section's plain step)."""
    from dgss.engine.speed import compile_segmentor

    methods = COMPILE_METHODS if not check.args.cpu_smoke else ("rein",)
    for method in methods:
        if not section.can_start(f"compile/{method}"):
            return
        built = check.build(section, method)
        if built is None:
            continue
        model, opt, _ = built
        compile_segmentor(model, backend=check.args.compile_backend)
        fn = check.step_fn(model, opt, amp)
        entry = section.run({f"compile/{method}/{amp}": fn}, warmup=1, repeats=check.repeats)[f"compile/{method}/{amp}"]
        eager = section.data["cases"].get(f"checkpointing/{method}/{amp}/none")
        rows.add(f"compiled / eager {amp} step ({method})", after=gs.ratio(entry, eager), target="< 1 to turn it on")
        del model, opt, fn
        torch._dynamo.reset()
        gs.free_memory(check.device)


def peak_anatomy(trace: list[dict], top: int = 15) -> dict:
    """What was allocated, and by which code, at the peak of ``torch.cuda.memory_allocated`` over a
    recorded stretch (``torch.cuda.memory._snapshot()["device_traces"][i]``): the trace replayed (alloc +,
    free_requested -), the blocks alive at its highest point grouped by the innermost frame in dgss (else
    in torch), largest first. Blocks allocated before the recording (weights, optimizer state) are not
    in the trace and not counted: what remains is what a step allocates, which the planner must foresee."""
    live: dict = {}
    current = peak = 0
    at_peak: dict = {}
    for event in trace:
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size", 0))
        if action == "alloc":
            live[addr] = event
            current += size
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_requested" and addr in live:
            del live[addr]
            current -= size
    groups: dict = {}
    for event in at_peak.values():
        frames = event.get("frames") or []
        where = next((f for f in frames if "/dgss/" in f.get("filename", "")), None) or \
            next((f for f in frames if "/torch/" in f.get("filename", "")), None)
        key = (f"{where['filename'].rsplit('/', 2)[-2]}/{where['filename'].rsplit('/', 1)[-1]}:{where['line']} "
               f"{where['name']}" if where else "(no Python frame)")
        count, total = groups.get(key, (0, 0))
        groups[key] = (count + 1, total + int(event.get("size", 0)))
    ranked = sorted(groups.items(), key=lambda item: -item[1][1])[:top]
    return {"peak_mib": round(peak / 2**20, 1),
            "by_code": [{"where": k, "blocks": n, "mib": round(b / 2**20, 1)} for k, (n, b) in ranked]}


def _memory_anatomy(check, section, model, opt, amp) -> None:
    """On CUDA: the allocations alive at the peak of two training steps, by code (:func:`peak_anatomy`), for
    the plan's gap on Full (the H200 measured 1.2-1.4 GiB more than dgss plan for Full and FisherTune in every
    variant, 0.17-0.2 GiB more for Frozen, Rein and LoRA: benchmarks/results/gpu_h200/)."""
    if check.device.type != "cuda" or not section.can_start("memory anatomy"):
        section.note("memory anatomy: CUDA only (torch.cuda.memory._record_memory_history)")
        return
    step = check.step_fn(model, opt, amp)
    step()  # the optimizer state exists before the recording
    torch.cuda.synchronize(check.device)
    torch.cuda.memory._record_memory_history(max_entries=500_000, context="alloc", stacks="python")
    try:
        step()
        step()
        torch.cuda.synchronize(check.device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][check.device.index or 0]
    section.data["figures"][f"memory anatomy (full, {amp}, two steps)"] = peak_anatomy(trace)


def speed_table(section: dict) -> list[str]:
    rows = section["figures"].get("rows", {})
    if not rows:
        return []
    lines = ["| figure | before | after | target | other |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        other = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("before", "after", "target"))
        cell = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {name} | {cell(row['before'])} | {cell(row['after'])} | {row['target']} | {other} |")
    return lines + [""]
