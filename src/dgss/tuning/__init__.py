"""Tuning methods: how a pretrained backbone adapts. One module per method, one small interface."""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from ..config import check_name
from .base import Frozen, Full, TuningMethod

__all__ = ["TuningMethod", "Frozen", "Full", "METHODS", "build_method", "check_method_name"]


def _frozen(cfg, backbone) -> TuningMethod:
    return Frozen()


def _full(cfg, backbone) -> TuningMethod:
    return Full()


def _lazy(module: str, factory: str) -> Callable:
    def build(cfg, backbone):
        return getattr(importlib.import_module(module, __name__), factory)(cfg, backbone)

    return build


# name -> factory(method_cfg, backbone) returning an unattached method.
METHODS: dict[str, Callable] = {
    "frozen": _frozen,
    "full": _full,
    "rein": _lazy(".rein", "build_rein"),
    "fishertune": _lazy(".fishertune", "build_fishertune"),
    "lora": _lazy(".lora", "build_lora"),
    "vpt": _lazy(".vpt", "build_vpt"),
    "adaptformer": _lazy(".adaptformer", "build_adaptformer"),
    "vqt": _lazy(".vqt", "build_vqt"),
    "childtune-f": _lazy(".childtune", "build_childtune_f"),
    "childtune-d": _lazy(".childtune", "build_childtune_d"),
    "soma": _lazy(".soma", "build_soma"),
    "fada": _lazy(".fada", "build_fada"),
    "lp-ft": _lazy(".lpft", "build_lpft"),
}


def check_method_name(name: str, where: str = "") -> None:
    """ConfigError (one line, the closest name) unless ``name`` is a registered method (method.name)."""
    check_name("method.name", name, METHODS, "method", where)


def build_method(cfg, backbone) -> TuningMethod:
    """Build the method named ``cfg.name`` (a :class:`dgss.config.MethodConfig`) and attach it."""
    if cfg.name not in METHODS:
        close = difflib.get_close_matches(cfg.name, METHODS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method.name '{cfg.name}'{hint} (available: {', '.join(sorted(METHODS))})")
    method = METHODS[cfg.name](cfg, backbone)
    method.attach(backbone)
    return method
