"""The one check of a config before anything is built: the names it gives to the registries (each
checked next to its registry), its values (:func:`dgss.config.validate_config`) and its dataset entries.

:mod:`dgss.config` is the ground floor and imports no registry; the engine sits on all of them, so the
check that needs every registry lives here. The registries are read as they are when it runs, so methods
and dataset types a user registered count. ``dgss config``, ``dgss train``/``eval``/``fisher`` and
:class:`~dgss.engine.trainer.Trainer` call it, so ``dgss config`` refuses exactly what ``dgss train``
refuses before it reads a file (the files themselves are checked by the command that reads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ConfigError, ExperimentConfig, validate_config
from ..data.builder import build_dataset, check_dataset_config, check_dataset_types
from ..models.backbones import canonical_backbone_name, check_backbone_name
from ..models.heads import check_head_type
from ..tuning import check_method_name

__all__ = ["check_config", "check_datasets", "resolve_shipped_weights", "SHIPPED_ASSETS"]

# the weights files that ship inside the package (the demo's and the testbed's foundation ViTs)
SHIPPED_ASSETS = Path(__file__).resolve().parents[1] / "assets"


def resolve_shipped_weights(weights: Optional[str]) -> Optional[str]:
    """``weights`` itself when it exists (or is None / "hub"); else, when it names a file of the package's
    assets folder (``src/dgss/assets/demo_foundation_vit.safetensors``, as the example configs write it
    for a checkout), that shipped file, so the example configs also run after a plain ``pip install``."""
    if weights in (None, "hub") or Path(weights).expanduser().exists():
        return weights
    path = Path(weights)
    shipped = SHIPPED_ASSETS / path.name
    if not path.is_absolute() and path.parent.parts[-2:] == ("dgss", "assets") and shipped.is_file():
        return str(shipped)
    return weights


def check_datasets(cfg: ExperimentConfig, where: str = "") -> None:
    """Every dataset entry as ``dgss train`` builds it, without reading a file: type, options, root given,
    condition, labels, corruption; a synthetic set (no files) is built, which checks its options' values
    (domain, size, label set).

    Raises:
        dgss.config.ConfigError: naming the entry (``data.test[1]``), the file and the problem.
    """
    check_dataset_types(cfg.data, where)
    for split in ("train", "val", "test"):
        for i, ds in enumerate(getattr(cfg.data, split)):
            try:
                check_dataset_config(ds, train=split == "train")
                if ds.type == "synthetic":
                    build_dataset(ds, cfg.data, train=split == "train", write_fraction_list=False)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"data.{split}[{i}]{where}: {err}") from err


def check_config(cfg: ExperimentConfig, source: str = "") -> ExperimentConfig:
    """``cfg`` with its registry names, its values and its datasets checked; ``source``: the file named in
    errors. A backbone spelt like a config file (``dinov2-l``) or a paper (``DINOv2-L``) becomes its
    registered name (``dinov2_l``), so the saved config and the run's records use one spelling; a weights
    path of the package's assets that is not on disk becomes the shipped file (:func:`resolve_shipped_weights`).

    Raises:
        dgss.config.ConfigError: one line naming the key, the value and the closest valid name.
    """
    where = f" in {source}" if source else ""
    check_backbone_name(cfg.model.backbone, where)
    cfg.model.backbone = canonical_backbone_name(cfg.model.backbone)
    cfg.model.weights = resolve_shipped_weights(cfg.model.weights)
    check_head_type(cfg.model.head.type, where)
    check_method_name(cfg.method.name, where)
    cfg = validate_config(cfg, source)
    check_datasets(cfg, where)
    return cfg
