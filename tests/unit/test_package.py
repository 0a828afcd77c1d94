"""Unit tests of the package's shape: public ``__all__`` lists and the dependency rule.

(a) Every fedface module with an ``__all__`` exports only names it defines, once each, in the
    isort-style order that ruff's RUF022 enforces.
(b) The dependency rule, read from the source with ``ast``: ``common`` depends on nothing else
    in fedface; ``client`` and ``server`` depend on ``common`` only, never on each other or on
    ``simulations``.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOT_PACKAGES = (
    "fedface.common",
    "fedface.common.data",
    "fedface.common.models",
    "fedface.client",
    "fedface.server",
    "fedface.simulations",
)


def _module_names() -> list[str]:
    names: set[str] = set()
    for root in ROOT_PACKAGES:
        package = importlib.import_module(root)
        names.add(root)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."))
    return sorted(names)


MODULE_NAMES = _module_names()
MODULES_WITH_ALL = [name for name in MODULE_NAMES if hasattr(importlib.import_module(name), "__all__")]


def _ruf022_key(name: str) -> tuple[int, list[tuple[int, int | str]]]:
    """ruff RUF022's isort-style order: SCREAMING_CASE, then CamelCase, then the rest; natural
    sort within each group (digit runs compare as numbers)."""
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]
    return group, natural


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


# --- (a) __all__ -------------------------------------------------------------------------------


def test_walk_finds_the_packages_public_modules() -> None:
    # Guards the parametrised tests below against walking nothing.
    for expected in ("fedface.common.config", "fedface.common.models", "fedface.common.data.splits", "fedface.simulations.cli"):
        assert expected in MODULES_WITH_ALL


@pytest.mark.parametrize("name", MODULES_WITH_ALL)
def test_dunder_all_names_exist(name: str) -> None:
    module = _module(name)

    missing = [n for n in module.__all__ if not hasattr(module, n)]

    assert missing == []


@pytest.mark.parametrize("name", MODULES_WITH_ALL)
def test_dunder_all_has_no_duplicates_and_only_strings(name: str) -> None:
    exported = list(_module(name).__all__)

    assert all(isinstance(n, str) for n in exported)
    assert len(exported) == len(set(exported))


@pytest.mark.parametrize("name", MODULES_WITH_ALL)
def test_dunder_all_is_isort_style_sorted(name: str) -> None:
    exported = list(_module(name).__all__)

    assert exported == sorted(exported, key=_ruf022_key)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["b", "A", "C_D", "Ab", "a"], ["C_D", "A", "Ab", "a", "b"]),
        (["x10", "x2", "X1"], ["X1", "x2", "x10"]),
        (["EXIT_CODES", "ConfigError", "CheckpointError"], ["EXIT_CODES", "CheckpointError", "ConfigError"]),
    ],
)
def test_ruf022_key_orders_like_ruff(names: list[str], expected: list[str]) -> None:
    assert sorted(names, key=_ruf022_key) == expected


# --- (b) dependency rule -----------------------------------------------------------------------

FORBIDDEN = {
    "common": ("fedface.client", "fedface.server", "fedface.simulations"),
    "client": ("fedface.server", "fedface.simulations"),
    "server": ("fedface.client", "fedface.simulations"),
}


def _package_of(path: Path) -> list[str]:
    """Package of a source file as parts, e.g. common/data/splits.py -> fedface, common, data."""
    return ["fedface", *path.relative_to(REPO_ROOT).parent.parts]


def _imports(path: Path) -> set[str]:
    """Every absolute module an import statement in ``path`` names (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path)
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            # `from fedface import server` imports fedface.server
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def _violations(folder: str) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in _sources(folder):
        hits = sorted(
            imp
            for imp in _imports(path)
            for banned in FORBIDDEN[folder]
            if imp == banned or imp.startswith(banned + ".")
        )
        if hits:
            bad[str(path.relative_to(REPO_ROOT))] = hits
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_dependency_rule_holds(folder: str) -> None:
    # Arrange
    assert _sources(folder), f"no Python files under {folder}/"

    # Act
    bad = _violations(folder)

    # Assert
    assert bad == {}


def test_dependency_checker_sees_relative_and_from_package_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: a fake checkout whose common/ breaks the rule three ways
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
    (tmp_path / "common" / "sub").mkdir(parents=True)
    (tmp_path / "common" / "sub" / "a.py").write_text(
        "from ...server import x\n"
        "def f():\n    from fedface import client\n"
        "import fedface.simulations.cli as cli\n"
    )

    # Act
    bad = _violations("common")

    # Assert
    assert bad == {
        "common/sub/a.py": ["fedface.client", "fedface.server", "fedface.server.x", "fedface.simulations.cli"]
    }


# --- packaging ---------------------------------------------------------------------------------


def test_pyproject_lists_every_subpackage_so_wheels_hold_them() -> None:
    # Arrange
    setuptools_cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    top_level = {name for name in ROOT_PACKAGES if name.count(".") == 1}
    on_disk = {
        ".".join([package, *init.parent.relative_to(REPO_ROOT / folder).parts])
        for package, folder in setuptools_cfg["package-dir"].items()
        if package in top_level
        for init in (REPO_ROOT / folder).rglob("__init__.py")
    }

    # Act
    missing = sorted(on_disk - set(setuptools_cfg["packages"]))

    # Assert
    assert on_disk, "no packages found on disk"
    assert missing == []
