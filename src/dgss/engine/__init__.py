"""Training and evaluation engine: the loop, checkpoints, distributed set-up, evaluation, metrics.

    from dgss.engine import Trainer, evaluate_datasets, load_model_weights
    Trainer(cfg).train()                                  # RUN/model_final.safetensors
    Trainer(cfg, resume=True).train()                     # continue from RUN/checkpoints/last

Submodules: ``trainer`` (the loop), ``config_check`` (a config's names and values, before anything is
built), ``checkpoint`` (atomic files, model weights, resume state), ``data_stream`` (resumable batches),
``optim`` (AdamW, state by name), ``schedule`` (warm-up, poly or cosine), ``distributed`` (torchrun processes),
``evaluate`` (mIoU reports), ``speed`` (activation checkpointing, torch.compile), ``ema`` (the weight EMA of
``train.ema``), ``preemption`` (SIGTERM/SIGUSR1: checkpoint and exit 75), ``logging``, ``metrics``.
Imports are lazy so that ``dgss.engine.metrics`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["Trainer", "NonFiniteLossError", "evaluate_datasets", "evaluate_dataset", "load_model_weights",
           "CheckpointError", "ConfusionMatrix", "PolySchedule", "init_distributed", "TrainingPreempted",
           "PREEMPTED_EXIT_CODE"]

_WHERE = {
    "Trainer": "trainer", "NonFiniteLossError": "trainer", "evaluate_datasets": "evaluate",
    "evaluate_dataset": "evaluate", "load_model_weights": "checkpoint", "CheckpointError": "checkpoint",
    "ConfusionMatrix": "metrics", "PolySchedule": "schedule", "init_distributed": "distributed",
    "TrainingPreempted": "preemption", "PREEMPTED_EXIT_CODE": "preemption",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'dgss.engine' has no attribute '{name}'")
