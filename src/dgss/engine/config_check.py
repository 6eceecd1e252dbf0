"""The one check of a config before anything is built: the names it gives to the registries (each
checked next to its registry) and its values (:func:`dgss.config.validate_config`).

:mod:`dgss.config` is the ground floor and imports no registry; the engine sits on all of them, so the
check that needs every registry lives here. The registries are read as they are when it runs, so methods
and dataset types a user registered count. ``dgss config``, ``dgss train``/``eval``/``fisher`` and
:class:`~dgss.engine.trainer.Trainer` call it.
"""

from __future__ import annotations

from ..config import ExperimentConfig, validate_config
from ..data.builder import check_dataset_types
from ..models.backbones import check_backbone_name
from ..models.heads import check_head_type
from ..tuning import check_method_name

__all__ = ["check_config"]


def check_config(cfg: ExperimentConfig, source: str = "") -> ExperimentConfig:
    """``cfg`` with its registry names and its values checked; ``source``: the file named in errors.

    Raises:
        dgss.config.ConfigError: one line naming the key, the value and the closest valid name.
    """
    where = f" in {source}" if source else ""
    check_backbone_name(cfg.model.backbone, where)
    check_head_type(cfg.model.head.type, where)
    check_method_name(cfg.method.name, where)
    check_dataset_types(cfg.data, where)
    return validate_config(cfg, source)
