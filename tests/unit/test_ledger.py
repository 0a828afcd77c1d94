"""Unit tests for fedface.common.privacy.ledger: golden spend across runs and restarts, budget
refusal, append-only triggers, tamper evidence, foreign files and concurrent charging."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import threading
import warnings
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedface.common.errors import BudgetExhaustedError, ConfigError, LedgerError
from fedface.common.privacy.accounting import Mechanism, calibrate_noise, compute_epsilon
from fedface.common.privacy.ledger import LEDGER_ENV, PrivacyLedger, default_ledger_path

DELTA = 1e-5
DATASET = "/data/orl"
# (run_id, round, sigma, q, steps): two runs, several rounds; distinct (sigma, q) per session
# so that Opacus sees exactly the history fedface composes.
SESSIONS = [
    ("run-a", 1, 1.2, 0.05, 60),
    ("run-a", 2, 1.0, 0.04, 40),
    ("run-a", 3, 1.5, 0.10, 30),
    ("run-b", 1, 0.9, 0.05, 50),
]


def _mech(sigma: float, q: float, steps: int, accountant: str = "rdp", delta: float = DELTA) -> Mechanism:
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=1.0,
        delta=delta,
        accountant=accountant,  # type: ignore[arg-type]
    )


def _opacus_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of a fresh Opacus accountant, independently of fedface."""
    acct = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acct.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acct.get_epsilon(delta=delta))


def _charge_all(ledger: PrivacyLedger, accountant: str = "rdp") -> list[tuple[float, float, int]]:
    for run_id, rnd, sigma, q, steps in SESSIONS:
        ledger.charge(DATASET, _mech(sigma, q, steps, accountant), run_id=run_id, round=rnd, examples=400)
    return [(sigma, q, steps) for _, _, sigma, q, steps in SESSIONS]


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "ledger.sqlite"


@pytest.fixture(scope="module")
def charged_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed ledger file with a budget and the four SESSIONS (copy it before changing it)."""
    file = tmp_path_factory.mktemp("charged") / "ledger.sqlite"
    with PrivacyLedger(file) as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA)
        _charge_all(ledger)
        ledger.verify()
    return file


# --- golden spend ------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_spend_across_runs_and_rounds_equals_opacus_and_survives_restart(path: Path, accountant: str) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA, accountant=accountant)  # type: ignore[arg-type]
        history = _charge_all(ledger, accountant)
        expected = _opacus_epsilon(accountant, history)

        # Act: the same object, a second object on the same file, and (below) after a restart
        live = ledger.spend(DATASET)
        with PrivacyLedger(path) as second:
            from_second = second.spend(DATASET).epsilon
    with PrivacyLedger(path) as reopened:
        after_restart = reopened.spend(DATASET)

    # Assert
    assert live.epsilon == pytest.approx(expected, abs=1e-6)
    assert from_second == pytest.approx(expected, abs=1e-6)
    assert after_restart.epsilon == pytest.approx(expected, abs=1e-6)
    assert (after_restart.sessions, after_restart.steps) == (4, 180)
    assert (after_restart.accountant, after_restart.delta) == (accountant, DELTA)


def test_charge_records_the_running_total_after_each_session(path: Path) -> None:
    # Arrange / Act
    with PrivacyLedger(path) as ledger:
        history = _charge_all(ledger)
        sessions = ledger.sessions(DATASET)

    # Assert
    assert [s.epsilon_after for s in sessions] == pytest.approx(
        [_opacus_epsilon("rdp", history[: i + 1]) for i in range(len(history))], abs=1e-9
    )
    assert [(s.run_id, s.round) for s in sessions] == [(r, n) for r, n, *_ in SESSIONS]
    assert [s.mechanism.history_entry() for s in sessions] == history
    assert all(s.epsilon_accountant == "rdp" and s.epsilon_delta == DELTA for s in sessions)


def test_charge_seen_by_a_second_ledger_object_on_the_same_file(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as writer, PrivacyLedger(path) as reader:
        before = reader.spend(DATASET).epsilon

        # Act
        writer.charge(DATASET, _mech(1.0, 0.01, 1000), run_id="r", examples=100)
        after = reader.spend(DATASET).epsilon

    # Assert
    assert before == 0.0
    assert after == pytest.approx(_opacus_epsilon("rdp", [(1.0, 0.01, 1000)]), abs=1e-9)


def test_spend_without_budget_uses_rdp_at_the_smallest_recorded_delta(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.charge(DATASET, _mech(1.0, 0.05, 100, "prv", delta=1e-5), run_id="r", examples=10)
        ledger.charge(DATASET, _mech(1.3, 0.05, 100, "rdp", delta=1e-6), run_id="r", examples=10)

        # Act
        spend = ledger.spend(DATASET)

    # Assert
    assert (spend.accountant, spend.delta, spend.budget, spend.remaining) == ("rdp", 1e-6, None, None)
    assert spend.epsilon == pytest.approx(_opacus_epsilon("rdp", [(1.0, 0.05, 100), (1.3, 0.05, 100)], 1e-6), abs=1e-9)


def test_spend_of_unknown_dataset_is_zero_without_delta(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        spend = ledger.spend("nowhere")

    assert (spend.epsilon, spend.delta, spend.sessions, spend.budget) == (0.0, None, 0, None)


def test_preview_gives_the_charge_epsilon_and_writes_nothing(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=10.0, delta=DELTA)
        ledger.charge(DATASET, _mech(1.0, 0.02, 200), run_id="r", examples=50)
        mech = _mech(1.1, 0.03, 150)

        # Act
        previewed = ledger.preview(DATASET, mech)
        count = len(ledger.sessions())
        charged = ledger.charge(DATASET, mech, run_id="r", examples=50)

    # Assert
    assert count == 1
    assert previewed == charged.epsilon_after


# --- budgets -----------------------------------------------------------------------------------


def test_charge_over_budget_raises_and_leaves_the_ledger_unchanged(path: Path) -> None:
    # Arrange: a budget that one session fits and two do not
    one = _opacus_epsilon("rdp", [(1.0, 0.01, 1000)])
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=one * 1.2, delta=DELTA)
        ledger.charge(DATASET, _mech(1.0, 0.01, 1000), run_id="r", round=1, examples=100)
        before = ledger.sessions()

        # Act
        with pytest.raises(BudgetExhaustedError) as caught:
            ledger.charge(DATASET, _mech(1.0, 0.01, 1000), run_id="r", round=2, examples=100)
        after = ledger.sessions()
        ledger.verify()

    # Assert
    message = str(caught.value)
    assert after == before
    assert "budget exhausted" in message
    assert repr(DATASET) in message
    assert "spent epsilon 2.102" in message and "remaining 0.420" in message and "budget 2.52164" in message
    assert "\n" not in message
    assert caught.value.exit_code == 10


def test_session_calibrated_to_the_remaining_budget_is_accepted(path: Path) -> None:
    # Arrange: calibrate the next session against the data set's history so the total lands
    # on the budget, as a private `fedface train` does
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=4.0, delta=DELTA)
        ledger.charge(DATASET, _mech(1.2, 0.02, 300), run_id="r", round=1, examples=100)
        sigma = calibrate_noise(
            target_epsilon=4.0, delta=DELTA, sample_rate=0.02, steps=400, accountant="rdp", prior=ledger.history(DATASET)
        )

        # Act
        session = ledger.charge(DATASET, _mech(sigma, 0.02, 400), run_id="r", round=2, examples=100)
        spend = ledger.spend(DATASET)

    # Assert
    assert 4.0 * (1 - 2e-3) <= session.epsilon_after <= 4.0
    assert spend.epsilon == session.epsilon_after
    assert spend.remaining == pytest.approx(4.0 - spend.epsilon)


def test_set_budget_latest_applies_and_earlier_ones_stay_recorded(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=8.0, delta=DELTA)

        # Act
        latest = ledger.set_budget(DATASET, epsilon=3.0, delta=1e-6, accountant="prv")
        budget = ledger.budget(DATASET)
    rows = _raw(path).execute("SELECT epsilon FROM budgets ORDER BY id").fetchall()

    # Assert
    assert budget == latest
    assert (budget.epsilon, budget.delta, budget.accountant) == (3.0, 1e-6, "prv")
    assert rows == [(8.0,), (3.0,)]


@pytest.mark.parametrize(
    ("epsilon", "delta", "accountant", "match"),
    [
        (0.0, DELTA, "rdp", "budget epsilon must be"),
        (float("inf"), DELTA, "rdp", "budget epsilon must be"),
        (1.0, 1.0, "rdp", "budget delta must be"),
        (1.0, DELTA, "gdp", "accountant must be one of"),
    ],
)
def test_set_budget_out_of_range_raises_config_error(
    path: Path, epsilon: float, delta: float, accountant: str, match: str
) -> None:
    with PrivacyLedger(path) as ledger, pytest.raises(ConfigError, match=match):
        ledger.set_budget(DATASET, epsilon=epsilon, delta=delta, accountant=accountant)  # type: ignore[arg-type]


def test_datasets_lists_budgeted_and_charged_sets_sorted(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.charge("yale", _mech(1.0, 0.1, 10), run_id="r", examples=10)
        ledger.set_budget("att", epsilon=1.0, delta=DELTA)
        ledger.charge("orl", _mech(1.0, 0.1, 10), run_id="r", examples=10)

        # Act
        names = ledger.datasets()
        orl_only = [s.dataset for s in ledger.sessions("orl")]

    # Assert
    assert names == ["att", "orl", "yale"]
    assert orl_only == ["orl"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"run_id": "", "examples": 1}, "run_id"),
        ({"run_id": "r", "examples": -1}, "examples"),
        ({"run_id": "r", "examples": 1, "round": -2}, "round"),
    ],
)
def test_charge_bad_arguments_raise_config_error(path: Path, kwargs: dict[str, object], match: str) -> None:
    with PrivacyLedger(path) as ledger, pytest.raises(ConfigError, match=match):
        ledger.charge(DATASET, _mech(1.0, 0.1, 10), **kwargs)  # type: ignore[arg-type]


# --- append-only and tamper evidence -----------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE sessions SET steps = 1",
        "DELETE FROM sessions",
        "UPDATE budgets SET epsilon = 100",
        "DELETE FROM budgets",
        "UPDATE meta SET value = '0'",
        "DELETE FROM meta",
    ],
)
def test_raw_update_or_delete_is_refused(path: Path, statement: str) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=9.0, delta=DELTA)
        ledger.charge(DATASET, _mech(1.0, 0.1, 10), run_id="r", examples=10)
    conn = _raw(path)

    # Act / Assert
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(statement)
    conn.close()


def _drop_triggers(conn: sqlite3.Connection) -> None:
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        ("UPDATE sessions SET steps = 1 WHERE id = 2", "sessions row 2 was altered"),
        ("UPDATE sessions SET epsilon_after = 0.1 WHERE id = 3", "sessions row 3 was altered"),
        ("DELETE FROM sessions WHERE id = 2", "sessions row 2 is missing"),
        ("DELETE FROM sessions WHERE id = 4", "sessions rows after id 3 were removed"),
        ("UPDATE budgets SET epsilon = 100 WHERE id = 1", "budgets row 1 was altered"),
    ],
)
def test_verify_detects_tampering_after_triggers_were_dropped(
    charged_file: Path, tmp_path: Path, tamper: str, match: str
) -> None:
    # Arrange
    path = Path(shutil.copy(charged_file, tmp_path / "ledger.sqlite"))
    conn = _raw(path)
    _drop_triggers(conn)
    conn.execute(tamper)
    conn.close()

    # Act / Assert
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerError, match=match):
        ledger.verify()


def test_verify_reports_dropped_triggers(path: Path) -> None:
    # Arrange
    PrivacyLedger(path).close()
    conn = _raw(path)
    conn.execute("DROP TRIGGER sessions_no_delete")
    conn.close()

    # Act / Assert: opening does not quietly re-create it; verify reports it
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerError, match="triggers sessions_no_delete were removed"):
        ledger.verify()


# --- foreign and missing files -----------------------------------------------------------------


def test_open_non_sqlite_file_raises_ledger_error(path: Path) -> None:
    # Arrange
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database, just some bytes\n" * 50)

    # Act / Assert
    with pytest.raises(LedgerError, match="not an SQLite file"):
        PrivacyLedger(path)
    assert path.read_bytes().startswith(b"this is not a database")


def test_open_other_sqlite_database_raises_ledger_error(path: Path) -> None:
    # Arrange
    path.parent.mkdir(parents=True)
    conn = _raw(path)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()

    # Act / Assert
    with pytest.raises(LedgerError, match="not a fedface privacy ledger"):
        PrivacyLedger(path)


def test_open_ledger_of_newer_schema_raises_ledger_error(path: Path) -> None:
    # Arrange
    path.parent.mkdir(parents=True)
    conn = _raw(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("application", "fedface-privacy-ledger"), ("schema_version", "99")])
    conn.close()

    # Act / Assert
    with pytest.raises(LedgerError, match="schema version 99, newer"):
        PrivacyLedger(path)


def test_open_missing_file_without_create_raises_and_creates_nothing(path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger at"):
        PrivacyLedger(path, create=False)

    assert not path.parent.exists()


def test_default_ledger_path_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Arrange
    monkeypatch.setenv(LEDGER_ENV, str(tmp_path / "mine.sqlite"))
    from_env = default_ledger_path()
    monkeypatch.delenv(LEDGER_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))

    # Act
    fallback = default_ledger_path()

    # Assert
    assert from_env == tmp_path / "mine.sqlite"
    assert fallback == tmp_path / ".fedface" / "privacy-ledger.sqlite"


# --- concurrency -------------------------------------------------------------------------------

RACE_MECH = (1.0, 0.02, 100)
RACE_ALLOWED = 5


def _race_budget() -> float:
    """An epsilon between that of RACE_ALLOWED sessions and of one more."""
    fits = compute_epsilon([RACE_MECH] * RACE_ALLOWED, delta=DELTA, accountant="rdp")
    over = compute_epsilon([RACE_MECH] * (RACE_ALLOWED + 1), delta=DELTA, accountant="rdp")
    return (fits + over) / 2


def _charge_until_refused(path: str, worker: int, barrier: object, results: object) -> None:
    """Child process: open the ledger, wait for the other worker, then charge RACE_ALLOWED times."""
    accepted = refused = 0
    with PrivacyLedger(path) as ledger:
        barrier.wait()  # type: ignore[attr-defined]
        for i in range(RACE_ALLOWED):
            try:
                ledger.charge(DATASET, _mech(*RACE_MECH), run_id=f"worker-{worker}", round=i, examples=10)
                accepted += 1
            except BudgetExhaustedError:
                refused += 1
    results.put((accepted, refused))  # type: ignore[attr-defined]


def test_threads_charging_concurrently_never_pass_the_budget(path: Path) -> None:
    # Arrange
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=_race_budget(), delta=DELTA)
    outcomes: list[bool] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        with PrivacyLedger(path) as own:
            barrier.wait()
            for i in range(RACE_ALLOWED):
                try:
                    own.charge(DATASET, _mech(*RACE_MECH), run_id=threading.current_thread().name, round=i, examples=1)
                    outcomes.append(True)
                except BudgetExhaustedError:
                    outcomes.append(False)

    threads = [threading.Thread(target=worker) for _ in range(3)]

    # Act
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    with PrivacyLedger(path) as ledger:
        ledger.verify()
        assert len(ledger.sessions(DATASET)) == RACE_ALLOWED
    assert outcomes.count(True) == RACE_ALLOWED
    assert outcomes.count(False) == 2 * RACE_ALLOWED  # every other attempt refused, none failed


@pytest.mark.integration
def test_two_processes_charging_concurrently_record_exactly_the_sessions_the_budget_allows(path: Path) -> None:
    # Arrange: a budget for RACE_ALLOWED sessions; each worker tries RACE_ALLOWED
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=_race_budget(), delta=DELTA)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [ctx.Process(target=_charge_until_refused, args=(str(path), i, barrier, results)) for i in range(2)]

    # Act
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)

    # Assert
    assert [w.exitcode for w in workers] == [0, 0]
    assert sum(accepted for accepted, _ in outcomes) == RACE_ALLOWED
    assert sum(refused for _, refused in outcomes) == RACE_ALLOWED
    with PrivacyLedger(path) as ledger:
        ledger.verify()
        assert len(ledger.sessions(DATASET)) == RACE_ALLOWED
        assert ledger.spend(DATASET).epsilon <= _race_budget()
