"""Export: ONNX (onnxruntime parity) and TorchScript of tiny models, FisherTune folded into dense weights,
Rein kept in the graph, and clear errors."""

import numpy as np
import pytest
import torch
from test_engine_support import tiny_config

from dgss.cli import main
from dgss.config import load_config
from dgss.engine.checkpoint import save_model
from dgss.export import ExportError, export_model, export_onnx, export_torchscript
from dgss.tuning.model import build_segmentor
from dgss.predict import Predictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def tiny_model(tmp_path, method="rein", head="mask2former"):
    cfg = load_config(tiny_config(tmp_path, method, head=head, method=method), ["eval.crop_size=[64,64]"])
    return cfg, build_segmentor(cfg).eval()


def rgb_batch(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()


def pytorch_scores(model, cfg, images):
    """The reference: whole-image inference of the unexported model on the same RGB images."""
    return model.whole_inference(Predictor(model, cfg).normalize(images))


def onnx_outputs(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def test_onnx_of_rein_mask2former_matches_pytorch(tmp_path):
    cfg, model = tiny_model(tmp_path)
    result = export_onnx(model, tmp_path / "rein.onnx", input_size=(64, 96), mean=cfg.data.mean, std=cfg.data.std)
    assert result.notes == ["rein kept in the graph as it is (the method offers no merge into plain weights)"]
    images = rgb_batch(2, 64, 96)  # batch 2 through a graph traced with batch 1: the batch axis is dynamic
    scores, labels = onnx_outputs(result.path, images)
    reference = pytorch_scores(model, cfg, images)
    assert scores.shape == (2, 19, 64, 96) and labels.shape == (2, 64, 96)
    assert np.abs(scores - reference.numpy()).max() < 1e-4
    assert (labels == reference.argmax(1).numpy()).mean() > 0.999  # ties may break either way


def test_fishertune_is_merged_into_dense_weights_and_matches(tmp_path):
    cfg, model = tiny_model(tmp_path, method="fishertune", head="fpn")
    method = model.method
    method.select(None)  # a random selection, all of it active, with large deltas
    with torch.no_grad():
        method.num_active.fill_(method.capacity)
        method.delta.normal_(0, 0.5)
    images = rgb_batch(1, 64, 64, seed=1)
    reference = pytorch_scores(model, cfg, images)
    result = export_model(model, cfg, tmp_path / "ft.onnx")  # default size: eval.crop_size (64 x 64 here)
    assert result.input_size == (64, 64) and result.notes == ["fishertune merged into dense weights"]
    assert model.method is method  # the caller's model is untouched
    scores, _ = onnx_outputs(result.path, images)
    assert np.abs(scores - reference.numpy()).max() < 1e-4
    import onnx

    sizes = [int(np.prod(t.dims)) for t in onnx.load(str(result.path)).graph.initializer]
    assert method.capacity not in sizes  # no delta vector: plain dense weights only
    with torch.no_grad():
        method.num_active.zero_()  # without the deltas the model predicts differently: they were folded in
    assert not torch.allclose(pytorch_scores(model, cfg, images), reference, atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_trace_matches_pytorch(tmp_path):
    cfg, model = tiny_model(tmp_path)
    result = export_torchscript(model, tmp_path / "rein.pt", input_size=(64, 64), mean=cfg.data.mean,
                                std=cfg.data.std)
    traced = torch.jit.load(str(result.path))
    images = rgb_batch(1, 64, 64, seed=2)
    scores, labels = traced(images)
    reference = pytorch_scores(model, cfg, images)
    assert torch.allclose(scores, reference, atol=1e-5) and labels.shape == (1, 64, 64)


def test_export_errors_are_clear(tmp_path):
    cfg, model = tiny_model(tmp_path, head="fpn", method="frozen")
    with pytest.raises(ExportError, match="multiple of 32"):
        export_model(model, cfg, tmp_path / "m.onnx", input_size=(50, 64))
    with pytest.raises(ExportError, match="GridSample"):
        export_model(model, cfg, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, cfg, tmp_path / "m.onnx", fmt="tflite")


def test_export_command(tmp_path, capsys):
    cfg, model = tiny_model(tmp_path, head="fpn", method="frozen")
    path = save_model(model, cfg, tmp_path / "model.safetensors")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx"), "--input-size", "64",
                 "96"]) == 0
    out = capsys.readouterr().out
    assert "B x 3 x 64 x 96" in out and "frozen: nothing to fold" in out
    scores, _ = onnx_outputs(tmp_path / "m.onnx", rgb_batch(1, 64, 96))
    assert scores.shape == (1, 19, 64, 96)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx"), "--input-size", "60",
                 "96"]) == 1
    assert "multiple of 32" in capsys.readouterr().err
