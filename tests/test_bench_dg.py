"""benchmarks/bench_dg.py (issue 16): the seeded DG benchmark through the real engine at smoke size
(files, every value, resume and re-run), and its statistics against hand-computed numbers."""

import json
import math
import sys
from pathlib import Path

import pytest

import dgss.engine.trainer as trainer_module
from dgss.cli import main as dgss_main
from dgss.demo import SOURCE, TARGETS, run_demo
from dgss.testbed.benchmark import RESULT_FILE, ROWS, SMOKE_BUDGET, TESTBED_BUDGETS, run_seeded
from dgss.testbed.stats import CLAIMS, mean_std, paired_difference, summarize, t_interval, verdict
from dgss.testbed.experiment import curve_iterations, demo_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dg  # noqa: E402

T_975_2DF = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)


@pytest.fixture
def count_trainers(monkeypatch):
    """How many Trainers were built (run_method imports the class from its module at call time)."""
    built = []
    original = trainer_module.Trainer

    class Counting(original):
        def __init__(self, cfg, **kwargs):
            built.append(cfg.name)
            super().__init__(cfg, **kwargs)

    monkeypatch.setattr(trainer_module, "Trainer", Counting)
    return built


def test_smoke_run_writes_every_value_and_reuses_finished_runs(tmp_path, capsys, count_trainers):
    out = tmp_path / "bench"
    argv = ["--world", "demo", "--smoke", "--methods", "frozen,fishertune", "--seeds", "2", "--out", str(out),
            "--jobs", "1"]
    assert bench_dg.main(argv) == 0
    printed = capsys.readouterr().out
    assert count_trainers == ["frozen/seed0", "frozen/seed1", "fishertune/seed0", "fishertune/seed1"]
    assert "[4/4] fishertune seed 1: mIoU clean" in printed and "to go)" in printed
    assert "[train]" not in printed  # the engine's lines went to the runs' stdout.log
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 100

    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["budget"]["iters"] == SMOKE_BUDGET.iters
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["threads"] == 1 and data["wall_seconds"] > 0
    runs = {(r["row"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(m, s) for m in ("frozen", "fishertune") for s in (0, 1)}
    for (row, seed), run in runs.items():
        assert [p["iteration"] for p in run["curve"]] == [2, 4]  # curve points 2: the middle and the end
        for point in run["curve"]:
            assert list(point["miou"]) == [SOURCE, *TARGETS]
            assert all(math.isfinite(v) and 0 <= v <= 100 for v in point["miou"].values())
        # the final point is what the run's own eval files (as `dgss eval` writes them) hold
        evaluated = json.loads((out / "runs" / row / f"seed{seed}" / "eval" / "results.json").read_text())
        for target in TARGETS:
            assert run["curve"][-1]["miou"][target] == pytest.approx(evaluated["datasets"][target]["miou"], abs=1e-3)
        assert not (out / "runs" / row / f"seed{seed}" / "checkpoints").exists()  # evaluated, then deleted

    # the summary is the raw values' statistics
    summary = data["summary"]
    final = {k: r["curve"][-1]["miou"] for k, r in runs.items()}
    target = {k: sum(m[t] for t in TARGETS) / len(TARGETS) for k, m in final.items()}
    cell = summary["table"]["fishertune"]["target"]
    assert cell["mean"] == pytest.approx((target["fishertune", 0] + target["fishertune", 1]) / 2)
    assert cell["sd"] == pytest.approx(abs(target["fishertune", 0] - target["fishertune", 1]) / math.sqrt(2))
    diffs = [target["fishertune", s] - target["frozen", s] for s in (0, 1)]
    assert summary["paired"]["fishertune"]["target"]["differences"] == pytest.approx(diffs)
    assert [c["id"] for c in summary["claims"]] == ["d"]  # the only claim both of whose rows ran
    md = (out / "results.md").read_text()
    assert "| fishertune | 2 | 37,627 |" in md and "| (d) | FisherTune beats Frozen on the targets |" in md
    assert f"**{summary['claims'][0]['verdict']}**" in md

    # a second call with the same config trains nothing and reports the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/" + RESULT_FILE)}
    assert len(stamps) == 4
    assert bench_dg.main(argv) == 0
    assert len(count_trainers) == 4 and "finished earlier" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["summary"]["table"] == summary["table"] and again["runs_reused"] == 4

    # a changed config (here the evaluation sets) runs again; the unchanged seed is still reused
    changed = SMOKE_BUDGET.__class__(**{**SMOKE_BUDGET.__dict__, "eval_images": 3})
    records = run_seeded(["frozen"], [0], changed, out, curve_points=2, log=lambda line: None)
    assert count_trainers[4:] == ["frozen/seed0"] and not records[0]["skipped"]
    assert records[0]["config"]["data"]["test"][0]["options"]["num_images"] == 3
    records = run_seeded(["frozen"], [0, 1], SMOKE_BUDGET, out, curve_points=2, log=lambda line: None)
    assert count_trainers[5:] == ["frozen/seed0"] and [r["skipped"] for r in records] == [False, True]


def test_a_time_limit_stops_before_a_run_and_the_same_command_continues(tmp_path, capsys, count_trainers):
    """A run in chunks (a CPU session, a device call): past the limit no run starts, the finished ones are
    kept, the command exits 3 without a report, and the same command continues."""
    import time

    from dgss.testbed.benchmark import TimeLimitReached

    out = tmp_path / "bench"
    argv = ["--world", "demo", "--smoke", "--methods", "frozen", "--seeds", "2", "--out", str(out), "--jobs", "1"]
    run_seeded(["frozen"], [0], SMOKE_BUDGET, out, curve_points=2, log=lambda line: None)
    with pytest.raises(TimeLimitReached, match="1 of 2 runs finished") as stop:
        run_seeded(["frozen"], [0, 1], SMOKE_BUDGET, out, curve_points=2, log=lambda line: None,
                   deadline=time.time())
    assert (stop.value.finished, stop.value.total) == (1, 2) and count_trainers == ["frozen/seed0"]
    assert not (out / "runs" / "frozen" / "seed1").exists()
    assert bench_dg.main(argv + ["--time-limit", "0"]) == 3
    assert "time limit reached: 1 of 2 runs finished" in capsys.readouterr().out
    assert not (out / "results.json").exists() and count_trainers == ["frozen/seed0"]
    assert bench_dg.main(argv + ["--time-limit", "3600"]) == 0  # the same command, time enough: it ends
    assert count_trainers == ["frozen/seed0", "frozen/seed1"] and (out / "results.json").is_file()


def test_demo_with_several_seeds_runs_through_the_benchmark_and_shows_the_spread(tmp_path, capsys):
    rows = run_demo(tmp_path / "demo", methods=("frozen",), budget=SMOKE_BUDGET, targets=("night",),
                    overlays=False, progress=False, seeds=(0, 1))
    assert rows[0]["seeds"] == 2 and set(rows[0]["sd"]) == {"source", "night", "mean"}
    values = [json.loads((tmp_path / "demo" / "runs" / "frozen" / f"seed{s}" / RESULT_FILE).read_text())
              for s in (0, 1)]
    nights = [v["curve"][-1]["miou"]["night"] for v in values]
    assert rows[0]["night"] == pytest.approx(sum(nights) / 2)
    assert rows[0]["sd"]["night"] == pytest.approx(abs(nights[0] - nights[1]) / math.sqrt(2))
    assert f"{rows[0]['night']:.1f} ± {rows[0]['sd']['night']:.1f}" in capsys.readouterr().out
    header = (tmp_path / "demo" / "results.csv").read_text().splitlines()[0]
    assert header.endswith("night_sd,mean_targets_sd")


def test_t_interval_and_paired_difference_match_hand_computed_values():
    # differences 1.0, 2.0, 0.5: mean 7/6, sample sd sqrt(7/12), half-width t(0.975, 2) * sd / sqrt(3)
    diff = paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 5: 1.0}, {0: 9.0, 1: 10.0, 2: 10.5})
    assert diff["seeds"] == [0, 1, 2] and diff["differences"] == [1.0, 2.0, 0.5]
    assert diff["mean"] == pytest.approx(7 / 6) and diff["sd"] == pytest.approx(math.sqrt(7 / 12))
    half = T_975_2DF * math.sqrt(7 / 12) / math.sqrt(3)
    assert diff["half"] == pytest.approx(half) and half == pytest.approx(1.8973, abs=1e-4)
    assert (diff["low"], diff["high"]) == pytest.approx((7 / 6 - half, 7 / 6 + half))
    # n = 2: t(0.975, 1) = 12.706
    two = t_interval([3.0, 5.0])
    assert two["half"] == pytest.approx(12.706204736 * math.sqrt(2) / math.sqrt(2))
    assert mean_std([4.0]) == (4.0, pytest.approx(float("nan"), nan_ok=True))
    one = t_interval([4.0])
    assert one["mean"] == 4.0 and math.isnan(one["half"]) and verdict(one["low"], one["high"], +1) == "undecided"


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.5, 2.0, +1, "holds"), (-2.0, -0.5, +1, "contradicted"), (-0.5, 1.0, +1, "undecided"),
    (-2.0, -0.5, -1, "holds"), (0.5, 2.0, -1, "contradicted"), (-1.0, 0.0, -1, "undecided"),
    (float("nan"), float("nan"), +1, "undecided"),
])
def test_verdict(low, high, direction, expected):
    assert verdict(low, high, direction) == expected


def _record(row: str, seed: int, source: float, target: float) -> dict:
    miou = {SOURCE: source, **{t: target for t in TARGETS}}
    return {"row": row, "seed": seed, "trainable": 0, "curve": [{"iteration": 1, "miou": miou}]}


def test_claims_are_decided_by_their_paired_intervals_and_omitted_without_their_rows():
    records = []
    for seed, offset in enumerate((0.0, 0.2, -0.1)):
        records.append(_record("frozen", seed, 20 + offset, 15 + offset))
        records.append(_record("full", seed, 23 + offset * 2, 12 + offset))  # source +3, targets -3: (a), (b) hold
        records.append(_record("rein", seed, 20 + offset, 15 + (1, -1, 0.5)[seed]))  # +-: (c) undecided
    summary = summarize(records, SOURCE, TARGETS)
    claims = {c["id"]: c for c in summary["claims"]}
    assert list(claims) == ["a", "b", "c"]  # FisherTune's claims need rows that did not run
    assert claims["a"]["verdict"] == "holds" and claims["a"]["quantity"] == "source"
    assert claims["b"]["verdict"] == "holds" and claims["b"]["mean"] == pytest.approx(-3.0)
    assert claims["c"]["verdict"] == "undecided"
    flipped = [dict(r, row={"full": "frozen", "frozen": "full"}.get(r["row"], r["row"])) for r in records]
    claims = {c["id"]: c["verdict"] for c in summarize(flipped, SOURCE, TARGETS)["claims"]}
    assert claims["a"] == "contradicted" and claims["b"] == "contradicted"
    assert {c[0] for c in CLAIMS} >= {"a", "b", "c", "d", "e", "f1", "f2", "f3", "g", "h"}


def test_rows_are_the_methods_and_fishertunes_ablations():
    assert set(ROWS) >= {"frozen", "full", "rein", "fishertune", "lora", "vpt", "soma", "ft-random", "ft-fim",
                         "ft-domain", "ft-plain", "ft-no-xprime"}
    assert ROWS["fishertune"] == ("fishertune", [])  # FisherTune's defaults, whatever they become

    def fishertune(row):
        method, overrides = ROWS[row]
        return demo_config(method, budget=SMOKE_BUDGET, out_dir="x", weights=None, overrides=overrides).method

    assert fishertune("ft-random").fishertune.selection == "random"
    assert fishertune("ft-fim").fishertune.selection == "fisher"
    assert fishertune("ft-domain").fishertune.selection == "domain"
    assert fishertune("ft-plain").fishertune.variational is False
    assert "method.fishertune.train_perturb_prob=0.0" in ROWS["ft-no-xprime"][1]
    assert fishertune("ft-no-xprime").fishertune.train_perturb_prob == 0.0
    assert fishertune("ft-random").name == "fishertune" and fishertune("ft-random").fishertune.variational is True


@pytest.mark.parametrize("iters, points, expected", [
    (400, 4, [100, 200, 300, 400]), (6, 4, [2, 4, 6]), (10, 1, [10]), (5, 5, [1, 2, 3, 4, 5]), (7, 2, [4, 7])])
def test_curve_iterations(iters, points, expected):
    assert curve_iterations(iters, points) == expected
    cfg = demo_config("frozen", budget=SMOKE_BUDGET.__class__(**{**SMOKE_BUDGET.__dict__, "iters": iters}),
                      out_dir="x", weights=None, curve_points=points)
    assert cfg.train.checkpoint_interval == (expected[0] if points > 1 else 0)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "frozen,lora2"], "unknown row(s) lora2"),
    (["--seed-list", "0,x"], "--seed-list"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--smoke", "--curve-points", "9"], "--curve-points must be in [1, 4]"),
    (["--quick", "--budget", "default"], "--budget and --quick/--smoke"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_dg.plan(bench_dg.parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_budget_is_named_apart_from_the_device():
    """--device cuda takes the GPU budget unless --budget names another (the CPU run's sizes on a GPU)."""
    def budget_of(*argv):
        return bench_dg.plan(bench_dg.parse_args(list(argv)))[2:4]

    assert budget_of("--device", "cuda") == ("cuda", TESTBED_BUDGETS["cuda"])
    assert budget_of("--device", "cuda", "--budget", "default") == ("default", TESTBED_BUDGETS["default"])
    assert budget_of("--budget", "quick")[1] == TESTBED_BUDGETS["quick"] != TESTBED_BUDGETS["default"]
    assert budget_of()[0] == "default"


def test_demo_seeds_must_be_positive(tmp_path, capsys):
    assert dgss_main(["demo", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err


def test_runs_in_parallel_processes_give_the_same_numbers(tmp_path):
    """--jobs 2 trains the runs in two spawned processes: the same computation, so the same numbers as
    one process, in the same order."""
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert bench_dg.main(["--world", "demo", "--smoke", "--methods", "frozen,rein", "--out", str(out),
                              "--jobs", str(jobs)]) == 0
        data = json.loads((out / "results.json").read_text())
        assert data["jobs"] == jobs and data["runs_trained"] == 2
        results[jobs] = [(r["row"], r["seed"], r["curve"]) for r in data["runs"]]
    assert results[1] == results[2]


WORKERS_SCRIPT = """
import concurrent.futures, multiprocessing, sys, time
from dgss.testbed.benchmark import _workers_die_with_this_process

def nap(_):
    time.sleep(120)

if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    with _workers_die_with_this_process(pool):
        futures = [pool.submit(nap, i) for i in range(2)]
        while len(pool._processes) < 2:
            time.sleep(0.1)
        print(" ".join(str(pid) for pid in pool._processes), flush=True)
        futures[0].result()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_stopped_driver_takes_its_worker_processes_with_it(tmp_path):
    # SIGTERM to the driver alone (a scheduler's scancel, `kill PID`) must not leave workers training
    import signal
    import subprocess
    import time

    script = tmp_path / "driver.py"
    script.write_text(WORKERS_SCRIPT)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        driver.kill()


def test_source_diagnostic_merges_the_vehicle_classes_by_summing_their_confusions():
    import torch

    import bench_dg_source

    classes = ["road", "car", "truck", "bus"]
    matrix = torch.tensor([[10., 0, 0, 0], [0, 5, 3, 0], [0, 2, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    merged, names = bench_dg_source.merge(matrix, classes)
    assert names == ["road", "vehicle"]
    assert merged.tolist() == [[10, 0], [1, 11]]  # the vehicles' mutual confusions become hits
    miou, per_class = bench_dg_source.iou(matrix)
    # road 10/11; car 5/(7+8-5)=0.5; truck 1/(4+3-1); bus 0/1 -> mean over the 4 present classes
    assert per_class[0] == pytest.approx(100 * 10 / 11) and per_class[1] == pytest.approx(50.0)
    assert miou == pytest.approx(100 * (10 / 11 + 0.5 + 1 / 6 + 0) / 4)


def test_source_probe_adds_overrides_and_evaluates_no_target(tmp_path, capsys, monkeypatch):
    import bench_dg_probe

    monkeypatch.setattr("dgss.testbed.benchmark.ROWS", dict(ROWS))  # the probe rewrites its rows' overrides

    bench_dg_probe.main([str(tmp_path), "frozen", "model.head.type=fpn", "--smoke"])
    record = json.loads((tmp_path / "runs/frozen/seed0" / RESULT_FILE).read_text())
    assert record["config"]["model"]["head"]["type"] == "fpn"
    assert set(record["curve"][-1]["miou"]) == {"clean", "blur-1", "blur-2"}  # source and validation only
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("frozen ")
    with pytest.raises(SystemExit):
        bench_dg_probe.main([str(tmp_path), "no-such-row"])


def test_resume_accepts_a_run_made_before_an_option_existed_or_from_another_checkout(tmp_path):
    """A saved config that lacks a newer option (which the new config gives its default), or names the
    same weights file under another path, is the same experiment; any real change is not."""
    import shutil

    from dgss.config import to_dict
    from dgss.testbed.benchmark import _finished_record
    from dgss.testbed.world import TESTBED_WORLD, resolve_weights
    from dgss.fileio import file_sha256

    weights = resolve_weights("ssl-foundation")
    moved = tmp_path / "other_checkout" / Path(weights).name
    moved.parent.mkdir()
    shutil.copyfile(weights, moved)
    sha = file_sha256(weights)
    config = to_dict(demo_config("frozen", budget=SMOKE_BUDGET, out_dir=tmp_path, weights="ssl-foundation",
                                 world=TESTBED_WORLD))
    assert config["method"]["rein"]["lr_mult"] == 1.0  # Frozen's config keeps the Reins' default

    def saved(edit):
        old = json.loads(json.dumps(config))
        edit(old)
        path = tmp_path / "benchmark.json"
        path.write_text(json.dumps({"weights_sha256": sha, "config": old}))
        return _finished_record(path, config, sha) is not None

    assert saved(lambda c: None)
    assert saved(lambda c: c["method"]["rein"].pop("lr_mult"))  # made before method.rein.lr_mult existed
    assert not saved(lambda c: c["method"]["rein"].update(lr_mult=0.5))
    assert saved(lambda c: c["model"].update(weights=str(moved)))  # the same file, another checkout
    assert saved(lambda c: c["model"].update(weights=str(tmp_path / "gone" / moved.name)))  # gone, same name
    assert not saved(lambda c: c["model"].update(weights=str(tmp_path / "gone" / "other.safetensors")))
    moved.write_bytes(b"other weights")
    assert not saved(lambda c: c["model"].update(weights=str(moved)))
    assert not saved(lambda c: c["train"].update(iters=config["train"]["iters"] + 1))
    assert not saved(lambda c: c["data"]["test"][0]["options"].pop("num_images"))  # list items: no default


def test_a_worlds_method_overrides_reach_only_that_methods_rows(tmp_path):
    from dgss.testbed.world import TESTBED_WORLD

    def config(method, *overrides):
        return demo_config(method, budget=SMOKE_BUDGET, out_dir=tmp_path, weights="ssl-foundation",
                           world=TESTBED_WORLD, overrides=list(overrides))

    rein = config("rein")
    assert rein.method.rein.lr_mult == 0.1 and rein.method.rein.num_tokens == 24  # merged, not replaced
    assert rein.method.backbone_lr_mult == 1.0
    for method in ("lora", "soma", "fishertune", "full", "lp-ft"):  # one lr (1e-3) for every adapting tensor
        cfg = config(method)
        assert cfg.train.lr * cfg.method.backbone_lr_mult == pytest.approx(1e-3), method
        assert cfg.method.rein.lr_mult == 1.0, method  # another method's section keeps its defaults
    assert config("frozen").method.backbone_lr_mult == 1.0
    assert config("rein", "method.rein.lr_mult=1.0").method.rein.lr_mult == 1.0  # a row's own override wins
    assert config("soma", "method.soma.start_block=2").method.backbone_lr_mult == 0.1
    demo = demo_config("soma", budget=SMOKE_BUDGET, out_dir=tmp_path, weights=None)  # the demo world: none
    assert demo.method.backbone_lr_mult == 0.5


def test_the_label_rows_run_the_label_pretrained_file_at_the_testbeds_token_grid(tmp_path):
    """frozen-label and fishertune-label: the shipped label-pretrained ViT (patch 16) at the testbed's 16 x 16
    grid on a 128 crop, its kernel and position embedding resampled as timm's checkpoint filter does."""
    import torch
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    from dgss.testbed.supervised_foundation import FOUNDATION_FILE
    from dgss.testbed.world import TESTBED_WORLD
    from dgss.tuning.model import build_segmentor

    for row in ("frozen-label", "fishertune-label"):
        method, overrides = ROWS[row]
        cfg = demo_config(method, budget=SMOKE_BUDGET, out_dir=tmp_path, weights="ssl-foundation",
                          world=TESTBED_WORLD, overrides=overrides)
        assert Path(cfg.model.weights) == FOUNDATION_FILE and cfg.model.patch_size == 8 and cfg.model.img_size == 128
    model = build_segmentor(cfg).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, 3, 128, 128))
    assert features[2].shape[-2:] == (16, 16)  # the token grid, as the label-free rows' (patch 8)
    saved, vit = load_file(str(FOUNDATION_FILE)), model.backbone.model
    assert saved["patch_embed.proj.weight"].shape[-1] == 16
    torch.testing.assert_close(vit.patch_embed.proj.weight, resample_patch_embed(saved["patch_embed.proj.weight"], [8, 8]))
    torch.testing.assert_close(vit.pos_embed, resample_abs_pos_embed(saved["pos_embed"], [16, 16], [8, 8]))
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])  # the rest as saved
