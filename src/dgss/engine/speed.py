"""Speed options of a training run: activation checkpointing and ``torch.compile`` (``train.*``).

    apply_speed_options(model, cfg.train)    # the Trainer does this before building the optimizer and DDP
    with compile_errors(cfg.train): ...      # a torch.compile failure names the option

* ``train.grad_checkpointing``: timm's non-reentrant activation checkpointing of every backbone block
  (:meth:`dgss.models.backbones.Backbone.set_grad_checkpointing`). A block keeps only its input and is
  run again during the backward pass, hooks included, so Rein, VPT, LoRA, FisherTune's sparse deltas
  and the other methods compute the same losses and gradients (tests/test_engine_speed.py). It applies
  to the training step only: a method's own passes in ``on_train_iteration`` (FisherTune's and
  ChildTune-D's Fisher estimates) run without it (:func:`without_checkpointing`), because they take
  gradients after leaving ``functional_call`` or a perturbation context, and a recomputation outside
  those contexts would use other weights or inputs than the forward pass did. Nor while nothing in the
  backbone trains (:func:`checkpointing_needed`: Frozen, LPFT's probing stage): there is nothing to save.
  Hook-based methods keep their per-forward work outside the checkpointed blocks (Rein's operands are
  computed by a pre-hook on the backbone), so a block's re-run repeats only the block and its hook.
  ``train.checkpoint_hooks: keep`` recomputes the block's own forward only (:func:`set_checkpointing`):
  hooks on the block (Rein, VPT) run once and keep their activations, for more memory than "replay".
* ``train.compile``: ``nn.Module.compile()`` of the backbone and of the head, in place: the modules keep
  their names and parameters, so state-dict keys, checkpoints and the optimizer are unchanged, and DDP
  wraps the model afterwards (what the PyTorch documentation advises: compile the inner module). The
  methods' forward hooks are traced with the modules they are registered on; dynamo is told to guard
  on module hooks (``skip_nnmodule_hook_guards = False``), so a hook added or removed later (a method
  detaching itself, a method from outside dgss) recompiles instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["apply_speed_options", "compile_segmentor", "compile_errors", "is_compiled", "without_checkpointing",
           "checkpointing_needed", "checkpointing_where_needed", "checkpoint_mode", "set_checkpointing",
           "CHECKPOINT_MODES", "CompileError"]


class CompileError(RuntimeError):
    """torch.compile is unavailable or failed (``train.compile``)."""


_HINT = "set train.compile=false, or train.compile_backend=aot_eager to tell a backend failure from a tracing one"


def compile_segmentor(model: nn.Module, *, mode: str = "default", backend: str = "inductor") -> None:
    """Compile ``model.backbone`` and ``model.head`` in place (``nn.Module.compile``). Compilation
    itself happens lazily, on the first forward pass of each module (see :func:`compile_errors`)."""
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        raise CompileError(f"train.compile: torch {torch.__version__} has no torch.compile / nn.Module.compile; "
                           "set train.compile=false")
    import torch._dynamo as dynamo

    supported = getattr(dynamo, "is_dynamo_supported", lambda: True)
    try:
        ok = supported()
    except Exception as err:  # older torch raises with the reason (Python version, platform)
        raise CompileError(f"train.compile: torch.compile is not supported here ({err}); "
                           "set train.compile=false") from err
    if ok is False:
        raise CompileError("train.compile: torch.compile is not supported on this platform; set train.compile=false")
    backends = dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise CompileError(f"train.compile_backend: unknown torch.compile backend {backend!r} "
                           f"(available: {', '.join(sorted(backends))})")
    if backend != "inductor" and mode != "default":
        raise CompileError(f"train.compile_mode={mode!r} applies to the inductor backend only, "
                           f"not to train.compile_backend={backend!r}")
    # Recompile when a module's hooks change instead of running the hooks of compile time (the default
    # skips these guards for speed).
    dynamo.config.skip_nnmodule_hook_guards = False
    options = {"backend": backend} if backend != "inductor" else {"backend": backend, "mode": mode}
    for name in ("backbone", "head"):
        getattr(model, name).compile(**options)


def apply_speed_options(model: nn.Module, train) -> None:
    """``train.grad_checkpointing`` (as ``train.checkpoint_hooks`` says) and ``train.compile`` on a
    Segmentor (before the optimizer and DDP)."""
    if train.grad_checkpointing:
        set_checkpointing(model.backbone, getattr(train, "checkpoint_hooks", "replay"))
    if train.compile:
        compile_segmentor(model, mode=train.compile_mode, backend=train.compile_backend)


def checkpointing_needed(model: nn.Module) -> bool:
    """Whether activation checkpointing of the backbone's blocks can save anything now: some parameter of
    a block or of the method trains (its gradient needs the blocks' activations). With none (Frozen; LPFT
    while it probes), autograd keeps nothing inside the blocks, and checkpointing would only add its cost
    (an H200 measured the frozen bf16 step 1.43 x slower with it, benchmarks/results/gpu_h200/).
    Asked every step: LPFT starts training the backbone mid-run."""
    params = [p for block in model.backbone.blocks for p in block.parameters()]
    return any(p.requires_grad for p in params) or any(p.requires_grad for p in model.method.parameters())


@contextlib.contextmanager
def checkpointing_where_needed(model: nn.Module) -> Iterator[None]:
    """The training step's forward and backward: the backbone's checkpointing off inside the block when
    :func:`checkpointing_needed` says it saves nothing (back on afterwards)."""
    if checkpoint_mode(model.backbone) is not None and not checkpointing_needed(model):
        with without_checkpointing(model.backbone):
            yield
    else:
        yield


@contextlib.contextmanager
def without_checkpointing(backbone) -> Iterator[None]:
    """Turn the backbone's activation checkpointing off inside the block (back on afterwards, as it was)."""
    mode = checkpoint_mode(backbone)
    if mode is not None:
        set_checkpointing(backbone, None)
    try:
        yield
    finally:
        if mode is not None:
            set_checkpointing(backbone, mode)


CHECKPOINT_MODES = ("replay", "keep")


def checkpoint_mode(backbone) -> Optional[str]:
    """How the backbone's blocks are checkpointed now: "replay", "keep" or None (not at all)."""
    mode = getattr(backbone, "_checkpoint_mode", None)
    if mode is None and getattr(backbone, "grad_checkpointing", False):  # set on the backbone directly
        return "replay"
    return mode


def set_checkpointing(backbone, mode: Optional[str]) -> None:
    """Checkpoint every block of ``backbone`` ("replay": timm's, the block's hooks recomputed with it;
    "keep": the block's own forward only, its hooks run once outside the recomputed region and keep their
    activations), or none (None). Both non-reentrant; neither changes a name, a parameter or a result."""
    if mode is not None and mode not in CHECKPOINT_MODES:
        raise ValueError(f"train.checkpoint_hooks must be one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
    backbone.set_grad_checkpointing(mode == "replay")
    for block in backbone.blocks:
        _checkpoint_own_forward(block, mode == "keep")
    backbone._checkpoint_mode = mode


def _checkpoint_own_forward(block: nn.Module, enable: bool) -> None:
    """Make ``block.forward`` (an instance attribute over the class's: no state-dict key changes) run under
    non-reentrant checkpointing when autograd is on; ``nn.Module.__call__`` runs the hooks around it."""
    wrapped = "_plain_forward" in block.__dict__
    if enable and not wrapped:
        plain = block.forward

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, **kwargs)
            return plain(*args, **kwargs)

        block.__dict__["_plain_forward"] = plain
        block.forward = forward
    elif not enable and wrapped:
        del block.__dict__["forward"], block.__dict__["_plain_forward"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``nn.Module.compile()`` was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def compile_errors(train) -> Iterator[None]:
    """Re-raise a torch.compile failure (tracing, backend, C++/Triton toolchain) inside the block as a
    :class:`CompileError` that names ``train.compile``; a no-op when compile is off."""
    if not train.compile:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as err:
        cause = getattr(err, "inner_exception", None) or err  # a backend's own error, if that is what failed
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        what = f"{type(cause).__name__}: {' '.join(lines[:2])[:300]}" if lines else type(cause).__name__
        raise CompileError(f"train.compile (backend {train.compile_backend!r}, mode {train.compile_mode!r}): "
                           f"torch.compile failed: {what}; {_HINT}") from err
