"""Cityscapes-C style corrupted evaluation through the optional imagecorruptions package."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from dgss.config import ConfigError, DataConfig, DatasetConfig
from dgss.data import CORRUPTIONS, ImageCorruption, build_dataset, expand_corruptions, generate
from dgss.data import corruptions as corruptions_module


def _importable() -> bool:
    try:
        corruptions_module.load_imagecorruptions()
        return True
    except ImportError:
        return False


# Installed by the dev extra; without it only the "missing package" behaviour is tested.
needs_package = pytest.mark.skipif(not _importable(), reason="optional extra: pip install 'dgss[corruptions]'")


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return generate("textured", 0, (48, 64))[0]


@needs_package
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_changes_the_image_deterministically(name, scene):
    corruption = ImageCorruption(name, severity=3)
    out = corruption(scene, index=4)
    assert out.shape == scene.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - scene).mean() > 0.5
    assert np.array_equal(out, corruption(scene, index=4))  # the same image every run


@needs_package
def test_severity_grows_the_change(scene):
    change = [np.abs(ImageCorruption("gaussian_noise", s)(scene, 0).astype(int) - scene).mean() for s in (1, 3, 5)]
    assert change[0] < change[1] < change[2]
    state = np.random.get_state()[1].copy()
    ImageCorruption("shot_noise", 2)(scene, 1)
    assert np.array_equal(np.random.get_state()[1], state)  # NumPy's global generator is restored


@needs_package
def test_corrupted_dataset_from_config():
    options = {"num_images": 2, "size": [40, 40]}
    clean = build_dataset(DatasetConfig(type="synthetic", options=options), DataConfig(), train=False)
    noisy = build_dataset(DatasetConfig(type="synthetic", options=options, corruption="gaussian_noise", severity=5),
                          DataConfig(), train=False)
    assert noisy.name == "synthetic/gaussian_noise-5"
    assert np.array_equal(clean.load(0)[1], noisy.load(0)[1])  # labels untouched
    assert np.abs(clean.load(0)[0].astype(int) - noisy.load(0)[0]).mean() > 10
    with pytest.raises(ConfigError, match="needs a severity"):
        build_dataset(DatasetConfig(type="synthetic", corruption="fog"), DataConfig(), train=False)
    with pytest.raises(ValueError, match="did you mean 'motion_blur'"):
        ImageCorruption("motoin_blur", 1)
    suite = expand_corruptions(DatasetConfig(type="cityscapes", root="x"))
    assert len(suite) == 75 and suite[0].name == "cityscapes/gaussian_noise-1" and suite[-1].severity == 5


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(corruptions_module, "_MODULE", None)
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'dgss\[corruptions\]'"):
        ImageCorruption("fog", 1)
