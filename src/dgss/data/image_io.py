"""Reading images and label maps with errors that name the file.

PIL does the decoding. One special case: 16-bit multi-channel PNGs (SYNTHIA's labels) are reduced
to 8 bits per channel by PIL, keeping the high byte, which would turn every class id below 256 into
0. :func:`read_png_16bit` decodes such files twice with PIL's own decoder, once keeping the high and
once the low byte of each sample, and combines them, so no OpenCV is needed.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DataError",
    "BadSampleError",
    "UnreadableFileError",
    "IMAGE_EXTENSIONS",
    "read_image",
    "pil_to_rgb",
    "uint16_to_uint8",
    "read_label",
    "read_png_16bit",
    "write_png_16bit",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class DataError(ValueError):
    """A dataset on disk is not what its layout promises; the message names the path."""


class BadSampleError(DataError):
    """One sample is unusable (unreadable file, image and label of different sizes).

    Datasets can be told to skip such samples with a warning instead of stopping
    (``on_bad_sample: skip``); every other :class:`DataError` always stops.
    """


class UnreadableFileError(BadSampleError):
    """A file exists but cannot be decoded (corrupt, truncated, not an image)."""


def _open(path: str | os.PathLike, what: str, *, load: bool = True) -> Image.Image:
    try:
        image = Image.open(path)
        if load:
            image.load()
        return image
    except FileNotFoundError as err:
        raise DataError(f"{what} not found: {path}") from err
    except MemoryError:
        raise
    except Exception as err:  # any decoder failure means the same thing: the file is unusable
        raise UnreadableFileError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB (grey, palette and RGBA files are converted; 16-bit grey
    is scaled to 8 bits, see :func:`pil_to_rgb`)."""
    return pil_to_rgb(_open(path, "image"), str(path))


_GREY_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits by the bit depth: round(v / 257), so 0 -> 0 and 65535 -> 255 exactly."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def pil_to_rgb(image: Image.Image, name: str = "image") -> np.ndarray:
    """A PIL image as H x W x 3 uint8 RGB, a writable copy.

    PIL's own ``convert("RGB")`` clips 16-bit grey samples to 255 (a white image), so 16-bit grey
    (modes I;16*, and 16-bit PNGs, which PIL opens as I) is scaled by its bit depth: v / 257, i.e. the
    full 16-bit range onto 0..255 (no stretching by the image's own maximum: a dark image stays dark).
    32-bit integer and float images have no such range and are refused (``name`` names the file).
    16-bit RGB files are already reduced to 8 bits per channel by PIL when it decodes them.
    """
    mode = image.mode
    if mode in _GREY_16BIT or (mode == "I" and image.format == "PNG"):  # PNG's "I" is 16-bit grey
        grey = uint16_to_uint8(np.clip(np.asarray(image), 0, 65535))
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise UnreadableFileError(f"cannot read image {name}: a {kind} greyscale image (PIL mode {mode}) has no "
                                  "fixed range to map to 0..255; convert it to 8 or 16 bits per sample first")
    if mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label map of class indices as an H x W integer array (uint8, uint16 or int32).

    Palette ("P") PNGs give their palette indices, which is how GTAV and Mapillary store classes.
    Colour (RGB) label files are rejected: their colours are not class indices.
    """
    image = _open(path, "label")
    if image.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
        return np.array(image)
    if image.mode == "1":
        return np.asarray(image).astype(np.uint8)
    raise DataError(
        f"label {path} is a {image.mode} image; expected a single channel of class indices "
        "(a colour-coded mask must first be converted to indices)"
    )


def _with_rawmode(image: Image.Image, rawmode: str) -> None:
    """Make PIL unpack the decoded (unfiltered) PNG rows with another raw mode."""
    tiles = []
    for tile in image.tile:
        args = tile[3]
        args = (rawmode,) + tuple(args[1:]) if isinstance(args, tuple) else rawmode
        tiles.append(tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args))
    image.tile = tiles


def read_png_16bit(path: str | os.PathLike) -> np.ndarray:
    """All channels of a PNG at full bit depth: H x W x C (uint16 for 16-bit files, else uint8).

    8-bit files come back unchanged (as H x W x C uint8, C = 1 for grey).
    """
    image = _open(path, "label", load=False)
    rawmodes = {str(t[3][0] if isinstance(t[3], tuple) else t[3]) for t in image.tile}
    if image.format == "PNG" and image.mode == "RGB" and rawmodes == {"RGB;16B"}:
        high = np.asarray(_open(path, "label"))  # PIL keeps the most significant byte
        low_image = _open(path, "label", load=False)
        _with_rawmode(low_image, "RGB;16L")  # little-endian unpacker on big-endian data: low byte
        try:
            low_image.load()
        except Exception as err:
            raise UnreadableFileError(f"cannot read label {path}: {type(err).__name__}: {err}") from err
        low = np.asarray(low_image)
        return (high.astype(np.uint16) << 8) | low
    array = np.asarray(_open(path, "label"))
    return array[..., None] if array.ndim == 2 else array


def write_png_16bit(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an H x W x 3 uint16 array as a 16-bit RGB PNG (the encoding SYNTHIA's labels use).

    PIL cannot write this format; the encoder is the PNG specification's simplest form (one IDAT
    chunk, "Up" filter on every row so readers exercise their unfiltering).
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 array, got shape {array.shape}")
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array.astype(">u2").reshape(height, width * 3)).view(np.uint8)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, width * 6), np.uint8))  # wraps modulo 256
    scanlines = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
