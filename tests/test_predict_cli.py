"""`dgss predict` on folders and videos: every format, batching, and bad inputs that do not stop the run."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine_support import tiny_config
from test_predict import street_image

import dgss
from dgss.cli import main
from dgss.config import load_config
from dgss.data import CITYSCAPES_PALETTE
from dgss.engine.checkpoint import save_model
from dgss.tuning.model import build_segmentor
from dgss.predict.inputs import VideoReader


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny Rein + Mask2Former model file (untrained: the CLI plumbing is under test here)."""
    tmp_path = tmp_path_factory.mktemp("model")
    cfg = load_config(tiny_config(tmp_path, "cli", head="mask2former", method="rein"))
    path = save_model(build_segmentor(cfg), cfg, tmp_path / "model.safetensors")
    return path


def read_png(path):
    return np.array(Image.open(path))


def test_folder_with_a_corrupt_image_writes_the_others_and_reports_it(model_file, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "city").mkdir(parents=True)
    (images / "empty").mkdir()
    pictures = {"a": street_image(seed=1), "city/b": street_image(seed=2), "city/c": street_image(48, 64, seed=3)}
    for name, picture in pictures.items():
        Image.fromarray(picture).save(images / f"{name}.png")
    (images / "city" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.fromarray(street_image(8, 8)).save(images / "tiny.png")  # smaller than one patch: the model fails
    out = tmp_path / "out"
    status = main(["predict", str(images), str(tmp_path / "missing.jpg"), "--checkpoint", str(model_file),
                   "--out", str(out), "--format", "colour,overlay,panel,trainids,labelids", "--batch", "2",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert "broken.png" in err and "cannot read image" in err and "missing.jpg: no such file" in err
    assert "tiny.png: prediction failed" in err and "3 input(s) failed" in err

    model = dgss.load(model_file, device="cpu")
    for name, picture in pictures.items():
        expected = model.predict(picture).labels.numpy()
        train_ids = read_png(out / "trainids" / f"{name}.png")
        assert train_ids.shape == picture.shape[:2] and (train_ids == expected).all()
        label_ids = read_png(out / "labelids" / f"{name}.png")
        assert (label_ids == dgss.predict.train_ids_to_label_ids(expected)).all()
        colour = read_png(out / "colour" / f"{name}.png")
        assert (colour == np.asarray(CITYSCAPES_PALETTE, np.uint8)[expected]).all()
        panel = read_png(out / "panel" / f"{name}.png")
        width = picture.shape[1]
        assert panel.shape == (picture.shape[0], 2 * width, 3) and (panel[:, :width] == picture).all()
        overlay = read_png(out / "overlay" / f"{name}.png").astype(int)
        assert np.abs(overlay - (picture.astype(int) + colour) / 2).max() <= 1
    assert not (out / "colour" / "city" / "broken.png").exists() and not (out / "colour" / "tiny.png").exists()


def test_empty_folder_and_bad_options_are_reported(model_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(model_file), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    assert "empty: folder holds no images" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--checkpoint", str(model_file), "--out", str(tmp_path / "o"),
                 "--format", "colour,heatmap"]) == 2
    assert "unknown --format 'heatmap'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--checkpoint", str(tmp_path / "nope.safetensors"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def write_video(path, frames, fps=5.0):
    cv2 = pytest.importorskip("cv2")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_round_trip_writes_annotated_videos_and_id_frames(model_file, tmp_path, capsys):
    pytest.importorskip("cv2")
    frames = [street_image(64, 96, seed=s) for s in range(4)]
    video = tmp_path / "clip.mp4"
    write_video(video, frames)
    (tmp_path / "fake.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "out"
    status = main(["predict", str(video), str(tmp_path / "fake.mp4"), "--checkpoint", str(model_file),
                   "--out", str(out), "--format", "overlay,panel,trainids", "--batch", "3"])
    captured = capsys.readouterr()
    assert status == 1 and "fake.mp4: cannot decode the video" in captured.err
    assert "1 videos (4 frames)" in captured.out

    decoded = list(VideoReader(video))  # what the model saw (mp4v is lossy)
    assert len(decoded) == 4
    model = dgss.load(model_file, device="cpu")
    for index, frame in enumerate(decoded):
        ids = read_png(out / "trainids" / "clip" / f"frame_{index:06d}.png")
        assert (ids == model.predict(frame).labels.numpy()).all()
    overlay = VideoReader(out / "overlay" / "clip.mp4")
    assert overlay.size == (64, 96) and len(list(overlay)) == 4
    panel = list(VideoReader(out / "panel" / "clip.mp4"))
    assert len(panel) == 4 and panel[0].shape == (64, 192, 3)
    # the left half of the panel is the frame itself (up to the codec's loss)
    assert np.abs(panel[0][:, :96].astype(int) - decoded[0].astype(int)).mean() < 12
    assert torch.is_tensor(model.predict(decoded[0]).scores)
