"""fp32 matmul precision of a process: ``train.tf32`` (issue 38). At the bottom of dgss (imports torch only),
so that training, evaluation, ``predict`` and FisherTune's estimate apply the same setting.

    apply_tf32(cfg.train.tf32, device)     # once the device is known; a CPU is left as it is
    describe_precision(amp, device)        # the log line: "precision: amp bf16, fp32 matmuls TF32 ..."

TF32 keeps fp32's range and rounds the products' inputs to a 10-bit mantissa (fp32 accumulation): about
1e-3 relative per product, on Ampere or newer GPUs only. It does not touch bf16/fp16 autocast products.
``enabled=False`` restores torch's defaults: fp32 matmuls in full fp32 and cuDNN convolutions with TF32
allowed (torch's own default, kept so that false reproduces dgss's numerics before this switch bit for
bit). The setting is global to the process, as torch's flags are.
"""

from __future__ import annotations

import torch

__all__ = ["apply_tf32", "tf32_state", "describe_precision"]

# torch's defaults: what a process starts with, and what train.tf32=false keeps
_TORCH_DEFAULT = {"matmul": False, "cudnn": True}


def apply_tf32(enabled: bool, device) -> dict:
    """Set TF32 for fp32 matmuls and convolutions on CUDA (``enabled``) or torch's defaults (not). A CPU
    device changes nothing: CPU numerics stay torch's whatever the option says. Returns the new state."""
    if not isinstance(enabled, bool):
        raise ValueError(f"train.tf32 must be true or false, got {enabled!r}")
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled or _TORCH_DEFAULT["matmul"]
        torch.backends.cudnn.allow_tf32 = enabled or _TORCH_DEFAULT["cudnn"]
    return tf32_state()


def tf32_state() -> dict:
    """The process's flags: {"matmul": bool, "cudnn": bool}."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def describe_precision(amp: str, device) -> str:
    """One line for a run's log: the autocast dtype and how fp32 matmuls and convolutions run."""
    if torch.device(device).type != "cuda":
        return f"precision: fp32 on {torch.device(device).type} (train.amp and train.tf32 apply on a GPU only)"
    state = tf32_state()
    matmul = "TF32" if state["matmul"] else "full fp32"
    conv = "TF32" if state["cudnn"] else "full fp32"
    return f"precision: autocast {amp}, fp32 matmuls {matmul}, fp32 convolutions {conv}"
