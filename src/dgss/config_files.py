"""The configs that ship with dgss (``dgss configs list|show|copy``).

    list_configs("rein")                   # ['rein/clip-l_gtav_512.yaml', 'rein/dinov2-l_citys2acdc_1024.yaml', ...]
    copy_configs(["rein/dinov2-l_gtav_512.yaml"], "configs")   # the file and every _base_ it inherits from

A config inherits from others by relative ``_base_`` paths (``../_base_/gtav_512.yaml``), so a config copied
alone would not load. :func:`copy_configs` copies each requested file with everything it inherits from,
at the same relative places under the destination, and never overwrites a file (unless ``force``): a
copy under ``./configs`` then wins over the shipped file of the same name
(:func:`dgss.config.resolve_config_path`), so the documented commands run the edited copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import yaml

from .config import SHIPPED_CONFIGS, ConfigError

__all__ = ["list_configs", "shipped_config", "config_dependencies", "copy_configs"]


def _relative_name(name: str | os.PathLike) -> Path:
    """``rein/x.yaml`` from ``rein/x.yaml``, ``configs/rein/x.yaml`` or ``rein/x`` (the suffix may be left off)."""
    path = Path(name)
    if path.parts[:1] == ("configs",):
        path = Path(*path.parts[1:])
    return path


def list_configs(under: str = "", *, include_bases: bool = False) -> list[str]:
    """The shipped config files under the folder ``under`` (all when empty), as names relative to the
    configs folder; the ``_base_`` fragments only with ``include_bases``."""
    root = SHIPPED_CONFIGS / _relative_name(under) if under else SHIPPED_CONFIGS
    if not root.is_dir():
        raise ConfigError(f"no shipped config folder '{under}' (folders: {', '.join(_folders())})")
    names = sorted(p.relative_to(SHIPPED_CONFIGS).as_posix() for p in root.rglob("*.yaml"))
    include_bases = include_bases or _relative_name(under).parts[:1] == ("_base_",)  # asked for by name
    return [n for n in names if include_bases or not n.startswith("_base_/")]


def _folders() -> list[str]:
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if p.is_dir())


def shipped_config(name: str | os.PathLike) -> Path:
    """The shipped file or folder called ``name`` (``.yaml`` may be left off).

    Raises:
        ConfigError: no such shipped config, with the closest names.
    """
    relative = _relative_name(name)
    for candidate in (SHIPPED_CONFIGS / relative, SHIPPED_CONFIGS / relative.with_name(relative.name + ".yaml")):
        if candidate.exists() and candidate.resolve().is_relative_to(SHIPPED_CONFIGS):
            return candidate
    import difflib

    close = difflib.get_close_matches(relative.as_posix(), list_configs(include_bases=True) + _folders(), n=3,
                                      cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"no shipped config '{name}' in {SHIPPED_CONFIGS}{hint} (`dgss configs list` names them)")


def config_dependencies(path: Path) -> list[Path]:
    """``path`` and every file it inherits from through ``_base_``, each once, the file itself first."""
    seen: list[Path] = []
    pending = [path.resolve()]
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.append(current)
        data = yaml.safe_load(current.read_text()) or {}
        bases = data.get("_base_", []) if isinstance(data, dict) else []
        for base in [bases] if isinstance(bases, str) else bases:
            pending.append((current.parent / base).resolve())
    return seen


def copy_configs(names: Iterable[str], dest: str | os.PathLike = "configs", *, force: bool = False) -> list[Path]:
    """Copy shipped configs (files or folders) with the ``_base_`` files they inherit from into ``dest``,
    at their relative places. Returns the files written, in order.

    Raises:
        ConfigError: an unknown name, or a file that exists already at the destination (nothing is written
            then, unless ``force``).
    """
    dest = Path(dest)
    sources: list[Path] = []
    for name in names:
        found = shipped_config(name)
        for path in sorted(found.rglob("*.yaml")) if found.is_dir() else [found]:
            sources += [p for p in config_dependencies(path) if p not in sources]
    root = SHIPPED_CONFIGS.resolve()
    targets = [(source, dest / source.relative_to(root)) for source in sources]
    existing = [str(target) for source, target in targets if target.exists() and target.read_bytes() != source.read_bytes()]
    if existing and not force:
        raise ConfigError(f"not overwriting {', '.join(existing)} (edited copies?): pass --force, or copy to "
                          "another folder with --to")
    written = []
    for source, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written
