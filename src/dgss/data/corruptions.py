"""Cityscapes-C style corrupted evaluation: the ImageNet-C corruptions at 5 severities, applied on the
fly to evaluation images through the optional ``imagecorruptions`` package
(``pip install 'dgss[corruptions]'``).

``imagecorruptions`` 1.1.2 (its latest release) predates NumPy 2, scikit-image 0.19 and setuptools
without ``pkg_resources``. Rather than re-implementing its corruptions (the numbers must be the
published ones), :func:`load_imagecorruptions` imports it with narrowly scoped fixes that only touch
that package's own module: a stand-in for ``pkg_resources.resource_filename`` while it is imported,
scikit-image's ``channel_axis`` for its removed ``multichannel`` argument, the removed
``numpy.float_`` alias, and a seed for scikit-image's ``random_noise`` (which no longer follows
NumPy's global generator).

Corruptions draw from NumPy's global generator; :class:`ImageCorruption` seeds it from the sample
index (and restores it afterwards) so a corrupted set is the same on every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["CORRUPTIONS", "ImageCorruption", "load_imagecorruptions", "expand_corruptions"]

# The 15 ImageNet-C corruptions (noise, blur, weather, digital) followed by the 4 extra ones.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:11],
    "digital": CORRUPTIONS[11:15], "extra": CORRUPTIONS[15:], "all": CORRUPTIONS,
    "benchmark": CORRUPTIONS[:15],
}

_MODULE: Optional[types.ModuleType] = None


class _Override:
    """Attribute access to ``target`` with some attributes replaced (a module seen through a lens)."""

    def __init__(self, target: Any, **replaced: Any) -> None:
        self._target = target
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _NumpyWithOldAliases(types.ModuleType):
    """numpy, plus the aliases NumPy 2 removed that imagecorruptions still uses."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _resource_filename(package: str, resource: str) -> str:
    module = sys.modules[package]
    return os.path.join(os.path.dirname(module.__file__), resource)


def load_imagecorruptions() -> types.ModuleType:
    """The ``imagecorruptions`` package, importable and working on current NumPy/scikit-image."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    shim = None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # its scipy.ndimage.interpolation import is deprecated, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            package = importlib.import_module("imagecorruptions")
    except ImportError as err:
        raise ImportError(
            "corrupted evaluation needs the optional package imagecorruptions: "
            f"pip install 'dgss[corruptions]' (or pip install imagecorruptions); import failed with: {err}"
        ) from err
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    module = sys.modules["imagecorruptions.corruptions"]
    original_gaussian = module.gaussian

    def gaussian(image, sigma=1, multichannel=None, **kwargs):
        if multichannel is not None:
            kwargs.setdefault("channel_axis", -1 if multichannel else None)
        return original_gaussian(image, sigma=sigma, **kwargs)

    module.gaussian = gaussian
    module.np = _NumpyWithOldAliases("numpy")
    random_noise = module.sk.util.random_noise
    seed_keyword = "rng" if "rng" in inspect.signature(random_noise).parameters else "seed"

    def seeded_random_noise(image, *args, **kwargs):
        kwargs.setdefault(seed_keyword, int(np.random.randint(0, 2**31 - 1)))  # from the seeded global state
        return random_noise(image, *args, **kwargs)

    module.sk = _Override(module.sk, util=_Override(module.sk.util, random_noise=seeded_random_noise))
    _MODULE = package
    return package


@dataclasses.dataclass
class ImageCorruption:
    """``(image, index) -> image``: one corruption at one severity, deterministic per sample index.

    Images are H x W x 3 uint8 (at least 32 x 32); the output has the input's shape and dtype.
    """

    name: str
    severity: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            close = difflib.get_close_matches(self.name, CORRUPTIONS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown corruption '{self.name}'{hint} (valid: {', '.join(CORRUPTIONS)})")
        if self.severity not in (1, 2, 3, 4, 5):
            raise ValueError(f"corruption severity must be 1..5, got {self.severity}")
        load_imagecorruptions()  # fail at dataset construction, not in a worker

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        package = load_imagecorruptions()
        saved = np.random.get_state()
        np.random.seed((self.seed * 1_000_003 + index * 7919 + CORRUPTIONS.index(self.name)) % 2**32)
        try:
            out = package.corrupt(np.ascontiguousarray(image), severity=self.severity, corruption_name=self.name)
        finally:
            np.random.set_state(saved)
        out = np.clip(np.asarray(out), 0, 255)
        if out.shape != image.shape:  # some corruptions return a resized copy; keep label alignment
            raise ValueError(f"corruption {self.name} changed the image shape {image.shape} -> {out.shape}")
        return out.astype(np.uint8)


def expand_corruptions(
    dataset_cfg: Any, corruptions: str | Iterable[str] = "benchmark", severities: Sequence[int] = (1, 2, 3, 4, 5)
) -> list:
    """One copy of a :class:`~dgss.config.DatasetConfig` per corruption and severity (Cityscapes-C).

    ``corruptions``: a group name (noise, blur, weather, digital, extra, benchmark = the 15
    ImageNet-C ones, all) or a list of names. Copies are named ``<name>/<corruption>-<severity>``.
    """
    names = CORRUPTION_GROUPS.get(corruptions) if isinstance(corruptions, str) else tuple(corruptions)
    if names is None:
        raise ValueError(f"unknown corruption group '{corruptions}' (valid: {', '.join(CORRUPTION_GROUPS)})")
    base = dataset_cfg.name or dataset_cfg.type
    return [
        dataclasses.replace(dataset_cfg, corruption=name, severity=severity, name=f"{base}/{name}-{severity}")
        for name in names for severity in severities
    ]
