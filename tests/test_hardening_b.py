"""Issue 17, part B: one-line errors before the expensive work, 16-bit images, file modes, one config
validation, progress bars, and the smaller defects (logged lr, the bar's loss, the demo's means, which
checkpoint predict uses, export suffixes, stale temporary files, torch's unsafe advice, plot labels,
an empty comparison) and the CPU-sized example config."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from PIL import Image
from safetensors.torch import save_file
from test_engine_support import backbone_weights_file, tiny_config

import dgss.engine.trainer  # imported before any test patches build_segmentor, which it imports by name
import dgss.tuning.model
from dgss.cli import main
from dgss.config import ConfigError, load_config, save_config, validate_config
from dgss.data.image_io import DataError, read_image, read_label
from dgss.engine.checkpoint import CheckpointError, load_training_state, save_model, save_training_checkpoint
from dgss.engine.config_check import check_config
from dgss.fileio import remove_stale_temp_files
from dgss.models.backbone_weights import BackboneWeightsError, read_state_dict
from dgss.models.backbones import build_backbone
from dgss.tuning.model import build_segmentor

REPO = Path(__file__).resolve().parents[1]
UNSAFE_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "add_safe_globals", "safe_globals")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def never(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran before the inputs and the output folder were checked")

    return fail


@pytest.fixture
def no_model_building(monkeypatch):
    """Fail the test if a segmentor is built (the checks must come first)."""
    monkeypatch.setattr(dgss.tuning.model, "build_segmentor", never("build_segmentor"))
    monkeypatch.setattr("dgss.engine.trainer.build_segmentor", never("build_segmentor"))


# --------------------------------------------------------------------------------------------------
# 4. one line, before the expensive work
# --------------------------------------------------------------------------------------------------


def test_a_missing_weights_file_is_one_line_before_any_model_is_built(tmp_path, capsys, no_model_building,
                                                                      monkeypatch):
    missing = tmp_path / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    config = tiny_config(tmp_path, weights=str(missing))
    assert main(["train", str(config)]) == 2
    line = one_error_line(capsys)
    assert "model.weights" in line and str(missing) in line
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"x")
    assert main(["eval", str(config), "--checkpoint", str(model_file)]) == 2
    assert str(missing) in one_error_line(capsys)
    assert main(["fisher", str(config), "--no-progress"]) == 2
    assert str(missing) in one_error_line(capsys)
    assert main(["eval", str(config), "--checkpoint", str(tmp_path / "gone.safetensors")]) == 2
    assert "checkpoint file not found" in one_error_line(capsys)
    # the library checks the file before timm allocates the model too
    monkeypatch.setattr("dgss.models.backbones.timm.create_model", never("timm.create_model"))
    with pytest.raises(BackboneWeightsError, match="not found: .*dinov2_vitl14_pretrain.pth"):
        build_backbone("dinov2_l", weights=str(missing))


def test_unsuitable_weights_files_are_one_line_naming_the_file(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    assert main(["train", str(tiny_config(tmp_path, "a", weights=str(garbage)))]) == 2
    line = one_error_line(capsys)
    assert "cannot read" in line and str(garbage) in line
    wide = tmp_path / "wide.pth"  # another width: a multi-line list of shape mismatches, printed as one line
    torch.save(build_backbone("dinov2_s", img_size=64, depth=4, embed_dim=64, num_heads=2).model.state_dict(), wide)
    assert main(["train", str(tiny_config(tmp_path, "b", weights=str(wide)))]) == 2
    line = one_error_line(capsys)
    assert str(wide) in line and "shape mismatches" in line and "pos_embed" in line


@pytest.mark.parametrize("shape", [(17, 32), (32,), (1, 1, 17, 32)])
def test_a_position_embedding_of_the_wrong_rank_names_the_key(tmp_path, shape):
    donor = build_backbone("dinov2_s", img_size=64, **TINY_VIT)
    state = {k: v.clone() for k, v in donor.model.state_dict().items()}
    assert tuple(state["pos_embed"].shape) == (1, 17, 32)
    state["pos_embed"] = torch.zeros(shape)
    path = tmp_path / "bad_pos.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneWeightsError, match=r"bad_pos.safetensors: key 'pos_embed' has shape .*rank-3"):
        build_backbone("dinov2_s", img_size=64, weights=str(path), **TINY_VIT)


def _blocked(tmp_path) -> Path:
    """A folder that cannot be created, for root too: its parent is a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "out"


def test_unwritable_output_folders_are_one_line_before_the_work(tmp_path, capsys, no_model_building,
                                                                monkeypatch):
    out = _blocked(tmp_path)
    config = tiny_config(tmp_path, method="fishertune")
    monkeypatch.setattr("dgss.predict.load", never("dgss.load"))
    monkeypatch.setattr("dgss.demo.run_demo", never("run_demo"))
    monkeypatch.setattr("dgss.tuning.fishertune.report.run_fisher", never("run_fisher"))
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"x")
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    commands = {
        "train": ["train", str(config), f"output_dir={out}"],
        "eval": ["eval", str(config), "--checkpoint", str(model_file), "--out", str(out)],
        "predict": ["predict", str(image), "--checkpoint", str(model_file), "--out", str(out), "--no-progress"],
        "fisher": ["fisher", str(config), "--out", str(out), "--no-progress"],
        "demo": ["demo", "--quick", "--out", str(out), "--no-progress"],
        "export": ["export", "--checkpoint", str(model_file), "--out", str(out / "model.onnx")],
        "compare": ["compare", str(config), "--methods", "frozen", "--out", str(out), "--no-run"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        line = one_error_line(capsys)
        assert str(out) in line and "cannot be created" in line, (name, line)


# --------------------------------------------------------------------------------------------------
# 6. 16-bit greyscale images
# --------------------------------------------------------------------------------------------------


def test_16_bit_grey_images_are_scaled_by_their_bit_depth_not_clipped(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    sixteen = levels * 257  # 0 .. 65535: exactly the 8-bit levels at 16 bits
    for suffix in (".png", ".tif"):
        path = tmp_path / f"grey16{suffix}"
        Image.fromarray(sixteen).save(path)
        assert Image.open(path).mode.startswith("I")
        rgb = read_image(path)
        assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
        assert (rgb == levels[..., None]).all(), suffix  # PIL's convert("RGB") made this almost all 255
    # a dark 16-bit image stays dark (no stretching by its own maximum)
    dark = tmp_path / "dark16.png"
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(dark)
    assert (read_image(dark) == 4).all()  # round(1000 / 257)
    # predictions on PIL images and uint16 arrays take the same path
    from dgss.predict import to_rgb_array

    assert (to_rgb_array(Image.open(tmp_path / "grey16.png")) == levels[..., None]).all()
    assert (to_rgb_array(sixteen) == levels[..., None]).all()
    # 32-bit integer images have no fixed range: refused with the file named
    wide = tmp_path / "grey32.tif"
    Image.fromarray(sixteen.astype(np.int32) * 1000).save(wide)
    with pytest.raises(DataError, match="grey32.tif.*32-bit integer"):
        read_image(wide)
    # label maps of 16 bits keep their raw values (class ids, not intensities)
    label = tmp_path / "label16.png"
    Image.fromarray(np.array([[3, 300], [7, 65535]], np.uint16)).save(label)
    assert read_label(label).tolist() == [[3, 300], [7, 65535]]


# --------------------------------------------------------------------------------------------------
# 7. file modes follow the umask
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_every_file_dgss_writes_follows_the_umask(tmp_path, umask):
    cfg = load_config(tiny_config(tmp_path, method="rein", head="mask2former",
                                  weights=str(backbone_weights_file(tmp_path))))
    model = build_segmentor(cfg)
    previous = os.umask(umask)
    try:
        written = [save_config(cfg, tmp_path / "out" / "config.yaml"),
                   save_model(model, cfg, tmp_path / "out" / "model.safetensors")]
        directory = tmp_path / "out" / "checkpoints"
        save_training_checkpoint(directory, 1, model, cfg, {"data_position": 0})
        written += [directory / "iter_0000001.safetensors", directory / "iter_0000001.state.pt", directory / "last"]
        from dgss.data.builder import build_dataset

        ds = cfg.data.train[0]
        ds.fraction = 0.5
        build_dataset(ds, cfg.data, train=True, fraction_list_dir=tmp_path / "out" / "lists")
        written += list((tmp_path / "out" / "lists").iterdir())
    finally:
        os.umask(previous)
    assert len(written) == 6
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))


# --------------------------------------------------------------------------------------------------
# 8. one validation for `dgss config` and the commands that use a config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, closest", [
    ("model.backbone=dinov2_xl", "model.backbone", "did you mean 'dinov2_l'"),
    ("method.name=reinn", "method.name", "did you mean 'rein'"),
    ("model.head.type=mask2formr", "model.head.type", "did you mean 'mask2former'"),
    ("data.test.0.type=cityscape", "data.test[0].type", "did you mean 'cityscapes'"),
    ("train.iters=0", "train.iters", "at least 1, got 0"),
    ("train.batch_size=-2", "train.batch_size", "at least 1, got -2"),
    ("train.grad_accum=0", "train.grad_accum", "at least 1, got 0"),
])
def test_config_rejects_unknown_names_and_non_positive_sizes_as_train_does(tmp_path, capsys, override, key,
                                                                           closest, no_model_building):
    config = tiny_config(tmp_path)
    assert main(["config", str(config), override]) == 2
    line = one_error_line(capsys)
    assert f"key '{key}'" in line and closest in line and str(config) in line
    assert main(["train", str(config), override]) == 2  # the same check, before anything is built
    assert one_error_line(capsys) == line.replace("dgss config:", "dgss train:")
    from dgss.engine.trainer import Trainer

    with pytest.raises(ConfigError, match=re.escape(f"key '{key}'")):
        Trainer(load_config(config, [override]))


def test_the_shipped_configs_pass_the_validation():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        check_config(load_config(path), str(path))


def test_the_config_module_imports_no_registry():
    # dgss.config is the ground floor: the registries' names are checked above it (engine.config_check)
    code = ("import sys, dgss.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('dgss.models', 'dgss.tuning', 'dgss.data', "
            "'dgss.engine'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    cfg = load_config(None, ["method.name=reinn"])
    assert validate_config(cfg) is cfg  # values only
    with pytest.raises(ConfigError, match=r"key 'method.name': unknown method 'reinn'; did you mean 'rein'"):
        check_config(cfg)


def test_the_models_import_no_tuning_method():
    # tuning sits on models: the segmentor holds a method without importing the package
    code = ("import sys, dgss.models.segmentor, dgss.models.heads, dgss.models.backbones; "
            "print(sorted(m for m in sys.modules if m.startswith(('dgss.tuning', 'dgss.engine'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# 10. progress bars of evaluation
# --------------------------------------------------------------------------------------------------


def test_eval_shows_a_bar_per_dataset_and_image_when_the_progress_bar_is_on(tmp_path, capsys):
    config = tiny_config(tmp_path)
    cfg = load_config(config)
    model_file = save_model(build_segmentor(cfg), cfg, tmp_path / "model.safetensors")
    assert main(["eval", str(config), "--checkpoint", str(model_file), "train.progress_bar=true"]) == 0
    err = capsys.readouterr().err
    assert "evaluate" in err and "2/2" in err and "dataset" in err  # the datasets' bar
    assert "night" in err and "fog" in err and "img" in err  # each dataset's images
    assert main(["eval", str(config), "--checkpoint", str(model_file)]) == 0  # train.progress_bar: false
    quiet = capsys.readouterr().err
    assert "img" not in quiet and "%|" not in quiet


def test_compare_evaluation_shows_progress_when_the_progress_bar_is_on(tmp_path, capsys):
    from dgss.compare import _evaluate

    cfg = load_config(tiny_config(tmp_path), ["train.progress_bar=true"])
    model_file = save_model(build_segmentor(cfg), cfg, tmp_path / "model.safetensors")
    _evaluate(cfg, model_file)
    err = capsys.readouterr().err
    assert "evaluate" in err and "night" in err and (cfg.run_dir / "eval" / "results.json").is_file()


# --------------------------------------------------------------------------------------------------
# 11. the smaller ones
# --------------------------------------------------------------------------------------------------


def test_the_logged_lr_is_the_base_lr_and_stale_temp_files_go_at_the_start(tmp_path):
    from dgss.engine.schedule import PolySchedule
    from dgss.engine.trainer import Trainer

    cfg = load_config(tiny_config(tmp_path, method="full", iters=3))  # full: backbone group at lr x 0.1
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cfg.run_dir / f".config.yaml.tmp{int(dead.stdout)}"  # a save_config that was killed
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a config")
    Trainer(cfg).train()
    records = [json.loads(line) for line in (cfg.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    schedule = PolySchedule.from_config(cfg.train)
    logged = {r["iteration"]: r["lr"] for r in records if r["kind"] == "train"}
    assert logged == pytest.approx({i: cfg.train.lr * schedule.factor(i - 1) for i in (1, 2, 3)})
    assert not stale.exists()


def test_the_bar_shows_the_loss_of_the_iteration_it_counts(tmp_path, capsys):
    from dgss.engine.logging import TrainLogger

    log = TrainLogger(tmp_path / "logs", total_iters=3, progress_bar=True)
    log._bar.mininterval, log._bar.miniters, log._bar.dynamic_miniters = 0, 0, False  # redraw on every update
    try:
        for iteration, loss in ((1, 2.5), (2, 1.25), (3, 0.625)):
            capsys.readouterr()
            log.step(iteration, loss, 1e-3)
            drawn = capsys.readouterr().err.split("\r")[-1]
            assert f"{iteration}/3" in drawn and f"loss={loss:.4f}" in drawn, drawn
    finally:
        log.close()


def test_the_demo_runs_own_results_average_the_targets_like_the_table(tmp_path):
    import dataclasses

    from dgss.demo import QUICK_BUDGET, SOURCE, run_demo

    budget = dataclasses.replace(QUICK_BUDGET, iters=2, train_images=4, eval_images=2, fisher_batches=2)
    rows = run_demo(tmp_path, methods=("frozen",), budget=budget, targets=("night", "fog"), overlays=False,
                    progress=False)
    results = json.loads((tmp_path / "runs" / "frozen" / "eval" / "results.json").read_text())
    source = json.loads((tmp_path / "runs" / "frozen" / "eval" / "source.json").read_text())
    assert list(results["datasets"]) == ["night", "fog"] and list(source["datasets"]) == [SOURCE]
    assert results["mean_miou"] == pytest.approx(rows[0]["mean"], abs=1e-3)
    assert source["datasets"][SOURCE]["miou"] == pytest.approx(rows[0]["source"], abs=1e-3)
    assert "| mean |" in (tmp_path / "runs" / "frozen" / "eval" / "results.md").read_text()


def test_predict_on_a_run_without_a_final_model_names_the_checkpoint_it_uses(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path))
    model = build_segmentor(cfg)
    for iteration in (2, 4):
        save_training_checkpoint(cfg.run_dir / "checkpoints", iteration, model, cfg, {"data_position": 0})
    image = tmp_path / "street.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(cfg.run_dir), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "no model_final.safetensors" in err and "iter_0000004.safetensors" in err


def test_export_refuses_a_suffix_it_does_not_write(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dgss.predict.load", never("dgss.load"))
    out = tmp_path / "model.tflite"
    assert main(["export", "--checkpoint", str(tmp_path / "model.safetensors"), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "model.tflite" in line and ".onnx" in line and ".pt" in line and not out.exists()


def test_stale_temporary_files_of_dead_writers_are_removed_at_the_next_save(tmp_path):
    cfg = load_config(tiny_config(tmp_path))
    model = build_segmentor(cfg)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [directory / f".iter_0000003.state.pt.tmp{int(dead.stdout)}",
             directory / f".iter_0000003.safetensors.tmp{int(dead.stdout)}"]
    alive = directory / f".iter_0000009.state.pt.tmp{os.getppid()}"  # a writer that still runs keeps its file
    other = directory / "notes.tmp123"  # not a name atomic_write gives
    for path in (*stale, alive, other):
        path.write_bytes(b"partial")
    save_training_checkpoint(directory, 4, model, cfg, {"data_position": 0})
    assert not any(p.exists() for p in stale) and alive.exists() and other.exists()
    assert (directory / "iter_0000004.state.pt").is_file()
    assert remove_stale_temp_files(directory) == []


def test_dgss_never_passes_on_torchs_advice_to_load_without_weights_only(tmp_path, capsys):
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(2)}, "extra": np.zeros(3)}, pickled)
    with pytest.raises(CheckpointError) as state_error:
        load_training_state(pickled)
    with pytest.raises(BackboneWeightsError) as weights_error:
        read_state_dict(pickled)
    for message in (str(state_error.value), str(weights_error.value)):
        assert str(pickled) in message and "pickled Python object" in message and "numpy" in message
        assert not any(advice in message for advice in UNSAFE_ADVICE), message
    config = tiny_config(tmp_path)
    assert main(["predict", str(pickled), "--checkpoint", str(pickled), "--config", str(config),
                 "--out", str(tmp_path / "p")]) == 2
    line = one_error_line(capsys)
    assert str(pickled) in line and not any(advice in line for advice in UNSAFE_ADVICE)


def test_the_per_block_selection_plot_has_no_overlapping_labels(tmp_path, monkeypatch):
    from dgss.tuning.fishertune import plots

    overlaps = {}

    def measure(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
        overlaps[Path(path).name] = sum(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
        plots._pyplot().close(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", measure)
    for blocks in (6, 12, 24, 40):  # the demo's 6 blocks, ViT-B, ViT-L, ViT-g
        groups = {f"block {i:02d}": (i, 100) for i in range(blocks)}
        groups["embed/other"] = (0, 50)
        plots.plot_selection_fractions(groups, tmp_path / f"blocks{blocks}.png", "fraction per block", 0.05)
    types = {t: (1, 10) for t in ("q", "k", "v", "proj", "fc1", "fc2", "norm", "embed", "other")}
    plots.plot_selection_fractions(types, tmp_path / "types.png", "fraction per type", 0.05)
    assert overlaps == {"blocks6.png": 0, "blocks12.png": 0, "blocks24.png": 0, "blocks40.png": 0, "types.png": 0}


def test_compare_without_any_results_refuses_instead_of_an_empty_chart(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = tmp_path / "compare"
    assert main(["compare", str(config), "--methods", "frozen,rein", "--no-run", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "nothing to compare" in line and "frozen" in line and "rein" in line
    assert not (out / "miou.png").exists() and not (out / "table.md").exists()


# --------------------------------------------------------------------------------------------------
# 12. the CPU-sized example config, and README examples that exist
# --------------------------------------------------------------------------------------------------


def test_the_cpu_example_config_loads_builds_and_trains(tmp_path, monkeypatch):
    from dgss.engine.trainer import Trainer

    monkeypatch.chdir(REPO)  # its weights path is relative to the repository root, as the README runs it
    example = Path("configs/examples/synthetic_cpu.yaml")
    assert main(["config", str(example)]) == 0
    cfg = check_config(load_config(example))
    assert cfg.train.device == "cpu" and 100 <= cfg.train.iters <= 1000 and Path(cfg.model.weights).is_file()
    assert all(d.type == "synthetic" for d in (*cfg.data.train, *cfg.data.val, *cfg.data.test))
    small = ["train.iters=2", "train.checkpoint_interval=0", "train.eval_interval=0", "train.progress_bar=false",
             f"output_dir={tmp_path}", "data.train.0.options.num_images=4"]
    final = Trainer(load_config(example, small)).train()
    assert final.is_file() and final.parent == tmp_path / "synthetic_cpu"


def test_the_readme_names_only_config_files_that_exist():
    readme = (REPO / "README.md").read_text()
    assert "my_experiment.yaml" not in readme
    named = set(re.findall(r"configs/[\w./-]+\.yaml", readme))
    assert "configs/examples/synthetic_cpu.yaml" in named
    assert [p for p in sorted(named) if not (REPO / p).is_file()] == []
