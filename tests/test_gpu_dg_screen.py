"""benchmarks/gpu_dg_screen.py's summary: the numbers docs/figures/testbed_log.md quotes from a target screen."""

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_dg_screen  # noqa: E402


def _line(row, seed, base):
    domains = ("clean", "blur-1", "blur-2", *sorted({d for s in gpu_dg_screen.TARGET_SETS.values() for d in s}))
    miou = {d: base + i for i, d in enumerate(domains)}
    return json.dumps({"row": row, "seed": seed, "miou": miou})


def test_summary_gives_retention_and_spreads_from_hand_made_records(tmp_path):
    path = tmp_path / "rescore.jsonl"
    path.write_text("\n".join(["tqdm noise, not a record", _line("frozen", 0, 10.0), _line("frozen", 1, 12.0),
                               _line("full", 0, 20.0), _line("full", 1, 21.0), _line("full", 2, 25.0)]) + "\n")
    out = gpu_dg_screen.summarize(path).splitlines()
    # Frozen's retention of blur-1 (clean + 1): (11 + 13) / 2 over (10 + 12) / 2
    assert out[0].startswith("frozen retention: blur-1 1.09,")
    full = next(line for line in out if line.startswith("full (seeds 0,1,2)"))
    # every domain moves with the base, so each target mean is base + a constant: sd of (20, 21, 25)
    assert f"world {'{:.2f}'.format(20 + 0)}" not in full  # the constant is not zero
    assert f"(sd {statistics.stdev([20, 21, 25]):.2f})" in full and "source sd 2.65, blur sd 2.65" in full
    means = [float(x) for x in full.split("; world ")[1].split(" (")[0].split(" / ")]
    assert [round(b - a, 6) for a, b in zip(means, means[1:])] == [1.0, 4.0]


def test_screen_needs_an_output_folder(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_dg_screen.main([])
    assert exc.value.code == 2
    assert "--out is required" in capsys.readouterr().err
