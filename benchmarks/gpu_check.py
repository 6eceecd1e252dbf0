"""One prepared GPU check (issue 18): every figure only a GPU can give, in one command under 10 minutes.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR          # on a CUDA machine, no install step
    python benchmarks/gpu_check.py --cpu-smoke --out DIR              # toy sizes on the CPU (the test's run)

Random weights, synthetic inputs. Writes DIR/gpu_check.json (after every case, so an interrupted run
keeps what it measured) and DIR/gpu_check.md, and prints the Markdown summary. Sections:

1. training   the papers' recipe shape (DINOv2-L as dgss builds it, patch 16 at 512, random init,
              512 x 512, batch 4, the full Mask2Former head of configs/_base_): step time, peak memory
              and hours for 40k iterations of frozen, rein, fishertune (random top-K, all of delta_max
              active), lora and full, in fp32 and bf16 autocast, with and without
              train.grad_checkpointing; Rein's backbone part against the adapter limit (fp32).
2. head       multi-scale deformable attention at the shapes the pixel decoder really calls it with:
              default (one grid_sample) against per-level and torch.compile, forward and forward +
              backward, and in a whole training step; its share of the step.
3. inference  sliding-window evaluation (dgss eval's path: Segmentor.inference + argmax) of 1024 x 2048
              images, images/s, for frozen and Rein; whole-image predict (dgss predict's path) at 512.
4. estimate   FisherTune's estimate through FisherTune.estimate / select: seconds per pass, per batch
              and per sample, and the share of a 40k schedule at the paper's 2 x 100 passes.
5. plan       `dgss plan` against torch.cuda.max_memory_allocated (issue 24): DINOv2-L methods at the 512
              recipe in fp32/bf16/checkpointed, FisherTune's estimate, and DINOv3-7B (the streamed estimate on
              one GPU, Rein with bf16 and checkpointing): planned / measured, target within 15%.
6. env        GPU, CUDA, torch, timm, Python, the command line.
7. speed      issue 38's table, before and after its changes (benchmarks/_gpu_speed.py): fp32 (with and
              without TF32) against bf16, Rein's backbone part against its FLOP floor, Rein's bf16 predict,
              checkpointing per method, FisherTune's estimate pass, fused AdamW, torch.compile per method.
              Run second (after env): the figures that decide the speed options' defaults.

Each section has a time budget (--budget-*): a case starts only while its section's budget lasts and
then repeats only while it lasts; what was skipped or shortened is recorded as "cut". The whole run is
held under --total-budget-s, and a watchdog ends the process at --hard-limit-s whatever happens.
Imports: torch, timm, numpy, scipy, safetensors, peft (LoRA) and what timm itself needs (PyYAML,
Pillow via torchvision, huggingface_hub); no matplotlib, tensorboard or OpenCV.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_plan  # noqa: E402  (the "plan" section: dgss plan against max_memory_allocated)
import _gpu_speed  # noqa: E402  (the "speed" section: issue 38's ratios before and after)
import _gpu_support as gs  # noqa: E402
import bench_methods as bm  # noqa: E402  (model building and the timed parts, shared with the CPU benchmark)

SECTIONS = ("training", "head", "inference", "estimate", "plan", "env", "speed")
# seconds per section; together 550, the default --total-budget-s (one device call of under 10 minutes)
BUDGETS = {"training": 120.0, "head": 30.0, "inference": 40.0, "estimate": 50.0, "plan": 100.0, "env": 10.0,
           "speed": 200.0}
METHODS = ("frozen", "rein", "fishertune", "lora", "full")
ITERS = 40_000
# The recipe (configs/_base_/schedule_512.yaml, dinov2-l.yaml, rein.yaml): the config defaults are these
# values; the empty backbone_kwargs undoes bench_methods' depth override, so DINOv2-L is built exactly
# as dgss builds it. Eval window and stride of the 512 recipe; images of Cityscapes' full 1024 x 2048.
FULL = dict(img=512, depth=24, batch=4, infer_hw=(1024, 2048), estimate_batches=8, warmup=2, repeats=5,
            overrides=["model.backbone_kwargs={}"])
SMOKE = dict(img=64, depth=2, batch=2, infer_hw=(128, 256), estimate_batches=2, warmup=1, repeats=2, overrides=[
    "model.backbone_kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "model.head.hidden_dim=32",
    "model.head.num_queries=8", "model.head.num_heads=2", "model.head.num_points=2",
    "model.head.pixel_decoder_layers=1", "model.head.pixel_decoder_ffn_dim=32", "model.head.decoder_layers=2",
    "model.head.decoder_ffn_dim=32", "model.head.num_points_loss=64", "method.rein.num_tokens=8",
    "method.rein.query_dim=32"])


class Check:
    """What every section needs: device, sizes, inputs and the model factory."""

    def __init__(self, args, report: gs.Report):
        self.args, self.report = args, report
        self.device = torch.device("cpu" if args.cpu_smoke else "cuda")
        self.size = SimpleNamespace(**(SMOKE if args.cpu_smoke else FULL))
        self.warmup = args.warmup if args.warmup is not None else self.size.warmup
        self.repeats = args.repeats if args.repeats is not None else self.size.repeats
        img = self.size.img
        self.size.overrides = self.size.overrides + [f"eval.crop_size=[{img},{img}]",
                                                     f"eval.stride=[{img * 2 // 3},{img * 2 // 3}]"]
        self.images, self.labels = bm.inputs(SimpleNamespace(batch=self.size.batch, img=img), self.device)

    def build(self, section: gs.Section, method: str, *extra: str):
        """bench_methods.build at this run's sizes: (model, whole-step AdamW, backbone-part AdamW); None
        (and the reason recorded) when the budget is spent or the build fails, e.g. out of memory."""
        name = f"{method}: build"
        if not section.can_start(name):
            return None
        spec = SimpleNamespace(backbone="dinov2_l", img=self.size.img, depth=self.size.depth,
                               grad_checkpointing=False, compile=False, compile_mode="default",
                               compile_backend=self.args.compile_backend,
                               overrides=[*self.size.overrides, *extra])
        try:
            return bm.build(spec, method, self.device)
        except gs.OOM_ERRORS + (RuntimeError, ValueError) as err:
            what = (str(err).splitlines() or [""])[0][:200]
            oom = isinstance(err, gs.OOM_ERRORS)
            section.record(name, status="oom" if oom else f"error: {type(err).__name__}: {what}")
            section.note(f"{name} failed: {type(err).__name__}")
            gs.free_memory(self.device)
            return None

    def amps(self, section: gs.Section):
        for amp in ("fp32", "bf16"):
            if amp == "bf16" and not gs.bf16_supported(self.device):
                section.record(f"bf16 on {self.device}", status="bf16 unsupported")
                section.note("bf16 autocast is not supported on this GPU: bf16 cases not run")
                continue
            yield amp

    def step_fn(self, model, opt, amp: str):
        ctx = lambda: gs.autocast(amp, self.device)  # noqa: E731
        return lambda: bm.whole_step(model, opt, self.images, self.labels, ctx)


def hours(entry: dict) -> dict:
    return {"hours_40k": round(entry["median_s"] * ITERS / 3600, 3)} if gs.ok(entry) else {}


def training(check: Check, section: gs.Section) -> None:
    limit_model = None
    for method in METHODS:
        built = check.build(section, method)
        if built is None:
            continue
        model, whole_opt, backbone_opt = built
        for ckpt in (False, True):
            model.backbone.set_grad_checkpointing(ckpt)  # what apply_speed_options does for the option
            for amp in check.amps(section):
                name = f"{method}/{amp}/{'ckpt' if ckpt else 'no-ckpt'}"
                entry = section.run({name: check.step_fn(model, whole_opt, amp)}, warmup=check.warmup,
                                    repeats=check.repeats)[name]
                entry.update(hours(entry))
        model.backbone.set_grad_checkpointing(False)
        if method == "frozen":
            # the adapter limit runs on the frozen backbone (bench_methods' definition); parked on the CPU
            # so that it does not count in Rein's peak memory
            limit_model = model.cpu()
        if method == "rein" and limit_model is not None:
            limit_model.to(check.device)
            with torch.no_grad():
                cotangents = [torch.randn_like(f) for f in limit_model.backbone(check.images)]
            parts = section.run({"backbone part/limit": lambda: bm.limit_part(limit_model, check.images, cotangents),
                                 "backbone part/rein": lambda: bm.backbone_part(model, backbone_opt, check.images,
                                                                                cotangents)},
                                warmup=check.warmup, repeats=check.repeats)
            section.data["figures"]["rein_backbone_part_x_limit"] = gs.ratio(parts["backbone part/rein"],
                                                                            parts["backbone part/limit"])
            limit_model = cotangents = None
        del model, whole_opt, backbone_opt
        gs.free_memory(check.device)
    cases, figures = section.data["cases"], section.data["figures"]
    figures["step_x_full"], figures["peak_x_full"] = {}, {}
    for name, entry in cases.items():
        method, _, rest = name.partition("/")
        if method in METHODS and gs.ok(entry):
            figures["step_x_full"][name] = gs.ratio(entry, cases.get(f"full/{rest}"))
            figures["peak_x_full"][name] = gs.ratio(entry, cases.get(f"full/{rest}"), "peak_mib")


def head(check: Check, section: gs.Section) -> None:
    from dgss.models.mask2former import deformable_attention as da

    built = check.build(section, "frozen")
    if built is None:
        return
    model, whole_opt, _ = built
    calls, default = [], da.multi_scale_deformable_attention

    def record(value, shapes, locations, weights):
        calls.append((value.shape, list(shapes), locations.shape))
        return default(value, shapes, locations, weights)

    with torch.no_grad(), mock.patch.object(da, "multi_scale_deformable_attention", record):
        model(check.images)
    value_shape, shapes, loc_shape = calls[0]
    section.data["figures"].update(calls_per_step=len(calls), value_shape=list(value_shape), spatial_shapes=shapes,
                                   locations_shape=list(loc_shape))
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(value_shape, generator=gen).to(check.device).requires_grad_(True)
    locations = (torch.rand(loc_shape, generator=gen) * 1.2 - 0.1).to(check.device).requires_grad_(True)
    weights = torch.rand(loc_shape[:-1], generator=gen).flatten(-2).softmax(-1).view(loc_shape[:-1])
    weights = weights.to(check.device).requires_grad_(True)
    grad = torch.randn(value_shape[0], loc_shape[1], value_shape[2] * value_shape[3], generator=gen).to(check.device)
    paths = {"default": da.multi_scale_deformable_attention, "per-level": da.multi_scale_deformable_attention_per_level}
    if section.can_start("torch.compile: first call"):
        try:
            compiled = torch.compile(da.multi_scale_deformable_attention, dynamic=False,
                                     backend=check.args.compile_backend)
            t0 = time.perf_counter()
            torch.autograd.backward(compiled(value, shapes, locations, weights), grad)
            gs.sync(check.device)
            section.data["figures"]["compile_first_call_s"] = round(time.perf_counter() - t0, 2)
            with torch.no_grad():
                diff = (compiled(value, shapes, locations, weights)
                        - da.multi_scale_deformable_attention(value, shapes, locations, weights)).abs().max()
            section.data["figures"]["compile_max_abs_diff"] = float(diff)
            paths["compile"] = compiled
        except Exception as err:  # noqa: BLE001
            section.note(f"torch.compile ({check.args.compile_backend}) failed: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}")

    def fwd(fn):
        return lambda: fn(value, shapes, locations, weights)

    def fwd_bwd(fn):
        return lambda: torch.autograd.backward(fn(value, shapes, locations, weights), grad)

    with torch.no_grad():
        section.run({f"{k}/forward": fwd(f) for k, f in paths.items()}, warmup=check.warmup, repeats=check.repeats)
    section.run({f"{k}/forward+backward": fwd_bwd(f) for k, f in paths.items()}, warmup=check.warmup,
                repeats=check.repeats)
    for k, fn in paths.items():  # the frozen recipe step (fp32: the recipe's train.amp=none) with each path
        with mock.patch.object(da, "multi_scale_deformable_attention", fn):
            section.run({f"{k}/step": check.step_fn(model, whole_opt, "fp32")}, warmup=check.warmup,
                        repeats=check.repeats)
    cases, figures = section.data["cases"], section.data["figures"]
    for k in list(paths)[1:]:
        for part in ("forward", "forward+backward", "step"):
            figures[f"{k}/{part} x default"] = gs.ratio(cases.get(f"{k}/{part}"), cases.get(f"default/{part}"))
    share = gs.ratio(cases.get("default/forward+backward"), cases.get("default/step"))
    figures["share_of_step"] = round(share * len(calls), 4) if share is not None else None
    del model, whole_opt
    gs.free_memory(check.device)


def inference(check: Check, section: gs.Section) -> None:
    from dgss.models.segmentor import sliding_windows
    from dgss.predict.predictor import tta_inference

    height, width = check.size.infer_hw
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, height, width, generator=gen).to(check.device)
    single = check.images[:1]
    for method in ("frozen", "rein"):
        built = check.build(section, method)
        if built is None:
            continue
        model = built[0].eval()
        crop, stride = model.eval_cfg.crop_size, model.eval_cfg.stride
        section.data["figures"]["windows_per_image"] = len(sliding_windows(height, width, crop, stride))
        for amp in check.amps(section):
            ctx = lambda: _no_grad_autocast(amp, check.device)  # noqa: E731
            # dgss eval: Segmentor.inference in eval.mode (slide), argmax, labels to the host
            slide = section.run({f"{method}/{amp}/slide": lambda: model.inference(image, out_size=(height, width))
                                 .argmax(1).cpu()}, warmup=1, repeats=check.repeats, context=ctx)
            entry = slide[f"{method}/{amp}/slide"]
            if gs.ok(entry):
                entry["images_per_s"] = round(1 / entry["median_s"], 4)
            # dgss predict: tta_inference in whole mode (dgss predict itself runs fp32)
            section.run({f"{method}/{amp}/predict": lambda: tta_inference(model, single, mode="whole")},
                        warmup=1, repeats=check.repeats, context=ctx)
        del model
        gs.free_memory(check.device)
    cases = section.data["cases"]
    for amp in ("fp32", "bf16"):
        for kind in ("slide", "predict"):
            section.data["figures"][f"rein/{amp}/{kind} time x frozen"] = gs.ratio(cases.get(f"rein/{amp}/{kind}"),
                                                                                   cases.get(f"frozen/{amp}/{kind}"))


def _no_grad_autocast(amp, device):
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(gs.autocast(amp, device))
    return stack


def estimate(check: Check, section: gs.Section) -> None:
    batches_n = check.size.estimate_batches
    built = check.build(section, "fishertune", "method.fishertune.selection=drfim",
                        f"method.fishertune.num_batches={batches_n}")
    if built is None:
        return
    model, whole_opt, _ = built
    method = model.method

    scores = {}
    figures = section.data["figures"]
    paper_passes = 2 * type(method.cfg)().num_batches  # the paper's 2 x 100 passes (FisherTuneConfig default)
    figures.update(batches_per_estimate=batches_n, passes_per_estimate=2 * batches_n, paper_passes=paper_passes)
    for per_sample in (False, True):
        kind = "per-sample" if per_sample else "per-batch"
        method.cfg = dataclasses.replace(method.cfg, per_sample=per_sample)

        def run():
            scores["last"] = method.estimate(model, gs.alternating_batches(check), seed=0)

        # one warm-up for both (the per-sample run follows the warmed-up per-batch one)
        entry = section.run({f"estimate/{kind}": run}, warmup=0 if per_sample else 1,
                            repeats=max(1, check.repeats // 2))[f"estimate/{kind}"]
        if gs.ok(entry):
            # a "pass" is x or x' of one batch (per sample: the batch's single-image passes together), so
            # the paper's 2 x 100 of them scale the same way in both modes
            entry["s_per_pass"] = entry["median_s"] / (2 * batches_n)
            entry["passes_counted"] = getattr(method, "estimation_passes", None)
    if "last" in scores:
        section.run({"select": lambda: method.select(scores["last"], seed=0)}, warmup=0, repeats=1)
    method.num_active.fill_(method.capacity)  # stage 3 at delta_max, as in the training section
    section.run({"train step/fp32": check.step_fn(model, whole_opt, "fp32")}, warmup=check.warmup,
                repeats=check.repeats)
    cases = section.data["cases"]
    step, select = cases.get("train step/fp32"), cases.get("select")
    for kind in ("per-batch", "per-sample"):
        entry = cases.get(f"estimate/{kind}")
        if gs.ok(entry) and gs.ok(step):
            seconds = entry["s_per_pass"] * paper_passes + (select["median_s"] if gs.ok(select) else 0.0)
            figures[f"{kind}: paper estimate s"] = round(seconds, 2)
            figures[f"{kind}: paper estimate in iterations"] = round(seconds / step["median_s"], 1)
            figures[f"{kind}: share of 40k"] = round(seconds / step["median_s"] / ITERS, 6)
    del model, whole_opt, scores
    gs.free_memory(check.device)


def environment(check: Check, section: gs.Section) -> None:
    import timm

    env = {"command": check.report.data["meta"]["command"], "python": platform.python_version(),
           "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(check.device), "cpu_threads": torch.get_num_threads(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                   gpus=torch.cuda.device_count())
    section.data["figures"].update(env)


RUNNERS = {"training": training, "head": head, "inference": inference, "estimate": estimate,
           "plan": _gpu_plan.plan_section, "env": environment, "speed": _gpu_speed.speed_section}
# env first: cheap, and kept if a later one hangs; speed next: its figures decide the speed options' defaults
ORDER = ("env", "speed", "training", "head", "inference", "estimate", "plan")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section at toy sizes on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--section-budget-s", type=float, help="one budget for every section (overrides --budget-*)")
    for name, seconds in BUDGETS.items():
        parser.add_argument(f"--budget-{name}", type=float, default=seconds, help=f"seconds (default {seconds:.0f})")
    parser.add_argument("--total-budget-s", type=float, default=550.0, help="no section starts after this")
    parser.add_argument("--hard-limit-s", type=float, default=585.0,
                        help="the watchdog ends the run this long after it started (imports not counted)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per case (default 2; smoke 1)")
    parser.add_argument("--repeats", type=int, help="timed runs per case (default 5; smoke 2)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; smoke 1)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu_smoke else "inductor")
    return args


def run_section(name: str, check: Check, args, t_start: float) -> None:
    budget = args.section_budget_s if args.section_budget_s is not None else getattr(args, f"budget_{name}")
    budget = min(budget, args.total_budget_s - (time.perf_counter() - t_start))
    section = gs.Section(name, max(budget, 0.0), check.report, check.device)
    try:
        RUNNERS[name](check, section)
    except Exception as err:  # noqa: BLE001 (one failed section must not lose the others)
        section.note(f"section failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        section.data["failed"] = True
        gs.free_memory(check.device)
    section.finish()
    cut = " (cut)" if section.data["cut"] else ""
    print(f"gpu_check: {name} done in {section.elapsed():.1f} s{cut}", flush=True)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False); run on a GPU machine, or "
              "pass --cpu-smoke for the toy-size CPU run", file=sys.stderr)
        return 2
    if args.threads or args.cpu_smoke:
        torch.set_num_threads(args.threads or 1)
    size = SMOKE if args.cpu_smoke else FULL
    meta = {"command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_smoke": args.cpu_smoke,
            "sizes": {k: v for k, v in size.items() if k != "overrides"}, "iterations": ITERS}
    report = gs.Report(Path(args.out), meta)
    summary = lambda: gs.markdown(report.data, SECTIONS, METHODS)  # noqa: E731
    write_md = lambda: (Path(args.out) / "gpu_check.md").write_text(summary())  # noqa: E731
    watchdog = gs.start_watchdog(args.hard_limit_s - (time.perf_counter() - t_start), report, write_md)
    try:
        check = Check(args, report)
        for name in ORDER:
            if name in args.sections:
                run_section(name, check, args, t_start)
    finally:
        watchdog.cancel()  # also when a test runs main() in-process and it fails
    report.data["meta"]["total_s"] = round(time.perf_counter() - t_start, 1)
    path = report.save()
    write_md()
    print(summary())
    print(f"gpu_check: wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
