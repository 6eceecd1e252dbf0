"""The demo: `dgss demo --quick` end to end (engine runs, files, a table that matches the runs' own
evaluation results), determinism, and the shipped foundation ViT (loadable, small, its command)."""

import csv
import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from dgss.cli import main
from dgss.demo import FOUNDATION_FILE, METHODS, QUICK_BUDGET, SOURCE, TARGETS, pretrain_command, run_demo
from dgss.testbed.supervised_foundation import FOUNDATION, PRETRAIN, build_foundation_backbone, pretrain_foundation


def test_quick_demo_writes_the_table_chart_overlays_and_fisher_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    domains = [SOURCE, *TARGETS]

    # every method is a normal engine run, evaluated on the source val split and every target
    results = {}
    for method in METHODS:
        run = out / "runs" / method
        assert (run / "config.yaml").is_file() and (run / "model_final.safetensors").is_file()
        records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert max(r["iteration"] for r in records) == QUICK_BUDGET.iters  # the same budget for all
        # results.json is what `dgss eval` writes: the targets and their mean; the source is kept apart
        data = json.loads((run / "eval" / "results.json").read_text())
        source = json.loads((run / "eval" / "source.json").read_text())
        assert list(data["datasets"]) == list(TARGETS) and list(source["datasets"]) == [SOURCE]
        results[method] = {d: data["datasets"][d]["miou"] for d in TARGETS}
        results[method][SOURCE] = source["datasets"][SOURCE]["miou"]
        results[method]["mean"] = data["mean_miou"]

    # the table (Markdown, CSV, printed) holds exactly the runs' numbers
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(METHODS)
    backbone_size = sum(p.numel() for p in build_foundation_backbone().model.parameters())
    for row in rows:
        miou = results[row["method"]]
        assert float(row[f"{SOURCE}_source"]) == pytest.approx(miou[SOURCE], abs=1e-3)
        for target in TARGETS:
            assert float(row[target]) == pytest.approx(miou[target], abs=1e-3)
            assert 0.0 <= float(row[target]) <= 100.0
        assert float(row["mean_targets"]) == pytest.approx(sum(miou[t] for t in TARGETS) / len(TARGETS), abs=1e-3)
        assert float(row["mean_targets"]) == pytest.approx(miou["mean"], abs=1e-3)  # the run's own results.md
    trainable = {r["method"]: int(r["trainable_backbone_params"]) for r in rows}
    assert trainable["frozen"] == 0 and trainable["full"] == backbone_size
    assert trainable["fishertune"] == round(0.05 * backbone_size)
    assert 0 < trainable["rein"] < backbone_size
    table = (out / "results.md").read_text().strip()
    assert table in printed and f"| {SOURCE} (source) |" in table and "| mean (targets) |" in table
    for row in rows:
        cells = f"| {row['method']} | {int(row['trainable_backbone_params']):,} | {float(row[f'{SOURCE}_source']):.1f} |"
        assert cells in table

    # the figures, and the closing lines that say where everything is
    assert (out / "miou.png").stat().st_size > 1000
    for domain in domains:
        assert (out / "overlays" / f"{domain}.png").is_file()
        for method in METHODS:
            assert (out / "overlays" / method / f"{domain}_0.png").is_file()
    for name in ("selection_per_block.png", "selection_per_type.png", "drfim_distribution.png",
                 "selection_stats.json"):
        assert (out / "fishertune" / name).is_file()
    stats = json.loads((out / "fishertune" / "selection_stats.json").read_text())
    assert stats["selected"] == trainable["fishertune"]
    for where in ("results.md", "miou.png", "overlays", "selection_per_block.png", "runs"):
        assert where in printed.split("written (")[1]


def test_the_same_seeds_give_the_same_numbers(tmp_path):
    budget = dataclasses.replace(QUICK_BUDGET, iters=6, train_images=8, eval_images=2, fisher_batches=2)
    runs = []
    for attempt in ("a", "b"):
        rows = run_demo(tmp_path / attempt, methods=("fishertune",), budget=budget, targets=("night",),
                        overlays=False, progress=False)
        runs.append(rows)
    assert runs[0] == runs[1] and not math.isnan(runs[0][0]["night"])
    files = [tmp_path / a / "runs" / "fishertune" / "model_final.safetensors" for a in ("a", "b")]
    with safe_open(str(files[0]), "pt") as f0, safe_open(str(files[1]), "pt") as f1:
        assert sorted(f0.keys()) == sorted(f1.keys())
        for key in f0.keys():
            assert torch.equal(f0.get_tensor(key), f1.get_tensor(key)), key


def test_the_shipped_foundation_vit_is_small_loadable_and_says_how_it_was_made():
    assert FOUNDATION_FILE.is_file() and FOUNDATION_FILE.stat().st_size < 5 * 2**20
    with safe_open(str(FOUNDATION_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["command"] == pretrain_command()
    assert json.loads(meta["architecture"]) == json.loads(json.dumps(FOUNDATION))
    assert json.loads(meta["recipe"]) == json.loads(json.dumps(PRETRAIN))
    shipped = build_foundation_backbone(str(FOUNDATION_FILE))  # every tensor fits, none is missing
    random = build_foundation_backbone()
    assert not torch.equal(shipped.model.blocks[0].attn.qkv.weight, random.model.blocks[0].attn.qkv.weight)


def test_pretraining_writes_a_backbone_file_in_timm_layout(tmp_path):
    path = pretrain_foundation(tmp_path / "vit.safetensors", iters=2, progress=False)
    backbone = build_foundation_backbone(str(path))
    x = torch.randn(1, 3, FOUNDATION["img_size"], 2 * FOUNDATION["img_size"])
    assert [tuple(f.shape[-2:]) for f in backbone(x)] == [(32, 64), (16, 32), (8, 16), (4, 8)]
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["recipe"])["iters"] == 2


def test_demo_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["demo", "--methods", "frozen,lora2", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) lora2" in capsys.readouterr().err
    assert main(["demo", "--foundation", str(tmp_path / "missing.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["demo", "--pretrain-ssl", str(tmp_path / "vit.safetensors"), "--pool-version", "4"]) == 2
    assert "--pool-version must be one of 1, 2, 3, got 4" in capsys.readouterr().err
    assert main(["demo", "--pool-version", "2", "--out", str(tmp_path)]) == 2
    assert "give it with --pretrain-ssl" in capsys.readouterr().err
