"""Exact resume: 20 iterations straight equal 10 + a real SIGKILL + `--resume` 10, bit for bit; a
kill while a checkpoint is being written leaves the previous one intact and resumable."""

import json
import signal

import torch
from safetensors import safe_open
from test_engine_support import KILL_AT_ITERATION, backbone_weights_file, run_python, tiny_config, weights

from dgss.engine.checkpoint import load_training_state, resolve_checkpoint

# Kills the process half-way through writing the training state of the second checkpoint.
KILL_WHILE_SAVING = """
import os, signal, sys
import torch
from dgss.cli import main
from dgss.engine import checkpoint

calls = []
real_save = torch.save

def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 2:
        real_save(obj, f, *args, **kwargs)
        f.flush()
        name = getattr(f, "name", f)   # the temporary file being written (dgss passes a file object)
        with open(name, "r+b") as g:   # only half of the bytes made it to disk
            g.truncate(os.path.getsize(name) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

checkpoint.torch.save = save
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_resume_after_a_real_kill_gives_bit_identical_weights(tmp_path):
    # Rein + Mask2Former: random point sampling (torch RNG), a frozen backbone re-attached from its
    # file, optimizer moments, the poly schedule and the data position all have to be restored.
    backbone = backbone_weights_file(tmp_path)
    common = dict(head="mask2former", method="rein", weights=str(backbone), iters=20, checkpoint_interval=10)
    straight = tiny_config(tmp_path, "straight", **common)
    killed = tiny_config(tmp_path, "killed", **common)

    done = run_python("-m", "dgss", "train", str(straight))
    assert done.returncode == 0, done.stderr
    died = run_python("-c", KILL_AT_ITERATION, "13", str(killed))
    assert died.returncode == -signal.SIGKILL, died.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert json.loads((run_dir / "checkpoints" / "last").read_text())["iteration"] == 10
    assert not (run_dir / "model_final.safetensors").exists()

    # the checkpoint holds Rein and the head, not the frozen backbone, and names the backbone
    model_file, state_file = resolve_checkpoint(None, run_dir / "checkpoints")
    with safe_open(str(model_file), framework="pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["dgss"])
    assert not any(k.startswith("backbone.model.") for k in keys) and any(k.startswith("method.") for k in keys)
    assert meta["backbone"] == "dinov2_s" and meta["backbone_weights"] == str(backbone)
    assert meta["iteration"] == 10 and len(meta["backbone_fingerprint"]) == 16
    assert load_training_state(state_file)["data_position"] == 10 * 2

    resumed = run_python("-m", "dgss", "train", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at iteration 10" in resumed.stdout
    expected, actual = weights(tmp_path / "runs/straight/model_final.safetensors"), weights(run_dir / "model_final.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    config = tiny_config(tmp_path, "atomic", iters=4, checkpoint_interval=2)
    died = run_python("-c", KILL_WHILE_SAVING, str(config))
    assert died.returncode == -signal.SIGKILL, died.stderr
    checkpoints = tmp_path / "runs" / "atomic" / "checkpoints"
    assert json.loads((checkpoints / "last").read_text())["iteration"] == 2
    assert not (checkpoints / "iter_0000004.state.pt").exists()  # only a hidden temporary file was cut short
    model_file, state_file = resolve_checkpoint(None, checkpoints)
    assert load_training_state(state_file)["iteration"] == 2 and model_file.name == "iter_0000002.safetensors"

    resumed = run_python("-m", "dgss", "train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at iteration 2" in resumed.stdout
    assert json.loads((checkpoints / "last").read_text())["iteration"] == 4
