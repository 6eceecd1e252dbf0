"""`dgss compare`: collects finished runs (and runs missing ones) into the papers' table."""

import csv
import json

from test_engine_support import tiny_config

from dgss.cli import main
from dgss.compare import resolve_runs, trainable_backbone_parameters
from dgss.config import save_config


def write_results(config, method, scores):
    """A finished run of ``method``: its config.yaml (as training writes it) and eval/results.json, in the
    format `dgss eval` writes. Returns the run folder."""
    cfg = resolve_runs(config, [method])[0].cfg
    run_dir = cfg.run_dir
    save_config(cfg, run_dir / "config.yaml")
    datasets = {name: {"miou": v, "pixel_accuracy": 90.0, "num_images": 2, "eval_class_ids": None, "iou": {}}
                for name, v in scores.items()}
    path = run_dir / "eval" / "results.json"
    path.parent.mkdir(parents=True)
    mean = sum(scores.values()) / len(scores)
    path.write_text(json.dumps({"checkpoint": "x", "datasets": datasets, "mean_miou": mean}))
    return run_dir


def test_compare_collects_two_finished_runs_into_the_table(tmp_path, capsys):
    config = tiny_config(tmp_path, "frozen_tiny", method="frozen")
    runs = tmp_path / "runs"
    scores = {"frozen": {"night": 12.3456, "fog": 20.05}, "lora": {"night": 31.25, "fog": 7.5}}
    for method, values in scores.items():
        assert write_results(config, method, values) == runs / f"{method}_tiny"
    out = tmp_path / "table"
    assert main(["compare", str(config), "--methods", "frozen,lora", "--out", str(out), "--no-run"]) == 0
    printed = capsys.readouterr().out

    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["method"] for r in rows] == ["frozen", "lora"]
    for row in rows:
        expected = scores[row["method"]]
        assert float(row["night"]) == expected["night"] and float(row["fog"]) == expected["fog"]
        assert float(row["mean"]) == (expected["night"] + expected["fog"]) / 2
        assert row["status"] == "collected"
    lora_cfg = resolve_runs(config, ["lora"])[0].cfg
    assert int(rows[0]["trainable_backbone_params"]) == 0
    assert int(rows[1]["trainable_backbone_params"]) == trainable_backbone_parameters(lora_cfg) == 4 * 8 * (32 + 96)

    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| method | trainable backbone params (M) | night | fog | mean |"
    assert "| frozen | 0.00 | 12.3 | 20.1 | 16.2 |" in table  # 16.197... -> 16.2
    assert "| lora | 0.00 | 31.2 | 7.5 | 19.4 |" in table  # 31.25 -> 31.2 (round half to even)
    assert table.strip() in printed
    assert (out / "miou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_what_is_missing_and_reports_what_it_may_not_run(tmp_path, capsys):
    config = tiny_config(tmp_path, "frozen_tiny", method="frozen", iters=2)
    write_results(config, "frozen", {"night": 10.0, "fog": 30.0})
    # --no-run: the AdaptFormer run does not exist yet; it is listed, nothing is trained
    assert main(["compare", str(config), "--methods", "frozen,adaptformer", "--no-run", "--out", str(tmp_path / "a")]) == 1
    assert "not run yet" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "adaptformer_tiny").exists()
    # without it, the missing run is trained and evaluated; the finished one is only collected
    assert main(["compare", str(config), "--methods", "frozen,adaptformer", "--out", str(tmp_path / "b")]) == 0
    run = tmp_path / "runs" / "adaptformer_tiny"
    assert (run / "model_final.safetensors").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "b" / "table.csv"))}
    assert rows["frozen"]["status"] == "collected" and rows["adaptformer"]["status"] == "trained"
    assert float(rows["adaptformer"]["night"]) == results["datasets"]["night"]["miou"]
    assert int(rows["adaptformer"]["trainable_backbone_params"]) == 4 * (32 * 64 + 64 + 64 * 32 + 32)
