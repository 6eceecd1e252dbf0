"""The DG testbed's pool version 3 (issue 37): night's look in the pool, snow as the unseen look, two looks
of one scene as the views of the SSL recipe, and pretraining in resumable chunks."""

import json

import numpy as np
import pytest
import torch

from dgss.data.synthetic import SEVERITY_STYLES, generate
from dgss.testbed.pool import (NIGHT_EXPOSURE, POOL_VERSIONS, UNSEEN_FAMILIES, held_out_families, pool_family,
                               pool_image, pool_style, pool_views, pool_weights)
from dgss.testbed.ssl import SSLRecipe, multi_crop

from test_testbed import TINY_SSL, _pretrain, tiny_ssl_architecture  # noqa: F401 (a fixture)


def _edges(image: np.ndarray) -> np.ndarray:
    grey = image.astype(np.float32).mean(-1)
    return np.abs(np.diff(grey, axis=0))[:, :-1] + np.abs(np.diff(grey, axis=1))[:-1]


def test_version_3_renders_nights_look_and_no_version_renders_snow():
    assert set(pool_weights(3)) == set(pool_weights(2)) | {"night"} and POOL_VERSIONS[-1] == 3
    assert held_out_families(3) == UNSEEN_FAMILIES == ("snow",) and held_out_families(2) == ("night",)
    rng = np.random.default_rng(0)
    for version in POOL_VERSIONS:
        for family in pool_weights(version):
            for _ in range(10):
                style = pool_style(rng, family)
                assert not style.snow  # the unseen look, in every version
                assert style.night == (family == "night")
                if family == "night":
                    assert NIGHT_EXPOSURE[0] <= style.exposure[0] <= NIGHT_EXPOSURE[1]
    families = [pool_family(i, 3) for i in range(600)]
    night = [i for i, f in enumerate(families) if f == "night"]
    assert 0.06 * 600 < len(night) < 0.16 * 600
    # night's colour (moonlit blue ambient light) is in the pool now: bluer than the dim scenes of "dark"
    dark = [i for i, f in enumerate(families) if f == "dark"]

    def blue_over_red(i):
        image = pool_image(i, version=3).astype(np.float64)
        return image[..., 2].mean() / max(image[..., 0].mean(), 1.0)

    assert np.median([blue_over_red(i) for i in night[:8]]) > np.median([blue_over_red(i) for i in dark[:8]]) + 0.2


def test_snow_is_an_appended_look_on_the_same_scenes():
    names = list(SEVERITY_STYLES)
    assert names[-2:] == ["snow-1", "snow-2"]  # appended: every other style keeps its index and its draws
    snow, snow_label = generate("snow-2", 20_000_005, (128, 256), "visible")
    plain, label = generate("textured", 20_000_005, (128, 256), "visible")
    assert np.array_equal(snow_label, label)  # the same scene, labels unchanged by the snow
    road = label == 0
    # snow settles on the road: brighter and greyer (less saturated) there than in the textured look
    assert snow[road].mean() > plain[road].mean() + 30
    assert np.ptp(snow[road].mean(0)) < np.ptp(plain[road].mean(0)) + 5


def test_pool_views_are_one_scene_in_two_looks():
    first, second = pool_views(11, version=3)
    assert np.array_equal(first, pool_image(11, version=3))  # the image of the pool itself, then another look
    assert not np.array_equal(first, second)
    same = np.corrcoef(_edges(first).ravel(), _edges(second).ravel())[0, 1]
    other = np.corrcoef(_edges(first).ravel(), _edges(pool_image(12, version=3)).ravel())[0, 1]
    assert same > other + 0.2  # the same edges: one layout under two appearances


def test_two_look_views_cut_view_two_and_every_other_local_from_the_second_look():
    recipe = SSLRecipe(**{**TINY_SSL, "jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": (0.0, 0.0, 0.0)})
    dark = torch.full((2, 3, 64, 128), 40, dtype=torch.uint8)
    bright = torch.full((2, 3, 64, 128), 220, dtype=torch.uint8)
    g, loc = multi_crop(dark, recipe, torch.Generator().manual_seed(0), second_look=bright)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    level = lambda v: ((v * std + mean) * 255).flatten(1).mean(1)  # noqa: E731
    assert torch.allclose(level(g), torch.tensor([40.0, 40, 220, 220]), atol=1)  # view 1 of both, then view 2
    assert torch.allclose(level(loc), torch.tensor([40.0, 40, 220, 220]), atol=1)  # local 1 (B), local 2 (B)


def test_a_run_in_chunks_and_with_view_workers_equals_an_uninterrupted_one(tmp_path, tiny_ssl_architecture):
    from safetensors.torch import load_file

    extra = {"pool_version": 3, "views": "two_looks"}
    straight = _pretrain(tmp_path, "straight.safetensors", 4, overrides_extra=extra)
    manifest = json.loads(straight.with_suffix(".json").read_text())
    assert manifest["recipe"]["views"] == "two_looks" and manifest["pool"]["held_out_families"] == ["snow"]
    assert "night" in manifest["pool"]["families"] and manifest["pool"]["images_seen"] == 8
    state = tmp_path / "state.pt"
    assert _pretrain(tmp_path, "chunked.safetensors", 4, overrides_extra=extra, checkpoint=state, stop_at=1) is None
    assert torch.load(state, weights_only=True)["iteration"] == 1
    assert _pretrain(tmp_path, "chunked.safetensors", 4, overrides_extra=extra, checkpoint=state, stop_at=3) is None
    chunked = _pretrain(tmp_path, "chunked.safetensors", 4, overrides_extra=extra, checkpoint=state, workers=2)
    a, b = load_file(straight), load_file(chunked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a state of another recipe is refused, not resumed into a different run
    _pretrain(tmp_path, "other.safetensors", 4, overrides_extra=extra, checkpoint=state, stop_at=1)
    with pytest.raises(ValueError, match="another pretraining recipe"):
        _pretrain(tmp_path, "other.safetensors", 4, overrides_extra={"pool_version": 3}, checkpoint=state)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        _pretrain(tmp_path, "x.safetensors", 4, stop_at=1)
    with pytest.raises(ValueError, match="unknown views"):
        _pretrain(tmp_path, "x.safetensors", 4, overrides_extra={"views": "three"})
