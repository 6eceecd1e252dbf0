"""What ``dgss predict`` reads: images, folders (recursively) and videos, each with its output name.

Output names keep the input's structure: a file ``a/b.png`` is written as ``b.*``, a folder's files
keep their path inside the folder (``city/x.png``), a video ``clip.mp4`` becomes ``clip.*`` (frames
under ``clip/``). Videos are read with OpenCV (the ``video`` extra), frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..data.image_io import IMAGE_EXTENSIONS

__all__ = ["VIDEO_EXTENSIONS", "InputItem", "InputError", "collect_inputs", "VideoReader", "open_video_writer"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class InputError(Exception):
    """One input cannot be used; the message names it and says why. Other inputs go on."""


@dataclass(frozen=True)
class InputItem:
    """An image or video to predict on and its output name (relative, without extension)."""

    path: Path
    name: Path
    is_video: bool


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def collect_inputs(specs: list[str]) -> tuple[list[InputItem], list[str]]:
    """Expand files and folders into items; returns (items, errors), one error line per bad spec."""
    items, errors = [], []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and (p.suffix.lower() in IMAGE_EXTENSIONS or _is_video(p)))
            if not found:
                errors.append(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}) or videos")
            items += [InputItem(p, p.relative_to(path).with_suffix(""), _is_video(p)) for p in found]
        elif path.is_file():
            items.append(InputItem(path, Path(path.stem), _is_video(path)))
        else:
            errors.append(f"{path}: no such file or folder")
    return items, errors


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError("reading and writing videos needs OpenCV: pip install 'dgss[video]'") from None
    return cv2


class VideoReader:
    """Frames of a video as H x W x 3 uint8 RGB arrays; ``fps`` and ``frame_count`` (an estimate)."""

    def __init__(self, path: Path):
        cv2 = _cv2()
        self.path = path
        self._capture = cv2.VideoCapture(str(path))
        ok, first = self._capture.read() if self._capture.isOpened() else (False, None)
        if not ok or first is None:
            self._capture.release()
            raise InputError(f"{path}: cannot decode the video (unsupported codec, or not a video file)")
        self._first: Optional[np.ndarray] = first
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS)) or 25.0
        self.frame_count = max(int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)), 1)
        self.size = (first.shape[0], first.shape[1])  # (H, W)

    def __iter__(self) -> Iterator[np.ndarray]:
        cv2 = _cv2()
        try:
            frame = self._first
            self._first = None
            while frame is not None:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                ok, frame = self._capture.read()
                frame = frame if ok else None
        finally:
            self._capture.release()


class _VideoWriter:
    def __init__(self, path: Path, fps: float, size_hw: tuple[int, int]):
        cv2 = self._cv2 = _cv2()
        path.parent.mkdir(parents=True, exist_ok=True)
        # mp4v: the MPEG-4 encoder every OpenCV build from PyPI has (H.264 is not always licensed in)
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size_hw[1], size_hw[0]))
        if not self._writer.isOpened():
            raise InputError(f"{path}: cannot open a video writer (mp4v) for this file")
        self.path = path

    def write(self, rgb: np.ndarray) -> None:
        self._writer.write(self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._writer.release()


def open_video_writer(path: Path, fps: float, size_hw: tuple[int, int]) -> _VideoWriter:
    """An MPEG-4 (.mp4) writer of H x W x 3 uint8 RGB frames."""
    return _VideoWriter(path, fps, size_hw)
