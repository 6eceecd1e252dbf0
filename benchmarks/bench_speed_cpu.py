"""CPU evidence for issue 38's changes (docs/speed.md): what can be counted or timed without a GPU.

    PYTHONPATH=src:benchmarks python benchmarks/bench_speed_cpu.py [--entries 4194304] [--repeats 5]

1. FisherTune's quantile: kthvalue, sort and bisection on one flat float32 tensor (the same value from
   each, checked), median seconds of ``--repeats``.
2. Rein's op counts per backbone forward, before issue 38 (gpu_check's legacy hooks) and after: GEMMs,
   dtype casts, under autocast bf16 and fp32, with and without autograd (a 4-block DINOv2-shaped ViT of
   width 256, M = 100 tokens).
3. Host reads (device syncs on a GPU) per FisherTune estimate pass, dense and streamed.
4. With ``--plan-vs-h200 METHODS``: dgss plan against the peaks the H200 measured (benchmarks/results/gpu_h200).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

GEMMS = ("aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm", "aten.matmul")


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func))
        return func(*args, **(kwargs or {}))

    def count(self, *names):
        return sum(1 for n in self.names if f"aten.{n}" in names)


def quantiles(entries: int, repeats: int) -> None:
    from dgss.tuning.fishertune.quantile import kth_smallest

    values = torch.rand(entries, generator=torch.Generator().manual_seed(0)).square()
    k = int(0.9 * (entries - 1)) + 1
    print(f"1. quantile of {entries:,} float32 entries (k = {k:,}), {torch.get_num_threads()} thread(s):")
    results = {}
    for method in ("kthvalue", "sort", "bisect"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results[method] = kth_smallest(values, k, method)
            times.append(time.perf_counter() - t0)
        print(f"   {method:9s} {statistics.median(times) * 1000:8.1f} ms")
    assert len(set(results.values())) == 1, results
    print(f"   the same value from all three: {results['kthvalue']!r}")


def rein_ops() -> None:
    import _gpu_speed
    from dgss.config import MethodConfig, ReinConfig
    from dgss.models.backbones import build_backbone
    from dgss.tuning import build_method

    torch.manual_seed(0)
    backbone = build_backbone("dinov2_s", img_size=128, depth=4, embed_dim=256, num_heads=4)
    method = build_method(MethodConfig(name="rein", rein=ReinConfig(num_tokens=100, lora_rank=16, query_dim=64)),
                          backbone)
    images = torch.randn(1, 3, 128, 128)
    layers = len(backbone.blocks)
    print(f"2. Rein's ops per forward of {layers} blocks (width 256, M = 100), Rein's share (the frozen "
          "backbone's ops subtracted):")
    print("   | pass | precision | GEMMs before | GEMMs after | casts before | casts after |")
    print("   |---|---|---|---|---|---|")

    def counted(grad: bool, bf16: bool, variant: str) -> Ops:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        legacy = _gpu_speed.legacy_rein(method) if variant == "before" else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), autocast, legacy:
            if variant == "frozen":
                method.detach_hooks()
            x = images.clone().requires_grad_(grad)  # the frozen backbone too has a backward (to its input)
            backbone(x)  # warm caches
            with Ops() as ops:
                out = backbone(x)
                if grad:
                    sum(o.float().square().mean() for o in out).backward()
            if variant == "frozen":
                method.attach(backbone)
        return ops

    for grad in (False, True):
        for bf16 in (False, True):
            frozen = counted(grad, bf16, "frozen")
            before, after = counted(grad, bf16, "before"), counted(grad, bf16, "after")
            g = lambda o: o.count(*GEMMS) - frozen.count(*GEMMS)  # noqa: E731
            c = lambda o: o.count("aten._to_copy") - frozen.count("aten._to_copy")  # noqa: E731
            print(f"   | {'training (fwd+bwd)' if grad else 'inference'} | {'bf16 autocast' if bf16 else 'fp32'} "
                  f"| {g(before)} | {g(after)} | {c(before)} | {c(after)} |")


def host_reads() -> None:
    from torch.overrides import TorchFunctionMode

    from dgss.tuning.fishertune.fisher import squared_gradient_sums

    class Reads(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__):
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    params = {f"w{i}": torch.randn(16, 16) for i in range(24)}
    x = torch.randn(4, 16)

    def loss(p, batch):
        h = batch["x"]
        for i in range(24):
            h = torch.tanh(h @ p[f"w{i}"])
        return h.square().mean()

    print("3. host reads per estimate pass, 24 eligible tensors:")
    for streamed in (False, True):
        Reads.count = 0
        with Reads():
            squared_gradient_sums(loss, params, [{"x": x}], streamed=streamed)
        print(f"   {'streamed' if streamed else 'dense':8s} {Reads.count} (before issue 38: "
              f"{1 + 24 if streamed else 24})")


def plan_vs_h200(methods: list[str]) -> None:
    """dgss plan (foreach AdamW, as measured) against the H200's training-section peaks (gpu_check run 1)."""
    import json

    from dgss.config import load_config
    from dgss.engine.memory_plan import Planner

    results = Path(__file__).resolve().parent / "results" / "gpu_h200" / "gpu_check_run1.json"
    cases = json.loads(results.read_text())["sections"]["training"]["cases"]
    print("4. dgss plan against the H200's measured peaks (training section of gpu_check_run1.json), MiB:")
    print("   | case | measured | planned | planned / measured | measured - planned |")
    print("   |---|---|---|---|---|")
    for method in methods:
        cfg = load_config(overrides=[f"method.name={method}", "method.fishertune.selection=random",
                                     "method.soma.start_block=8", "data.crop_size=[512,512]", "train.batch_size=4",
                                     "train.fused_adamw=false"])  # the run used foreach AdamW
        planner = Planner(cfg, device="cuda")
        for amp in ("fp32", "bf16"):
            for ckpt in ("no-ckpt", "ckpt"):
                entry = cases.get(f"{method}/{amp}/{ckpt}")
                if not entry or "peak_mib" not in entry:
                    continue
                plan = planner.plan(amp="none" if amp == "fp32" else amp, grad_checkpointing=ckpt == "ckpt")
                planned = plan.training_peak / 2**20
                print(f"   | {method}/{amp}/{ckpt} | {entry['peak_mib']:.0f} | {planned:.0f} | "
                      f"{planned / entry['peak_mib']:.3f} | {entry['peak_mib'] - planned:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=2**22)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan-vs-h200", metavar="METHODS",
                        help="also plan these methods (e.g. frozen,rein,full) against the H200's peaks (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quantiles(args.entries, args.repeats)
    rein_ops()
    host_reads()
    if args.plan_vs_h200:
        plan_vs_h200(args.plan_vs_h200.split(","))


if __name__ == "__main__":
    main()
