"""Unit tests for fedface.common.io: atomic writes (old or new file, never half of either)."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedface.common.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_new,
    atomic_write_text,
    atomic_write_toml,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_json_writes_readable_json(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "metrics.json"
    obj = {"rank1": 0.95, "runs": [1, 2], "name": "réseau"}

    # Act
    atomic_write_json(path, obj)

    # Assert
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_atomic_write_text_writes_utf8(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"

    atomic_write_text(path, "visage – ß\n")

    assert path.read_bytes() == "visage – ß\n".encode()


def test_atomic_write_toml_writes_parseable_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    obj = {"model": {"hidden-size": 8, "passes": ["rows", "columns"]}, "training": {"lr": 0.003}}

    atomic_write_toml(path, obj)

    assert tomllib.loads(path.read_text(encoding="utf-8")) == obj


def test_atomic_torch_save_writes_loadable_tensors(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "state.pt"
    state = {"weight": torch.arange(6.0).view(2, 3), "step": 4}

    # Act
    atomic_torch_save(path, state)
    loaded = torch.load(path, weights_only=True)

    # Assert
    assert torch.equal(loaded["weight"], state["weight"])
    assert loaded["step"] == 4


def test_atomic_write_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nested" / "metrics.json"

    atomic_write_json(path, {"ok": True})

    assert json.loads(path.read_text()) == {"ok": True}


def test_atomic_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"v": 1})

    atomic_write_json(path, {"v": 2})

    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


_WRITERS: list[tuple[str, Callable[[Path], None]]] = [
    ("bytes", lambda p: atomic_write_bytes(p, b"new content")),
    ("text", lambda p: atomic_write_text(p, "new content")),
    ("json", lambda p: atomic_write_json(p, {"new": True})),
    ("toml", lambda p: atomic_write_toml(p, {"new": True})),
    ("torch", lambda p: atomic_torch_save(p, {"new": torch.ones(3)})),
]


@pytest.mark.parametrize("writer", [w for _, w in _WRITERS], ids=[n for n, _ in _WRITERS])
def test_atomic_write_failed_replace_keeps_old_content_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Callable[[Path], None]
) -> None:
    # Arrange
    path = tmp_path / "target.dat"
    path.write_bytes(b"old content")

    def failing_replace(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)

    # Act
    with pytest.raises(OSError, match="No space left"):
        writer(path)

    # Assert
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["target.dat"]


def test_atomic_write_failed_write_keeps_old_content_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the failure happens mid-write (fsync), before the rename
    path = tmp_path / "target.txt"
    path.write_text("old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)

    # Act
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_text(path, "new")

    # Assert
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["target.txt"]


def test_atomic_write_failure_without_previous_file_leaves_directory_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)

    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})

    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("umask_022")
def test_atomic_write_new_file_mode_respects_umask_not_0600(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "metrics.json"

    # Act
    atomic_write_json(path, {"a": 1})

    # Assert: what open() would give under umask 022, not mkstemp's private 0600
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_write_mode_follows_a_stricter_umask(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "state.pt"
    old = os.umask(0o027)
    try:
        # Act
        atomic_torch_save(path, {"w": torch.zeros(1)})
    finally:
        os.umask(old)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.usefixtures("umask_022")
def test_atomic_write_does_not_change_the_process_umask(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")

    current = os.umask(0o022)
    assert current == 0o022


def test_atomic_write_new_writes_with_its_mode_and_never_overwrites(tmp_path: Path) -> None:
    # Arrange
    target = tmp_path / "keys" / "site.key"

    # Act
    first = atomic_write_new(target, b"first", 0o600)
    second = atomic_write_new(target, b"second", 0o600)

    # Assert
    assert (first, second) == (True, False)
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["site.key"]
