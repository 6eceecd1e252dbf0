"""The parameters and buffers of a TorchScript archive (OpenAI's CLIP ``.pt`` files), read without running it.

``torch.jit.load`` rebuilds a scripted module by running the archive's own code (a class's TorchScript
``__setstate__`` among it), so a weights file must never go through it. This reader takes the archive
apart instead; it executes nothing and imports nothing the archive names:

* ``<archive>/data.pkl`` is a pickle of the module tree: one object per module, of a class named
  ``__torch__.<qualified name>``, whose state is a dict of its attributes (submodules, tensors, plain
  values). It is read by :class:`_ArchiveUnpickler`, which resolves no global but the handful a module
  tree needs (tensor rebuilding, storage types, ``OrderedDict``, TorchScript's list builders) and turns
  every ``__torch__`` class into an inert record of its state. Any other global (``os.system``,
  ``builtins.eval``, ...) is refused before anything is called.
* ``<archive>/data/<key>`` holds the raw bytes of storage ``key`` (little-endian, unless
  ``<archive>/byteorder`` says otherwise).
* ``<archive>/code/<qualifier>.py`` declares each class, including which attributes are parameters and
  buffers (``__parameters__ = [...]``, ``__buffers__ = [...]``); those declarations are parsed as text
  (``ast.literal_eval`` of the list literals), so that the result holds exactly what the module's
  ``state_dict()`` would: parameters, then buffers, then submodules, with their dotted names, and not
  tensors kept as plain attributes (CLIP's ``attn_mask``).

A class that keeps a custom state (its own ``__getstate__``/``__setstate__``) is refused: its tensors
have no names without running its ``__setstate__``.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["TorchScriptReadError", "is_torchscript_archive", "read_torchscript_state_dict"]


class TorchScriptReadError(ValueError):
    """The archive cannot be read as a module tree of tensors (the message says why, without the path)."""


# torch's typed-storage names in the pickle -> the element type of the storage's bytes
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a zip holding a TorchScript module (``constants.pkl`` or ``code/``; what
    ``torch.load`` itself takes for TorchScript)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _StorageType:
    """What ``torch.FloatStorage`` and its kin unpickle to: only the element type is needed."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ScriptObject:
    """An inert stand-in for an object of a TorchScript class: it keeps the state pickle gives it and
    has no behaviour (pickle calls this ``__setstate__``, never the archive's)."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _collection(*args):
    """``collections.OrderedDict`` (the tensors' empty backward-hook dicts); nothing else is built."""
    if args:
        raise TorchScriptReadError("an OrderedDict with contents, where a tensor's empty hook dict belongs")
    return collections.OrderedDict()


def _passthrough(value, *_):
    """TorchScript's list builders and type tags: the value itself is all a state dict needs."""
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor view of an already read storage (the arguments checked, nothing else done)."""
    if not isinstance(storage, torch.Tensor):
        raise TorchScriptReadError("a tensor whose storage is not a storage record")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in (*size, *stride))):
        raise TorchScriptReadError("a tensor with malformed offset, size or stride")
    if backward_hooks:
        raise TorchScriptReadError("a tensor with backward hooks")
    try:
        return storage.as_strided(size, stride, storage_offset)
    except RuntimeError as err:
        raise TorchScriptReadError(f"a tensor that does not fit its storage: {err}") from None


_TORCH_PICKLE_HELPERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                         "restore_type_tag")


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` resolving only the globals a module tree needs (see the module docstring)."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._byteorder = zf, prefix, byteorder
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):  # noqa: D102 - the one gate every global goes through
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _collection
        if module == "torch.jit._pickle" and name in _TORCH_PICKLE_HELPERS:
            return _passthrough
        raise TorchScriptReadError(f"its pickle names {module}.{name}, which a weights file has no use for "
                                   "(refused: nothing was imported or run)")

    def persistent_load(self, pid):  # noqa: D102 - ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise TorchScriptReadError(f"an unexpected persistent record {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise TorchScriptReadError(f"storage {key} is read as two element types")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self._prefix}/data/{key}"
        try:
            raw = self._zf.read(name)
        except KeyError:
            raise TorchScriptReadError(f"the storage record {name} is missing") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise TorchScriptReadError(f"the storage record {name} holds {len(raw)} bytes, not {numel} x {itemsize}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if self._byteorder != sys.byteorder and itemsize > 1:  # reverse each element's bytes
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)
        return flat.view(dtype)


_CLASS = re.compile(r"^class (?P<name>[\w.]+)(?:\((?P<base>[\w.]*)\))?:\n(?P<body>(?:[ \t]+.*\n?|\n)*)", re.MULTILINE)
_DECLARED = re.compile(r"^[ \t]+(?P<kind>__parameters__|__buffers__) = (?P<names>\[.*\])[ \t]*$", re.MULTILINE)


def _class_declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, dict]:
    """qualified class name -> {"module": is an nn.Module, "__parameters__": [...], "__buffers__": [...]},
    from the archive's code files (text only)."""
    declarations = {}
    code_root = f"{prefix}/code/"
    for record in zf.namelist():
        if not (record.startswith(code_root) and record.endswith(".py")):
            continue
        qualifier = record[len(code_root):-len(".py")].replace("/", ".")
        text = zf.read(record).decode("utf-8", errors="replace")
        for match in _CLASS.finditer(text):
            entry = {"module": match["base"] == "Module", "__parameters__": [], "__buffers__": []}
            for declared in _DECLARED.finditer(match["body"]):
                try:
                    names = ast.literal_eval(declared["names"])
                except (ValueError, SyntaxError):
                    raise TorchScriptReadError(f"{record} declares {declared['kind']} unreadably") from None
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise TorchScriptReadError(f"{record} declares {declared['kind']} unreadably")
                entry[declared["kind"]] = names
            declarations[f"{qualifier}.{match['name']}"] = entry
    return declarations


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    tops = {n.split("/", 1)[0] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1}
    if len(tops) != 1:
        raise TorchScriptReadError("it has no single <archive>/data.pkl (an unsupported TorchScript layout)")
    return tops.pop()


def _collect(obj: _ScriptObject, prefix: str, declarations: dict, out: dict[str, torch.Tensor],
             visiting: set[int]) -> None:
    """``state_dict()`` order: the object's parameters, its buffers, then its submodules."""
    if id(obj) in visiting:  # a module tree has no cycles; a crafted pickle may
        raise TorchScriptReadError(f"module {prefix.rstrip('.')} contains itself")
    visiting.add(id(obj))
    declared = declarations.get(obj.qualname)
    if declared is None:
        raise TorchScriptReadError(f"class {obj.qualname} has no declaration in the archive's code/")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise TorchScriptReadError(f"class {obj.qualname} keeps a custom state (its own __getstate__/__setstate__), "
                                   "whose tensors cannot be named without running the archive's code")
    for name in (*declared["__parameters__"], *declared["__buffers__"]):
        value = state.get(name)
        if value is None:  # an optional parameter that is absent (e.g. a Linear without bias)
            continue
        if not isinstance(value, torch.Tensor):
            raise TorchScriptReadError(f"{prefix}{name} of class {obj.qualname} is declared a tensor but is "
                                       f"a {type(value).__name__}")
        out[prefix + name] = value.detach()  # a new tensor object: nothing the pickle set on this one comes along
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and declarations.get(value.qualname, {}).get("module", True):
            _collect(value, f"{prefix}{name}.", declarations, out, visiting)
    visiting.discard(id(obj))


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript module in ``path``, named as its ``state_dict()``
    names them (e.g. ``visual.conv1.weight``), on the CPU; nothing in the archive is run.

    Raises:
        TorchScriptReadError: the archive is not a plain module tree of tensors (the message says why).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf)
            names = set(zf.namelist())
            byteorder = "little"
            if f"{prefix}/byteorder" in names:
                byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", errors="replace").strip()
                if byteorder not in ("little", "big"):
                    raise TorchScriptReadError(f"unknown byte order {byteorder!r}")
            declarations = _class_declarations(zf, prefix)
            unpickler = _ArchiveUnpickler(zf.read(f"{prefix}/data.pkl"), zf, prefix, byteorder)
            try:
                root = unpickler.load()
            except TorchScriptReadError:
                raise
            except Exception as err:  # a malformed pickle: pickle's own errors, or a call with wrong arguments
                raise TorchScriptReadError(f"its data.pkl is malformed: {type(err).__name__}: {err}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise TorchScriptReadError(f"it cannot be read as a zip archive: {err}") from None
    if not isinstance(root, _ScriptObject):
        raise TorchScriptReadError(f"its data.pkl holds a {type(root).__name__}, not a module")
    out: dict[str, torch.Tensor] = {}
    try:
        _collect(root, "", declarations, out, set())
    except RecursionError:
        raise TorchScriptReadError("its module tree is nested too deeply") from None
    return out
