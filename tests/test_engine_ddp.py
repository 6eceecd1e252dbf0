"""DDP on CPU (gloo, 2 processes through torchrun): the same weights as one process with the doubled
batch, and evaluation metrics reduced over processes equal the single-process ones.

The light FPN head is used: its loss is the mean cross-entropy over labelled pixels, and synthetic
labels have no ignored pixel, so the mean of the two processes' means equals the mean over the
doubled batch. (Mask2Former's normalisation by the number of masks, averaged over processes, and its
random point sampling per process make that equality only approximate.)"""

import json

import torch
from test_engine_support import run_python, tiny_config, weights

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    # with the weight EMA on (each process keeps its own average of the same weights): the final model is
    # the average, the raw weights are beside it, and both equal the single process's
    common = dict(iters=3, grad_accum=1, ema={"enabled": True, "momentum": 0.5, "begin_iter": 1})
    single = tiny_config(tmp_path, "single", batch_size=2, **common)
    ddp = tiny_config(tmp_path, "ddp", batch_size=1, **common)
    one = run_python("-m", "dgss", "train", str(single))
    assert one.returncode == 0, one.stderr
    two = run_python(*TORCHRUN, "-m", "dgss", "train", str(ddp))
    assert two.returncode == 0, two.stderr
    assert "2 process(es) on cpu" in two.stdout and two.stdout.count("trainable parameters") == 1  # rank 0 only
    for name in ("model_final.safetensors", "model_final_raw.safetensors"):
        expected = weights(tmp_path / "runs/single" / name)
        actual = weights(tmp_path / "runs/ddp" / name)
        changed = False
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
            changed |= key.startswith("backbone.model.") and key.endswith("qkv.weight")
        assert changed  # the full method really trained the backbone through DDP
    averaged, raw = (weights(tmp_path / "runs/ddp" / n) for n in ("model_final.safetensors", "model_final_raw.safetensors"))
    assert not torch.allclose(averaged["backbone.model.blocks.0.attn.qkv.weight"], raw["backbone.model.blocks.0.attn.qkv.weight"])

    # evaluation: each process takes half of the images, the confusion matrices are summed
    model = tmp_path / "runs/single/model_final.safetensors"
    alone = run_python("-m", "dgss", "eval", str(single), "--checkpoint", str(model), "--out", str(tmp_path / "e1"))
    assert alone.returncode == 0, alone.stderr
    shared = run_python(*TORCHRUN, "-m", "dgss", "eval", str(single), "--checkpoint", str(model),
                        "--out", str(tmp_path / "e2"))
    assert shared.returncode == 0, shared.stderr
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("e1", "e2"))
    assert r1["datasets"]["night"]["num_images"] == r2["datasets"]["night"]["num_images"] == 2
    assert r1["datasets"] == r2["datasets"] and r1["mean_miou"] == r2["mean_miou"]
