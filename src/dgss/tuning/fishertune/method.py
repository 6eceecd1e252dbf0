"""FisherTune as a tuning method: the three stages inside the normal training loop (fishertune.md §6).

    method = build_fishertune(cfg.method, backbone); method.attach(backbone)   # build_method does both
    method.on_train_iteration(it, trainer)   # the engine calls this before every iteration

  * Stage 1, iterations < T1 (``warmup_iters``): the backbone is frozen, the head trains. The delta
    vector is not in the graph, so it gets no gradient and AdamW leaves it (and its state) alone.
  * Stage 2, at iteration T1: the DR-FIM is estimated from ``num_batches`` source batches
    (``trainer.next_batch()``, each seen as x and as x'; one pass per image with the per-sample
    Fisher) and the top round(delta_max N) entries are ranked (:mod:`.drfim`).
  * Stage 3: the top round(delta(t) N) of them train (t = iteration - T1), as theta_pt + scatter(delta),
    with x' as a feature augmentation in a ``train_perturb_prob`` share of the iterations.

Everything a resumed run needs is in the state dict: ``delta`` (K = round(delta_max N) float32, the
only trainable tensor besides the head), and the buffers ``entry_index`` / ``entry_rank`` (K int32),
``tensor_counts`` (T), ``num_active``, ``selected`` and ``refreshed_at``. The optimizer is built once
(from ``parameter_groups``) and never needs rebuilding: delta exists from attach on, and the entries
not yet active are held at zero by masking their gradient (zero gradient, zero Adam moments -> zero
update; decoupled weight decay of a zero is zero).

Adam equivalence: the active set only grows, an entry's moments start at zero when it becomes active,
and the bias correction uses the parameter's step count, which for the one flat delta counts every
stage-3 step, exactly as a dense tensor with a masked gradient would. Sparse training therefore equals
dense masked training step for step (tests/test_fishertune_sparse.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..base import TuningMethod, decay_groups
from .drfim import DomainRelatedFisher, DRFIMOptions, FisherEstimate, selection_scores
from .perturbation import FeatureStatisticsPerturbation
from .selection import Selection, active_count, random_scores, rank_top_entries, rerank_inactive, selection_count
from .sparse import DeltaInjector, apply_delta, eligible_tensors
from .streaming import ScoreList, TensorScores, streamed_top_entries

__all__ = ["FisherTune", "build_fishertune", "merge_into_dense", "read_selection_file"]

# Seed offsets, so the estimate's draws (theta samples, z of x', random scores) are reproducible
# from train.seed and independent of the training stream.
_THETA_SEED, _SHIFT_SEED, _RANDOM_SEED, _AUGMENT_SEED = 1_000_003, 2_000_003, 3_000_017, 4_000_037


class FisherTune(TuningMethod):
    """Sparse fine-tuning of the backbone entries with the highest DR-FIM.

    Args:
        cfg: a :class:`dgss.config.FisherTuneConfig`.

    Attributes (after :meth:`attach`):
        tensors: the eligible tensors, in ranking order. num_eligible: N. capacity: K = round(delta_max N).
        last_scores, last_estimate: the scores and estimate of the last ranking (kept only when
            ``keep_scores`` is set, as ``dgss fisher`` does).
    """

    name = "fishertune"
    backbone_requires_grad = True
    # The pretrained backbone stays in eval mode (no drop-path, no BatchNorm statistics updates):
    # only the selected entries change, nothing else about the backbone.
    freeze_backbone_mode = True

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.keep_scores = False
        self.last_scores: Optional[dict[str, torch.Tensor]] = None
        self.last_estimate: Optional[FisherEstimate] = None
        self.estimation_passes = 0
        # the autocast dtype of the estimate's passes (issue 38), None: fp32. estimate_and_select sets bf16
        # when method.fishertune.estimate_precision is "amp" and the trainer trains in bf16 (never fp16:
        # without a loss scale squared fp16 gradients underflow). The squares are summed in fp32 either way.
        self.estimate_autocast: Optional[torch.dtype] = None
        self._counts: list[int] = []
        self._is_selected = False
        self._suspended = False
        self._augment_now = False
        self._extra_handles: list = []

    # ------------------------------------------------------------------ attach and state

    def attach(self, backbone) -> None:
        super().attach(backbone)  # every pretrained tensor frozen; they are never written
        cfg = self.cfg
        if not 0.0 < cfg.delta_min <= cfg.delta_max <= 1.0:
            raise ValueError(f"need 0 < delta_min <= delta_max <= 1, got {cfg.delta_min}, {cfg.delta_max}")
        self.tensors = eligible_tensors(backbone.model, cfg.eligible)
        if not self.tensors:
            raise ValueError(f"method.fishertune.eligible matches no backbone parameter: {cfg.eligible}")
        self.num_eligible = sum(t.numel for t in self.tensors)
        self.capacity = selection_count(self.num_eligible, cfg.delta_max)
        reference = next(backbone.model.parameters())
        device = reference.device
        # One flat delta for all tensors, allocated now at delta_max so that the optimizer built
        # before stage 2 already holds it; at least float32 (bf16/fp16 backbones get float32 deltas).
        dtype = torch.promote_types(reference.dtype, torch.float32)
        self.delta = nn.Parameter(torch.zeros(self.capacity, dtype=dtype, device=device))
        self.register_buffer("entry_index", torch.zeros(self.capacity, dtype=torch.int32, device=device))
        self.register_buffer("entry_rank", torch.full((self.capacity,), self.capacity, dtype=torch.int32,
                                                      device=device))
        self.register_buffer("tensor_counts", torch.zeros(len(self.tensors), dtype=torch.int64, device=device))
        self.register_buffer("num_active", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("selected", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("refreshed_at", torch.full((), -1, dtype=torch.int64, device=device))
        self.injector = DeltaInjector(backbone, self.tensors, self._delta_chunks)
        self.shift = FeatureStatisticsPerturbation(backbone, cfg.perturb_layers, cfg.eps_mu, cfg.eps_sigma)
        self._extra_handles = [backbone.register_forward_pre_hook(self._augmentation_hook)]
        self._counts = [0] * len(self.tensors)

    def detach_hooks(self) -> None:
        """Remove every hook this method placed on the backbone (after :func:`merge_into_dense`)."""
        self.injector.remove()
        self.shift.remove()
        for handle in self._extra_handles:
            handle.remove()
        self._extra_handles = []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_host_cache()

    def _refresh_host_cache(self) -> None:
        # Python copies of what every forward pass needs, so that no pass syncs with the device.
        self._counts = [int(c) for c in self.tensor_counts.tolist()]
        self._is_selected = bool(self.selected)

    @property
    def is_selected(self) -> bool:
        return bool(self.selected)

    def ddp_buffers_to_ignore(self) -> list[str]:
        """Buffer names (relative to the method) that DDP need not broadcast every forward pass: they
        are identical on every process by construction and large (2 x K int32)."""
        return ["entry_index", "entry_rank", "tensor_counts"]

    # ------------------------------------------------------------------ optimizer

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        # Weight decay on delta pulls theta towards theta_pt, not towards zero, so the usual reasons
        # to exempt norms and embeddings from decay do not apply: one group, one decay for all entries.
        decay = weight_decay if self.cfg.delta_weight_decay is None else self.cfg.delta_weight_decay
        groups = [{"params": [self.delta], "lr": lr * backbone_lr_mult, "weight_decay": decay}]
        if self.backbone.neck is not None:
            groups += decay_groups(self.backbone.neck.named_parameters(), lr, weight_decay)
        return groups

    def num_trainable_backbone_parameters(self) -> int:
        """K = round(delta_max N), the count the paper reports (15.21M on DINOv2-L)."""
        return self.capacity

    # ------------------------------------------------------------------ the forward path

    def _delta_chunks(self):
        if self._suspended or not self._counts or not getattr(self, "_is_selected", False):
            return None
        mask = (self.entry_rank < self.num_active).to(self.delta.dtype)
        masked = self.delta * mask  # gradient of an inactive entry: zero
        return list(zip(self.entry_index.split(self._counts), masked.split(self._counts)))

    def _augmentation_hook(self, module, args):
        """Optional x' as training augmentation (train_perturb_prob): decided per iteration."""
        if self._suspended:
            return
        self.shift.enabled = bool(self.training and self._augment_now)
        self.shift.new_draw()

    def materialized(self) -> dict[str, torch.Tensor]:
        """The current theta of every eligible tensor (dense copies; for tests, refresh and export)."""
        chunks = self._delta_chunks()
        out = {}
        with torch.no_grad():
            for i, tensor in enumerate(self.tensors):
                pretrained = tensor.module._parameters[tensor.attr]
                out[tensor.name] = pretrained if chunks is None else apply_delta(pretrained, *chunks[i])
        return out

    # ------------------------------------------------------------------ stages

    def on_train_iteration(self, iteration: int, trainer) -> None:
        cfg = self.cfg
        start = cfg.warmup_iters
        if iteration < start:
            return  # stage 1
        if not self.is_selected:
            self.estimate_and_select(trainer)  # stage 2
        total = max(int(trainer.total_iters) - start, 1)
        t = iteration - start
        if cfg.refresh_interval > 0 and t > 0 and t % cfg.refresh_interval == 0 and int(self.refreshed_at) != iteration:
            self.refresh(trainer, iteration)
        count = active_count(t, total, self.num_eligible, delta_min=cfg.delta_min, delta_max=cfg.delta_max,
                             tau_frac=cfg.schedule_tau_frac)
        # Never shrink (a resumed or repeated call with a smaller t keeps what is already active).
        self.num_active.fill_(max(count, int(self.num_active)))
        if cfg.train_perturb_prob > 0:
            seed = cfg_seed(trainer) + _AUGMENT_SEED + iteration
            gen = torch.Generator().manual_seed(seed)
            self._augment_now = bool(torch.rand((), generator=gen) < cfg.train_perturb_prob)
            # The z of x' from a generator of (seed, iteration, rank), not the global RNG: a resumed run
            # draws the same perturbations, and each process its own.
            rank = int(getattr(trainer, "rank", 0) or 0)
            self.shift.generator = torch.Generator(self.delta.device).manual_seed(seed * 1_000 + rank)

    def estimate_and_select(self, trainer) -> None:
        """Stage 2 on the trainer's model and data stream; sets the ranking (or reads ``selection_file``)."""
        if self.cfg.selection_file:
            self.set_selection(read_selection_file(self, self.cfg.selection_file))
            return
        if getattr(trainer, "fsdp", False):
            raise ValueError("FisherTune's estimate (stage 2) needs the unsharded model and does not run under "
                             "train.parallel=fsdp: write the selection with `dgss fisher CONFIG` on one GPU (`dgss plan` "
                             "gives its memory) and set method.fishertune.selection_file=OUT/selection.safetensors")
        self.estimate_autocast = self.estimate_dtype(getattr(trainer, "amp", "none"))
        scores = self.estimate(trainer.model, _batches(trainer), seed=cfg_seed(trainer),
                               progress=_progress_bar(trainer, self.cfg.num_batches))
        self.select(scores, seed=cfg_seed(trainer))

    def estimate_dtype(self, amp: str) -> Optional[torch.dtype]:
        """The estimate's autocast dtype for a run trained with ``train.amp=amp``: bf16 only when
        ``estimate_precision`` is "amp" and the run trains in bf16; None (fp32) otherwise."""
        return torch.bfloat16 if amp == "bf16" and self.cfg.estimate_precision == "amp" else None

    def drfim_options(self) -> DRFIMOptions:
        cfg = self.cfg
        return DRFIMOptions(variational=cfg.variational, per_sample=cfg.per_sample, eps_mu=cfg.eps_mu,
                            eps_sigma=cfg.eps_sigma, domain_balance=cfg.domain_balance,
                            normalization=cfg.normalization, prior_rho=cfg.prior_rho,
                            prior_quantile=cfg.prior_quantile, ratio_eps=cfg.ratio_eps,
                            estimate_memory=cfg.estimate_memory)

    def estimate(self, segmentor, batches: Iterator[dict], *, seed: int = 0, at_current: bool = False,
                 mode: Optional[str] = None, progress=None) -> Optional[dict[str, torch.Tensor]]:
        """Estimate the selection scores of every eligible tensor (None for random selection).

        ``at_current``: at theta_pt + delta (a refresh) instead of theta_pt. ``mode``: the ranking
        (default ``cfg.selection``). ``progress``: called with the batches done after each batch.
        """
        mode = mode or self.cfg.selection
        if mode == "random":
            return None
        options = self.drfim_options()
        # The task term alone needs no x' (half the passes).
        estimate = self.run_estimate(segmentor, batches, options, seed=seed, with_shift=mode != "fisher",
                                     at_current=at_current, progress=progress)
        self.estimation_passes = estimate.passes
        if options.streamed and not self.keep_scores:  # one tensor's scores at a time (.streaming)
            scores = TensorScores(estimate, mode, options, self.cfg.delta_max)
        else:
            scores = selection_scores(estimate, mode, options, self.cfg.delta_max)
        if self.keep_scores:
            self.last_scores, self.last_estimate = scores, estimate
        return scores

    def run_estimate(self, segmentor, batches: Iterator[dict], options: DRFIMOptions, *, seed: int = 0,
                     with_shift: bool = True, at_current: bool = False, progress=None) -> FisherEstimate:
        """One DR-FIM estimate of ``cfg.num_batches`` batches with ``options`` (the method's own, or the
        variants `dgss fisher --stability` compares), without touching the selection."""
        device = self.delta.device
        theta_gen = torch.Generator(device).manual_seed(seed + _THETA_SEED)
        shift_gen = torch.Generator(device).manual_seed(seed + _SHIFT_SEED)
        base = self.materialized() if at_current else {
            t.name: t.module._parameters[t.attr] for t in self.tensors}
        forward_loss = self.estimate_forward_loss(segmentor, shift_gen)
        estimator = DomainRelatedFisher(base, forward_loss, options, generator=theta_gen, progress=progress)
        self._suspended = True  # the estimate passes its own theta; no delta hooks, no augmentation
        try:
            return estimator.estimate(batches, self.cfg.num_batches, with_shift=with_shift)
        finally:
            self._suspended = False
            self.shift.enabled = False

    def estimate_forward_loss(self, segmentor, shift_generator: torch.Generator):
        """``(params, batch, shifted) -> loss``: the segmentor's loss with the eligible tensors replaced by
        ``params`` (names in ``backbone.model``), on x or on x' (z drawn from ``shift_generator``)."""
        prefix = "backbone.model."

        dtype = self.estimate_autocast

        def forward_loss(params, batch, shifted):
            from torch.func import functional_call

            full = {prefix + name: value for name, value in params.items()}
            context = self.shift.active(shift_generator) if shifted else contextlib.nullcontext()
            precision = (torch.autocast(batch["image"].device.type, dtype=dtype) if dtype is not None
                         else contextlib.nullcontext())
            with context, precision:
                return functional_call(segmentor, full, (batch["image"], batch["label"]))["loss"]

        return forward_loss

    @torch.no_grad()
    def select(self, scores: Optional[dict[str, torch.Tensor]], seed: int = 0) -> Selection:
        """Rank the top K entries by ``scores`` (name -> tensor; None: random) and reset delta."""
        if scores is None:
            values = random_scores([t.shape for t in self.tensors], seed + _RANDOM_SEED, device=self.delta.device)
            if self.keep_scores:
                self.last_scores = {t.name: v for t, v in zip(self.tensors, values)}
        elif isinstance(scores, TensorScores):
            selection = streamed_top_entries(scores, [t.name for t in self.tensors], self.capacity)
            self.set_selection(selection)
            return selection
        else:
            values = [scores[t.name] for t in self.tensors]
        selection = rank_top_entries(values, self.capacity)
        self.set_selection(selection)
        return selection

    @torch.no_grad()
    def set_selection(self, selection: Selection) -> None:
        if selection.size != self.capacity or len(selection.counts) != len(self.tensors):
            raise ValueError(f"a selection of {selection.size} entries over {len(selection.counts)} tensors does "
                             f"not fit K = {self.capacity} over {len(self.tensors)} tensors")
        self.entry_index.copy_(selection.index.to(torch.int32))
        self.entry_rank.copy_(selection.rank.to(torch.int32))
        self.tensor_counts.copy_(selection.counts)
        self.delta.zero_()
        self.num_active.zero_()
        self.selected.fill_(True)
        self._refresh_host_cache()

    def selection(self) -> Selection:
        return Selection(self.tensor_counts.cpu(), self.entry_index.long(), self.entry_rank.long())

    def refresh(self, trainer, iteration: int) -> None:
        """Re-estimate at the current theta and re-order the not-yet-active candidates
        (:func:`~.selection.rerank_inactive`); a no-op for random selection."""
        scores = self.estimate(trainer.model, _batches(trainer), seed=cfg_seed(trainer) + iteration,
                               at_current=True, progress=_progress_bar(trainer, self.cfg.num_batches))
        if scores is not None:
            rank = rerank_inactive(self.selection(), ScoreList(scores, [t.name for t in self.tensors]),
                                   int(self.num_active))
            self.entry_rank.copy_(rank.to(torch.int32))
        self.refreshed_at.fill_(iteration)


def read_selection_file(method: FisherTune, path) -> Selection:
    """The selection ``dgss fisher`` wrote (selection.safetensors), checked against ``method``'s tensors."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"method.fishertune.selection_file: file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in ("tensor_counts", "entry_index", "entry_rank") if k in f.keys()}
    expected = [[t.name, list(t.shape)] for t in method.tensors]
    if len(tensors) < 3 or json.loads(meta.get("tensors", "[]")) != expected or \
            int(meta.get("capacity", -1)) != method.capacity:
        raise ValueError(f"method.fishertune.selection_file {path} was not written for this model (its eligible "
                         f"tensors or K = {method.capacity} differ): run `dgss fisher` with this config")
    device = method.delta.device
    return Selection(tensors["tensor_counts"].long(), tensors["entry_index"].long().to(device),
                     tensors["entry_rank"].long().to(device))


def _batches(trainer) -> Iterator[dict]:
    while True:
        yield trainer.next_batch()


def cfg_seed(trainer) -> int:
    cfg = getattr(trainer, "cfg", None)
    return int(getattr(getattr(cfg, "train", None), "seed", 0) or 0)


def _progress_bar(trainer, num_batches: int):
    """A progress callback for the estimate when the trainer shows progress bars, else None."""
    cfg = getattr(trainer, "cfg", None)
    show = bool(getattr(getattr(cfg, "train", None), "progress_bar", False)) and getattr(trainer, "rank", 0) == 0
    if not show:
        return None
    from tqdm import tqdm

    bar = tqdm(total=num_batches, desc="FisherTune estimate", unit="batch", dynamic_ncols=True, leave=False)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if bar.n >= bar.total:
            bar.close()

    return update


def build_fishertune(method_cfg, backbone) -> FisherTune:
    """The METHODS factory: ``method_cfg`` is a :class:`dgss.config.MethodConfig`."""
    return FisherTune(method_cfg.fishertune)


@torch.no_grad()
def merge_into_dense(segmentor):
    """Fold the deltas into the backbone's tensors (theta = theta_pt + delta, written in place) and
    replace the method by :class:`~dgss.tuning.base.Frozen`: a plain dense model for deployment, whose
    state dict is the backbone's and the head's. Returns ``segmentor``."""
    from ..base import Frozen

    method = segmentor.method
    if not isinstance(method, FisherTune):
        raise TypeError(f"merge_into_dense needs a FisherTune segmentor, got method '{method.name}'")
    chunks = method._delta_chunks()
    if chunks is not None:
        for (index, delta), tensor in zip(chunks, method.tensors):
            if index.numel():
                param = tensor.module._parameters[tensor.attr]
                param.view(-1).index_add_(0, index, delta.to(param.dtype))
    method.detach_hooks()
    frozen = Frozen()
    frozen.attach(segmentor.backbone)
    segmentor.method = frozen
    return segmentor
