"""benchmarks/gpu_check.py (issue 18): the prepared GPU check keeps working, tested at toy sizes on the CPU.

No timing assertions: the figures must exist and be sane, the budget must cut, failures must be recorded.
"""

import json
import math
import sys
import threading
from itertools import chain, repeat
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _gpu_support as gs  # noqa: E402
import gpu_check  # noqa: E402

# what the lent GPU machine may lack (it has torch, timm, peft, safetensors, scipy and timm's own needs)
ABSENT_ON_GPU_MACHINE = ("matplotlib", "tensorboard", "torch.utils.tensorboard", "cv2", "onnx", "imagecorruptions")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# The section budgets are wall-clock seconds sized for the GPU machine; on a loaded CI machine a smoke
# run could spend one and be cut. These two tests check the figures, not the speed, so they lift the
# budgets; the budget mechanism itself is tested below (a spent budget cuts, a repeat stops).
NO_BUDGET_CUTS = ("--section-budget-s", "3600", "--total-budget-s", "36000", "--hard-limit-s", "36000")


def test_cpu_smoke_run_has_every_section_with_sane_figures(tmp_path, monkeypatch, capsys):
    for name in ABSENT_ON_GPU_MACHINE:
        monkeypatch.setitem(sys.modules, name, None)  # an import of any of them now fails
    others = [s for s in gpu_check.SECTIONS if s != "speed"]  # speed: its own test below
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--warmup", "0", "--repeats", "1",
                           "--sections", ",".join(others), *NO_BUDGET_CUTS]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["sections"]) == set(others)
    for name, section in data["sections"].items():
        assert not section.get("failed") and not section["cut"], (name, section["notes"])
        for case, entry in section["cases"].items():
            assert entry["status"] == "ok", (name, case, entry)
            assert positive(entry["median_s"]) and positive(entry["min_s"]) and entry["repeats"] == 1, (case, entry)
    training = data["sections"]["training"]
    for method in gpu_check.METHODS:
        for variant in ("fp32/no-ckpt", "bf16/no-ckpt", "fp32/ckpt", "bf16/ckpt"):
            entry = training["cases"][f"{method}/{variant}"]
            assert positive(entry["hours_40k"])
            assert math.isclose(entry["hours_40k"], entry["median_s"] * 40_000 / 3600, rel_tol=1e-2)
            assert positive(training["figures"]["step_x_full"][f"{method}/{variant}"])
    assert positive(training["figures"]["rein_backbone_part_x_limit"])
    head = data["sections"]["head"]["figures"]
    assert head["calls_per_step"] == 1  # the smoke head has one encoder layer
    assert 0 < head["share_of_step"] < 1
    for path in ("per-level", "compile"):
        for part in ("forward", "forward+backward", "step"):
            assert positive(head[f"{path}/{part} x default"])
    assert head["compile_max_abs_diff"] < 1e-4
    inference = data["sections"]["inference"]
    assert inference["figures"]["windows_per_image"] == 18  # 3 x 6 windows, as 512 / 341 on 1024 x 2048
    for method in ("frozen", "rein"):
        for amp in ("fp32", "bf16"):
            assert positive(inference["cases"][f"{method}/{amp}/slide"]["images_per_s"])
            assert positive(inference["cases"][f"{method}/{amp}/predict"]["median_s"])
    estimate = data["sections"]["estimate"]
    for kind in ("per-batch", "per-sample"):
        assert positive(estimate["cases"][f"estimate/{kind}"]["s_per_pass"])
        assert 0 < estimate["figures"][f"{kind}: share of 40k"] < 1
    assert estimate["figures"]["paper_passes"] == 200
    plan = data["sections"]["plan"]
    assert plan["figures"]["cases_planned"] == len(plan["cases"]) == 5
    assert all(positive(entry["planned_mib"]) for entry in plan["cases"].values())
    env = data["sections"]["env"]["figures"]
    assert env["torch"] == torch.__version__ and env["timm"] and "--cpu-smoke" in env["command"]
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "## 1. training" in summary and "## 4. estimate" in summary
    assert summary in capsys.readouterr().out


def test_the_speed_section_dry_run_prints_every_ratio_of_issue_38_before_and_after(tmp_path, monkeypatch, capsys):
    for name in ABSENT_ON_GPU_MACHINE:
        monkeypatch.setitem(sys.modules, name, None)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--warmup", "0", "--repeats", "1",
                           "--sections", "speed", *NO_BUDGET_CUTS]) == 0
    speed = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["speed"]
    assert not speed.get("failed") and not speed["cut"], speed["notes"]
    assert all(entry["status"] == "ok" for entry in speed["cases"].values()), speed["cases"]
    rows = speed["figures"]["rows"]
    both = ["fp32 step / bf16 step (full)", "fp32 step / bf16 step (rein)", "Rein bf16 predict / Frozen bf16 predict",
            "Rein backbone part / its FLOP floor", "estimate pass / Full step, same precision",
            "paper's 100-batch estimate, s"] + [f"bf16 step checkpointed / plain ({m})"
                                                for m in ("frozen", "rein", "fishertune", "full")]
    for row in both:
        assert positive(rows[row]["before"]) and positive(rows[row]["after"]), row
    # Rein adds its FLOPs, and saves the backward of block 0 and the patch embedding (it refines after block 0)
    assert 0.5 < rows["Rein backbone part / its FLOP floor"]["floor_x_limit"] < 2.0
    assert positive(rows["AdamW step, fused / foreach (Full)"]["after"])
    assert positive(rows["compiled / eager bf16 step (rein)"]["after"])
    assert positive(rows["bf16 step checkpointed / plain (rein, checkpoint_hooks=keep)"]["after"])
    assert 0.0 <= rows["bf16 estimate's selection vs fp32's (Jaccard)"]["after"] <= 1.0
    # on a CPU, TF32 and the quantile method change nothing: before and after select the same entries
    assert speed["figures"]["estimate before/after selection Jaccard (TF32)"] == 1.0
    summary = capsys.readouterr().out
    assert "| figure | before | after | target |" in summary and "| Rein bf16 predict / Frozen bf16 predict |" in summary


def test_the_legacy_rein_of_the_speed_section_computes_what_rein_computes():
    import _gpu_speed
    from dgss.config import MethodConfig, ReinConfig
    from dgss.models.backbones import build_backbone
    from dgss.tuning import build_method

    backbone = build_backbone("dinov2_s", img_size=64, depth=3, embed_dim=32, num_heads=2)
    method = build_method(MethodConfig(name="rein", rein=ReinConfig(num_tokens=5, lora_rank=4, query_dim=8)),
                          backbone)
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.3)
    images = torch.randn(2, 3, 64, 64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            now = backbone(images)
            with _gpu_speed.legacy_rein(method):
                before = backbone(images)
        for a, b in zip(now, before):
            torch.testing.assert_close(a, b)
    assert len(method._hook_handles) == 3 + 2  # today's hooks are back: one per block and the operands' pair


def test_a_spent_budget_cuts_the_section_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "bf16_supported", lambda device: False)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "training,env",
                           "--section-budget-s", "0"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    training = data["sections"]["training"]
    assert training["cut"] and training["budget_s"] == 0
    assert {e["status"] for e in training["cases"].values()} == {"skipped (budget)"}
    assert any("section budget of 0 s spent" in note for note in training["notes"])
    assert "(cut: budget spent)" in (tmp_path / "gpu_check.md").read_text()
    assert data["sections"]["env"]["figures"]["torch"] == torch.__version__  # env needs no time


def test_a_case_stops_repeating_when_the_budget_runs_out(tmp_path):
    section = gs.Section("demo", 100.0, gs.Report(tmp_path, {}), torch.device("cpu"))
    # budget left when the case starts and for its first timed run, then spent
    states = chain([False], repeat(True))
    section.spent = lambda: next(states)
    calls = []
    entry = section.run({"case": lambda: calls.append(1)}, warmup=1, repeats=5)["case"]
    assert entry["status"] == "ok" and entry["repeats"] == 1 and entry["cut"] and len(calls) == 2
    assert section.data["cut"] and "case: 1 of 5 repeats (budget spent)" in section.data["notes"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"]["demo"]["cases"]["case"]["repeats"] == 1


def test_out_of_memory_and_errors_are_recorded_and_the_next_case_runs(tmp_path):
    section = gs.Section("demo", 100.0, gs.Report(tmp_path, {}), torch.device("cpu"))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken():
        raise ValueError("bad shape")

    assert section.run({"oom": oom}, warmup=1, repeats=2)["oom"] == {"status": "oom"}
    assert section.run({"broken": broken}, warmup=0, repeats=2)["broken"]["status"] == "error: ValueError: bad shape"
    assert section.run({"fine": lambda: None}, warmup=0, repeats=2)["fine"]["repeats"] == 2
    assert any("out of memory" in note for note in section.data["notes"]) and not section.data["cut"]


def test_bf16_unsupported_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "bf16_supported", lambda device: False)
    args = gpu_check.parse_args(["--cpu-smoke", "--out", str(tmp_path)])
    check = gpu_check.Check(args, gs.Report(tmp_path, {}))
    section = gs.Section("demo", 100.0, check.report, check.device)
    assert list(check.amps(section)) == ["fp32"]
    assert section.data["cases"]["bf16 on cpu"]["status"] == "bf16 unsupported"


def test_without_cuda_and_without_cpu_smoke_it_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--cpu-smoke" in err
    assert not (tmp_path / "gpu_check.json").exists()


def test_unknown_section_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--out", str(tmp_path), "--sections", "training,gpu"])
    assert exc.value.code == 2


def test_the_watchdog_writes_the_partial_report_and_ends_the_run(tmp_path, monkeypatch):
    ended, done = [], threading.Event()

    def fake_exit(code):
        ended.append(code)
        done.set()

    monkeypatch.setattr(gs.os, "_exit", fake_exit)
    report = gs.Report(tmp_path, {"command": "x"})
    written = []
    gs.start_watchdog(0.01, report, lambda: written.append(True))
    assert done.wait(10)
    assert ended == [3] and written == [True]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["meta"]["stopped_by_hard_limit_s"] == 0.01


@pytest.mark.parametrize("method", gpu_check.METHODS)
def test_the_config_defaults_it_builds_from_are_the_recipe_configs(method):
    # gpu_check (through bench_methods.build) starts from the config defaults: they must stay the
    # published DINOv2-L 512 recipe of configs/ (weights aside: random init)
    from dgss.config import load_config, to_dict

    recipe = to_dict(load_config(Path(__file__).resolve().parents[1] / f"configs/{method}/dinov2-l_gtav_512.yaml",
                                 ["model.weights=null"]))
    defaults = to_dict(load_config(None, [f"method.name={method}"]))
    for section in ("model", "method", "train", "eval"):
        assert defaults[section] == recipe[section], section


def test_a_build_out_of_memory_is_recorded_and_the_section_goes_on(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_check.bm, "build", no_memory)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "training,inference"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    for section, methods in (("training", gpu_check.METHODS), ("inference", ("frozen", "rein"))):
        cases = data["sections"][section]["cases"]
        assert {name: e["status"] for name, e in cases.items()} == {f"{m}: build": "oom" for m in methods}
        assert not data["sections"][section].get("failed")


def test_the_peak_anatomy_replays_a_trace_and_groups_the_blocks_alive_at_its_peak():
    import _gpu_speed

    def frame(file, line, name):
        return {"filename": f"/x/site-packages/{file}", "line": line, "name": name}

    mib = 2**20
    act = [frame("torch/nn/functional.py", 5, "linear"), frame("dgss/models/segmentor.py", 96, "forward_features")]
    tmp = [frame("torch/optim/adamw.py", 9, "_multi_tensor_adamw")]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * mib, "frames": act},
        {"action": "alloc", "addr": 2, "size": 50 * mib, "frames": act},
        {"action": "free_requested", "addr": 999, "size": 7 * mib},  # allocated before the recording: ignored
        {"action": "alloc", "addr": 3, "size": 30 * mib, "frames": tmp},  # the peak: 180 MiB
        {"action": "free_requested", "addr": 2, "size": 50 * mib},
        {"action": "free_completed", "addr": 2, "size": 50 * mib},
        {"action": "alloc", "addr": 4, "size": 60 * mib, "frames": tmp},  # 130 + 60 = 190: the new peak
        {"action": "free_requested", "addr": 1, "size": 100 * mib},
    ]
    anatomy = _gpu_speed.peak_anatomy(trace)
    assert anatomy["peak_mib"] == 190.0  # 100 + 30 + 60 (the block freed before counts no more)
    assert anatomy["by_code"] == [{"where": "models/segmentor.py:96 forward_features", "blocks": 1, "mib": 100.0},
                                  {"where": "optim/adamw.py:9 _multi_tensor_adamw", "blocks": 2, "mib": 90.0}]
