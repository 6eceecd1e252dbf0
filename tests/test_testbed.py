"""The DG testbed (issue 22): the unlabeled pool, the self-supervised objective, the label-free foundation's
file and manifest, the visible-class label set, graded shifts, LP-FT, WiSE-FT and the preconditions."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from dgss.data.image_io import DataError
from dgss.data.synthetic import (SEVERITY_STYLES, TESTBED_CLASSES, TESTBED_OF_TRAIN_ID, SyntheticDataset,
                                 generate)
from dgss.testbed.stats import GATING, preconditions, selection_bias, summarize
from dgss.testbed.pool import (DARK_EXPOSURE, HELD_OUT_FAMILIES, MIN_BRIGHTNESS, POOL_FAMILIES, POOL_SEED_OFFSET,
                            pool_family, pool_image, pool_style, pool_weights)
from dgss.testbed.benchmark import SMOKE_BUDGET
from dgss.testbed.experiment import demo_config
from dgss.testbed.ssl import SelfDistillation, SSLRecipe, encode_tokens, multi_crop, random_patch_masks
from dgss.testbed.world import TESTBED_WORLD, foundation_architecture
from dgss.fileio import file_sha256

TINY = dict(backbone="dinov2_s", img_size=32, patch_size=8, backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
TINY_SSL = dict(prototypes=32, head_hidden=32, head_bottleneck=16, global_size=32, local_size=16, local_crops=2,
                freeze_last_layer_iters=0)


def _tiny_vit():
    from dgss.models.backbones import build_backbone

    return build_backbone("dinov2_s", img_size=32, patch_size=8, **TINY["backbone_kwargs"]).model


# ---------------------------------------------------------------- the pool


def test_the_pool_never_holds_night_and_its_scenes_are_no_benchmark_split():
    assert "night" in HELD_OUT_FAMILIES and not any(f.startswith("night") for f in POOL_FAMILIES)
    rng = np.random.default_rng(0)
    for family in POOL_FAMILIES:  # no style of any family is a night style or darker than the floor
        for _ in range(20):
            style = pool_style(rng, family)
            assert not style.night and style.exposure[0] >= 0.45
    night_means = [generate(d, 10_000_000 + i)[0].mean() for d in ("night-1", "night-2") for i in range(6)]
    means = [pool_image(i).mean() for i in range(60)]
    assert min(means) >= MIN_BRIGHTNESS - 1 > max(night_means)
    # every family is drawn, clean rarely; images are deterministic and differ between indices
    families = [pool_family(i) for i in range(2000)]
    assert set(families) == set(POOL_FAMILIES) and families.count("clean") < 0.06 * len(families)
    assert np.array_equal(pool_image(3), pool_image(3)) and not np.array_equal(pool_image(3), pool_image(4))
    assert POOL_SEED_OFFSET > 20_000_000 + 10_000_000  # past the test split's seeds (20,000,000 + index)


def test_pool_version_2_adds_dim_scenes_but_never_nights_look():
    assert tuple(pool_weights(1)) == POOL_FAMILIES and pool_weights() == pool_weights(1)  # 1: the default
    assert set(pool_weights(2)) == set(POOL_FAMILIES) | {"dark"} and not any(f.startswith("night") for f in pool_weights(2))
    with pytest.raises(ValueError, match="unknown pool version 4"):
        pool_family(0, 4)
    rng = np.random.default_rng(1)
    for family in pool_weights(2):  # no style is night's (no blue ambient light, no lamps, no lit windows)
        for _ in range(20):
            style = pool_style(rng, family)
            assert not style.night
            assert (DARK_EXPOSURE[0] <= style.exposure[0] <= DARK_EXPOSURE[1]) if family == "dark" else style.exposure[0] >= 0.45
    families = [pool_family(i, 2) for i in range(400)]
    dark = [i for i, f in enumerate(families) if f == "dark"][:6]
    other = [i for i, f in enumerate(families) if f != "dark"][:30]
    assert 0.06 * 400 < families.count("dark") < 0.16 * 400
    # dark images go below the floor (the point of version 2); the other families keep it
    assert min(pool_image(i, version=2).mean() for i in dark) < MIN_BRIGHTNESS
    assert min(pool_image(i, version=2).mean() for i in other) >= MIN_BRIGHTNESS - 1
    # version 1 is the default and unchanged by version 2's family: the family draw is the same as before
    assert [pool_family(i) for i in range(200)] == [pool_family(i, 1) for i in range(200)]
    assert np.array_equal(pool_image(other[0]), pool_image(other[0], version=1))


def test_the_recipe_records_a_pool_version_only_when_it_is_not_the_first():
    from dgss.testbed.ssl_foundation import _recipe, ssl_pretrain_command

    assert "pool_version" not in _recipe({"pool_version": 1})[0]
    assert _recipe({"pool_version": 2})[0]["pool_version"] == 2 == _recipe({})[0]["pool_version"]  # the shipped one
    with pytest.raises(ValueError, match="unknown pool version 7"):
        _recipe({"pool_version": 7})
    # version 1's command names no version (its file's metadata holds the command: its bytes stay)
    assert ssl_pretrain_command(pool_version=1) == "dgss demo --pretrain-ssl src/dgss/assets/testbed_foundation_vit.safetensors"
    assert ssl_pretrain_command() == ssl_pretrain_command(pool_version=2)  # the shipped file's pool
    assert ssl_pretrain_command(pool_version=2, device="cuda").endswith("--pool-version 2 --device cuda")
    # a longer run (issue 37's 2-million-image one) names its length, so its manifest's command remakes it
    assert ssl_pretrain_command(pool_version=3, iters=62_500).endswith("--pool-version 3 --iters 62500")
    assert ssl_pretrain_command(iters=500, threads=1) == ssl_pretrain_command()  # the shipped recipe's values
    assert ssl_pretrain_command(threads=2).endswith("--threads 2")


def test_ssl_augmentations_never_dim_below_three_quarters():
    recipe = SSLRecipe(**TINY_SSL)
    assert recipe.brightness[0] >= 0.75 and not hasattr(recipe, "solarize")
    images = torch.full((2, 3, 64, 128), 100, dtype=torch.uint8)  # flat grey: the mean only moves by brightness
    g, loc = multi_crop(images, recipe, torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = torch.cat([(g * std + mean).flatten(1), (loc * std + mean).flatten(1)], 1) * 255
    assert g.shape == (4, 3, 32, 32) and loc.shape == (4, 3, 16, 16)
    assert pixels.mean(1).min() >= 0.75 * 100 - 1


# ---------------------------------------------------------------- the objective


def test_masked_patches_are_replaced_by_the_mask_token_before_the_position_embedding():
    vit = _tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    token = torch.randn(1, 32)
    # oracle: the patch embedding with that entry replaced, then timm's own path
    emb = vit.patch_embed(x)
    emb[0, 1, 2] = token[0]
    expected = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(emb))))
    assert torch.allclose(encode_tokens(vit, x, masks, token), expected, atol=1e-6)
    assert torch.allclose(encode_tokens(vit, x), vit.forward_features(x), atol=1e-6)


def test_random_masks_follow_the_recipe():
    recipe = SSLRecipe(mask_prob=0.5, mask_ratio=(0.1, 0.5))
    masks = random_patch_masks(400, 12, recipe, torch.Generator().manual_seed(0))
    share = masks.flatten(1).float().mean(1)
    masked = share > 0
    assert 0.4 < masked.float().mean() < 0.6
    assert share[masked].min() >= 0.09 and share[masked].max() <= 0.51


@pytest.mark.parametrize("objective", ["dino", "dino_ibot"])
def test_the_self_supervised_loss_decreases(objective):
    """With the teacher and its centre held fixed (momentum 1), each loss is a cross-entropy to a fixed
    target, which the student's gradient steps must reduce (with a moving teacher the targets move, and
    DINO's loss need not fall)."""
    torch.manual_seed(0)
    recipe = SSLRecipe(objective=objective, center_momentum=1.0, **TINY_SSL)
    model = SelfDistillation(_tiny_vit(), recipe)
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=2e-3)
    images = torch.randint(0, 255, (8, 3, 48, 48), dtype=torch.uint8)
    g, loc = multi_crop(images, recipe, torch.Generator().manual_seed(1))
    masks = random_patch_masks(g.shape[0], 4, SSLRecipe(mask_prob=1.0), torch.Generator().manual_seed(2))
    losses = []
    for _ in range(25):
        loss, logs = model(g, loc, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(1.0)
        losses.append(loss.item())
        assert ("ibot" in logs) == (objective == "dino_ibot")
        assert 0 <= logs["teacher_entropy"] <= 1 and 1 <= logs["feature_rank"] <= 32
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


def test_teacher_is_the_exponential_moving_average_of_the_student():
    model = SelfDistillation(_tiny_vit(), SSLRecipe(**TINY_SSL))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(0.75)
    for t, b, s in zip(model.teacher.parameters(), before, model.student.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


# ---------------------------------------------------------------- the foundation file


def _pretrain(tmp_path, name, iters, overrides_extra=None, **kwargs):
    from dgss.testbed import ssl_foundation as foundation_ssl

    overrides = dict(batch_size=2, warmup_iters=1, threads=1, ssl=TINY_SSL, **(overrides_extra or {}))
    return foundation_ssl.pretrain_ssl_foundation(tmp_path / name, iters=iters, progress=False, overrides=overrides,
                                                  monitor_every=10_000, log=lambda line: None, **kwargs)


@pytest.fixture
def tiny_ssl_architecture(monkeypatch):
    from dgss.testbed import ssl_foundation as foundation_ssl

    monkeypatch.setattr(foundation_ssl, "SSL_FOUNDATION", TINY)
    monkeypatch.setattr(foundation_ssl, "dense_knn_probe", lambda vit, **kw: {"clean": 0.0})


def test_pretraining_writes_a_label_free_manifest_and_resumes_bit_exactly(tmp_path, tiny_ssl_architecture):
    from safetensors.torch import load_file

    from dgss.testbed import ssl_foundation as foundation_ssl

    straight = _pretrain(tmp_path, "straight.safetensors", 4)
    manifest = json.loads(straight.with_suffix(".json").read_text())
    assert manifest["labels_used"] is False and manifest["objective"] == foundation_ssl.PRETRAIN_SSL["ssl"]["objective"]
    assert manifest["pool"]["held_out_families"] == ["night"] and "night" not in manifest["pool"]["families"]
    assert manifest["command"].startswith("dgss demo --pretrain-ssl") and manifest["pool"]["images_seen"] == 8
    assert foundation_architecture(str(straight), {})["patch_size"] == 8

    # 2 iterations, "killed", then resumed from the checkpoint: the same file as 4 straight
    ckpt = tmp_path / "run.ckpt"
    original = foundation_ssl._batch

    def failing(it, batch_size, pool_version=1):
        if it == 3:
            raise KeyboardInterrupt  # killed during iteration 3
        return original(it, batch_size, pool_version)

    foundation_ssl._batch = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            _pretrain(tmp_path, "resumed.safetensors", 4, checkpoint=ckpt, checkpoint_every=2)
    finally:
        foundation_ssl._batch = original
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["iteration"] == 2
    resumed = _pretrain(tmp_path, "resumed.safetensors", 4, checkpoint=ckpt, checkpoint_every=2)
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()  # a finished run removes its checkpoint

    # the pool's version is recorded in the manifest and the command; version 1 is named by neither
    assert manifest["pool"]["version"] == 2 and "dark" in manifest["pool"]["families"]  # the shipped pool
    assert manifest["recipe"]["pool_version"] == 2 and "--pool-version 2" in manifest["command"]
    v1 = _pretrain(tmp_path, "v1.safetensors", 1, overrides_extra={"pool_version": 1})
    manifest = json.loads(v1.with_suffix(".json").read_text())
    assert manifest["pool"]["version"] == 1 and "dark" not in manifest["pool"]["families"]
    assert "pool_version" not in manifest["recipe"] and "--pool-version" not in manifest["command"]


def test_the_shipped_label_free_foundation_matches_its_manifest_and_recipe():
    from safetensors import safe_open

    from dgss.testbed.ssl_foundation import (SHIPPED_POOL_VERSION, SSL_FOUNDATION, SSL_FOUNDATION_FILE, SSL_MANIFEST_FILE,
                                          _recipe, ssl_pretrain_command)

    manifest = json.loads(SSL_MANIFEST_FILE.read_text())
    assert manifest["sha256"] == file_sha256(SSL_FOUNDATION_FILE) and manifest["labels_used"] is False
    assert manifest["pool"]["version"] == SHIPPED_POOL_VERSION and manifest["command"] == ssl_pretrain_command()
    assert manifest["pool"]["families"] == pool_weights(SHIPPED_POOL_VERSION)
    assert manifest["pool"]["held_out_families"] == list(HELD_OUT_FAMILIES)
    assert not any(f.startswith(h) for f in manifest["pool"]["families"] for h in HELD_OUT_FAMILIES)
    # the file was made by today's recipe (PRETRAIN_SSL and the shipped pool), as its metadata says
    with safe_open(str(SSL_FOUNDATION_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["labels_used"] == "false" and json.loads(meta["architecture"]) == SSL_FOUNDATION
    assert json.loads(meta["recipe"])["pool_version"] == SHIPPED_POOL_VERSION
    assert meta["recipe"] == json.dumps(_recipe({})[0])  # the same text, so the same bytes when remade
    assert SSL_FOUNDATION_FILE.stat().st_size < 15 * 2 ** 20


# ---------------------------------------------------------------- the world


def test_testbed_classes_are_a_token_thick_at_the_median_and_the_dropped_ones_are_not():
    """The label set's rule, measured: the thickest part of a class in an image (2 x the largest distance
    to its border), median over images, at the evaluation size 128 x 256, in the testbed's scenes (its
    vehicle style); a token is 8 px."""
    thick = {c: [] for c in range(19)}
    for seed in range(40):
        _, label = generate("clean", seed, (128, 256), TESTBED_WORLD.objects)
        for c in np.unique(label):
            thick[c].append(2 * ndimage.distance_transform_edt(np.pad(label == c, 1)).max())
    for train_id in range(19):
        if TESTBED_OF_TRAIN_ID[train_id] != 255:
            merged = [c for c in range(19) if TESTBED_OF_TRAIN_ID[c] == TESTBED_OF_TRAIN_ID[train_id]]
            if len(merged) == 1:
                assert np.median(thick[train_id]) >= 8, train_id
        else:
            assert np.median(thick[train_id]) < 8, train_id
    assert len(TESTBED_CLASSES) == 12 == TESTBED_WORLD.num_classes
    ds = SyntheticDataset(domain="clean", num_images=2, label_set="testbed", name="clean")
    _, label = ds.load(0)
    assert ds.classes == TESTBED_CLASSES and set(np.unique(label)) <= set(range(12)) | {255}


def test_visible_objects_tell_truck_bus_and_train_apart_and_leave_plain_scenes_alone():
    """"plain" vehicles (the demo world and the SSL pool) share one shape and one colour set, so truck and
    bus cannot be told apart; "visible" ones (the testbed's) differ in shape and livery, and its traffic
    signs are larger."""
    from dgss.data.scene_layout import BUS, SIGN, TRAIN, TRUCK

    def aspect(objects, cls):  # bounding-box width / height of the class's largest instance
        ratios = []
        for seed in range(60):
            label = generate("clean", seed, (128, 256), objects)[1]
            parts, n = ndimage.label(label == cls)
            if n:
                sizes = ndimage.sum(np.ones_like(label), parts, range(1, n + 1))
                ys, xs = np.nonzero(parts == 1 + int(np.argmax(sizes)))
                if len(ys) > 60:
                    ratios.append((np.ptp(xs) + 1) / (np.ptp(ys) + 1))
        return np.median(ratios)

    plain = {c: aspect("plain", c) for c in (TRUCK, BUS)}
    assert abs(plain[TRUCK] - plain[BUS]) < 0.15  # the defect: indistinguishable by shape
    distinct = {c: aspect("visible", c) for c in (TRUCK, BUS, TRAIN)}
    assert distinct[TRUCK] < distinct[BUS] - 0.2 < distinct[TRAIN] - 0.6
    sign_pixels = {o: np.mean([(generate("clean", s, (128, 256), o)[1] == SIGN).sum() for s in range(30)])
                   for o in ("plain", "visible")}
    assert sign_pixels["visible"] > 2.5 * sign_pixels["plain"]  # 1.8 x the side
    # "plain" is the default everywhere the testbed does not ask for "visible" (the pool, the demo world)
    assert np.array_equal(generate("clean", 3)[1], generate("clean", 3, (128, 256), "plain")[1])
    assert not np.array_equal(generate("clean", 3)[1], generate("clean", 3, (128, 256), "visible")[1])
    assert TESTBED_WORLD.objects == "visible"
    cfg = demo_config("frozen", budget=SMOKE_BUDGET, out_dir="unused", weights=None, world=TESTBED_WORLD)
    assert all(d.options["objects"] == "visible" for d in (*cfg.data.train, *cfg.data.val, *cfg.data.test))
    demo = demo_config("frozen", budget=SMOKE_BUDGET, out_dir="unused", weights=None)
    assert "objects" not in demo.data.train[0].options
    with pytest.raises(DataError, match="objects 'fancy'"):
        SyntheticDataset(domain="clean", num_images=2, objects="fancy")


def test_each_target_family_has_graded_severities():
    def contrast(domain):
        return np.mean([generate(domain, 10_000_000 + i)[0].std() for i in range(6)])

    def brightness(domain):
        return np.mean([generate(domain, 10_000_000 + i)[0].mean() for i in range(6)])

    assert brightness("night-2") < brightness("night-1") < brightness("clean")
    assert contrast("fog-2") < contrast("fog-1")
    families = {d.rsplit("-", 1)[0] for d in TESTBED_WORLD.targets}
    assert families == {"night", "fog", "rain", "colorshift"}
    assert all(sum(t.startswith(f + "-") for t in TESTBED_WORLD.targets) >= 2 for f in families)
    assert set(TESTBED_WORLD.validation) & set(TESTBED_WORLD.targets) == set()
    assert set(TESTBED_WORLD.targets) | set(TESTBED_WORLD.validation) <= set(SEVERITY_STYLES)
    # the same seed shares its layout (label map) across every graded domain
    labels = [generate(d, 5)[1] for d in ("clean", *TESTBED_WORLD.targets)]
    assert all(np.array_equal(labels[0], lab) for lab in labels[1:])


# ---------------------------------------------------------------- the preconditions


def _record(row, seed, source, targets, curve_targets=None, iters=100):
    names = ("t1", "t2")
    curve = [{"iteration": iters // 2, "miou": {"src": source, **dict(zip(names, curve_targets or targets))}},
             {"iteration": iters, "miou": {"src": source, **dict(zip(names, targets))}}]
    return {"row": row, "seed": seed, "trainable": 0, "curve": curve}


def _hand_made(**changes):
    """A results file by hand: frozen 60 on the source, targets 40/44 (mean 42); full +8 source."""
    values = {
        "frozen": [(60, (40, 44)), (61, (41, 45)), (59, (39, 43))],
        "full": [(68, (36, 40)), (69.5, (37, 41)), (66.5, (35, 39))],
        "lp-ft": [(67, (40, 44)), (68, (41, 45)), (66, (40, 44))],
        "scratch": [(30, (10, 12)), (31, (11, 13)), (29, (9, 11))],
        "frozen-2x": [(61, (40, 44))],
        **changes,
    }
    return [_record(row, s, src, tg) for row, runs in values.items() for s, (src, tg) in enumerate(runs)]


def test_preconditions_from_a_hand_made_results_file():
    checks = preconditions(_hand_made(), "src", ("t1", "t2"))
    assert checks["P1"]["value"] == pytest.approx(1.0) and checks["P1"]["pass"] is True  # 61 - 60, seed 0
    # P2: full - frozen on the source: 8, 8.5, 7.5 -> mean 8, sd 0.5 -> 8 >= 5 and 8 >= 1.5
    assert checks["P2"]["value"] == pytest.approx(8.0) and checks["P2"]["sd"] == pytest.approx(0.5)
    assert checks["P2"]["pass"] is True
    assert checks["P3"]["value"] == pytest.approx(60 - 42) and checks["P3"]["pass"] is True
    # P4: the largest std over seeds of the target mean (frozen: 42, 43, 41 -> 1.0; lp-ft: 42, 43, 42)
    assert checks["P4"]["value"] == pytest.approx(1.0) and checks["P4"]["pass"] is True
    assert "scratch" not in checks["P4"]["per_row"]
    # P5: lp-ft - full on the targets: 4, 4, 5 -> holds
    assert checks["P5"]["best_row"] == "lp-ft" and checks["P5"]["value"] == pytest.approx(13 / 3)
    assert checks["P5"]["pass"] is True
    assert checks["P6"]["value"] == pytest.approx(42 - 11) and checks["P6"]["pass"] is True


@pytest.mark.parametrize("change, failing", [
    ({"frozen-2x": [(63, (40, 44))]}, "P1"),  # 3 points more when trained twice as long: unconverged
    ({"full": [(62, (36, 40)), (63, (37, 41)), (64, (35, 39))]}, "P2"),  # +2, +2, +5: too little room
    ({"frozen": [(50, (40, 44)), (51, (41, 45)), (49, (39, 43))], "frozen-2x": [(50, (40, 44))]}, "P3"),
    ({"lp-ft": [(67, (40, 44)), (68, (44, 48)), (66, (40, 44))]}, "P4"),  # 42, 46, 42: sd 2.3
])
def test_a_failing_precondition_makes_every_verdict_not_interpretable(change, failing):
    records = _hand_made(**change)
    checks = preconditions(records, "src", ("t1", "t2"))
    assert [k for k in GATING if not checks[k]["pass"]] == [failing]
    summary = summarize(records, "src", ("t1", "t2"), gated=True)
    assert summary["claims"] and all(c["verdict"] == f"not interpretable ({failing} fails)" for c in summary["claims"])
    assert summarize(_hand_made(), "src", ("t1", "t2"), gated=True)["claims"][0]["verdict"] in ("holds", "contradicted")


def test_missing_rows_count_as_failing_and_say_which():
    checks = preconditions([r for r in _hand_made() if r["row"] != "frozen-2x"], "src", ("t1", "t2"))
    assert checks["P1"]["pass"] is None and checks["P1"]["missing"] == ["frozen-2x"]


def test_selection_bias_is_the_best_target_mean_minus_the_last():
    records = [_record("rein", 0, 60, (40, 44), curve_targets=(44, 46)),  # 45 at the middle, 42 at the end
               _record("rein", 1, 60, (40, 44), curve_targets=(38, 40))]  # best is the last: 0
    bias = selection_bias(records, "src", ("t1", "t2"))
    assert bias["rein"]["values"] == [pytest.approx(3.0), 0.0] and bias["rein"]["best_iteration"] == [50, 100]


# ---------------------------------------------------------------- LP-FT and WiSE-FT


def test_lp_ft_keeps_the_backbone_pretrained_while_probing():
    from dgss.tuning.lpft import LPFT

    class FakeBackbone:
        model = torch.nn.Linear(2, 2)

    method = LPFT(0.5)
    method._backbone_ref[:] = [FakeBackbone()]

    class Trainer:
        total_iters = 10

    method.on_train_iteration(4, Trainer())
    assert not any(p.requires_grad for p in FakeBackbone.model.parameters())
    method.on_train_iteration(5, Trainer())
    assert all(p.requires_grad for p in FakeBackbone.model.parameters())
    with pytest.raises(ValueError, match="probe_fraction"):
        LPFT(1.0)


@pytest.fixture
def tiny_testbed_foundation(tmp_path):
    from dgss.fileio import save_safetensors
    from dgss.models.backbones import build_backbone

    torch.manual_seed(3)
    arch = dict(TINY, img_size=128, backbone_kwargs=dict(TINY["backbone_kwargs"], depth=3))  # soma tunes blocks 2+
    backbone = build_backbone(arch["backbone"], img_size=128, patch_size=8, **arch["backbone_kwargs"])
    path = tmp_path / "foundation.safetensors"
    save_safetensors({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, path,
                     metadata={"architecture": json.dumps(arch)})
    return str(path)


def test_lp_ft_and_wise_ft_through_the_engine(tmp_path, tiny_testbed_foundation):
    from safetensors.torch import load_file

    from dgss.testbed.benchmark import SMOKE_BUDGET, TESTBED_BUDGETS, run_seeded

    records = run_seeded(["lp-ft", "wise-ft", "soma-public"], [0], SMOKE_BUDGET, tmp_path / "bench", curve_points=1,
                         weights=tiny_testbed_foundation, world=TESTBED_WORLD, log=lambda line: None)
    assert [r["row"] for r in records] == ["lp-ft", "wise-ft", "soma-public"]
    assert records[2]["config"]["method"]["soma"]["init"] == "public_code"
    assert records[2]["config"]["train"]["ema"]["enabled"] is False
    assert list(records[0]["curve"][-1]["miou"]) == list(TESTBED_WORLD.evaluated)
    # the testbed's recipe (P1): a linear head at lr 1e-2 after 50 warm-up iterations (at most an eighth of
    # the run); Full's backbone at its 0.1 multiplier
    train = records[1]["config"]["train"]
    assert (train["lr"], train["warmup_iters"]) == (1e-2, 0) and records[1]["config"]["method"]["backbone_lr_mult"] == 0.1
    assert records[1]["config"]["model"]["head"]["type"] == "linear"
    default = demo_config("frozen", budget=TESTBED_BUDGETS["default"], out_dir=tmp_path, world=TESTBED_WORLD,
                          weights=tiny_testbed_foundation)
    assert (default.train.lr, default.train.warmup_iters) == (1e-2, 50)
    pretrained = load_file(tiny_testbed_foundation)
    full = load_file(str(tmp_path / "bench/runs/full/seed0/model_final.safetensors"))
    wise = load_file(str(tmp_path / "bench/runs/wise-ft/seed0/model_final.safetensors"))
    key = "blocks.0.attn.qkv.weight"
    full_key = next(k for k in full if k.endswith(key) and "backbone" in k)
    assert not torch.equal(full[full_key], pretrained[key])  # full fine-tuning moved it
    assert torch.allclose(wise[full_key], 0.5 * pretrained[key] + 0.5 * full[full_key], atol=1e-6)
    heads = [k for k in full if k.startswith("head.")]
    stats = [k for k in heads if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(wise[k], full[k]) for k in stats)  # BatchNorm statistics re-estimated
    assert all(torch.equal(wise[k], full[k]) for k in heads if k not in stats and "num_batches" not in k)
    assert records[1]["config"]["derived"]["bn_batches"] == 64

    # only the records travel (benchmarks/results keeps benchmark.json in git): with Full's model file gone,
    # WiSE-FT is still the same experiment, since Full's record names its model's content
    full_model = tmp_path / "bench/runs/full/seed0/model_final.safetensors"
    full_record = json.loads((tmp_path / "bench/runs/full/seed0/benchmark.json").read_text())
    assert full_record["model_sha256"] == file_sha256(str(full_model)) == records[1]["config"]["derived"]["base_sha256"]
    full_model.unlink()
    again = run_seeded(["wise-ft"], [0], SMOKE_BUDGET, tmp_path / "bench", curve_points=1,
                       weights=tiny_testbed_foundation, world=TESTBED_WORLD, log=lambda line: None)
    assert again[0]["skipped"] and again[0]["curve"] == records[1]["curve"]
    (tmp_path / "bench/runs/wise-ft/seed0/benchmark.json").unlink()  # and to derive it again, the file is needed
    with pytest.raises(FileNotFoundError, match="full seed 0 again"):
        run_seeded(["wise-ft"], [0], SMOKE_BUDGET, tmp_path / "bench", curve_points=1,
                   weights=tiny_testbed_foundation, world=TESTBED_WORLD, log=lambda line: None)


def test_batch_norm_statistics_are_the_plain_average_over_the_source_batches(tmp_path):
    from torch import nn

    from dgss.data import build_train_loader
    from dgss.testbed.benchmark import SMOKE_BUDGET, recalibrate_batch_norm

    cfg = demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, world=TESTBED_WORLD, weights="ssl-foundation")
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.9))
    model[1].momentum = 0.3
    assert recalibrate_batch_norm(model, cfg, 3) == 1
    batches = iter(build_train_loader(cfg, num_workers=0))
    with torch.no_grad():
        feats = [model[0](next(batches)["image"]) for _ in range(3)]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in feats])  # unbiased, as BatchNorm
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, variances.mean(0), atol=1e-4)
    assert model[1].momentum == 0.3 and not model.training  # put back, in eval mode
    assert recalibrate_batch_norm(nn.Sequential(nn.LayerNorm(3)), cfg, 3) == 0


def test_the_testbed_evaluates_with_precise_batch_norm_and_trains_an_sgd_probe(tmp_path, tiny_testbed_foundation):
    """The testbed's recipe: the head by SGD (momentum 0.9, lr 1e-2) and every model file evaluated with its
    BatchNorm statistics estimated on 64 source batches; evaluate_model_file applies eval.precise_bn_batches
    to the file's weights (the oracle: the plain average over the batches, as above), `dgss eval` too."""
    from dgss.cli import main as dgss_main
    from dgss.config import save_config
    from dgss.testbed.benchmark import SMOKE_BUDGET, TESTBED_BUDGETS
    from dgss.testbed.experiment import evaluate_model_file
    from dgss.engine.checkpoint import save_model
    from dgss.engine.precise_bn import recalibrate_batch_norm
    from dgss.tuning.model import build_segmentor

    default = demo_config("full", budget=TESTBED_BUDGETS["default"], out_dir=tmp_path, world=TESTBED_WORLD,
                          weights=tiny_testbed_foundation)
    assert (default.train.head_optim.optimizer, default.train.head_optim.lr_mult) == ("sgd", 1.0)
    assert default.train.head_optim.momentum == 0.9 and default.eval.precise_bn_batches == 64
    assert demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, weights=None).eval.precise_bn_batches == 0
    # every testbed row decays its lr by a cosine; the demo world keeps the papers' poly
    assert default.train.lr_decay == "cosine"
    assert demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, weights=None).train.lr_decay == "poly"

    cfg = demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, world=TESTBED_WORLD,
                      weights=tiny_testbed_foundation, targets=["night-1"], overrides=["eval.precise_bn_batches=2"])
    model = build_segmentor(cfg)
    path = tmp_path / "model.safetensors"
    save_model(model, cfg, path)  # fresh statistics: mean 0, variance 1
    results, evaluated = evaluate_model_file(cfg, path)
    expected = build_segmentor(cfg)
    expected.load_state_dict(model.state_dict())
    assert recalibrate_batch_norm(expected, cfg, 2) == 1
    torch.testing.assert_close(evaluated.head.norm.running_mean, expected.head.norm.running_mean)
    assert not torch.allclose(evaluated.head.norm.running_mean, model.head.norm.running_mean)
    _, untouched = evaluate_model_file(cfg, path, precise_bn=False)
    torch.testing.assert_close(untouched.head.norm.running_var, model.head.norm.running_var)
    # `dgss eval` with the same config scores what the benchmark scored
    save_config(cfg, tmp_path / "config.yaml")
    assert dgss_main(["eval", str(tmp_path / "config.yaml"), "--checkpoint", str(path),
                      "--out", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"]
    assert scores["night-1"]["miou"] == pytest.approx(results[-1].miou, abs=1e-3)


def test_frozen_trained_twice_as_long_runs_one_seed_as_p1_reads_one():
    from dgss.testbed.benchmark import ITERS_SCALE, seeds_of

    assert ITERS_SCALE["frozen-2x"] == 2
    assert seeds_of("frozen-2x", [0, 1, 2]) == [0] and seeds_of("frozen-2x", [4, 5]) == [4]
    assert seeds_of("frozen", [0, 1, 2]) == [0, 1, 2]


def test_a_runs_curve_scores_each_checkpoint_as_its_weight_ema(tmp_path, tiny_testbed_foundation):
    """With train.ema the final model holds the average, so every curve point must too: a checkpoint's
    model file holds the raw weights and its state file the average, which run_method puts into the model
    (before PreciseBN) when it scores the checkpoint."""
    from dgss.testbed.benchmark import SMOKE_BUDGET
    from dgss.testbed.experiment import evaluate_model_file, run_method
    from dgss.engine.checkpoint import checkpoint_paths, load_training_state

    cfg = demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, world=TESTBED_WORLD,
                      weights=tiny_testbed_foundation, targets=["night-1"], curve_points=2,
                      overrides=["train.ema.enabled=true", "train.ema.momentum=0.5", "eval.precise_bn_batches=1"])
    row, _, trainer = run_method(cfg, progress=False, keep_checkpoints=True)
    model_path, state_path = checkpoint_paths(trainer.checkpoint_dir, 2)
    average = load_training_state(state_path)["ema"]
    assert average and "head.classifier.weight" in average
    results, scored = evaluate_model_file(cfg, model_path, ema_state=average)
    params = dict(scored.named_parameters())
    for name, value in average.items():
        torch.testing.assert_close(params[name], value)
    assert row.curve[2] == {r.name: r.miou for r in results}
    _, raw = evaluate_model_file(cfg, model_path)
    assert not torch.equal(dict(raw.named_parameters())["head.classifier.weight"], average["head.classifier.weight"])


def test_rescoring_a_finished_run_on_its_own_images_reproduces_its_record(tmp_path, tiny_testbed_foundation,
                                                                         monkeypatch, capsys):
    """benchmarks/bench_dg_rescore.py (P4's noise diagnostic): on the run's own number of images it gives
    the record's final scores (the same model, PreciseBN and images); on more it scores more images."""
    from pathlib import Path

    from dgss.testbed.benchmark import SMOKE_BUDGET, run_seeded

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_dg_rescore

    records = run_seeded(["frozen"], [0], SMOKE_BUDGET, tmp_path / "bench", curve_points=1,
                         weights=tiny_testbed_foundation, world=TESTBED_WORLD, log=lambda line: None)
    run = tmp_path / "bench" / "runs" / "frozen" / "seed0"
    same = bench_dg_rescore.rescore(run, SMOKE_BUDGET.eval_images)
    assert same["miou"] == pytest.approx(records[0]["curve"][-1]["miou"], abs=1e-4)
    assert same["target_mean"] == pytest.approx(records[0]["target_mean"], abs=1e-4)
    capsys.readouterr()
    assert bench_dg_rescore.main([str(run), str(run), "--images", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scored = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["images"] for r in scored] == [3, 3] and scored[0]["miou"] == scored[1]["miou"]
    assert lines[-1].startswith("frozen: target mean by seed") and lines[-1].count(" / ") == 1
    with pytest.raises(SystemExit, match="not found"):
        bench_dg_rescore.rescore(tmp_path / "missing", 3)
    # --domains: candidate shifts in place of the targets, with the same model; a domain the run was
    # scored on gives its own score back, one it was not gets scored
    first_target = TESTBED_WORLD.targets[0]
    other = bench_dg_rescore.rescore(run, SMOKE_BUDGET.eval_images, [first_target, "night-a"])
    assert list(other["miou"])[-2:] == [first_target, "night-a"] and len(other["miou"]) == 1 + len(TESTBED_WORLD.validation) + 2
    assert other["miou"][first_target] == pytest.approx(same["miou"][first_target], abs=1e-4)
    assert other["target_mean"] == pytest.approx((other["miou"][first_target] + other["miou"]["night-a"]) / 2)
    with pytest.raises(SystemExit) as exc:
        bench_dg_rescore.main([str(run), "--domains", "night-z"])
    assert exc.value.code == 2 and "unknown synthetic domain(s) night-z" in capsys.readouterr().err


def test_a_worlds_unseen_looks_are_tested_in_columns_of_their_own(tmp_path, tiny_testbed_foundation):
    """Issue 37: a world's unseen look (snow, which no pretraining image has) is evaluated with the targets,
    shown in its own columns and paired like them, and left out of the target mean, the preconditions
    and the claims; the ssl-small rows name today's label-free file."""
    import dataclasses

    from dgss.testbed.benchmark import ROWS, run_seeded
    from dgss.testbed.report import format_tables
    from dgss.testbed.world import resolve_weights

    world = dataclasses.replace(TESTBED_WORLD, unseen=("snow-1",))
    assert world.evaluated == (*TESTBED_WORLD.evaluated, "snow-1") and TESTBED_WORLD.unseen == ()
    (record,) = run_seeded(["frozen"], [0], SMOKE_BUDGET, tmp_path / "bench", curve_points=1,
                           weights=tiny_testbed_foundation, world=world, log=lambda line: None)
    miou = record["curve"][-1]["miou"]
    assert list(miou) == list(world.evaluated)
    assert [d["name"] for d in record["config"]["data"]["test"]] == [*TESTBED_WORLD.targets, "snow-1"]
    assert record["target_mean"] == pytest.approx(np.mean([miou[t] for t in TESTBED_WORLD.targets]))

    def faked(row, seed, shift):  # the smoke run's numbers, moved: frozen + shift on the targets, 2 x on snow
        curve = [{"iteration": 1, "miou": {d: v + (shift * (2 if d == "snow-1" else 1) if d != "clean" else 0)
                                           for d, v in miou.items()}}]
        return {"row": row, "seed": seed, "trainable": 0, "curve": curve}

    records = [faked("frozen", s, 0.0) for s in range(3)] + [faked("rein", s, 1.0 + 0.1 * s) for s in range(3)]
    plain = summarize(records, "clean", TESTBED_WORLD.targets)
    summary = summarize(records, "clean", TESTBED_WORLD.targets, unseen=world.unseen)
    assert summary["unseen"] == ["snow-1"] and "unseen" not in plain["paired"]["rein"]
    assert summary["paired"]["rein"]["unseen"]["mean"] == pytest.approx(2.2)  # 2 x (1.0, 1.1, 1.2)
    assert summary["paired"]["rein"]["target"] == plain["paired"]["rein"]["target"]
    assert summary["paired"]["rein"]["target"]["mean"] == pytest.approx(1.1)
    assert summary["table"]["frozen"]["unseen"]["mean"] == pytest.approx(miou["snow-1"])
    assert summary["claims"] == plain["claims"]
    md = format_tables(summary)
    assert "| snow-1 (unseen) | mean (unseen) |" in md and "unseen mean − frozen |" in md
    assert "+2.20 [" in md.split("unseen mean − frozen |")[1]
    assert "(unseen)" not in format_tables(plain)

    assert resolve_weights("ssl-small") == resolve_weights("ssl-foundation")
    assert ROWS["frozen-ssl-small"] == ("frozen", ["model.weights=ssl-small"])
    cfg = demo_config("fishertune", budget=SMOKE_BUDGET, out_dir=tmp_path, world=TESTBED_WORLD, weights=None,
                      overrides=ROWS["fishertune-ssl-small"][1])
    assert cfg.model.weights == resolve_weights("ssl-foundation")
