"""The driver behind ``dgss predict``: batches images of one size, streams videos frame by frame,
writes every requested format, and keeps going past bad inputs.

A bad input (unreadable image, undecodable video, empty folder, missing path, two inputs that would
write the same output) is reported on stderr as one line naming it, and counted; the others are
still processed. The caller turns a non-empty error list into a non-zero exit status.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..data.image_io import DataError, read_image
from .inputs import InputError, InputItem, VideoReader, collect_inputs, open_video_writer
from .predictor import TTA, Predictor
from .writers import VISUAL_FORMATS, output_path, render, write_image

__all__ = ["PredictOptions", "PredictReport", "predict_inputs"]


@dataclass
class PredictOptions:
    formats: Sequence[str] = ("colour",)
    tta: TTA = TTA()
    batch_size: int = 1
    mode: Optional[str] = None  # slide | whole | coarse_to_fine; None: the config's eval.mode
    scale: Optional[float] = None  # inference resize factor; None: the config's eval.scale
    resize: Optional[Sequence[int]] = None  # (W, H) box, as data.test's resize
    opacity: float = 0.5
    progress: bool = True


@dataclass
class PredictReport:
    images: int = 0  # images written
    videos: int = 0  # videos written
    frames: int = 0  # video frames predicted
    errors: list[str] = field(default_factory=list)


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


class _Run:
    def __init__(self, predictor: Predictor, out_dir: Path, options: PredictOptions,
                 on_error: Callable[[str], None]):
        self.predictor, self.out_dir, self.opt = predictor, Path(out_dir), options
        self.report = PredictReport()
        self.on_error = on_error
        self._claimed: dict[Path, Path] = {}  # output name -> the input that writes it

    def fail(self, message: str) -> None:
        self.report.errors.append(message)
        self.on_error(f"error: {message}")

    def claim(self, item: InputItem) -> bool:
        """One output name per input: a second input with the same name would overwrite the first."""
        owner = self._claimed.setdefault(item.name, item.path)
        if owner != item.path:
            self.fail(f"{item.path}: its outputs would overwrite those of {owner} (same name '{item.name}'); skipped")
            return False
        return True

    def predict(self, images: list[np.ndarray]):
        o = self.opt
        return self.predictor.predict_batch(images, tta=o.tta, mode=o.mode, resize=o.resize, scale=o.scale)

    # ------------------------------------------------------------------ images

    def images(self, items: list[InputItem]) -> None:
        pending: list[tuple[InputItem, np.ndarray]] = []
        bar = tqdm(total=len(items), desc="images", unit="img", disable=not self.opt.progress or not items,
                   file=sys.stderr)
        for item in items:
            try:
                image = read_image(item.path)
            except DataError as err:
                self.fail(str(err))
                bar.update(1)
                continue
            if pending and (pending[0][1].shape != image.shape or len(pending) >= self.opt.batch_size):
                bar.update(self.flush(pending))
                pending = []
            pending.append((item, image))
        bar.update(self.flush(pending))
        bar.close()

    def flush(self, pending: list[tuple[InputItem, np.ndarray]]) -> int:
        if not pending:
            return 0
        try:
            predictions = self.predict([image for _, image in pending])
        except (RuntimeError, ValueError) as err:  # e.g. an image too small for the model's pyramid
            for item, _ in pending:
                self.fail(f"{item.path}: prediction failed: {type(err).__name__}: {str(err).splitlines()[0]}")
            return len(pending)
        for (item, image), prediction in zip(pending, predictions):
            write_image(self.out_dir, item.name, image, prediction, self.opt.formats, opacity=self.opt.opacity)
            self.report.images += 1
        return len(pending)

    # ------------------------------------------------------------------ videos

    def video(self, item: InputItem) -> None:
        try:
            reader = VideoReader(item.path)
        except InputError as err:
            self.fail(str(err))
            return
        visual = [f for f in self.opt.formats if f in VISUAL_FORMATS]
        writers = {}
        frames = 0
        bar = tqdm(total=reader.frame_count, desc=item.path.name, unit="frame", disable=not self.opt.progress,
                   file=sys.stderr)
        try:
            for fmt in visual:
                height, width = reader.size
                size = (height, 2 * width) if fmt == "panel" else (height, width)
                writers[fmt] = open_video_writer(output_path(self.out_dir, fmt, item.name, ".mp4"), reader.fps, size)
            batch: list[np.ndarray] = []
            for frame in reader:
                batch.append(frame)
                if len(batch) >= self.opt.batch_size:
                    frames = self._video_batch(item, batch, frames, writers)
                    bar.update(len(batch))
                    batch = []
            if batch:
                frames = self._video_batch(item, batch, frames, writers)
                bar.update(len(batch))
        except InputError as err:
            self.fail(str(err))
            return
        except (RuntimeError, ValueError) as err:
            self.fail(f"{item.path}: prediction failed at frame {frames}: {type(err).__name__}: "
                      f"{str(err).splitlines()[0]}")
            return
        finally:
            for writer in writers.values():
                writer.close()
            bar.close()
        self.report.videos += 1
        self.report.frames += frames

    def _video_batch(self, item: InputItem, frames: list[np.ndarray], index: int, writers: dict) -> int:
        for frame, prediction in zip(frames, self.predict(frames)):
            for fmt in self.opt.formats:
                if fmt in writers:
                    writers[fmt].write(render(fmt, frame, prediction, opacity=self.opt.opacity))
                else:  # ids: one PNG per frame under the video's name
                    write_image(self.out_dir, item.name / f"frame_{index:06d}", frame, prediction, [fmt])
            index += 1
        return index


def predict_inputs(predictor: Predictor, inputs: Sequence[str], out_dir: Path, options: PredictOptions = None,
                   *, on_error: Callable[[str], None] = _say) -> PredictReport:
    """Predict on every image and video of ``inputs`` (files or folders) and write the outputs.

    Returns the counts and the error lines (also passed to ``on_error`` as they happen).
    """
    options = options or PredictOptions()
    if options.batch_size < 1:
        raise ValueError(f"--batch must be at least 1, got {options.batch_size}")
    run = _Run(predictor, out_dir, options, on_error)
    items, errors = collect_inputs(list(inputs))
    for message in errors:
        run.fail(message)
    items = [item for item in items if run.claim(item)]
    run.images([item for item in items if not item.is_video])
    for item in items:
        if item.is_video:
            run.video(item)
    return run.report
