"""`fedface privacy status` and `fedface privacy budget` end to end on real ledger files."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedface.common.privacy.accounting import Mechanism
from fedface.common.privacy.ledger import LEDGER_ENV, PrivacyLedger
from fedface.simulations.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()
DELTA = 1e-5


def _mech(sigma: float, q: float, steps: int) -> Mechanism:
    return Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=DELTA, accountant="rdp")


def _last_json(stdout: str) -> dict[str, object]:
    return json.loads(stdout.strip().splitlines()[-1])


def _rows(stdout: str) -> dict[str, dict[str, object]]:
    return {row["dataset"]: row for row in _last_json(stdout)["datasets"]}  # type: ignore[index, union-attr]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger with a budgeted data set (two runs charged) and one without a budget."""
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.set_budget("orl", epsilon=8.0, delta=DELTA)
        ledger.charge("orl", _mech(1.0, 0.01, 1000), run_id="run-a", round=1, examples=200)
        ledger.charge("orl", _mech(1.2, 0.02, 300), run_id="run-b", round=1, examples=200)
        ledger.charge("yale", _mech(1.0, 0.01, 1000), run_id="run-a", examples=150)
    return path


def test_status_json_shows_the_ledgers_spend_and_state(ledger_path: Path) -> None:
    # Arrange
    with PrivacyLedger(ledger_path) as ledger:
        orl, yale = ledger.spend("orl"), ledger.spend("yale")

    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path), "--format", "json"])

    # Assert
    assert result.exit_code == 0, result.stderr
    payload = _last_json(result.stdout)
    rows = _rows(result.stdout)
    assert payload["ledger"] == str(ledger_path)
    assert list(rows) == ["orl", "yale"]
    assert rows["orl"]["epsilon"] == orl.epsilon
    assert rows["orl"] | {"epsilon": None, "epsilon_display": None, "remaining": None, "remaining_display": None} == {
        "dataset": "orl",
        "sessions": 2,
        "steps": 1300,
        "epsilon": None,
        "epsilon_display": None,
        "delta": DELTA,
        "accountant": "rdp",
        "budget_epsilon": 8.0,
        "remaining": None,
        "remaining_display": None,
        "state": "ok",
    }
    assert rows["orl"]["remaining"] == pytest.approx(8.0 - orl.epsilon)
    assert (rows["yale"]["epsilon"], rows["yale"]["budget_epsilon"], rows["yale"]["remaining"]) == (yale.epsilon, None, None)
    assert rows["yale"]["state"] == "no budget set"


def test_status_epsilon_display_is_rounded_up_and_remaining_down(ledger_path: Path) -> None:
    # Arrange: yale's epsilon, 2.10136..., would round to nearest as 2.101
    with PrivacyLedger(ledger_path) as ledger:
        eps = ledger.spend("yale").epsilon
        remaining = ledger.spend("orl").remaining
    assert f"{eps:.3f}" == "2.101"

    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path), "--format", "json"])

    # Assert
    rows = _rows(result.stdout)
    assert rows["yale"]["epsilon_display"] == "2.102"
    assert float(rows["yale"]["epsilon_display"]) >= eps  # type: ignore[arg-type]
    assert remaining is not None
    assert float(rows["orl"]["remaining_display"]) <= remaining  # type: ignore[arg-type]


def test_status_dataset_filter_shows_one_data_set(ledger_path: Path) -> None:
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path), "--dataset", "yale", "--format", "json"])

    assert result.exit_code == 0, result.stderr
    assert list(_rows(result.stdout)) == ["yale"]


def test_status_unknown_dataset_exits_3_naming_the_known_ones(ledger_path: Path) -> None:
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path), "--dataset", "att"])

    assert result.exit_code == 3
    assert result.stderr == (
        f"ConfigError: --dataset 'att' is not in privacy ledger {ledger_path} (data sets: 'orl', 'yale')\n"
    )


def test_status_text_prints_a_table_with_each_data_set_and_state(ledger_path: Path) -> None:
    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path)])

    # Assert
    assert result.exit_code == 0, result.stderr
    assert "orl" in result.stdout and "yale" in result.stdout
    assert "ok" in result.stdout and "no budget set" in result.stdout
    assert "2.102" in result.stdout


def test_status_missing_ledger_exits_11_with_one_line_and_creates_no_file(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "nowhere" / "ledger.sqlite"

    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(path)])

    # Assert
    assert result.exit_code == 11
    assert result.stderr == (
        f"LedgerError: no privacy ledger exists at {path}: create one with `fedface privacy budget --dataset NAME "
        f"--epsilon E --delta D` or a private `fedface train`, or point --ledger / {LEDGER_ENV} at it\n"
    )
    assert not path.parent.exists()


def test_status_reads_the_ledger_named_by_the_environment(ledger_path: Path) -> None:
    result = runner.invoke(app, ["privacy", "status", "--format", "json"], env={LEDGER_ENV: str(ledger_path)})

    assert result.exit_code == 0, result.stderr
    assert _last_json(result.stdout)["ledger"] == str(ledger_path)


def test_status_tampered_ledger_exits_11(ledger_path: Path) -> None:
    # Arrange
    conn = sqlite3.connect(ledger_path, isolation_level=None)
    conn.execute("DROP TRIGGER sessions_no_update")
    conn.execute("UPDATE sessions SET steps = 1 WHERE id = 1")
    conn.close()

    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger_path)])

    # Assert
    assert result.exit_code == 11
    assert result.stderr.startswith("LedgerError: privacy ledger ")
    assert "sessions row 1 was altered" in result.stderr
    assert result.stderr.count("\n") == 1


def test_budget_then_status_shows_the_new_budget(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "site" / "ledger.sqlite"

    # Act
    set_result = runner.invoke(
        app,
        ["privacy", "budget", "--ledger", str(path), "--dataset", "orl", "--epsilon", "3", "--delta", "1e-6",
         "--accountant", "prv", "--format", "json"],
    )
    status_result = runner.invoke(app, ["privacy", "status", "--ledger", str(path), "--format", "json"])

    # Assert
    assert set_result.exit_code == 0, set_result.stderr
    assert status_result.exit_code == 0, status_result.stderr
    assert _rows(set_result.stdout) == _rows(status_result.stdout)
    row = _rows(status_result.stdout)["orl"]
    assert (row["budget_epsilon"], row["delta"], row["accountant"], row["state"]) == (3.0, 1e-6, "prv", "ok")
    assert (row["epsilon"], row["remaining"], row["sessions"]) == (0.0, 3.0, 0)


def test_budget_below_the_spend_marks_the_data_set_exhausted(ledger_path: Path) -> None:
    # Act
    result = runner.invoke(
        app, ["privacy", "budget", "--ledger", str(ledger_path), "--dataset", "orl", "--epsilon", "1", "--delta", "1e-5",
              "--format", "json"]
    )

    # Assert
    assert result.exit_code == 0, result.stderr
    row = _rows(result.stdout)["orl"]
    assert (row["state"], row["remaining"], row["remaining_display"]) == ("budget exhausted", 0.0, "0.000")
    assert "further private training on it will be refused" in result.stderr


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        ("-1", "1e-5", "--epsilon must be a finite number > 0, got -1.0"),
        ("inf", "1e-5", "--epsilon must be a finite number > 0, got inf"),
        ("2", "1", "--delta must be in (0, 1), got 1.0"),
        ("0", "0", "--epsilon must be a finite number > 0, got 0.0; --delta must be in (0, 1), got 0.0"),
    ],
)
def test_budget_out_of_range_exits_3_with_one_line_and_writes_nothing(
    tmp_path: Path, epsilon: str, delta: str, message: str
) -> None:
    # Arrange
    path = tmp_path / "ledger.sqlite"

    # Act
    result = runner.invoke(
        app, ["privacy", "budget", "--ledger", str(path), "--dataset", "orl", "--epsilon", epsilon, "--delta", delta]
    )

    # Assert
    assert result.exit_code == 3
    assert result.stderr == f"ConfigError: {message}\n"
    assert not path.exists()


def test_budget_unknown_accountant_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["privacy", "budget", "--ledger", str(tmp_path / "l.sqlite"), "--dataset", "orl", "--epsilon", "1",
         "--delta", "1e-5", "--accountant", "gdp"],
    )

    assert result.exit_code == 2
    assert "expected rdp or prv, got 'gdp'" in result.stderr


def test_budget_on_a_non_ledger_file_exits_11(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "notes.txt"
    path.write_text("not a ledger\n" * 10)

    # Act
    result = runner.invoke(
        app, ["privacy", "budget", "--ledger", str(path), "--dataset", "orl", "--epsilon", "1", "--delta", "1e-5"]
    )

    # Assert
    assert result.exit_code == 11
    assert result.stderr.startswith(f"LedgerError: {path} is not a fedface privacy ledger")
    assert result.stderr.count("\n") == 1
    assert path.read_text() == "not a ledger\n" * 10


def test_status_json_epsilon_of_a_noiseless_session_is_infinite(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.charge("orl", _mech(0.0, 0.1, 5), run_id="r", examples=10)

    # Act
    result = runner.invoke(app, ["privacy", "status", "--ledger", str(path), "--format", "json"])

    # Assert
    row = _rows(result.stdout)["orl"]
    assert math.isinf(row["epsilon"])  # type: ignore[arg-type]
    assert row["epsilon_display"] == "inf"
