"""`dgss plan` on the safe side (issue 38): each term the planner adds beyond the meta-device probe, tested by
its mechanism: the allowances by device, foreach AdamW's temporary (the largest parameter group's, none for
fused), autocast's low-precision copies in bf16 and fp16, the gradients alive through accumulated
micro-batches, and a real CPU training step never above the plan."""

import pytest
import torch
from test_memory_plan import tiny

from dgss.engine.memory_plan import (CPU_PROCESS_OVERHEAD, CUBLAS_WORKSPACES, CUDA_ALLOCATOR_FRACTION, MIB,
                                     Planner)
from dgss.engine.memory_probe import EmulatedAutocast, LiveBytes, StepPeaks, planning_matcher

# a wide, shallow model on small images: the optimizer step, not the backward, is its peak
WIDE = "model.backbone_kwargs={depth: 2, embed_dim: 384, num_heads: 4}"


def _parts(plan) -> int:
    return (plan.weights + plan.optimizer + plan.communication + plan.gradients + plan.activations
            + plan.optimizer_step + plan.ema + plan.workspaces + plan.allocator)


def test_allowances_by_device_cublas_and_the_allocator_on_cuda_the_process_on_a_cpu():
    cfg = tiny("rein")
    cuda, cpu = Planner(cfg, device="cuda").plan(), Planner(cfg, device="cpu").plan()
    # CUDA: two cuBLAS workspaces of Hopper's default 32 MiB (the forward's thread and autograd's)
    assert CUBLAS_WORKSPACES == 64 * MIB and cuda.workspaces == CUBLAS_WORKSPACES
    step = cuda.gradients + cuda.activations + cuda.optimizer_step + cuda.communication
    assert cuda.allocator == round(CUDA_ALLOCATOR_FRACTION * step) > 0
    # a CPU: the process's own memory, a constant; no cuBLAS, no caching allocator
    assert cpu.workspaces == CPU_PROCESS_OVERHEAD and cpu.allocator == 0
    for plan in (cuda, cpu):
        assert plan.training_peak == _parts(plan)
    # DDP's buckets are allocated by the step too: the allocator's share grows with them
    ddp = Planner(cfg, device="cuda").plan(gpus=2)
    assert ddp.allocator == round(CUDA_ALLOCATOR_FRACTION * (step + ddp.communication))


def test_fishertune_estimate_carries_the_same_allowances():
    cfg = tiny("fishertune")
    for device in ("cuda", "cpu"):
        planner = Planner(cfg, device=device)
        e = planner.plan().estimate
        assert e["workspaces"] == (CUBLAS_WORKSPACES if device == "cuda" else CPU_PROCESS_OVERHEAD)
        step = e["sums"] + max(e["theta"] + e["passes"], e["data_scale"], e["selection"])
        assert e["allocator"] == (round(CUDA_ALLOCATOR_FRACTION * step) if device == "cuda" else 0)
        base = planner.param_bytes + planner.buffer_bytes + 3 * planner.head_grad_bytes
        assert e["peak"] == base + step + e["workspaces"] + e["allocator"]


def _adamw_temporary(groups: list[list[int]], **kind) -> int:
    """Bytes AdamW's second step allocates at once (its moments exist after the first), measured."""
    params = [[torch.randn(n, requires_grad=True) for n in sizes] for sizes in groups]
    optimizer = torch.optim.AdamW([{"params": p} for p in params], lr=1e-3, **kind)
    for p in (p for g in params for p in g):
        p.grad = torch.randn_like(p)
    optimizer.step()
    with LiveBytes() as tracker:
        optimizer.step()
    return tracker.phases[-1].total


def test_foreach_adamw_adds_the_largest_groups_temporary_and_fused_none():
    # measured: foreach takes the sqrt of one group's second moments at a time
    big, small = [3000, 1000], [500]
    assert _adamw_temporary([big, small], foreach=True) == 4 * sum(big)
    assert _adamw_temporary([big, small], foreach=False) <= 2 * 4 * max(big)
    cfg = tiny("full", 2, WIDE)
    planner = Planner(cfg, device="cuda")
    fused = planner.plan()
    planner.cfg.train.fused_adamw = False  # torch's default on CUDA: foreach
    foreach = planner.plan()
    temporary = max(planner.group_bytes)
    assert len(planner.group_bytes) > 1 and temporary < planner.grad_bytes
    assert fused.optimizer_step == 0 and foreach.optimizer_step == temporary
    # here the step is the peak: weights, moments, every gradient, the temporary and what the backward left
    after = planner.step_peaks("none", False, 2).after
    assert foreach.gradients == planner.grad_bytes and foreach.activations == after
    assert foreach.allocator == round(CUDA_ALLOCATOR_FRACTION * (planner.grad_bytes + temporary + after))
    assert foreach.training_peak == (foreach.weights + foreach.optimizer + planner.grad_bytes + temporary + after
                                     + CUBLAS_WORKSPACES + foreach.allocator)
    assert foreach.training_peak > fused.training_peak


def test_autocast_keeps_low_precision_copies_of_the_trained_weights_in_bf16_and_fp16():
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    weights = sum(p.numel() for p in layers.parameters())
    x = torch.randn(8, 64)
    for dtype in (torch.bfloat16, torch.float16):
        with LiveBytes() as tracker:
            with EmulatedAutocast(dtype):
                y = layers(x)
                # the input's copy, one output per layer and a 2-byte copy of every weight, kept for the step
                assert tracker.live == 2 * (x.numel() + 2 * y.numel() + weights)
            del y
            assert tracker.live == 0  # the copies die with the autocast region and the graph
    # the planner probes fp16 as it probes bf16 (same casts, same widths), and fp32 without casts
    cfg = tiny("full")
    planner = Planner(cfg, device="cuda")
    bf16, fp16, fp32 = (planner.step_peaks(amp, False, 2) for amp in ("bf16", "fp16", "none"))
    assert isinstance(fp16, StepPeaks) and fp16 == bf16 and fp16 != fp32


def test_accumulated_micro_batches_keep_every_gradient_alive():
    cfg = tiny("full", 4, "train.grad_accum=2")
    planner = Planner(cfg, device="cpu")
    plan = planner.plan()
    assert plan.grad_accum == 2 and plan.gradients == planner.grad_bytes
    # a smaller micro-batch for the same images per step: the accumulation follows
    assert planner.plan(batch_size=1).grad_accum == 4
    one = Planner(tiny("full"), device="cpu").plan()
    assert one.grad_accum == 1 and one.gradients < planner.grad_bytes
    # measured: the second micro-batch of a real step on CPU tensors never exceeds the plan's step part
    from dgss.tuning.model import build_segmentor

    torch.manual_seed(0)
    model = build_segmentor(cfg).train()
    images = torch.randn(2, 3, 64, 64)
    labels = (torch.arange(64) * 19 // 64).expand(2, 64, 64).contiguous()
    with planning_matcher():
        model(images, labels)["loss"].backward()  # the first micro-batch: gradients exist
        with LiveBytes() as tracker:
            x, y = images.clone(), labels.clone()
            model(x, y)["loss"].backward()
            del x, y
    grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
    assert 0.99 * planner.grad_bytes < grads <= planner.grad_bytes  # all but the ViT's unused final norm
    measured = grads + tracker.phases[0].total  # gradients existed before: not counted by the tracker
    assert measured <= plan.gradients + plan.activations <= 1.10 * measured


@pytest.mark.parametrize("method,fused", [("full", True), ("rein", True), ("full", False)])
def test_a_real_cpu_training_step_stays_within_the_plan(method, fused):
    """The third step of the trainer's loop (zero_grad, forward, backward, AdamW) on real CPU tensors: every
    byte it creates is within the plan's step part (gradients, activations, the optimizer's temporary), and
    the plan is at most 10% above it."""
    from dgss.engine.optim import build_optimizer
    from dgss.tuning.model import build_segmentor

    cfg = tiny(method, 2, WIDE, f"train.fused_adamw={str(fused).lower()}")
    plan = Planner(cfg, device="cpu").plan()
    torch.manual_seed(0)
    model = build_segmentor(cfg).train()
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    images = torch.randn(2, 3, 64, 64)
    labels = (torch.arange(64) * 19 // 64).expand(2, 64, 64).contiguous()

    def step():
        optimizer.zero_grad(set_to_none=True)
        x, y = images.clone(), labels.clone()  # the trainer's batch is new every step
        loss = model(x, y)["loss"]
        del x, y
        loss.backward()
        del loss
        optimizer.step()

    with planning_matcher():
        step()
        step()
        with LiveBytes() as tracker:
            step()
    measured = max(p.total for p in tracker.phases)
    planned = plan.gradients + plan.activations + plan.optimizer_step
    assert measured <= planned <= 1.10 * measured, (measured, planned)
