"""A tiny end-to-end run (train, validate, checkpoint, evaluate, write results), the method hook,
non-finite losses, and clear errors for wrong checkpoints."""

import json
import math

import pytest
import torch
from test_engine_support import backbone_weights_file, tiny_config

from dgss.cli import main
from dgss.config import load_config
from dgss.engine.checkpoint import CheckpointError, backbone_fingerprint, load_model_weights
from dgss.engine.trainer import NonFiniteLossError, Trainer
from dgss.tuning.model import build_segmentor


def test_tiny_run_trains_evaluates_and_writes_results(tmp_path, capsys):
    config = tiny_config(tmp_path, "e2e", head="mask2former", method="rein", iters=4, eval_interval=2,
                         checkpoint_interval=2, keep_checkpoints=1)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "e2e"
    assert "trainable parameters:" in out and "[val] iter 2: clean mIoU" in out
    assert load_config(run / "config.yaml").train.iters == 4  # the fully resolved config
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "iter_0000004.safetensors", "iter_0000004.state.pt", "last"]  # keep_checkpoints: 1
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in records if r["kind"] == "train")
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [2, 4]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").iterdir())

    assert main(["eval", str(config), "--checkpoint", str(run / "model_final.safetensors"), "eval.mode=slide",
                 "eval.crop_size=[64,64]", "eval.stride=[42,42]"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["datasets"]) == {"night", "fog"}
    for scores in results["datasets"].values():
        assert 0 <= scores["miou"] <= 100 and len(scores["iou"]) == 19 and scores["num_images"] == 2
    mean = (results["datasets"]["night"]["miou"] + results["datasets"]["fog"]["miou"]) / 2
    assert results["mean_miou"] == pytest.approx(mean, abs=1e-3)
    table = (run / "eval" / "results.md").read_text()
    assert "| mIoU |" in table and "| traffic light |" in table and table.strip() in printed


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, iteration, trainer):
        batch = trainer.next_batch() if iteration == 1 else None  # e.g. FisherTune's estimation batches
        self.calls.append((iteration, trainer.total_iters, trainer.rank, trainer.world_size, trainer.device.type,
                           None if batch is None else tuple(batch["image"].shape)))
        if iteration == 2:  # a method changes its trainable set and asks for a new optimizer
            trainer.model.head.classifier.requires_grad_(False)
            trainer.rebuild_optimizer()


def test_method_hook_runs_before_every_iteration_and_can_rebuild_the_optimizer(tmp_path):
    trainer = Trainer(load_config(tiny_config(tmp_path, "hook", iters=4)))
    recorder = Recorder()
    trainer.model.method.on_train_iteration = recorder
    trainer.train()
    assert [c[0] for c in recorder.calls] == [0, 1, 2, 3]
    assert recorder.calls[0][1:5] == (4, 0, 1, "cpu") and recorder.calls[1][5] == (2, 3, 64, 64)
    assert trainer.batches.position == (4 + 1) * 2  # the hook's batch counts as consumed data
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(trainer.model.head.classifier.weight) not in trained


def _poison_loss_at(trainer, bad_iteration):
    head_loss = trainer.model.head.loss

    def loss(*args, **kwargs):
        losses = head_loss(*args, **kwargs)
        if trainer.iteration == bad_iteration:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    trainer.model.head.loss = loss


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(load_config(tiny_config(tmp_path, "nan", iters=4, checkpoint_interval=2)))
    _poison_loss_at(trainer, 2)  # the third iteration
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at iteration 3 of 4.*iter_0000002"):
        trainer.train()
    checkpoints = tmp_path / "runs" / "nan" / "checkpoints"
    assert json.loads((checkpoints / "last").read_text())["iteration"] == 2
    assert not (tmp_path / "runs" / "nan" / "model_final.safetensors").exists()


def test_non_finite_loss_skips_the_step_with_nan_policy_skip(tmp_path):
    trainer = Trainer(load_config(tiny_config(tmp_path, "skip", iters=3, nan_policy="skip")))
    _poison_loss_at(trainer, 1)
    before = {}
    original_step = trainer.train_step

    def step(iteration):
        if iteration == 1:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        result = original_step(iteration)
        if iteration == 1:
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, before[k]), k  # the poisoned step changed nothing
        return result

    trainer.train_step = step
    with pytest.warns(UserWarning, match="iteration 2 of 3: optimizer step skipped"):
        trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


def test_a_backbone_rebuilt_with_float32_rounding_differences_still_loads_its_file(tmp_path):
    # model.patch_resize=timm solves a least-squares problem whose float32 result depends on the BLAS
    # thread count (or the device): the same weights file gives tensors that differ in their last bits,
    # which the rounded fingerprint alone rejected. The recorded moments accept them; another file does not.
    config = tiny_config(tmp_path, "frozen", method="frozen", weights=str(backbone_weights_file(tmp_path, "a.pth")),
                         iters=1)
    final = Trainer(load_config(config)).train()
    recorded = load_model_weights(build_segmentor(load_config(config)), final)["backbone_fingerprint"]
    generator = torch.Generator().manual_seed(0)

    def rebuilt(relative: float):
        model = build_segmentor(load_config(config))
        with torch.no_grad():
            for p in model.backbone.model.parameters():
                p.mul_(1 + relative * torch.randn(p.shape, generator=generator))
        return model

    rounded = rebuilt(2e-6)
    assert backbone_fingerprint(rounded.backbone) != recorded  # the exact check alone would refuse it
    assert load_model_weights(rounded, final)["contents"] == "rein+head"
    with pytest.raises(CheckpointError, match="differ from the backbone weights"):
        load_model_weights(rebuilt(1e-2), final)


def test_wrong_or_missing_checkpoints_are_clear_errors(tmp_path, capsys):
    weights_a = backbone_weights_file(tmp_path, "a.pth")
    weights_b = backbone_weights_file(tmp_path, "b.pth", std=0.3)
    config = tiny_config(tmp_path, "frozen", method="frozen", weights=str(weights_a), iters=1)
    final = Trainer(load_config(config)).train()
    # the file stores only the head: the backbone is re-attached from its weights file, and must be that one
    other = build_segmentor(load_config(config, [f"model.weights={weights_b}"]))
    with pytest.raises(CheckpointError, match="differ from the backbone weights"):
        load_model_weights(other, final)
    same = build_segmentor(load_config(config))
    assert load_model_weights(same, final)["contents"] == "rein+head"
    with pytest.raises(CheckpointError, match="not found"):
        load_model_weights(same, tmp_path / "missing.safetensors")
    assert main(["eval", str(config), "--checkpoint", str(final), "model.backbone=dinov2_b"]) == 2
    assert "trained with backbone 'dinov2_s'" in capsys.readouterr().err
    assert main(["train", str(config), "--resume"]) == 2  # no checkpoint was written (interval 0)
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", str(config), "--resume", str(final)]) == 2
    assert "a final model cannot be resumed" in capsys.readouterr().err
