"""Faults a cluster brings, each injected for real: SIGUSR1/SIGTERM to a training child process (and a
second signal in the middle of the save), one process of a torchrun job signalled and another killed
under `--max-restarts`, a disk that fills during a save (a real tmpfs where this machine lets the test
mount one, an injected ENOSPC always), truncated and bit-flipped checkpoints and model files, and an
image that becomes unreadable mid-run. Each test checks what was lost, exactly, and that the final
weights are bit-identical to an uninterrupted run's where the fault allows it."""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_engine_support import subprocess_env, tiny_config, weights

from dgss.cli import main
from dgss.config import load_config
from dgss.engine import checkpoint as ckpt
from dgss.engine.preemption import PREEMPTED_EXIT_CODE
from dgss.engine.trainer import Trainer
from dgss.fileio import DamagedFileError
from dgss.tuning.rein_checkpoint import load_model_file

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def assert_same_weights(expected_file, actual_file):
    expected, actual = weights(expected_file), weights(actual_file)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def no_temporary_files(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name] == []


class Child:
    """A process (and the processes it starts, in its own session) whose merged output is read line by
    line; all of them are killed if it outlives ``timeout`` seconds."""

    def __init__(self, args, timeout=400, env=None):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**subprocess_env(), **(env or {})}, start_new_session=True)
        self.lines = []
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.start()

    def _kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # torchrun's workers too, which hold the output pipe
        except ProcessLookupError:
            pass

    def wait_for(self, marker):
        for line in self.proc.stdout:
            self.lines.append(line)
            if marker in line:
                return line
        raise AssertionError(f"the child ended without printing {marker!r}:\n{''.join(self.lines)}")

    def finish(self):
        self.lines += self.proc.stdout.readlines()
        code = self.proc.wait()
        self._timer.cancel()
        return code, "".join(self.lines)


# --------------------------------------------------------------------------------------------
# 1. Preemption of one process: SIGUSR1 mid-step, SIGTERM in the middle of the save
# --------------------------------------------------------------------------------------------

# `dgss train CONFIG` that, in step STOP_AT, prints its pid and waits there for the test's signal, and
# that pauses in the middle of writing the preemption checkpoint (a temporary file half written)
# until a second signal has come.
PREEMPTED_CHILD = """
import os, sys, time
from dgss.cli import main
from dgss.engine import checkpoint
from dgss.engine.trainer import Trainer

stop_at = int(sys.argv[1])
watch = []
original_step = Trainer.train_step

def train_step(self, iteration):
    if iteration == stop_at:
        watch.append(self.preemption)
        print(f"IN STEP {iteration} PID {os.getpid()}", flush=True)
        while not self.preemption.received:
            time.sleep(0.01)
    return original_step(self, iteration)

original_write = checkpoint._HashingWriter.write

def write(self, data):
    if watch and len(watch[0].received) == 1 and self.file.tell() > 0:
        print("HALF WRITTEN", flush=True)
        while len(watch[0].received) < 2:
            time.sleep(0.01)
    return original_write(self, data)

Trainer.train_step = train_step
checkpoint._HashingWriter.write = write
sys.exit(main(["train", *sys.argv[2:]]))
"""


def with_data_workers(config, workers=1):
    raw = yaml.safe_load(config.read_text())
    raw["data"]["num_workers"] = workers
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def test_a_signal_finishes_the_step_checkpoints_it_and_a_resume_is_bit_identical(tmp_path):
    common = dict(iters=8, checkpoint_interval=0)  # no regular checkpoint: only the preemption writes one
    straight = Trainer(load_config(tiny_config(tmp_path, "straight", **common))).train()

    # a DataLoader worker too, and every signal to the whole process group, as a scheduler sends it
    config = with_data_workers(tiny_config(tmp_path, "preempted", **common))
    child = Child([sys.executable, "-c", PREEMPTED_CHILD, "3", str(config)])
    child.wait_for("IN STEP 3")
    os.killpg(child.proc.pid, signal.SIGUSR1)  # SLURM's warning ahead of the time limit
    child.wait_for("HALF WRITTEN")
    os.killpg(child.proc.pid, signal.SIGTERM)  # and the preemption itself, while the checkpoint is being written
    code, out = child.finish()

    assert code == PREEMPTED_EXIT_CODE == 75, out
    stops = [line for line in out.splitlines() if line.startswith("preempted")]
    assert len(stops) == 1, out  # one line, naming the signal, the iteration and the file
    assert "preempted (SIGUSR1): stopped after iteration 4 of 8" in stops[0]  # step 3 (0-based) was finished
    assert "iter_0000004.safetensors written" in stops[0] and "SIGTERM during the save: ignored" in stops[0]
    checkpoints = tmp_path / "runs" / "preempted" / "checkpoints"
    assert json.loads((checkpoints / "last").read_text())["iteration"] == 4
    assert no_temporary_files(checkpoints)
    loaded = ckpt.read_checkpoint(checkpoints / "iter_0000004.safetensors")  # both files intact, checksums match
    assert loaded.state["data_position"] == 4 * 2
    assert not (tmp_path / "runs" / "preempted" / "model_final.safetensors").exists()

    resumed = Trainer(load_config(config), resume=True).train()
    assert_same_weights(straight, resumed)


# --------------------------------------------------------------------------------------------
# 2. torchrun: one process signalled, another killed, --max-restarts, --auto-resume
# --------------------------------------------------------------------------------------------

# torchrun's agent shares one TCP store across restarts by default, and a restarted gloo process group
# may then read the previous attempt's addresses and hang or fail to connect; a store per attempt:
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

# The torchrun worker: `dgss train --auto-resume` (the same command on every attempt). The first time
# through step 2, rank 1 alone waits there for the test's SIGUSR1; the first time through step 5 after
# that, rank 1 is SIGKILLed. (Marker files, not attempt numbers: a restart that fails on its own, e.g. a
# slow gloo connection on a busy machine, only uses up one of the spare restarts.)
WORKER = """
import os, signal, sys, time
from pathlib import Path
from dgss.cli import main
from dgss.engine.trainer import Trainer

signalled, killed = Path(sys.argv[2]) / "signalled", Path(sys.argv[2]) / "killed"
original_step = Trainer.train_step

def train_step(self, iteration):
    if iteration == 2 and self.rank == 1 and not signalled.exists():
        print(f"RANK 1 IN STEP 2 PID {os.getpid()}", flush=True)
        while not self.preemption.received:
            time.sleep(0.01)
        signalled.touch()
    if iteration == 5 and self.rank == 1 and signalled.exists() and not killed.exists():
        killed.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return original_step(self, iteration)

Trainer.train_step = train_step
sys.exit(main(["train", sys.argv[1], "--auto-resume"]))
"""


def test_torchrun_processes_stop_together_and_elastic_restarts_end_bit_identical(tmp_path):
    common = dict(iters=8, batch_size=1, checkpoint_interval=2, keep_checkpoints=0)
    straight = subprocess.run([*TORCHRUN, "-m", "dgss", "train", str(tiny_config(tmp_path, "straight", **common))],
                              capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert straight.returncode == 0, straight.stderr

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    config = tiny_config(tmp_path, "cluster", **common)
    child = Child([*TORCHRUN, "--max-restarts", "4", str(worker), str(config), str(tmp_path)], env=FRESH_STORE)
    pid = int(child.wait_for("RANK 1 IN STEP 2").split("PID")[1])
    os.kill(pid, signal.SIGUSR1)  # one process only: rank 0 learns of it through the all-reduce
    code, out = child.finish()
    assert code == 0, out
    assert (tmp_path / "killed").exists()

    # attempt 0: both processes finished step 2 (iteration 3), one checkpoint of it, exit code 75
    stops = [line for line in out.splitlines() if line.startswith("preempted")]
    assert len(stops) == 1 and "preempted (SIGUSR1): stopped after iteration 3 of 8" in stops[0], out
    assert "no checkpoint in" in out and "starting at iteration 0" in out
    # attempt 1 resumed from it, wrote iteration 4, lost iteration 5 to the kill; attempt 2 resumed from 4
    assert "resumed at iteration 3 from" in out and "resumed at iteration 4 from" in out, out
    checkpoints = tmp_path / "runs" / "cluster" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == sorted(
        f"iter_000000{i}{suffix}" for i in (2, 3, 4, 6, 8) for suffix in (".safetensors", ".state.pt"))
    assert_same_weights(tmp_path / "runs/straight/model_final.safetensors",
                        tmp_path / "runs/cluster/model_final.safetensors")


# --------------------------------------------------------------------------------------------
# 3. A full disk during a save
# --------------------------------------------------------------------------------------------


def _mount_tmpfs(folder, size_kib) -> bool:
    folder.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _inject_enospc_in_the_model_file(monkeypatch):
    """The second model file written (the checkpoint of iteration 4) gets half its bytes, then ENOSPC."""
    import safetensors.torch

    real_save_file, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


# a real tmpfs needs the right to mount (root in most containers); ENOSPC is injected everywhere
FULL_DISKS = ["injected"] + (["tmpfs"] if os.geteuid() == 0 and os.path.exists("/bin/mount") else [])


@pytest.mark.parametrize("full_disk", FULL_DISKS)
def test_a_full_disk_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, full_disk):
    common = dict(iters=6, checkpoint_interval=2, keep_checkpoints=2)
    straight = Trainer(load_config(tiny_config(tmp_path, "straight", **common))).train()
    config = tiny_config(tmp_path, "full", **common)
    checkpoints = tmp_path / "runs" / "full" / "checkpoints"
    mounted = full_disk == "tmpfs" and _mount_tmpfs(checkpoints, 1700)  # one checkpoint (~1.1 MiB) fits, not two
    if not mounted:
        _inject_enospc_in_the_model_file(monkeypatch)
    capsys.readouterr()
    try:
        assert main(["train", str(config)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1, err
        assert f"no space left in {checkpoints} for the checkpoint of iteration 4: it needs about " in err[0]
        assert " bytes (1.1 MiB)" in err[0] and "iter_0000002.safetensors) and 'last' are unchanged" in err[0]
        # the previous checkpoint and `last` as they were, no temporary file, nothing of iteration 4
        assert json.loads((checkpoints / "last").read_text())["iteration"] == 2
        assert sorted(p.name for p in checkpoints.iterdir()) == [
            "iter_0000002.safetensors", "iter_0000002.state.pt", "last"]
        ckpt.read_checkpoint(checkpoints / "iter_0000002.safetensors")
        monkeypatch.undo()
        if mounted:  # space freed: the run moves to a bigger disk, as a user would
            saved = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
            subprocess.run(["umount", str(checkpoints)], check=True)
            mounted = False
            for name, data in saved.items():
                (checkpoints / name).write_bytes(data)
        assert main(["train", str(config), "--resume"]) == 0  # 2 iterations lost, the rest bit-identical
        assert_same_weights(straight, tmp_path / "runs" / "full" / "model_final.safetensors")
    finally:
        if mounted:
            subprocess.run(["umount", str(checkpoints)], check=False)


# --------------------------------------------------------------------------------------------
# 4. Damaged checkpoints and model files
# --------------------------------------------------------------------------------------------


def flip_a_bit(path, where=0.5):
    """Flip one bit of the file's data part (past a safetensors header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    data[start + int((len(data) - start) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_damaged_checkpoints_are_passed_over_for_the_newest_intact_one_and_never_silently(tmp_path, capsys):
    config = tiny_config(tmp_path, "damaged", iters=6, checkpoint_interval=2, keep_checkpoints=0)
    final = Trainer(load_config(config)).train()
    straight = {k: v.clone() for k, v in weights(final).items()}
    checkpoints = final.parent / "checkpoints"
    flip_a_bit(checkpoints / "iter_0000006.safetensors")  # one bit of a weight
    truncate(checkpoints / "iter_0000004.state.pt")

    capsys.readouterr()
    resumed = Trainer(load_config(config), resume=True)
    assert resumed.iteration == 2
    resumed.train()
    out = capsys.readouterr().out
    assert f"passed over a damaged checkpoint: {checkpoints / 'iter_0000006.safetensors'} is damaged: its contents " \
           "do not match the checksum" in out
    assert f"passed over a damaged checkpoint: {checkpoints / 'iter_0000004.state.pt'} is damaged: its bytes do not " \
           "match the checksum iter_0000004.safetensors records" in out
    assert f"resuming from the newest intact checkpoint, {checkpoints / 'iter_0000002.safetensors'}" in out
    for key, value in weights(final).items():  # 4 iterations redone, bit for bit
        assert torch.equal(value, straight[key]), key

    # a file named on the command line is refused, not replaced by another one
    flip_a_bit(checkpoints / "iter_0000004.state.pt", where=0.9)
    assert main(["train", str(config), "--resume", str(checkpoints / "iter_0000004.safetensors")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"{checkpoints / 'iter_0000004.state.pt'} is damaged: its bytes do not match" in line

    # a damaged model file is refused by every reader, in one line naming it
    flip_a_bit(final, where=0.3)
    with pytest.raises(DamagedFileError, match="model_final.safetensors is damaged"):
        load_model_file(final)
    assert main(["eval", str(config), "--checkpoint", str(final)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"{final} is damaged: its contents do not match the checksum" in line

    # nothing intact: refused (also with --auto-resume), never a run from scratch
    truncate(checkpoints / "iter_0000002.safetensors")
    flip_a_bit(checkpoints / "iter_0000006.state.pt")
    for how in ("--resume", "--auto-resume"):
        assert main(["train", str(config), how]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and f"no intact checkpoint to resume from in {checkpoints}" in line
        assert all(f"iter_000000{i}" in line for i in (2, 4, 6)) and "does not start over" in line


# --------------------------------------------------------------------------------------------
# 5. An image that becomes unreadable mid-run
# --------------------------------------------------------------------------------------------


def folder_dataset_config(tmp_path, name, on_bad_sample, num_workers=0, **train):
    """4 real PNG images with train-id masks (batch 2: each epoch of 2 iterations reads every image)."""
    root = tmp_path / "data"
    if not root.exists():
        rng = np.random.default_rng(0)
        for folder in ("images", "masks"):
            (root / folder).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"img_{i}.png")
            Image.fromarray(rng.integers(0, 19, (64, 64), dtype=np.uint8)).save(root / "masks" / f"img_{i}.png")
    path = tiny_config(tmp_path, name, iters=6, **train)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"] = [{"type": "folder", "root": str(root), "name": "disk", "on_bad_sample": on_bad_sample,
                             "options": {"images": "images", "labels": "masks"}}]
    raw["data"]["num_workers"] = num_workers
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, root / "images" / "img_1.png"


def truncate_before_step(monkeypatch, image, step=2):
    original = Trainer.train_step

    def train_step(self, iteration):
        if iteration == step:
            truncate(image)  # from epoch 1 on, every read of it fails
        return original(self, iteration)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_an_image_unreadable_mid_run_is_skipped_counted_and_reported(tmp_path, monkeypatch, capsys):
    config, image = folder_dataset_config(tmp_path, "skip", "skip", checkpoint_interval=4)
    truncate_before_step(monkeypatch, image)
    with pytest.warns(UserWarning, match="skipping images/img_1.png"):
        final = Trainer(load_config(config)).train()
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if line.startswith("[data]")]
    assert len(skips) == 2, out  # read once in each of the epochs 1 and 2 (iterations 3-4 and 5-6)
    assert all(f"skipped {image}: cannot read image {image}" in line for line in skips)
    assert f"skipped 2 unreadable samples in 1 file(s) (on_bad_sample=skip): {image} (2x)" in out
    assert ckpt.read_model(final)[1]["skipped_samples"] == 2
    state = ckpt.read_checkpoint(final.parent / "checkpoints" / "iter_0000004.safetensors").state
    assert state["skipped_samples"] == [{str(image): 1}]  # per process, for a resume to go on counting


def test_an_image_unreadable_mid_run_stops_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    config, image = folder_dataset_config(tmp_path, "error", "error", num_workers=1)  # read in a worker process
    truncate_before_step(monkeypatch, image)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "worker" not in err, err
    assert lines[0].startswith(f"dgss train: error: cannot read image {image}: ")
    assert multiprocessing.active_children() == []  # the worker was shut down (it ignores SIGTERM)


def test_the_same_tensors_and_metadata_make_the_same_bytes(tmp_path):
    import json
    import struct

    from safetensors import safe_open

    from dgss.fileio import save_safetensors

    tensors = {f"block{i}.weight": torch.full((3, 2), float(i)) for i in range(6)}
    keys = [f"key{i}" for i in range(12)]  # enough keys that a hash-map order differs from insertion order
    forward = {k: f"value of {k}" for k in keys}
    backward = {k: forward[k] for k in reversed(keys)}
    a = save_safetensors(tensors, tmp_path / "a.safetensors", metadata=forward)
    b = save_safetensors(dict(reversed(list(tensors.items()))), tmp_path / "b.safetensors", metadata=backward)
    assert a.read_bytes() == b.read_bytes()
    raw = a.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])  # the canonical order
    with safe_open(str(a), "pt") as f:  # still a valid file, read by safetensors itself
        assert f.metadata()["key3"] == "value of key3"
        assert torch.equal(f.get_tensor("block4.weight"), tensors["block4.weight"])
