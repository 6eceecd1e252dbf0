"""How dgss writes files: atomically, with the permissions the user's umask asks for, and with output
folders and input files checked before the expensive work starts.

    atomic_write(path, lambda tmp: torch.save(obj, tmp))     # configs, model files, checkpoints, lists
    save_safetensors(tensors, path, metadata={...})          # safetensors files, the same way, with a checksum
                                                             # and one header order (same content, same bytes)
    tensors, metadata = load_safetensors(path)               # checksum verified: flipped bits are refused
    check_output_dir(run_dir, "run folder")                  # before building a model: one clear line
    check_input_file(weights, "model.weights")               # exists and is readable

A writer first writes ``.<name>.tmp<pid>`` next to the target, flushes it to disk, gives it the mode
``0o666 & ~umask`` (what ``open()`` gives a new file; some writers, safetensors among them, create
their files 0600) and renames it over the target. A process killed while writing leaves the old file
intact and its temporary file behind; :func:`remove_stale_temp_files` deletes those of dead writers.

Every safetensors file dgss writes carries a SHA-256 of its tensors and other metadata under the
metadata key ``dgss_sha256``; :func:`load_safetensors` recomputes it, so a truncated, bit-flipped or
half-copied file is refused with one line naming it (files without the key, e.g. other tools', load
unchecked). :func:`is_out_of_space` tells a full disk (or quota) from other write failures, whatever
the writer (Python, torch or safetensors' Rust) made of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["UnusablePathError", "DamagedFileError", "current_umask", "atomic_write", "save_safetensors",
           "canonicalize_safetensors_header",
           "load_safetensors", "safetensors_checksum", "CHECKSUM_KEY", "is_out_of_space", "remove_stale_temp_files",
           "describe_load_error", "check_output_dir", "check_input_file"]

PathLike = Union[str, os.PathLike]
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp(?P<pid>\d+)$")  # what atomic_write names its temporary files
_UMASK_LOCK = threading.Lock()


class UnusablePathError(ValueError):
    """An input file or output folder the user named cannot be used; the message names it and why."""


class DamagedFileError(UnusablePathError):
    """A file is truncated, bit-flipped or otherwise not what was written; the message names it."""


CHECKSUM_KEY = "dgss_sha256"


def current_umask() -> int:
    """The process's umask (read without changing it where the OS tells it, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, flush it to disk, give it the umask's mode and rename it to ``path``.

    A crash at any moment leaves either the old file or the complete new one under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # before the rename, so the file never appears under its name with another mode
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_checksum(tensors: dict, metadata: Optional[dict[str, str]] = None) -> str:
    """SHA-256 of the metadata entries (all but :data:`CHECKSUM_KEY`) and of every tensor's name,
    dtype, shape and bytes, in name order: what :func:`save_safetensors` stores and
    :func:`load_safetensors` checks."""
    import torch

    digest = hashlib.sha256()
    entries = sorted((k, v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY)
    digest.update(json.dumps(entries).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_safetensors(tensors: dict, path: PathLike, *, metadata: Optional[dict[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_write` (safetensors itself writes 0600),
    with :func:`safetensors_checksum` under :data:`CHECKSUM_KEY` in the metadata."""
    from safetensors.torch import save_file

    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = safetensors_checksum(tensors, metadata)

    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        canonicalize_safetensors_header(tmp)

    return atomic_write(path, write)


def canonicalize_safetensors_header(path: PathLike) -> None:
    """Rewrite a safetensors file's header in one order: metadata keys sorted, tensors by data offset.

    safetensors' writer puts the metadata keys in hash-map order, which changes from one process to the
    next. Two saves of the same tensors and metadata then differ in their bytes, and a file remade by its
    recipe would not be the same file. The header is rewritten in place with the same length (the same
    keys and values, padded with spaces as safetensors pads it), so the tensor data does not move.
    """
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        ordered = {}
        if "__metadata__" in header:
            ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        for name in sorted(header, key=lambda name: (header[name]["data_offsets"][0], name)):
            ordered[name] = header[name]
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # never expected (same keys and values); leave the file as written
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def load_safetensors(path: PathLike, *, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a file dgss wrote must match its checksum.

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: one line naming the file: unreadable (truncated, a corrupt header) or its
            contents differ from what was written (flipped bits).
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "file not found", str(path))
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors reports a truncated or garbled file in several ways
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedFileError(f"{path} is damaged or not a safetensors file (truncated or corrupt: {reason})") \
            from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and safetensors_checksum(tensors, metadata) != expected:
        raise DamagedFileError(f"{path} is damaged: its contents do not match the checksum written with them "
                               "(flipped bits or a partial copy)")
    return tensors, metadata


_OUT_OF_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28)", "os error 122)")


def is_out_of_space(err: BaseException) -> bool:
    """Whether a failed write failed for lack of space (ENOSPC) or quota (EDQUOT), also when a library
    turned the OS error into its own exception (safetensors' "... (os error 28)") or raised another one
    while handling it (torch.save's writer, finishing the archive)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in _OUT_OF_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): not ours to judge, keep its file
    return True


def remove_stale_temp_files(directory: PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` when its process was killed.

    Only files named as atomic_write names them (``.<target>.tmp<pid>``) whose process no longer runs
    on this machine are removed; a writer that is still running keeps its file. (A run folder is written
    by one process on one machine, rank 0, so a pid that is not running here is a dead writer.)
    Returns the files removed.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file() or _pid_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
    return removed


def check_output_dir(path: PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) and make sure a file can be written in it, before any work is done.

    Raises:
        UnusablePathError: one line naming the folder and why it cannot be used.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UnusablePathError(f"{what} {path} cannot be created: a file of that name is in the way") from None
    except OSError as err:
        raise UnusablePathError(f"{what} {path} cannot be created: {err.strerror or err}") from None
    if not path.is_dir():
        raise UnusablePathError(f"{what} {path} is not a folder")
    probe = path / f".dgss-write-test.tmp{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UnusablePathError(f"{what} {path} is not writable: {err.strerror or err}") from None
    return path


_PICKLED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_UNSAFE_ADVICE = ("weights_only", "safe_globals", "trust", "Check the documentation of torch.load")


def describe_load_error(err: BaseException) -> str:
    """One line about why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load
    it with ``weights_only=False`` or to allowlist its globals (either would run whatever the file names).
    Other errors come back as ``Type: first line``."""
    text = str(err)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"{type(err).__name__}: {first}" if first else type(err).__name__
    found = _PICKLED_GLOBAL.search(text)
    if found:
        return (f"it holds a pickled Python object ({found.group(1)}) besides tensors; dgss reads tensors and "
                "plain containers only and never unpickles anything else")
    reasons = []
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        sentences = [s for s in re.split(r"(?<=\.)\s+", line) if s and not any(a in s for a in _UNSAFE_ADVICE)]
        if sentences and not line.startswith("("):
            reasons.append(" ".join(sentences))
    reason = "; ".join(r for r in reasons if "load failed" not in r) or "it holds objects other than tensors"
    return f"{reason} (dgss reads tensors and plain containers only and never unpickles anything else)"


def check_input_file(path: PathLike, what: str) -> Path:
    """``path`` exists, is a file and can be opened for reading; else one line naming ``what`` and the path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UnusablePathError(f"{what} not found: {path}")
    if not path.is_file():
        raise UnusablePathError(f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise UnusablePathError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    return path
