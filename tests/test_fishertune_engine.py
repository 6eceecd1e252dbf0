"""FisherTune inside `dgss train`: resume across the stage boundaries (before the estimate, after it)
gives bit-identical final weights to a straight run."""

import pytest
import torch
import yaml

pytest.importorskip("dgss.engine.trainer")

from safetensors.torch import load_file  # noqa: E402

from dgss.cli import main  # noqa: E402


def write_config(tmp_path, name, weights):
    synthetic = {"type": "synthetic", "split": "train", "options": {"domain": "clean", "num_images": 8, "size": [64, 64]}}
    raw = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"backbone": "dinov2_s", "img_size": 64, "weights": str(weights),
                  "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
                  "head": {"type": "fpn", "hidden_dim": 16}},
        "method": {"name": "fishertune",
                   "fishertune": {"warmup_iters": 2, "num_batches": 2}},
        "data": {"train": [synthetic], "crop_size": [64, 64], "scales": [64], "num_workers": 0},
        "train": {"iters": 6, "batch_size": 2, "lr": 1e-3, "eval_interval": 0, "checkpoint_interval": 1,
                  "keep_checkpoints": 0, "log_interval": 100, "device": "cpu", "progress_bar": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.filterwarnings("ignore:resuming .* with a config that differs")
def test_resume_across_the_stage_boundaries_is_exact(tmp_path):
    from dgss.models.backbones import build_backbone

    donor = build_backbone("dinov2_s", img_size=64, depth=2, embed_dim=32, num_heads=2)
    weights = tmp_path / "backbone.pth"
    torch.save({k: v.normal_(0, 0.2) for k, v in donor.model.state_dict().items()}, weights)
    assert main(["train", str(write_config(tmp_path, "straight", weights))]) == 0
    straight = load_file(str(tmp_path / "runs" / "straight" / "model_final.safetensors"))
    assert bool(straight["method.selected"]) and int(straight["method.num_active"]) > 0
    checkpoints = tmp_path / "runs" / "straight" / "checkpoints"
    for iteration in (1, 3):  # stage 1 (the estimate still to come), stage 3 (selection restored)
        name = f"resumed_{iteration}"
        checkpoint = next(checkpoints.glob(f"iter_*{iteration}.safetensors"))
        assert main(["train", str(write_config(tmp_path, name, weights)), "--resume", str(checkpoint)]) == 0
        resumed = load_file(str(tmp_path / "runs" / name / "model_final.safetensors"))
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), iteration
