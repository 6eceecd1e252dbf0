"""The model of an experiment config: its backbone, its tuning method attached to it, and its head.

    model = build_segmentor(cfg)   # a dgss.models.segmentor.Segmentor

It lives in the tuning package because it is where models and methods meet: tuning sits on models,
and the segmentor (:mod:`dgss.models.segmentor`) holds a method without importing any.
"""

from __future__ import annotations

import warnings

import torch

from ..config import ConfigError, ExperimentConfig
from ..models.backbones import build_backbone
from ..models.geco import GeCoLoss
from ..models.heads import build_head
from ..models.segmentor import Segmentor
from . import build_method

__all__ = ["build_segmentor"]


def build_segmentor(cfg: ExperimentConfig) -> Segmentor:
    """Backbone (``cfg.model``), tuning method (``cfg.method``) and head (``cfg.model.head``)."""
    model = cfg.model
    backbone = build_backbone(model.backbone, weights=model.weights, img_size=model.img_size,
                              patch_size=model.patch_size, out_indices=model.out_indices,
                              drop_path_rate=model.drop_path_rate, patch_resize=model.patch_resize,
                              **model.backbone_kwargs)
    method = build_method(cfg.method, backbone)
    with torch.no_grad():
        queries = method.head_queries()
    supplies_queries = queries is not None
    expected = (model.head.num_queries, model.head.hidden_dim)
    if supplies_queries and model.head.type == "mask2former" and tuple(queries.shape) != expected:
        raise ConfigError(
            f"method '{method.name}' supplies {queries.shape[0]} x {queries.shape[1]} queries but the head expects "
            f"model.head.num_queries x model.head.hidden_dim = {expected[0]} x {expected[1]}: make them equal "
            f"(for Rein: method.rein.num_tokens and method.rein.query_dim)")
    head = build_head(model.head, backbone.channels, external_queries=supplies_queries,
                      query_content=method.query_content)
    if supplies_queries and not getattr(head, "accepts_queries", False):
        warnings.warn(f"method '{method.name}' supplies head queries but the '{model.head.type}' head does not "
                      "use them; the method's query parameters will get no gradient", stacklevel=2)
    geco = GeCoLoss(cfg.loss.geco) if cfg.loss.geco.enabled else None  # any method: cfg.loss is not the method's
    return Segmentor(backbone, method, head, num_classes=model.head.num_classes, eval_cfg=cfg.eval, geco=geco)
