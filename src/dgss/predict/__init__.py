"""Using a trained model: load any dgss checkpoint, predict on images, folders and videos.

    import dgss
    model = dgss.load("runs/rein/model_final.safetensors")   # a Predictor around the Segmentor
    result = model.predict("street.png", tta="flip")
    result.labels, result.scores                               # H x W train ids, K x H x W scores
    model.model                                                # the Segmentor itself (eval mode)

One module per part:

    loading.py     checkpoint kinds (dgss files, training checkpoints, run folders, official Rein)
    predictor.py   image inputs, test-time augmentation, Predictor and Prediction
    inputs.py      files, folders and videos for `dgss predict`
    writers.py     colour masks, overlays, panels, train-id and label-id PNGs
    run.py         the `dgss predict` driver (batches, progress, errors that do not stop the run)
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from .loading import CheckpointError, LoadedModel, load_segmentor, resolve_model_file
from .predictor import TTA, Prediction, Predictor, parse_tta, to_rgb_array, train_ids_to_label_ids, tta_inference

__all__ = [
    "load", "CheckpointError", "LoadedModel", "load_segmentor", "resolve_model_file",
    "TTA", "Prediction", "Predictor", "parse_tta", "to_rgb_array", "train_ids_to_label_ids", "tta_inference",
]


def load(path: Union[str, os.PathLike], *, config=None, overrides: Sequence[str] = (),
         backbone_weights: Optional[Union[str, os.PathLike]] = None, device=None) -> Predictor:
    """A trained model, ready to predict: ``dgss.load(path).predict(image)``.

    Args:
        path: a dgss model file (``model_final.safetensors``), a training checkpoint (either half), a run
            folder, or an official Rein or released SoMA ``.pth`` (then ``config`` is required).
        config: experiment YAML or ExperimentConfig, for files that carry no config.
        overrides: dotted config overrides (e.g. ``["eval.mode=whole"]``).
        backbone_weights: the pretrained backbone file for method-only checkpoints whose recorded
            file has moved, or for official Rein checkpoints.
        device: "cpu", "cuda", ...; default CUDA when available.

    Returns:
        a :class:`Predictor`; ``.model`` is the :class:`~dgss.models.segmentor.Segmentor` in eval mode
        and ``.cfg`` its config.

    Raises:
        CheckpointError: missing file, unknown kind or keys that do not fit; the message names the file.
    """
    loaded = load_segmentor(path, config=config, overrides=overrides, backbone_weights=backbone_weights,
                            device=device)
    return Predictor(loaded.model, loaded.cfg, source=loaded.source)
