"""How much memory a training run takes per process, before it runs: ``dgss plan``.

    plan = plan_memory(cfg, gpus=8, gpu_memory=80 * GIB)
    plan.total_bytes, plan.fits, plan.change        # the per-process peak, the verdict, what makes it fit

Exact counts on the meta device at full size (nothing allocated): weights and buffers, gradients and
AdamW's two moments of every trainable tensor (fp32, as dgss trains). Activations are measured, not
modelled: one step of the same config at two or three small depths on the meta device
(:mod:`.memory_probe`), each phase's peak scaled linearly to the full number of blocks (for SoMA,
frozen and tuned blocks separately). bf16 is CUDA autocast's (emulated on meta); the optimizer step's
transient is AdamW's temporary: none for fused AdamW (a GPU's default, ``train.fused_adamw``), one
state-sized for foreach (a CPU's, FSDP's), two of the largest tensor's for torch's per-tensor loop.

Several processes: DDP adds its gradient buckets (a gradient-sized copy); FSDP (``train.parallel:
fsdp``) divides weights, gradients and state by the process count and adds the two blocks it holds
gathered at a time (modelled, not probed: the activations are the same as without sharding).

FisherTune's estimate (stage 2) has its own peak: weights, the head's state, the sums of F(x) and
F(x') and the sampled theta (4 bytes per eligible entry each), then the largest of a probed estimation
pass, the data scale's quantile and the selection (streamed: one tensor at a time and a running top-k of
K entries; dense: every entry concatenated, three score-sized buffers).

What no shape gives is allowed for, by name, on the safe side (each constant below says where its value
comes from): on a GPU the cuBLAS workspaces of the forward's and the backward's threads and a fraction of
the step's allocations for the caching allocator; on a CPU the process's own memory besides its tensors.
With ``train.grad_accum`` > 1 the micro-batches after the first run with every gradient alive.

``fits`` compares the larger peak with the GPU's memory less a reserve (CUDA context, allocator
slack): 5%, at least 1 GiB. ``change`` is the first of a fixed list of changes that makes it fit:
activation checkpointing, FSDP, bf16, smaller micro-batches with gradient accumulation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .memory_probe import Peak, StepPeaks, probe_estimate_pass, probe_training_step

__all__ = ["GIB", "MIB", "MemoryPlan", "plan_memory", "parse_memory", "usable_memory", "Planner",
           "CUBLAS_WORKSPACES", "CUDA_ALLOCATOR_FRACTION", "CPU_PROCESS_OVERHEAD"]

GIB = 2**30
MIB = 2**20

# The allowances: memory a process holds that no shape on the meta device shows. Each is the measured or
# documented size of a mechanism, not a fit to one run's gap; docs/performance.md shows them against the runs.
#
# cuBLAS keeps one workspace per (handle, stream) and allocates it through PyTorch's caching allocator, so it
# is part of torch.cuda.max_memory_allocated. Handles are per thread, and a training step drives cuBLAS from
# two: the forward's and autograd's device thread, which runs the backward. PyTorch's default workspace is
# 32 MiB on Hopper (sm90) and 8.125 MiB before it (ATen's CublasHandlePool.cpp; CUBLAS_WORKSPACE_CONFIG
# changes it): planned at the larger size.
CUBLAS_WORKSPACES = 2 * 32 * MIB
# What CUDA's caching allocator counts beyond the tensors' own bytes, with what kernels allocate inside
# themselves through it (the attention backward's fp32 accumulators, cuDNN's convolution workspace): every
# block is rounded up to 512 bytes, and a cached block up to 1 MiB larger than a request is handed out whole.
# It depends on the order of allocations, not on shapes alone: an allowance of 1% of what the step allocates
# and frees (activations, gradients, the optimizer's temporaries, communication buffers). Its value: the H200
# run (benchmarks/results/gpu_h200/gpu_check_run2.json, the cases no earlier case's memory was left in) was
# 74-90 MiB above the tensors this planner counts, 10-26 MiB (0.1-0.3% of the step) beyond the cuBLAS
# workspaces; 1% covers three times that and adds under 1% to a plan.
CUDA_ALLOCATOR_FRACTION = 0.01
# A CPU process's memory that is no tensor the step creates: the kernels' scratch inside oneDNN and MKL calls,
# glibc's arenas, the autograd graph's nodes and Python's objects of the step. benchmarks/bench_plan.py
# measured it at 44-59 MiB on every case, DINOv2-S to DINOv2-L (a constant, not a share of the model); the
# allowance covers that with a margin for the run-to-run spread of resident memory.
CPU_PROCESS_OVERHEAD = 96 * MIB


def parse_memory(text: str) -> int:
    """"80GB", "141 GB", "80GiB", "24G" -> bytes (GB = GiB = 2^30, as GPU memory is quoted)."""
    value = str(text).strip().upper().replace(" ", "")
    for suffix in ("GIB", "GB", "G"):
        if value.endswith(suffix):
            value = value[: -len(suffix)]
            break
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"GPU memory must look like 80GB, got {text!r}") from None
    if not number > 0:
        raise ValueError(f"GPU memory must be positive, got {text!r}")
    return int(number * GIB)


def usable_memory(total: int) -> int:
    """What a training process can allocate of ``total`` (5% or at least 1 GiB held back)."""
    return total - max(GIB, total // 20)


@dataclass
class MemoryPlan:
    """Per-process memory of one configuration (bytes)."""

    amp: str
    grad_checkpointing: bool
    parallel: str
    gpus: int
    batch_size: int
    weights: int
    gradients: int  # alive at the training peak
    optimizer: int
    activations: int  # activations and temporaries at the training peak
    communication: int  # DDP buckets, or FSDP's gathered blocks and unsharded gradients
    optimizer_step: int  # foreach AdamW's temporary (part of the peak when the step is the peak)
    training_peak: int
    ema: int = 0  # train.ema: one copy of the trained tensors (dgss.engine.ema), part of training_peak
    # the allowances (part of training_peak): CUDA: the cuBLAS workspaces; a CPU: the process's own memory
    workspaces: int = 0
    allocator: int = 0  # CUDA: the caching allocator's share of the step's allocations
    grad_accum: int = 1  # micro-batches per step: above 1, every gradient is alive through each micro-batch
    estimate: dict = field(default_factory=dict)  # FisherTune's stage 2: parts and "peak"; {} otherwise
    gpu_memory: Optional[int] = None
    change: Optional[str] = None
    variants: list = field(default_factory=list)
    # whether train.grad_checkpointing is worth its time here (issue 38), given gpu_memory: "not needed"
    # (the run fits without it), "needed" (it fits only with it), "not enough" (neither), "no effect"
    # (nothing in the backbone trains: the trainer skips it); None without a GPU size
    checkpointing: Optional[str] = None

    @property
    def estimate_peak(self) -> int:
        return int(self.estimate.get("peak", 0))

    @property
    def total_bytes(self) -> int:
        return max(self.training_peak, self.estimate_peak)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None else self.total_bytes <= usable_memory(self.gpu_memory)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits, estimate_peak=self.estimate_peak,
                   usable_bytes=None if self.gpu_memory is None else usable_memory(self.gpu_memory))
        return out


def _probe(kind: str, cfg, amp: str, target: str) -> StepPeaks:
    """One probe (a function of its own so that a process pool can run it)."""
    if kind == "step":
        return probe_training_step(cfg, amp=amp, target=target)
    return probe_estimate_pass(cfg, target=target)


def _workers(jobs: int) -> int:
    """Processes for ``jobs`` probes: DGSS_PLAN_WORKERS, else the cores but one (at most 8), 1 on 2 cores."""
    value = os.environ.get("DGSS_PLAN_WORKERS")
    if value:
        try:
            return max(1, min(int(value), jobs))
        except ValueError:
            raise ValueError(f"DGSS_PLAN_WORKERS must be a whole number of processes, got {value!r}") from None
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else max(1, min(cores - 1, 8, jobs))


def _fit(points: list[tuple[tuple[int, int], StepPeaks]], target: tuple[int, int]) -> StepPeaks:
    """Each phase's total and gradients, and what the backward leaves alive, as c + n_frozen f + n_tuned t,
    from probes at (n_frozen, n_tuned)."""
    if len(points) == 1:
        return points[0][1]
    (f0, t0), (_, t1) = points[0][0], points[1][0]

    def scaled(value) -> int:
        r = {shape: value(peaks) for shape, peaks in points}
        per_tuned = (r[points[1][0]] - r[points[0][0]]) / (t1 - t0)
        per_frozen = r[points[2][0]] - r[points[0][0]] if len(points) > 2 else 0.0
        return max(0, round(r[points[0][0]] + (target[0] - f0) * per_frozen + (target[1] - t0) * per_tuned))

    head, backbone = (Peak(scaled(lambda p, ph=ph: getattr(p, ph).total), scaled(lambda p, ph=ph: getattr(p, ph).grads))
                      for ph in ("head", "backbone"))
    return StepPeaks(head, backbone, scaled(lambda p: p.after))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Planner:
    """Plans ``cfg`` and its variants; probes are cached, so a table of variants costs few probes."""

    def __init__(self, cfg, *, device: str = "cuda"):
        from ..tuning.model import build_segmentor

        self.cfg = copy.deepcopy(cfg)
        self.cfg.model.weights = None  # shapes only: no file is read
        self.device = device
        self._probes: dict = {}
        with torch.device("meta"):
            model = build_segmentor(self.cfg)
        groups = model.parameter_groups(1.0, 0.0, 1.0)
        trainable = list({id(p): p for g in groups for p in g["params"]}.values())
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in trainable)
        self.param_bytes = _nbytes(model.parameters())
        self.buffer_bytes = _nbytes(model.buffers())
        self.grad_bytes = _nbytes(trainable)
        self.largest_trainable = max((_nbytes([p]) for p in trainable), default=0)
        # AdamW steps one parameter group at a time (the optimizer's groups, as dgss.engine.optim builds them)
        train = self.cfg.train
        real_groups = model.parameter_groups(train.lr, train.weight_decay, self.cfg.method.backbone_lr_mult)
        self.group_bytes = [_nbytes(g["params"]) for g in real_groups if g["params"]]
        blocks = model.backbone.blocks
        self.depth = len(blocks)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        self.root_bytes = _nbytes(p for p in model.parameters() if id(p) not in in_blocks)
        self.block_bytes = max((_nbytes(b.parameters()) for b in blocks), default=0)
        self.block_grad_bytes = max((_nbytes(p for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
        self.head_grad_bytes = _nbytes(p for p in model.head.parameters() if p.requires_grad)
        if model.backbone.neck is not None:
            self.head_grad_bytes += _nbytes(p for p in model.backbone.neck.parameters() if p.requires_grad)
        from .speed import checkpointing_needed

        self.checkpointing_effective = checkpointing_needed(model)
        method = model.method
        self.fishertune = None
        if method.name == "fishertune":
            self.fishertune = dict(eligible=method.num_eligible, capacity=method.capacity,
                                   largest=max(t.numel for t in method.tensors))
        self.prefix = cfg.method.soma.start_block if cfg.method.name == "soma" else 0
        indices = model.backbone.out_indices
        # feature blocks among the frozen prefix and among the tuned blocks: the probes keep both counts (a
        # feature's gradient waits for its block's backward, so where features leave changes the peak)
        self.frozen_outputs = sum(1 for i in indices if i < self.prefix)
        self.tuned_outputs = len(indices) - self.frozen_outputs
        self.scalable = (model.backbone.family in ("vit", "eva") and self.tuned_outputs >= 1
                         and self.depth > max(self.frozen_outputs, 1) + self.tuned_outputs + 1)
        del model

    # ------------------------------------------------------------------ probes

    def _small(self, n_frozen: int, n_tuned: int, **train) -> object:
        cfg = copy.deepcopy(self.cfg)
        for key, value in train.items():
            setattr(cfg.train, key, value)
        if self.scalable:
            depth = n_frozen + n_tuned
            cfg.model.backbone_kwargs = {**cfg.model.backbone_kwargs, "depth": depth}
            # frozen-prefix features first; tuned ones on the first tuned blocks, the last on the last block
            tuned = [n_frozen + i for i in range(self.tuned_outputs - 1)] + [depth - 1]
            cfg.model.out_indices = list(range(self.frozen_outputs)) + tuned
            if cfg.method.name == "soma":
                cfg.method.soma.start_block = n_frozen
        return cfg

    def _shapes(self) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        target = (self.prefix, self.depth - self.prefix)
        if not self.scalable:
            return [target], target
        frozen, tuned = (max(self.frozen_outputs, 1) if self.prefix else 0), self.tuned_outputs + 1
        if self.prefix == 0:
            return [(0, tuned), (0, tuned + 1)], target
        return [(frozen, tuned), (frozen, tuned + 1), (frozen + 1, tuned)], target

    def prefetch(self, keys: list[tuple], workers: Optional[int] = None) -> None:
        """Run the probes of ``keys`` (("step", amp, checkpointing, batch) or ("estimate",)) not run yet,
        in parallel processes when the machine has cores to spare (``DGSS_PLAN_WORKERS`` sets how many)."""
        shapes, target = self._shapes()
        jobs = []
        for key in dict.fromkeys(keys):
            if key in self._probes:
                continue
            for shape in shapes:
                if key[0] == "step":
                    jobs.append((key, shape, "step", self._small(*shape, grad_checkpointing=key[2], batch_size=key[3]),
                                 key[1]))
                else:
                    jobs.append((key, shape, "estimate", self._small(*shape, grad_checkpointing=False), "none"))
        if not jobs:
            return
        workers = _workers(len(jobs)) if workers is None else workers
        args = ([j[2] for j in jobs], [j[3] for j in jobs], [j[4] for j in jobs], [self.device] * len(jobs))
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_probe, *args))
        else:
            results = [_probe(*a) for a in zip(*args)]
        points: dict = {}
        for (key, shape, *_), peaks in zip(jobs, results):
            points.setdefault(key, []).append((shape, peaks))
        for key, found in points.items():
            self._probes[key] = _fit(found, target)

    def step_peaks(self, amp: str, grad_checkpointing: bool, batch_size: int) -> StepPeaks:
        key = ("step", amp, grad_checkpointing, batch_size)
        self.prefetch([key], workers=1)
        return self._probes[key]

    def estimate_pass(self) -> StepPeaks:
        self.prefetch([("estimate",)], workers=1)
        return self._probes[("estimate",)]

    # ------------------------------------------------------------------ plans

    def plan(self, *, amp: Optional[str] = None, grad_checkpointing: Optional[bool] = None,
             parallel: Optional[str] = None, gpus: int = 1, batch_size: Optional[int] = None,
             gpu_memory: Optional[int] = None) -> MemoryPlan:
        train = self.cfg.train
        amp = train.amp if amp is None else amp
        amp = "none" if self.device == "cpu" else amp  # the trainer runs fp32 on a CPU
        ckpt = train.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
        parallel = (train.parallel if parallel is None else parallel) if gpus > 1 else "ddp"
        batch = train.batch_size if batch_size is None else batch_size
        # the same images per step: a smaller micro-batch takes more of them (as _describe proposes)
        accum = max(1, train.grad_accum * train.batch_size // batch)
        peaks = self.step_peaks(amp, ckpt, batch)
        shards = gpus if parallel == "fsdp" else 1
        weights = -(-self.param_bytes // shards) + self.buffer_bytes
        optimizer = -(-2 * self.grad_bytes // shards)
        communication = 0
        if gpus > 1 and parallel == "ddp":
            communication = self.grad_bytes  # DDP's buckets
        elif shards > 1:  # FSDP: the unsharded root, two blocks gathered, two blocks' gradients to reduce
            communication = self.root_bytes + 2 * self.block_bytes + 2 * self.block_grad_bytes
        if accum > 1:
            # micro-batches after the first run forward and backward with the earlier ones' gradients alive
            # (the new ones are added into them): every gradient, plus the most else a phase holds
            phase = max(peaks.head, peaks.backbone, key=lambda p: p.total - p.grads)
            grads_at_peak = -(-self.grad_bytes // shards)
        else:
            phase = max(peaks.head, peaks.backbone, key=lambda p: p.total)
            grads_at_peak = -(-phase.grads // shards)
        activations = phase.total - phase.grads
        transient = self._optimizer_transient(shards)
        # the optimizer step: every gradient, its temporary, and what the backward left alive besides them
        step = -(-self.grad_bytes // shards) + transient + peaks.after
        if step > grads_at_peak + activations:  # the optimizer step is the peak
            grads_at_peak, activations = -(-self.grad_bytes // shards), peaks.after
        else:
            transient = 0
        # the weight EMA keeps one copy of every trained tensor in its dtype on every process (refused under FSDP)
        ema = self.grad_bytes if self.cfg.train.ema.enabled else 0
        workspaces, allocator = self._allowances(grads_at_peak + activations + transient + communication)
        training = (weights + optimizer + communication + grads_at_peak + activations + transient + ema
                    + workspaces + allocator)
        plan = MemoryPlan(amp, ckpt, parallel, gpus, batch, weights, grads_at_peak, optimizer, activations,
                          communication, transient, training, ema=ema, gpu_memory=gpu_memory,
                          workspaces=workspaces, allocator=allocator, grad_accum=accum)
        if self.fishertune is not None:
            plan.estimate = self.estimate_plan(gpus if parallel == "ddp" else 1)
        return plan

    def _allowances(self, step_bytes: int) -> tuple[int, int]:
        """(workspaces, allocator): what no shape shows, for a step that allocates and frees ``step_bytes``
        (the constants' comments say where each value comes from). CUDA: the cuBLAS workspaces and the
        caching allocator's share; a CPU: the process's own memory besides its tensors."""
        if self.device == "cpu":
            return CPU_PROCESS_OVERHEAD, 0
        return CUBLAS_WORKSPACES, round(CUDA_ALLOCATOR_FRACTION * step_bytes)

    def _optimizer_transient(self, shards: int) -> int:
        """AdamW's temporary at its step, by the implementation dgss.engine.optim picks (train.fused_adamw):
        fused (CUDA, unsharded) works in place; foreach (a CPU, FSDP, or fused_adamw off on CUDA) makes the
        square root of every second moment of a parameter group at once (torch._foreach_sqrt), freed before
        the next group: the largest group's bytes; torch's per-tensor loop on a CPU (fused_adamw off) two of
        the largest tensor's."""
        fused = getattr(self.cfg.train, "fused_adamw", False)
        if self.device != "cpu" and fused and shards == 1:
            return 0
        if self.device == "cpu" and not fused:
            return 2 * self.largest_trainable
        return -(-max(self.group_bytes, default=0) // shards)

    def estimate_plan(self, gpus: int) -> dict:
        """FisherTune's stage-2 peak: weights, the head's AdamW state and last gradients, then the largest
        of the estimation passes, the data scale and the selection. Under FSDP the estimate is not sharded:
        it runs in one process (``dgss fisher``), planned with ``gpus=1``."""
        ft, cfg = self.fishertune, self.cfg.method.fishertune
        n, k = ft["eligible"], ft["capacity"]
        base = self.param_bytes + self.buffer_bytes + 3 * self.head_grad_bytes
        if gpus > 1 and self.cfg.train.parallel == "ddp":
            base += self.grad_bytes  # DDP's buckets exist from the start
        if cfg.selection == "random":  # no passes: uniform scores, ranked at once
            workspaces, allocator = self._allowances(8 * n + 12 * k)
            return {"sums": 0, "theta": 0, "passes": 0, "data_scale": 0, "selection": 8 * n + 12 * k,
                    "workspaces": workspaces, "allocator": allocator,
                    "peak": base + 8 * n + 12 * k + workspaces + allocator}
        sums = (1 if cfg.selection == "fisher" else 2) * 4 * n
        theta = 4 * n if cfg.variational else 0
        peaks = self.estimate_pass()
        passes = max(peaks.head.total, peaks.backbone.total)
        if cfg.estimate_memory == "streamed":
            # running top-k (values, positions, their merge) and one tensor's scores; the data scale's
            # quantile one tensor at a time (its copy, positive entries and kthvalue's sort buffers)
            selection, data_scale = 48 * k + 24 * ft["largest"], 24 * ft["largest"]
        else:  # the two terms, their sum and its concatenation; every positive entry concatenated and sorted
            selection, data_scale = 12 * n + 16 * k, 16 * n
        step = sums + max(theta + passes, data_scale, selection)
        workspaces, allocator = self._allowances(step)
        return {"sums": sums, "theta": theta, "passes": passes, "data_scale": data_scale, "selection": selection,
                "workspaces": workspaces, "allocator": allocator, "peak": base + step + workspaces + allocator}


def _changes(gpus: int, batch: int) -> list[dict]:
    """Candidate changes, fewest and least intrusive first (results unchanged before numerics change)."""
    options = [{}, {"grad_checkpointing": True}]
    if gpus > 1:
        options += [{"parallel": "fsdp"}, {"grad_checkpointing": True, "parallel": "fsdp"}]
    options += [dict(o, amp="bf16") for o in list(options)]
    smaller = []
    size = batch // 2
    while size >= 1:
        smaller += [dict(o, batch_size=size) for o in options]
        size //= 2
    return options + smaller


def _describe(change: dict, cfg) -> str:
    names = {"grad_checkpointing": "train.grad_checkpointing", "parallel": "train.parallel", "amp": "train.amp"}
    parts = [f"{names[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items() if k != "batch_size"]
    if "batch_size" in change:
        accum = cfg.train.grad_accum * cfg.train.batch_size // change["batch_size"]
        parts += [f"train.batch_size={change['batch_size']}", f"train.grad_accum={accum}"]
    return " ".join(parts)


def _checkpointing_verdict(planner: Planner, gpus: int, gpu_memory: int) -> str:
    """:attr:`MemoryPlan.checkpointing` for the configured run on ``gpus`` GPUs of ``gpu_memory``."""
    if not planner.checkpointing_effective:
        return "no effect"
    if planner.plan(gpus=gpus, gpu_memory=gpu_memory, grad_checkpointing=False).fits:
        return "not needed"
    if planner.plan(gpus=gpus, gpu_memory=gpu_memory, grad_checkpointing=True).fits:
        return "needed"
    return "not enough"


def plan_memory(cfg, *, gpus: int = 1, gpu_memory: Optional[int] = None, device: str = "cuda",
                variants: bool = True, planner: Optional[Planner] = None) -> MemoryPlan:
    """The plan of ``cfg`` as configured, its variants (fp32/bf16 x checkpointing x DDP/FSDP) and, when
    ``gpu_memory`` is given and it does not fit, the first change of :func:`_changes` that fits."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    planner = planner or Planner(cfg, device=device)
    variant_amps = ("none", "bf16") if device != "cpu" else ("none",)  # a CPU trains in fp32
    configured = ("none" if device == "cpu" else cfg.train.amp, cfg.train.grad_checkpointing)
    combos = [configured] + ([(a, c) for a in variant_amps for c in (False, True)] if variants else [])
    keys = [("step", amp, ckpt, cfg.train.batch_size) for amp, ckpt in dict.fromkeys(combos)]
    planner.prefetch(keys + ([("estimate",)] if planner.fishertune is not None else []))  # in parallel where it can
    plan = planner.plan(gpus=gpus, gpu_memory=gpu_memory)
    if variants:
        for amp in variant_amps:
            for ckpt in (False, True):
                for parallel in (("ddp", "fsdp") if gpus > 1 else ("ddp",)):
                    v = planner.plan(amp=amp, grad_checkpointing=ckpt, parallel=parallel, gpus=gpus, gpu_memory=gpu_memory)
                    plan.variants.append({"amp": amp, "grad_checkpointing": ckpt, "parallel": parallel,
                                          "training_peak": v.training_peak, "estimate_peak": v.estimate_peak,
                                          "total_bytes": v.total_bytes, "fits": v.fits})
    if gpu_memory is not None:
        plan.checkpointing = _checkpointing_verdict(planner, gpus, gpu_memory)
    if plan.fits is False and plan.estimate and plan.estimate_peak > usable_memory(gpu_memory):
        # the estimate runs unsharded in fp32 without checkpointing: only a larger GPU helps
        plan.change = (f"FisherTune's estimate alone needs {plan.estimate_peak / GIB:.1f} GiB per process: a GPU with at "
                       f"least {(plan.estimate_peak / 0.95) / GIB:.0f} GB (or method.fishertune.eligible on fewer tensors)")
    elif plan.fits is False:
        for change in _changes(gpus, cfg.train.batch_size)[1:]:
            if planner.plan(gpus=gpus, gpu_memory=gpu_memory, **change).fits:
                plan.change = _describe(change, cfg)
                break
        else:
            plan.change = "none of checkpointing, FSDP, bf16 or smaller micro-batches: more or larger GPUs"
    return plan
