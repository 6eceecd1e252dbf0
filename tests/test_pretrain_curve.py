"""The curve of pretraining length (issue 37): a long run's snapshots at its monitor points, and
benchmarks/bench_pretrain_curve.py, which sets each against Scratch (P6) through real frozen runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dgss.testbed.benchmark import RESULT_FILE

from test_testbed import TINY_SSL, tiny_ssl_architecture  # noqa: F401 (a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pretrain_curve  # noqa: E402


def _run(tmp_path, out, iters, **kwargs):
    from dgss.testbed import ssl_foundation

    overrides = dict(batch_size=2, warmup_iters=1, threads=1, ssl=TINY_SSL, pool_version=3)
    return ssl_foundation.pretrain_ssl_foundation(tmp_path / out, iters=iters, progress=False, overrides=overrides,
                                                  monitor_every=2, log=lambda line: None, **kwargs)


def test_snapshots_hold_the_start_and_every_monitor_point_in_a_straight_or_chunked_run(tmp_path,
                                                                                      tiny_ssl_architecture):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dgss.testbed.ssl_foundation import initial_ssl_backbone

    final = _run(tmp_path, "straight.safetensors", 4, snapshots=tmp_path / "snaps")
    names = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert names == ["iter_000000.safetensors", "iter_000002.safetensors", "iter_000004.safetensors"]
    last, end = load_file(tmp_path / "snaps" / names[-1]), load_file(final)
    assert last.keys() == end.keys() and all(torch.equal(last[k], end[k]) for k in end)  # the last point = the file
    manifest = json.loads(final.with_suffix(".json").read_text())
    start = initial_ssl_backbone(manifest["recipe"]).model.state_dict()
    zero = load_file(tmp_path / "snaps" / names[0])
    assert all(torch.equal(zero[k], start[k]) for k in zero)  # no image seen: the initialisation itself
    assert not all(torch.equal(zero[k], end[k]) for k in zero)
    with safe_open(str(tmp_path / "snaps" / names[1]), "pt") as handle:
        meta = handle.metadata()
    assert meta["iteration"] == "2" and meta["images_seen"] == "4" and meta["labels_used"] == "false"
    assert json.loads(meta["monitor"]) == manifest["monitor"][0]  # the probe's row of that iteration

    # in chunks: the same snapshots, bit for bit, and the start written once
    state = tmp_path / "state.pt"
    assert _run(tmp_path, "chunked.safetensors", 4, snapshots=tmp_path / "chunked", checkpoint=state,
                stop_at=3) is None
    (tmp_path / "chunked" / "iter_000000.safetensors").unlink()
    _run(tmp_path, "chunked.safetensors", 4, snapshots=tmp_path / "chunked", checkpoint=state)
    assert sorted(p.name for p in (tmp_path / "chunked").iterdir()) == names[1:]  # a resumed run is not at 0
    for name in names[1:]:
        a, b = load_file(tmp_path / "snaps" / name), load_file(tmp_path / "chunked" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder: Path, iteration: int, seed: int, monitor=None) -> Path:
    from dgss.testbed.ssl_foundation import _save_snapshot, initial_ssl_backbone, recipe_of

    recipe = dict(recipe_of({"pool_version": 3}), seed=seed)
    return _save_snapshot(folder, iteration, initial_ssl_backbone(recipe).model, recipe, monitor)


def _record(folder: Path, row: str, seed: int, target_mean: float, weights_sha256: str = "x") -> None:
    path = folder / "runs" / row / f"seed{seed}" / RESULT_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"target_mean": target_mean, "weights_sha256": weights_sha256}))


def test_curve_sets_each_foundation_against_scratch_by_seed(tmp_path, capsys):
    snaps = tmp_path / "run" / "snapshots"
    early = _snapshot(snaps, 0, seed=1)
    late = _snapshot(snaps, 250, seed=2, monitor={"iteration": 250, "knn_clean": 31.5, "knn_textured": 40.0,
                                                  "knn_blur-2": 29.0, "loss": 3.0})
    testbed = tmp_path / "testbed"
    _record(testbed, "scratch", 0, 20.0)
    _record(testbed, "scratch", 1, 22.0)
    out = tmp_path / "curve"
    assert bench_pretrain_curve.main([str(out), str(late), str(early), "--scratch", str(testbed), "--seed-list",
                                      "0,1", "--smoke"]) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert [r["images_seen"] for r in curve["rows"]] == [0, 250 * 32]  # sorted by images seen
    assert curve["rows"][1]["probe"] == {"knn_clean": 31.5, "knn_textured": 40.0, "knn_blur-2": 29.0}
    assert set(curve["rows"][0]["probe"]) == {"knn_clean", "knn_textured", "knn_blur-2"}  # computed: none recorded
    for row, path in zip(curve["rows"], (early, late)):
        frozen = {s: json.loads((out / path.stem / "runs" / "frozen" / f"seed{s}" / RESULT_FILE).read_text())
                  for s in (0, 1)}
        differences = [frozen[0]["target_mean"] - 20.0, frozen[1]["target_mean"] - 22.0]
        assert row["P6"]["mean"] == pytest.approx(sum(differences) / 2)
        assert row["P6"]["n"] == 2 and row["P6"]["low"] < row["P6"]["mean"] < row["P6"]["high"]
        assert row["P6_pass"] == (row["P6"]["mean"] >= 10.0)
        assert frozen[0]["weights_sha256"] != "x"  # trained here, on this file
    assert "| iter_000250.safetensors | 8,000 | 31.5 / 40.0 / 29.0 |" in (out / "curve.md").read_text()
    with pytest.raises(FileNotFoundError, match="scratch/seed5"):
        bench_pretrain_curve.main([str(out), str(late), "--scratch", str(testbed), "--seed-list", "5", "--smoke"])
    assert bench_pretrain_curve.main([str(out), str(tmp_path / "none.safetensors"), "--scratch", str(testbed)]) == 2
    assert "not found" in capsys.readouterr().err


def test_curve_scores_the_unseen_look_and_trains_again_what_only_has_a_record(tmp_path):
    import bench_dg_rescore

    late = _snapshot(tmp_path / "snapshots", 250, seed=2)
    testbed = tmp_path / "testbed"
    _record(testbed, "scratch", 0, 20.0)  # records without model files: scratch is trained again under OUT
    _record(testbed, "scratch", 1, 22.0)
    out = tmp_path / "curve"
    args = [str(out), str(late), "--scratch", str(testbed), "--seed-list", "0,1", "--smoke", "--unseen", "snow-1"]
    assert bench_pretrain_curve.main(args) == 0
    row = json.loads((out / "curve.json").read_text())["rows"][0]
    frozen_runs = [out / late.stem / "runs" / "frozen" / f"seed{s}" for s in (0, 1)]
    scratch_runs = [out / "scratch" / "runs" / "scratch" / f"seed{s}" for s in (0, 1)]
    images = json.loads((frozen_runs[0] / RESULT_FILE).read_text())["config"]["data"]["test"][0]["options"]["num_images"]
    frozen = [bench_dg_rescore.rescore(run, images, ["snow-1"])["miou"]["snow-1"] for run in frozen_runs]
    scratch = [bench_dg_rescore.rescore(run, images, ["snow-1"])["miou"]["snow-1"] for run in scratch_runs]
    assert row["unseen"]["frozen"] == pytest.approx(sum(frozen) / 2)
    assert row["unseen"]["scratch"] == pytest.approx(sum(scratch) / 2)
    assert row["unseen"]["difference"]["mean"] == pytest.approx((frozen[0] - scratch[0] + frozen[1] - scratch[1]) / 2)
    assert row["P6"]["mean"] == pytest.approx(sum(json.loads((r / RESULT_FILE).read_text())["target_mean"]
                                                  for r in frozen_runs) / 2 - 21.0)  # P6 keeps the records' scratch
    assert "| Frozen / Scratch on snow-1 |" in (out / "curve.md").read_text()

    # the scores are cached by the model's content: a model file gone (a new machine) is not needed again
    cache = out / "unseen" / late.stem / "seed0.json"
    assert json.loads(cache.read_text())["miou"]["snow-1"] == pytest.approx(frozen[0])
    (frozen_runs[0] / "model_final.safetensors").unlink()
    assert bench_pretrain_curve.main(args) == 0
    assert not (frozen_runs[0] / "model_final.safetensors").exists()
    # without the cache as well, the run is trained again (deterministic: the same model, the same score)
    cache.unlink()
    assert bench_pretrain_curve.main(args) == 0
    assert json.loads(cache.read_text())["miou"]["snow-1"] == pytest.approx(frozen[0])
    with pytest.raises(SystemExit):
        bench_pretrain_curve.main(args[:-1] + ["snowy"])
