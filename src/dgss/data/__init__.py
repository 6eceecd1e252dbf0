"""Datasets as users download them, the augmentation recipe, loaders and synthetic domains.

Quick use::

    from dgss.config import DatasetConfig, DataConfig
    from dgss.data import build_dataset
    ds = build_dataset(DatasetConfig(type="cityscapes", root="data/cityscapes", split="val",
                                     resize=[1024, 512]), DataConfig(), train=False)
    sample = ds[0]  # {"image": 3 x h x w float32, "label": H x W int64, "name": str, "ori_size": (H, W)}

Dataset types (``DatasetConfig.type``), the folders under ``root`` they read, and their ``options``:

==========  ==============================================================  ==========================
type        layout (as the official download unpacks)                       options
==========  ==============================================================  ==========================
gtav        images/*.png, labels/*.png (label ids)                          -
synthia     RGB/*.png, GT/LABELS/*.png (16-bit, class in channel 1)         eval_classes: 16 | 13 | 19
cityscapes  leftImg8bit/<split>/<city>/, gtFine/<split>/<city>/             label_type: auto | train_ids | label_ids
bdd100k     images/10k/<split>/*.jpg, labels/sem_seg/masks/<split>/*.png    -
mapillary   <split>/images/*.jpg, <split>/<version>/labels/*.png, config    version (v1.2), half_resolution
acdc        rgb_anon/<cond>/<split>/<seq>/, gt/<cond>/<split>/<seq>/        (field ``condition``)
urbansyn    rgb/*.png, ss/*.png                                             -
folder      any: see :mod:`dgss.data.folder`                                images, labels, label_rules, ...
synthetic   nothing on disk: :mod:`dgss.data.synthetic`                     domain, num_images, size, seed
==========  ==============================================================  ==========================

Common fields: ``split``, ``list_file``, ``first_n``, ``fraction``, ``resize`` (evaluation),
``with_labels``, ``on_bad_sample``, ``on_unknown_label``, ``corruption`` + ``severity``.
"""

from .base import Sample, SegmentationDataset
from .builder import DATASET_TYPES, build_dataset, dataset_name, select_fraction
from .corruptions import CORRUPTIONS, ImageCorruption, expand_corruptions
from .folder import FolderDataset
from .image_io import BadSampleError, DataError, UnreadableFileError
from .labels import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    SYNTHIA_13_TRAIN_IDS,
    SYNTHIA_16_TRAIN_IDS,
    TRAIN_ID_TO_LABEL_ID,
    LabelValueError,
    colorize,
)
from .layouts import (
    ACDCDataset,
    BDD100KDataset,
    CityscapesDataset,
    GTAVDataset,
    MapillaryDataset,
    SynthiaDataset,
    UrbanSynDataset,
)
from .loader import (
    EvalLoader,
    InfiniteSampler,
    TrainLoader,
    UniformSourceSampler,
    build_eval_loader,
    build_train_loader,
    seed_worker,
)
from .synthetic import DOMAINS, SyntheticDataset, generate, write_cityscapes_layout, write_gtav_layout
from .transforms import EvalTransform, TrainTransform

__all__ = [
    "ACDCDataset", "BDD100KDataset", "BadSampleError", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
    "CORRUPTIONS", "CityscapesDataset", "DATASET_TYPES", "DOMAINS", "DataError", "EvalLoader",
    "EvalTransform", "FolderDataset", "GTAVDataset", "IGNORE_INDEX", "ImageCorruption", "InfiniteSampler",
    "LABEL_ID_TO_TRAIN_ID", "LabelValueError", "MapillaryDataset", "SYNTHIA_13_TRAIN_IDS",
    "SYNTHIA_16_TRAIN_IDS", "Sample", "SegmentationDataset", "SynthiaDataset", "SyntheticDataset",
    "TRAIN_ID_TO_LABEL_ID", "TrainLoader", "TrainTransform", "UniformSourceSampler", "UnreadableFileError",
    "UrbanSynDataset", "build_dataset", "build_eval_loader", "build_train_loader", "colorize", "dataset_name",
    "expand_corruptions", "generate", "seed_worker", "select_fraction", "write_cityscapes_layout",
    "write_gtav_layout",
]
