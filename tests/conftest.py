"""Shared test fixtures: where the real face data lives.

Tests run on real faces from ``../shared/data`` (or ``$FEDFACE_TEST_DATA``). A missing data
directory is an error, not a skip: a suite that silently skips its real-data tests proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("FEDFACE_TEST_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "orl").is_dir():
        pytest.fail(
            f"real face data not found at {root}: set FEDFACE_TEST_DATA to a directory holding "
            "orl/, yalefaces/ and extended_yaleb/ (see ../shared/data/README.md)"
        )
    return root


@pytest.fixture(scope="session")
def orl_root(data_root: Path) -> Path:
    return data_root / "orl"


@pytest.fixture(scope="session")
def yale_a_root(data_root: Path) -> Path:
    return data_root / "yalefaces"


@pytest.fixture(scope="session")
def yaleb_root(data_root: Path) -> Path:
    return data_root / "extended_yaleb"


@pytest.fixture(scope="session")
def ckplus_root(data_root: Path) -> Path:
    return data_root / "ckplus48"


@pytest.fixture(scope="session")
def jaffe_root(data_root: Path) -> Path:
    return data_root / "jaffe"


@pytest.fixture(scope="session")
def fer_root(data_root: Path) -> Path:
    """FER2013's release folder (it holds ``train/``)."""
    return data_root / "fer2013"


@pytest.fixture(scope="session")
def lfw_root(data_root: Path) -> Path:
    return data_root / "lfw_dev"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One torch thread: the suite runs on 2-core machines beside other work; oversubscribed
    OpenMP threads there cost far more than they gain on the small tensors tests use."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _no_home_ledgers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ledgers made before a test's own fixtures run (module-scoped runs) never go to ~/.fedface."""
    root = tmp_path_factory.mktemp("session-ledgers")
    os.environ["FEDFACE_LEDGER"] = str(root / "privacy-ledger.sqlite")
    os.environ["FEDFACE_LEDGER_DIR"] = str(root / "site-ledgers")


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's default privacy ledger is its own temporary file, never ~/.fedface."""
    path = tmp_path_factory.mktemp("ledger") / "privacy-ledger.sqlite"
    monkeypatch.setenv("FEDFACE_LEDGER", str(path))
    # and simulated sites' ledgers (fedface simulate --ledger-dir) go under it too
    monkeypatch.setenv("FEDFACE_LEDGER_DIR", str(path.parent / "site-ledgers"))
    return path



CHROMIUM = os.environ.get("FEDFACE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """The system Chromium (``.ci/run`` installs Debian's) driven by Playwright's sync API, for
    one test module: no ``playwright install`` (it would download a browser). Playwright's sync
    API keeps an asyncio loop running in this thread while it is started, which breaks every
    later ``asyncio.run`` in the session: so it is started per module and stopped after it,
    not once per session (pytest-playwright's ``browser`` fixture is session-wide). Headless as
    root, Playwright adds ``--no-sandbox``. A missing binary is an error, not a skip."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it (`apt-get install chromium fonts-dejavu-core`, as .ci/run does) or set FEDFACE_CHROMIUM")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()
