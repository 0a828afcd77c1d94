"""Listing image files: what the loaders of :mod:`fedface.common.data.sources` and
:mod:`fedface.common.data.expressions` share (natural order, hidden files, extensions)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["IMAGE_EXTENSIONS", "Entry", "dir_has", "is_image_name", "natural_key", "scan"]

#: File extensions (lower case, with the dot) that the folder layouts read.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)


class Entry(NamedTuple):
    """One image file found by a lister: where it is, whose it is, and its attributes."""

    path: Path
    identity: str
    attrs: tuple[tuple[str, str], ...]


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers numerically (``s2`` before ``s10``)."""
    parts = re.split(r"(\d+)", text)
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in parts if p)


def visible(entries: Sequence[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """Drop hidden entries (``.DS_Store``, ``.git``)."""
    return [e for e in entries if not e.name.startswith(".")]


def scan(path: Path) -> tuple[list[str], list[str]]:
    """Names of the visible files and directories directly under ``path``, naturally sorted."""
    with os.scandir(path) as it:
        entries = visible(list(it))
    files = sorted((e.name for e in entries if e.is_file()), key=natural_key)
    dirs = sorted((e.name for e in entries if e.is_dir()), key=natural_key)
    return files, dirs


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of :data:`IMAGE_EXTENSIONS`."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def dir_has(path: Path, predicate: Callable[[str], bool]) -> bool:
    """Whether ``path`` directly holds a visible file whose name satisfies ``predicate``."""
    with os.scandir(path) as it:
        return any(not e.name.startswith(".") and predicate(e.name) and e.is_file() for e in it)
