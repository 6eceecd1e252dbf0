"""Open any model file dgss writes (or an official Rein checkpoint) as a ready segmentor.

Kinds of checkpoint, recognised by their contents rather than their names:

* a dgss model file (``.safetensors`` with "dgss" metadata): ``RUN/model_final.safetensors`` or a
  training checkpoint ``RUN/checkpoints/iter_*.safetensors`` (the ``.state.pt`` half may be given
  too). Its metadata holds the resolved config, so nothing else is needed; a method-only file
  (Rein/FisherTune + head, no pretrained backbone tensors) rebuilds the backbone from the weights
  file recorded at training time, or from ``backbone_weights`` when it has moved. The backbone's
  fingerprint is checked, so a different weights file is reported instead of silently used.
* a run folder (``RUN``: its final model, else its newest checkpoint) or a checkpoint folder.
* an official Rein checkpoint (``.pth`` with ``backbone.reins.*`` and ``decode_head.*``): needs the
  experiment config it was trained with (``config``) and the backbone's weights file.
* a FADA checkpoint of its public code (the same layout plus ``backbone.reins.wavepool.*`` and the
  style branch's keys, :mod:`dgss.tuning.fada`): the same, with a FADA config.
* a released SoMA checkpoint (``.pth`` with ``backbone.model.*.lora_A.weight``, :mod:`dgss.tuning.
  soma_checkpoint`): the same; built with ``method.soma.init: public_code`` and folded.
* a plain state dict of a dgss segmentor (``.safetensors``/``.pth`` without metadata): needs ``config``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..config import ExperimentConfig, apply_overrides, from_dict, load_config, parse_overrides, to_dict
from ..engine.checkpoint import CheckpointError, latest_checkpoint, load_model_weights
from ..tuning.rein_checkpoint import (OFFICIAL_REIN_PREFIX, PRETRAINED_PREFIX, ReinCheckpointError, load_segmentor_state,
                                      read_model_file_metadata)

__all__ = ["CheckpointError", "LoadedModel", "resolve_model_file", "load_segmentor", "is_dgss_model_file"]

PathLike = Union[str, os.PathLike]
ConfigLike = Union[None, PathLike, ExperimentConfig]


@dataclasses.dataclass
class LoadedModel:
    """A segmentor in eval mode, the config that built it and where it came from."""

    model: torch.nn.Module  # a dgss.models.segmentor.Segmentor
    cfg: ExperimentConfig
    source: Path
    kind: str  # "dgss" | "official-rein" | "official-fada" | "official-soma" | "state-dict"


def resolve_model_file(path: PathLike) -> Path:
    """The model file a user means by ``path``: the file itself, the model half of a training
    checkpoint, or the final model / newest checkpoint of a run or checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_final.safetensors").is_file():
            return path / "model_final.safetensors"
        for directory in (path, path / "checkpoints"):
            found = latest_checkpoint(directory) if directory.is_dir() else None
            if found is not None:
                return found
        raise CheckpointError(f"{path} is a folder without model_final.safetensors or a checkpoint "
                              "('last' pointer): give the model file itself")
    if path.name.endswith(".state.pt"):  # the training-state half: use its model half
        path = path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def _config_from(config: ConfigLike, overrides: Sequence[str], what: Path) -> ExperimentConfig:
    if config is None:
        raise CheckpointError(f"{what} holds no dgss config: pass the experiment config it was trained with "
                              "(--config FILE / config=)")
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        data = apply_overrides(to_dict(config), parse_overrides(list(overrides)))
        return from_dict(ExperimentConfig, data, source="command-line overrides")
    return load_config(config, list(overrides))


def _with_weights(cfg: ExperimentConfig, backbone_weights: Optional[PathLike]) -> ExperimentConfig:
    if backbone_weights is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(backbone_weights)))


def is_dgss_model_file(path: PathLike) -> bool:
    """Whether ``path`` is a safetensors file with dgss metadata (a final model or training checkpoint)."""
    return _has_dgss_metadata(Path(path))


def _has_dgss_metadata(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    try:
        read_model_file_metadata(path)
    except ReinCheckpointError:
        return False  # a safetensors file, just not one of ours
    except Exception as err:  # truncated or not safetensors at all
        raise CheckpointError(f"{path} cannot be read as a safetensors file: {err}") from err
    return True


def _load_dgss_file(path: Path, overrides: Sequence[str], backbone_weights: Optional[PathLike]):
    from ..tuning.model import build_segmentor

    meta = read_model_file_metadata(path)
    data = meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} has dgss metadata without a config (format {meta.get('format_version')})")
    if overrides:
        data = apply_overrides(data, parse_overrides(list(overrides)))
    cfg = from_dict(ExperimentConfig, data, source=f"{path} (stored config)")
    if meta.get("contents") == "full":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))  # all tensors inside
    else:
        cfg = _with_weights(cfg, backbone_weights)
        weights = cfg.model.weights
        if weights is None:
            raise CheckpointError(f"{path} holds the method and head only: pass the pretrained "
                                  f"'{meta.get('backbone')}' weights file (--backbone-weights / backbone_weights=)")
        if weights != "hub" and not Path(weights).is_file():
            raise CheckpointError(f"{path} needs the pretrained backbone file {weights!r}, which does not exist "
                                  "here: pass its new location (--backbone-weights / backbone_weights=)")
    model = build_segmentor(cfg)
    load_model_weights(model, path)  # checks the backbone's name and fingerprint, and missing keys
    return model, cfg


def _read_plain_state(path: Path) -> dict[str, torch.Tensor]:
    from ..models.backbone_weights import BackboneWeightsError, read_state_dict

    try:
        return read_state_dict(path)
    except BackboneWeightsError as err:
        raise CheckpointError(f"{path} is not a checkpoint dgss can read: {err}") from err
    except Exception as err:  # a corrupt safetensors header, a truncated zip, ...
        raise CheckpointError(f"{path} cannot be read: {type(err).__name__}: {err}") from err


def load_segmentor(path: PathLike, *, config: ConfigLike = None, overrides: Sequence[str] = (),
                   backbone_weights: Optional[PathLike] = None, device: Union[str, torch.device, None] = "cpu"
                   ) -> LoadedModel:
    """Rebuild the segmentor a checkpoint describes (see the module docstring for the kinds).

    Args:
        path: a model file, the state half of a training checkpoint, a run or checkpoint folder.
        config: an experiment YAML or :class:`ExperimentConfig`; required for official Rein, released
            SoMA and plain state-dict files, which carry no config; ignored for dgss model files except through
            ``overrides``.
        overrides: dotted overrides applied to the config (e.g. ``["eval.mode=whole"]``).
        backbone_weights: the pretrained backbone file, for files that do not hold it.
        device: where to put the model (None: CUDA when available).

    Raises:
        CheckpointError: the file is missing, of an unknown kind, or does not fit (names the file).
    """
    from ..tuning.model import build_segmentor
    from ..tuning.rein_checkpoint import segmentor_from_official_rein
    from ..tuning.soma_checkpoint import SoMACheckpointError, is_official_soma_state, segmentor_from_official_soma

    source = resolve_model_file(path)
    if _has_dgss_metadata(source):
        model, cfg = _load_dgss_file(source, overrides, backbone_weights)
        kind = "dgss"
    else:
        state = _read_plain_state(source)
        if any(k.startswith(OFFICIAL_REIN_PREFIX) for k in state):
            # FADA's public code is a fork of Rein's: its checkpoints have the same layout, more reins keys
            is_fada = OFFICIAL_REIN_PREFIX + "wavepool.LL.weight" in state
            method = "fada" if is_fada else "rein"
            cfg = _with_weights(_config_from(config, overrides, source), backbone_weights)
            if cfg.method.name != method:
                raise CheckpointError(f"{source} is an official {method.upper() if is_fada else 'Rein'} checkpoint "
                                      f"but the config's method is '{cfg.method.name}': use a config with "
                                      f"method.name: {method}")
            try:
                model = segmentor_from_official_rein(cfg, {"state_dict": state})
            except (ReinCheckpointError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"{source} does not fit the {cfg.method.name} model of the config: "
                                      f"{err}") from err
            kind = f"official-{method}"
        elif is_official_soma_state(state):
            cfg = public_code_config_for(_with_weights(_config_from(config, overrides, source), backbone_weights),
                                         source)
            try:
                model = segmentor_from_official_soma(cfg, state)
            except (SoMACheckpointError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"{source} does not fit the SoMA model of the config: {err}") from err
            kind = "official-soma"
        elif any(k.startswith(("backbone.", "head.", "method.")) for k in state):
            cfg = _with_weights(_config_from(config, overrides, source), backbone_weights)
            model = build_segmentor(cfg)
            _load_plain_state(model, state, source, cfg)
            kind = "state-dict"
        else:
            sample = ", ".join(list(state)[:3])
            raise CheckpointError(f"{source} is a checkpoint of an unknown kind (keys like {sample}): expected a "
                                  "dgss model file, a training checkpoint, an official Rein or a released SoMA checkpoint")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return LoadedModel(model=model.to(device).eval(), cfg=cfg, source=source, kind=kind)


def public_code_config_for(cfg: ExperimentConfig, source: Path) -> ExperimentConfig:
    """The config a released SoMA file is built with (``init: public_code``), or a CheckpointError."""
    from ..tuning.soma_checkpoint import SoMACheckpointError, public_code_config

    try:
        return public_code_config(cfg)
    except SoMACheckpointError as err:
        raise CheckpointError(f"{source} is a released SoMA checkpoint: {err}") from err


def _load_plain_state(model, state: dict[str, torch.Tensor], source: Path, cfg: ExperimentConfig) -> None:
    """A dgss segmentor's state dict without metadata: every key of the model must be there, except
    the pretrained backbone's when the config names a weights file for it."""
    has_backbone_file = any(k.startswith(PRETRAINED_PREFIX) for k in state)
    if not has_backbone_file and cfg.model.weights is None:
        raise CheckpointError(f"{source} holds no pretrained backbone tensors and the config names no backbone "
                              "weights file (model.weights / --backbone-weights)")
    load_segmentor_state(model, state, source, with_backbone=has_backbone_file, error=CheckpointError,
                         what="the model the config builds")
