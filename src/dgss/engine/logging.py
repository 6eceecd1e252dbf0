"""What a training run reports (rank 0 only): a tqdm bar, log lines, TensorBoard and a JSONL file.

``RUN/logs/`` holds the TensorBoard event files (``tensorboard --logdir RUN/logs``) and
``metrics.jsonl``, one JSON object per log point or validation, easy to read back without TensorBoard.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["TrainLogger"]


class TrainLogger:
    """Progress and metrics of one run. Every method is a no-op when ``enabled`` is False (ranks > 0).

    Args:
        log_dir: folder for TensorBoard events and metrics.jsonl.
        total_iters, start_iter: the bar's length and starting point (a resumed run starts later).
        progress_bar: show tqdm's bar (loss, lr, it/s, ETA); otherwise plain log lines only.
    """

    def __init__(self, log_dir: Path, *, total_iters: int, start_iter: int = 0, enabled: bool = True,
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        self._bar = None
        self._writer = None
        self._jsonl = None
        self._last_time, self._last_iter = time.time(), start_iter
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(log_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))
        except ImportError as err:  # tensorboard is a dependency, but keep training if it is broken
            warnings.warn(f"TensorBoard logging is off: {err}", stacklevel=2)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.05)

    def info(self, message: str) -> None:
        """A line on stdout that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def step(self, iteration: int, loss: float, lr: float) -> None:
        """After iteration ``iteration`` (1-based count of completed iterations)."""
        if self._bar is not None:
            # postfix first: update() redraws the bar, which must show this iteration's loss with its count
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self._bar.update(iteration - self._bar.n)

    def scalars(self, iteration: int, values: dict[str, float], *, prefix: str = "train",
                line: Optional[str] = None) -> None:
        """Record ``values`` at ``iteration`` (TensorBoard tags ``prefix/key``, one JSONL object) and
        print a line (``line`` or an automatic one with it/s)."""
        if not self.enabled:
            return
        now = time.time()
        if prefix == "train":
            elapsed = max(now - self._last_time, 1e-9)
            values = {**values, "it_per_s": (iteration - self._last_iter) / elapsed}
            self._last_time, self._last_iter = now, iteration
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{prefix}/{key}", value, iteration)
        self._jsonl.write(json.dumps({"iteration": iteration, "kind": prefix, **values}) + "\n")
        self._jsonl.flush()
        if line is None:
            parts = [f"{k} {v:.4g}" for k, v in values.items()]
            line = f"[{prefix}] iter {iteration}: " + ", ".join(parts)
        self.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._writer = self._jsonl = None
