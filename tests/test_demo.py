"""The interim demo runs end to end (real segmentor, head, data and mIoU code) and writes its table."""

import math

from dgss.demo import TARGETS, run_demo


def test_quick_demo_trains_evaluates_and_writes_the_table(tmp_path):
    rows = run_demo(out_dir=str(tmp_path), quick=True, methods=("frozen", "rein"))
    assert [r["method"] for r in rows] == ["frozen", "rein"]
    assert rows[0]["trainable"] == 0 and rows[1]["trainable"] > 0
    for row in rows:
        for key in ("source", "mean", *TARGETS):
            assert 0.0 <= row[key] <= 100.0 and not math.isnan(row[key])
    table = (tmp_path / "results.md").read_text()
    assert "| rein |" in table and "mean (targets)" in table
    assert (tmp_path / "demo_rein" / "config.yaml").is_file()
