"""FSDP (train.parallel: fsdp, torch's fully_shard) on CPU with 2 gloo processes: a sharded step equals the
DDP step, save and resume through torch.distributed.checkpoint are exact, and a checkpoint converts to a
plain model file that `dgss eval` and `dgss predict` read."""

import torch
from test_engine_support import KILL_AT_ITERATION, run_python, tiny_config, weights

from dgss.engine import fsdp

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def assert_same(expected: dict, actual: dict, *, exact: bool = False) -> None:
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        if exact:
            assert torch.equal(actual[key], value), key
        else:
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def build_reference(tmp_path) -> dict:
    """The initial weights of the tiny config (train.seed 0): what training started from."""
    from dgss.config import load_config
    from dgss.engine.trainer import seed_everything
    from dgss.tuning.model import build_segmentor

    seed_everything(0)
    return build_segmentor(load_config(tmp_path / "ddp.yaml")).state_dict()


def test_fsdp_steps_equal_ddp_resume_is_exact_and_a_checkpoint_converts_for_eval_and_predict(tmp_path):
    # full fine-tuning (every backbone block an FSDP unit), gradient clipping, 4 steps with AdamW's state
    common = dict(method="full", iters=4, batch_size=1, clip_grad=1.0, checkpoint_interval=2, keep_checkpoints=1)
    ddp = tiny_config(tmp_path, "ddp", parallel="ddp", **common)
    straight = tiny_config(tmp_path, "straight", parallel="fsdp", **common)
    killed = tiny_config(tmp_path, "killed", parallel="fsdp", **common)
    for path in (ddp, straight):
        done = run_python(*TORCHRUN, "-m", "dgss", "train", str(path))
        assert done.returncode == 0, done.stderr
    final = weights(tmp_path / "runs/straight/model_final.safetensors")  # gathered to rank 0, unsharded
    assert_same(weights(tmp_path / "runs/ddp/model_final.safetensors"), final)
    start = build_reference(tmp_path)
    assert not torch.equal(final["backbone.model.blocks.0.attn.qkv.weight"], start["backbone.model.blocks.0.attn.qkv.weight"])

    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_ITERATION)
    died = run_python(*TORCHRUN, str(script), "2", str(killed))
    assert died.returncode != 0
    checkpoints = tmp_path / "runs/killed/checkpoints"
    folder, state_path = fsdp.latest_checkpoint(checkpoints)
    assert folder.name == "iter_0000002.dcp" and folder.is_dir() and state_path.is_file()
    assert not (checkpoints / "last").exists()  # not a DDP checkpoint
    state = torch.load(state_path, weights_only=True)
    assert state["iteration"] == 2 and state["world_size"] == 2 and state["optimizer"] == {"state": {}}
    resumed = run_python(*TORCHRUN, "-m", "dgss", "train", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at iteration 2" in resumed.stdout
    assert_same(final, weights(tmp_path / "runs/killed/model_final.safetensors"), exact=True)
    # keep_checkpoints=1 pruned iteration 2 when iteration 4 was written
    assert sorted(p.name for p in (tmp_path / "runs/straight/checkpoints").iterdir()) == [
        "iter_0000004.dcp", "iter_0000004.fsdp.pt", "last_fsdp"]

    # the last checkpoint (iteration 4) -> a plain model file, in this process without torch.distributed
    converted = tmp_path / "converted.safetensors"
    run = run_python("-m", "dgss", "convert", str(tmp_path / "runs/straight/checkpoints"), "--out", str(converted))
    assert run.returncode == 0, run.stderr
    assert_same(final, weights(converted), exact=True)
    evaluated = run_python("-m", "dgss", "eval", str(straight), "--checkpoint", str(converted), "--out",
                           str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    predicted = run_python("-m", "dgss", "predict", "--checkpoint", str(converted), str(image), "--out",
                           str(tmp_path / "pred"))
    assert predicted.returncode == 0, predicted.stderr
    assert any((tmp_path / "pred").rglob("*.png"))
    # a resume of an FSDP run under DDP is refused with one line
    refused = run_python("-m", "dgss", "train", str(killed), "--resume", "train.parallel=ddp")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1


def test_fishertune_sparse_training_under_fsdp_equals_ddp_from_a_dgss_fisher_selection(tmp_path):
    # stage 2 runs unsharded (`dgss fisher`, one process); stages 1 and 3 train sharded with its selection
    ft = {"num_batches": 1, "warmup_iters": 1, "delta_min": 0.05, "delta_max": 0.1}
    source = tiny_config(tmp_path, "fisher", method="fishertune", iters=3, batch_size=1)
    text = source.read_text().replace("name: fishertune\n", f"name: fishertune\n  fishertune: {ft}\n")
    source.write_text(text)
    written = run_python("-m", "dgss", "fisher", str(source), "--out", str(tmp_path / "fisher"), "--no-progress")
    assert written.returncode == 0, written.stderr
    selection = tmp_path / "fisher" / "selection.safetensors"
    finals = {}
    for parallel in ("ddp", "fsdp"):
        path = tiny_config(tmp_path, parallel, method="fishertune", parallel=parallel, iters=3, batch_size=1)
        path.write_text(path.read_text().replace(
            "name: fishertune\n", f"name: fishertune\n  fishertune: {dict(ft, selection_file=str(selection))}\n"))
        run = run_python(*TORCHRUN, "-m", "dgss", "train", str(path))
        assert run.returncode == 0, run.stderr
        finals[parallel] = weights(tmp_path / "runs" / parallel / "model_final.safetensors")
    assert_same(finals["ddp"], finals["fsdp"])
    assert finals["fsdp"]["method.delta"].abs().max() > 0  # the selected entries trained

    # without a selection file, stage 2 under FSDP stops with one line
    refused_cfg = tiny_config(tmp_path, "refused", method="fishertune", parallel="fsdp", iters=3, batch_size=1)
    refused_cfg.write_text(refused_cfg.read_text().replace("name: fishertune\n", f"name: fishertune\n  fishertune: {ft}\n"))
    refused = run_python(*TORCHRUN, "-m", "dgss", "train", str(refused_cfg))
    assert refused.returncode != 0 and "method.fishertune.selection_file" in refused.stderr


def test_what_fsdp_does_not_support_is_refused_in_one_line(tmp_path):
    import pytest

    from dgss.config import load_config

    with pytest.raises(ValueError, match="train.ema"):
        fsdp.check_supported(load_config(None, ["train.parallel=fsdp", "train.ema.enabled=true"]))
    with pytest.raises(ValueError, match="train.compile"):
        fsdp.check_supported(load_config(None, ["train.parallel=fsdp", "train.compile=true"]))
    fsdp.check_supported(load_config(None, ["train.parallel=fsdp"]))
    with pytest.raises(Exception, match="no FSDP checkpoint to resume from"):
        fsdp.latest_checkpoint(tmp_path)
    with pytest.raises(Exception, match="is not an FSDP checkpoint"):
        fsdp.latest_checkpoint(tmp_path / "iter_0000002.safetensors")
