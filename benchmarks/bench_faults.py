"""What each cluster fault costs a run, measured (not a test): the figures of docs/reliability.md.

    python benchmarks/bench_faults.py [--iters 40] [--interval 10] [--out DIR]

Each fault is injected for real into `dgss train` on the CPU (the tiny configuration of the tests: a
4-block ViT of width 32, the light FPN head, 64 x 64 crops, batch 2 per process, one thread per
process), and the run is recovered the way the README says. For each: the iterations and files lost,
whether the final weights are bit-identical to an uninterrupted run's, and the times: from the fault
to the process's exit, and from the recovery command to its first new iteration (a fresh start's
figure is given for comparison: most of it is Python and torch starting). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")

# `dgss train`, with faults chosen by environment variables: WAIT_AT (this rank, 0-based step: print and
# wait for a signal there), KILL_AT (SIGKILL itself before that step, once: marker file KILLED),
# PAUSE_SAVE (pause in the middle of the preemption checkpoint until a second signal came) and
# TRUNCATE_AT + TRUNCATE (cut that file in half before that step).
CHILD = """
import os, signal, sys, time
from pathlib import Path
from dgss.cli import main
from dgss.engine import checkpoint
from dgss.engine.trainer import Trainer

wait_at, kill_at = int(os.environ.get("WAIT_AT", -1)), int(os.environ.get("KILL_AT", -1))
rank = int(os.environ.get("WAIT_RANK", 0))
killed = Path(os.environ.get("KILLED", "/nonexistent/killed"))
original_step, original_write, watch = Trainer.train_step, checkpoint._HashingWriter.write, []

def train_step(self, iteration):
    if iteration == wait_at and self.rank == rank and not watch:
        watch.append(self.preemption)
        print(f"WAITING {os.getpid()}", flush=True)
        while not self.preemption.received:
            time.sleep(0.005)
    if iteration == int(os.environ.get("TRUNCATE_AT", -1)):
        with open(os.environ["TRUNCATE"], "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    if iteration == kill_at and self.rank == rank and not killed.exists():
        killed.touch()
        print(f"KILLING {iteration}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return original_step(self, iteration)

def write(self, data):
    if os.environ.get("PAUSE_SAVE") and watch and len(watch[0].received) == 1 and self.file.tell() > 0:
        print("HALF WRITTEN", flush=True)
        while len(watch[0].received) < 2:
            time.sleep(0.005)
    return original_write(self, data)

Trainer.train_step, checkpoint._HashingWriter.write = train_step, write
sys.exit(main(["train", *sys.argv[1:]]))
"""


class Run:
    """A child process whose output lines are timestamped as they arrive."""

    def __init__(self, args, env=None):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**ENV, **(env or {})}, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._timer = threading.Timer(900, lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        self._timer.start()

    def until(self, marker: str) -> tuple[float, str]:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line))
            if marker in line:
                return self.lines[-1]
        raise RuntimeError(f"no {marker!r} in:\n" + "".join(text for _, text in self.lines))

    def finish(self) -> tuple[int, float]:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line))
        code = self.proc.wait()
        self._timer.cancel()
        return code, time.perf_counter()

    def first(self, marker: str) -> float:
        return next(t for t, text in self.lines if marker in text)

    def text(self) -> str:
        return "".join(text for _, text in self.lines)


def config(folder: Path, name: str, iters: int, interval: int, batch: int = 2, **data) -> Path:
    raw = {
        "name": name, "output_dir": str(folder / "runs"),
        "model": {"backbone": "dinov2_s", "img_size": 64, "backbone_kwargs": {"depth": 4, "embed_dim": 32,
                  "num_heads": 2}, "head": {"type": "fpn", "hidden_dim": 16}},
        "method": {"name": "full"},
        "data": {"train": [data.get("train", {"type": "synthetic", "split": "train", "name": "clean",
                                              "options": {"domain": "clean", "num_images": 16, "size": [64, 96]}})],
                 "crop_size": [64, 64], "scales": [64, 80], "num_workers": 0},
        "train": {"iters": iters, "batch_size": batch, "lr": 1e-3, "eval_interval": 0, "checkpoint_interval": interval,
                  "keep_checkpoints": 0, "log_interval": 1, "device": "cpu", "progress_bar": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def last_iteration(run: Run) -> int:
    done = [int(text.split("iter ")[1].split(":")[0]) for _, text in run.lines if text.startswith("[train] iter")]
    return done[-1] if done else 0


def pointer(folder: Path) -> int:
    return json.loads((folder / "checkpoints" / "last").read_text())["iteration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--interval", type=int, default=10, help="train.checkpoint_interval")
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    n, k = args.iters, args.interval
    at = k + k // 2 + 1  # the fault comes mid-interval: step `at` (0-based) of the run
    child = work / "child.py"
    child.write_text(CHILD)
    dgss = (sys.executable, str(child))
    rows = []

    def train(name, extra=(), env=None, launcher=dgss, **cfg):
        return Run([*launcher, str(config(work, name, n, k, **cfg)), *extra], env=env)

    # references: uninterrupted, one process and two
    ref = train("ref")
    ref.finish()
    fresh = ref.first("[train] iter") - ref.start
    ddp_ref = train("ddp_ref", launcher=(*TORCHRUN, "-m", "dgss", "train"), batch=1)
    ddp_ref.finish()
    ref_file, ddp_file = work / "runs/ref/model_final.safetensors", work / "runs/ddp_ref/model_final.safetensors"

    # 0. SIGKILL (no warning): what a run loses without a chance to save
    run = train("kill9", env={"KILL_AT": str(at), "KILLED": str(work / "kill9.killed")})
    run.finish()
    lost = last_iteration(run) - pointer(work / "runs/kill9")
    again = train("kill9", ["--resume"])
    again.until("[train] iter")
    resume_time = again.lines[-1][0] - again.start
    again.finish()
    rows.append(("SIGKILL mid-run (1 process)", f"{lost} iterations", "none",
                 same_weights(ref_file, work / "runs/kill9/model_final.safetensors"), "0 s (killed)",
                 f"{resume_time:.1f} s (`--resume`)"))

    # 1. SIGTERM mid-step; then SIGUSR1 mid-step and SIGTERM in the middle of the checkpoint it causes
    for name, pause in (("preempt", ""), ("preempt2", "1")):
        run = train(name, env={"WAIT_AT": str(at), "PAUSE_SAVE": pause})
        pid = int(run.until("WAITING")[1].split()[1])
        sent = time.perf_counter()
        os.kill(pid, signal.SIGUSR1 if pause else signal.SIGTERM)
        if pause:
            run.until("HALF WRITTEN")  # the save waits here for the second signal
            os.kill(pid, signal.SIGTERM)
        saved, _ = run.until("preempted (")
        code, ended = run.finish()
        assert code == 75, run.text()
        lost = last_iteration(run) - pointer(work / "runs" / name)
        again = train(name, ["--resume"])
        again.until("[train] iter")
        resume_time = again.lines[-1][0] - again.start
        again.finish()
        fault = "SIGUSR1 mid-step, SIGTERM during the save" if pause else "SIGTERM mid-step"
        rows.append((f"{fault} (1 process)", f"{lost} iterations", "none",
                     same_weights(ref_file, work / "runs" / name / "model_final.safetensors"),
                     "- (the save waited for the 2nd signal)" if pause else
                     f"{saved - sent:.2f} s to the checkpoint, {ended - sent:.1f} s to exit 75",
                     f"{resume_time:.1f} s (`--resume`)"))

    # 2. torchrun: SIGUSR1 to one of two processes, then --max-restarts with a worker SIGKILLed
    run = train("elastic", ["--auto-resume"], launcher=(*TORCHRUN, "--max-restarts", "3", str(child)), batch=1,
                env={"WAIT_AT": str(at), "WAIT_RANK": "1", "KILL_AT": str(n - k // 2),
                     "KILLED": str(work / "el.killed")})
    pid = int(run.until("WAITING")[1].split()[1])
    sent = time.perf_counter()
    os.kill(pid, signal.SIGUSR1)
    stopped, _ = run.until("preempted (")
    first_back, _ = run.until("[train] iter")
    killed, text = run.until("KILLING")
    back, _ = run.until("resumed at")
    back, _ = run.until("[train] iter")
    code, _ = run.finish()
    assert code == 0, run.text()
    rows.append(("SIGUSR1 to 1 of 2 torchrun processes", "0 iterations", "none", "yes (the run of the next row)",
                 f"{stopped - sent:.2f} s to the checkpoint (both processes stop, exit 75)",
                 f"{first_back - stopped:.1f} s (torchrun `--max-restarts`)"))
    resumed_from = int(run.text().split("resumed at iteration ")[-1].split()[0])
    rows.append(("SIGKILL of 1 of 2 torchrun processes", f"{n - k // 2 - resumed_from} iterations", "none",
                 same_weights(ddp_file, work / "runs/elastic/model_final.safetensors"), "-",
                 f"{back - killed:.1f} s (torchrun `--max-restarts`)"))

    # 3. A disk that fills during a checkpoint: a tmpfs with room for one checkpoint (needs root)
    folder = work / "runs/full/checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in (work / "runs/ref/checkpoints").glob(f"iter_{k:07d}.*"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 1024}k", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:
        run = train("full")
        code, _ = run.finish()
        lost = last_iteration(run) - pointer(work / "runs/full")
        saved = {p.name: p.read_bytes() for p in folder.iterdir()}
        subprocess.run(["umount", str(folder)], check=True)
        for name, data in saved.items():
            (folder / name).write_bytes(data)
        again = train("full", ["--resume"])
        again.until("[train] iter")
        resume_time = again.lines[-1][0] - again.start
        again.finish()
        rows.append(("disk full during a checkpoint (tmpfs)", f"{lost} iterations",
                     "the failed checkpoint (removed; earlier ones intact)",
                     same_weights(ref_file, work / "runs/full/model_final.safetensors"),
                     f"immediate (exit {code}, one line)", f"{resume_time:.1f} s (`--resume`, after freeing space)"))

    # 4. Damaged checkpoints: the newest truncated, the one before bit-flipped
    checkpoints = work / "runs/ref/checkpoints"
    newest = pointer(work / "runs/ref")
    with open(checkpoints / f"iter_{newest:07d}.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    data = bytearray((checkpoints / f"iter_{newest - k:07d}.state.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (checkpoints / f"iter_{newest - k:07d}.state.pt").write_bytes(bytes(data))
    kept = work / "ref_final.safetensors"
    kept.write_bytes(ref_file.read_bytes())
    again = train("ref", ["--resume"])
    again.until("[train] iter")
    resume_time = again.lines[-1][0] - again.start
    again.finish()
    used = int(again.text().split("resumed at iteration ")[1].split()[0])
    rows.append(("newest checkpoint truncated, the one before bit-flipped", f"{newest - used} iterations (redone)",
                 "the 2 damaged checkpoints", same_weights(kept, ref_file), "-",
                 f"{resume_time:.1f} s (`--resume` falls back)"))

    # 5. An image that becomes unreadable mid-run
    from PIL import Image
    import numpy as np

    root = work / "images"
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 19, (64, 64), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    folder_set = {"type": "folder", "root": str(root), "on_bad_sample": "skip",
                  "options": {"images": "images", "labels": "masks"}}
    run = train("bad_image", train=folder_set, env={"TRUNCATE_AT": str(at), "TRUNCATE": str(root / "images/3.png")})
    run.finish()
    skipped = run.text().split("skipped ")[-1].split(" unreadable")[0] if "unreadable samples" in run.text() else "0"
    rows.append(("image unreadable mid-run, `on_bad_sample: skip`", f"0 iterations, {skipped} samples (replaced)",
                 "none", "no (other samples, by design)", "-", "none needed"))

    print(f"fresh start of the same command: {fresh:.1f} s to its first iteration; {n} iterations, checkpoint "
          f"every {k}, fault at iteration {at + 1}\n")
    print("| fault | lost | files lost | final weights bit-identical | stop | recovery |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) if not isinstance(c, bool) else ("yes" if c else "no") for c in row) + " |")


if __name__ == "__main__":
    main()
