"""Unit tests for fedface.server.store: a run's lifecycle and every query, refusals, the latest
spend per site, resume, persistence, append-only triggers, foreign files and a reader beside an
open write transaction."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedface.common.errors import ConfigError, RunDirError
from fedface.server.store import Participation, RoundRecord, RunStore

RUN = "run-2026-05-09"
CONFIG = {"federation": {"sites": 3, "rounds": 3, "secagg": True}, "privacy": {"epsilon": 8.0}}
SITES = ["site-a", "site-b", "site-c"]
# Floats that a rounding store would change: they must come back bit for bit.
EPS_A1 = 0.1 + 0.2  # 0.30000000000000004
EPS_A2 = 1.2345678901234567
EPS_A3 = 7.999999999999999
EPS_B1 = 2.0000000000000004
EPS_C1 = 7.9999999999999982


def _reported(site: str, status: str, epsilon: float, budget: float, **kwargs: Any) -> Participation:
    """A participation with privacy figures, as a site reports them."""
    figures: dict[str, Any] = {"delta": 1e-5, "accountant": "rdp", "budget_epsilon": budget}
    figures.update(epsilon=epsilon, remaining=max(0.0, budget - epsilon), **kwargs)
    return Participation(site, status, **figures)  # type: ignore[arg-type]


def _round(n: int) -> dict[str, Any]:
    """record_round arguments of round ``n`` of the three-site run.

    1: all answer. 2: site-b refuses (budget exhausted), site-c fails. 3: sampled in another
    order; site-c answers without figures, site-b refuses again without figures, site-a answers.
    """
    a = _reported("site-a", "answered", [EPS_A1, EPS_A2, EPS_A3][n - 1], 8.0, examples=40, train_s=1.5 * n)
    participation = {
        1: [
            a,
            _reported("site-b", "answered", EPS_B1, 2.0, accountant="prv", examples=35, train_s=1.25),
            _reported("site-c", "answered", EPS_C1, 8.0, delta=1e-6, examples=50, train_s=2.0),
        ],
        2: [
            a,
            _reported("site-b", "refused", EPS_B1, 2.0, accountant="prv", reason="budget exhausted"),
            Participation("site-c", "failed", reason="timeout after 60 s"),
        ],
        3: [
            Participation("site-c", "answered", examples=50, train_s=2.5),
            Participation("site-b", "refused", reason="budget exhausted"),
            a,
        ],
    }
    return {
        "started_at": f"2026-05-09T10:0{n}:00+00:00",
        "seconds": 10.0 + n / 3,
        "sampled": SITES if n != 3 else ["site-c", "site-b", "site-a"],
        "participation": participation[n],
        "metrics": {"verif_acc": 0.5 + n / 10, "tar_at_far_1e-3": 0.1 * n},
        "checkpoint": f"/runs/{RUN}/round-{n}.pt" if n != 3 else None,
    }


def _start(store: RunStore, run_id: str = RUN, **kwargs: Any) -> None:
    args: dict[str, Any] = {
        "config": CONFIG,
        "sites": 3,
        "rounds": 3,
        "secagg": True,
        "started_at": "2026-05-09T10:00:00+00:00",
    }
    store.start_run(run_id, **{**args, **kwargs})


def _record(store: RunStore, *rounds: int, run_id: str = RUN) -> None:
    for n in rounds:
        store.record_round(run_id, n, **_round(n))


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "server" / "runs.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[RunStore]:
    with RunStore(path) as opened:
        yield opened


@pytest.fixture(scope="module")
def recorded_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed store file holding RUN with round 2 (the triggers keep it unchanged)."""
    file = tmp_path_factory.mktemp("recorded") / "runs.sqlite"
    with RunStore(file) as store:
        _start(store)
        _record(store, 2)
    return file


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunStore]:
    """A store holding RUN started and nothing recorded (for tests that must write nothing)."""
    with RunStore(tmp_path_factory.mktemp("started") / "runs.sqlite") as opened:
        _start(opened)
        yield opened


# --- lifecycle and queries ---------------------------------------------------------------------


def test_full_lifecycle_and_every_query(store: RunStore) -> None:
    # Arrange / Act
    _start(store)
    running = store.run(RUN)
    _record(store, 1, 2, 3)
    store.finish_run(RUN, status="completed")

    # Assert: the run
    assert (running.status, running.rounds_done, running.finished_at) == ("running", 0, None)
    (summary,) = store.runs()
    assert summary == store.run(RUN)
    assert (summary.run_id, summary.status, summary.error) == (RUN, "completed", None)
    assert (summary.sites, summary.rounds_planned, summary.rounds_done, summary.secagg) == (3, 3, 3, True)
    assert summary.config == CONFIG
    assert summary.started_at == "2026-05-09T10:00:00.000000+00:00"
    assert summary.finished_at is not None and summary.finished_at.endswith("+00:00")

    # Assert: the rounds, exactly as given
    rounds = store.rounds(RUN)
    expected = [
        RoundRecord(
            round=n,
            started_at=f"2026-05-09T10:0{n}:00.000000+00:00",
            seconds=_round(n)["seconds"],
            sampled=_round(n)["sampled"],
            participation=_round(n)["participation"],
            metrics=_round(n)["metrics"],
            checkpoint=_round(n)["checkpoint"],
        )
        for n in (1, 2, 3)
    ]
    assert rounds == expected
    counts = [(r.answered, r.refused, r.failed, r.unreported) for r in rounds]
    assert counts == [(3, 0, 0, []), (1, 1, 1, []), (2, 1, 0, [])]
    assert rounds[0].participation[0].epsilon == EPS_A1 and rounds[2].participation[2].epsilon == EPS_A3

    # Assert: the other queries
    assert store.metric_series(RUN, "verif_acc") == [(n, 0.5 + n / 10) for n in (1, 2, 3)]
    assert store.metric_series(RUN, "no-such-metric") == []
    assert [(n, p.site) for n, p in store.refusals(RUN)] == [(2, "site-b"), (3, "site-b")]
    assert store.last_checkpoint(RUN) == (2, f"/runs/{RUN}/round-2.pt")
    assert [(e.event, e.round) for e in store.events(RUN)] == [("started", 0), ("completed", 3)]


def test_refusal_for_exhausted_budget_is_recorded_and_the_round_goes_on(store: RunStore) -> None:
    # Arrange
    _start(store)
    refusal = _reported("site-b", "refused", 2.0, 2.0, reason="budget exhausted")
    answers = [Participation("site-a", "answered", examples=10), Participation("site-c", "answered", examples=12)]

    # Act
    store.record_round(
        RUN,
        1,
        started_at="2026-05-09T10:01:00Z",
        seconds=3.0,
        sampled=SITES,
        participation=[answers[0], refusal, answers[1]],
        metrics={"verif_acc": 0.7},
    )

    # Assert
    assert store.refusals(RUN) == [(1, refusal)]
    (record,) = store.rounds(RUN)
    assert (record.answered, record.refused, record.failed) == (2, 1, 0)
    assert store.site_spend(RUN)["site-b"].remaining == 0.0


def test_site_spend_takes_each_sites_latest_reported_figures(store: RunStore) -> None:
    # Arrange
    _start(store)
    _record(store, 1, 2, 3)

    # Act
    spend = store.site_spend(RUN)

    # Assert: site-a from round 3; site-b from its round-2 refusal (round 3 reported nothing);
    # site-c from round 1 (it failed in 2 and reported no epsilon in 3)
    assert list(spend) == ["site-a", "site-b", "site-c"]
    a, b, c = spend["site-a"], spend["site-b"], spend["site-c"]
    assert (a.round, a.status, a.epsilon, a.remaining) == (3, "answered", EPS_A3, 8.0 - EPS_A3)
    assert (b.round, b.status, b.epsilon, b.accountant, b.budget_epsilon) == (2, "refused", EPS_B1, "prv", 2.0)
    assert (c.round, c.epsilon, c.delta, c.accountant) == (1, EPS_C1, 1e-6, "rdp")


def test_nan_metric_round_trips_and_offsets_become_utc(store: RunStore) -> None:
    # Arrange
    _start(store, started_at="2026-05-09T12:00:00+02:00")

    # Act
    store.record_round(
        RUN,
        1,
        started_at="2026-05-09T12:00:30.5+02:00",
        seconds=0.0,
        sampled=["site-a"],
        participation=[],
        metrics={"tar": math.nan, "inf": math.inf},
    )

    # Assert
    assert store.run(RUN).started_at == "2026-05-09T10:00:00.000000+00:00"
    (record,) = store.rounds(RUN)
    assert record.started_at == "2026-05-09T10:00:30.500000+00:00"
    assert math.isnan(record.metrics["tar"]) and record.metrics["inf"] == math.inf
    assert record.unreported == ["site-a"]


# --- refusing bad writes -----------------------------------------------------------------------


def test_duplicate_round_raises_config_error_and_keeps_the_first(store: RunStore) -> None:
    # Arrange
    _start(store)
    _record(store, 1)

    # Act / Assert
    with pytest.raises(ConfigError, match=rf"round 1 of run '{RUN}' is already recorded") as info:
        store.record_round(RUN, 1, **{**_round(1), "metrics": {"verif_acc": 0.0}})
    assert "\n" not in str(info.value)
    assert store.rounds(RUN)[0].metrics == _round(1)["metrics"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sampled": ["site-a", "site-a"]}, "sampled names sites 'site-a' more than once"),
        ({"participation": [Participation("site-z", "answered")]}, "site 'site-z'.*was not sampled"),
        ({"participation": [Participation("site-a", "refused")]}, "a refusal needs a reason"),
        ({"participation": [Participation("site-a", "gone")]}, "status must be one of"),  # type: ignore[arg-type]
        ({"participation": [Participation("site-a", "answered", epsilon=math.nan)]}, "epsilon must be a number"),
        ({"participation": [Participation("site-a", "answered")] * 2}, "'site-a' more than once"),
        ({"seconds": -1.0, "started_at": "yesterday"}, "started_at must be an ISO-8601.*seconds must be"),
        ({"started_at": "2026-05-09T10:00:00"}, "must carry a UTC offset"),
        ({"metrics": {"acc": "high"}}, "metric 'acc' must be a number"),
    ],
)
def test_malformed_round_raises_config_error_and_writes_nothing(
    started: RunStore, change: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        started.record_round(RUN, 1, **{**_round(1), **change})

    assert started.rounds(RUN) == []


def test_finished_run_refuses_rounds_and_a_second_finish(store: RunStore) -> None:
    # Arrange
    _start(store)
    store.finish_run(RUN, status="stopped")

    # Act / Assert
    with pytest.raises(ConfigError, match="the run is stopped; resume it first"):
        _record(store, 1)
    with pytest.raises(ConfigError, match="already stopped"):
        store.finish_run(RUN, status="completed")
    with pytest.raises(ConfigError, match="status must be one of"):
        store.finish_run(RUN, status="running")  # type: ignore[arg-type]


def test_starting_an_existing_run_raises_run_dir_error(store: RunStore) -> None:
    _start(store)

    with pytest.raises(RunDirError, match=rf"run '{RUN}' already exists.*choose another run id or resume it"):
        _start(store)


def test_unknown_run_raises_run_dir_error(store: RunStore) -> None:
    # Arrange
    _start(store)
    calls = {
        "run": lambda: store.run("nope"),
        "rounds": lambda: store.rounds("nope"),
        "metric_series": lambda: store.metric_series("nope", "verif_acc"),
        "site_spend": lambda: store.site_spend("nope"),
        "refusals": lambda: store.refusals("nope"),
        "last_checkpoint": lambda: store.last_checkpoint("nope"),
        "events": lambda: store.events("nope"),
        "resume_run": lambda: store.resume_run("nope"),
        "finish_run": lambda: store.finish_run("nope", status="failed"),
        "record_round": lambda: store.record_round("nope", 1, **_round(1)),
    }

    # Act / Assert
    for name, call in calls.items():
        with pytest.raises(RunDirError, match="no run 'nope' in run store"):
            call()
        assert [r.run_id for r in store.runs()] == [RUN], name


# --- resume and persistence --------------------------------------------------------------------


def test_resume_returns_the_last_round_and_keeps_the_checkpoint(path: Path) -> None:
    # Arrange: a run that failed after round 2 (checkpointed) and round 3 (not)
    with RunStore(path) as store:
        _start(store)
        _record(store, 1, 2, 3)
        store.finish_run(RUN, status="failed", error="CUDA out of memory")

    # Act: after a restart
    with RunStore(path) as store:
        last = store.resume_run(RUN)
        checkpoint = store.last_checkpoint(RUN)
        resumed = store.run(RUN)
        events = store.events(RUN)

    # Assert
    assert last == 3
    assert checkpoint == (2, f"/runs/{RUN}/round-2.pt")
    assert (resumed.status, resumed.finished_at, resumed.error, resumed.rounds_done) == ("running", None, None, 3)
    assert [(e.event, e.round, e.detail) for e in events] == [
        ("started", 0, None),
        ("failed", 3, "CUDA out of memory"),
        ("resumed", 3, None),
    ]


def test_start_run_with_resume_keeps_rounds_and_checks_the_federation(store: RunStore) -> None:
    # Arrange
    _start(store)
    _record(store, 1, 2)
    store.finish_run(RUN, status="stopped")

    # Act
    _start(store, rounds=5, resume=True, config={"changed": True})
    _record(store, 3)

    # Assert
    run = store.run(RUN)
    assert (run.status, run.rounds_planned, run.rounds_done, run.config) == ("running", 5, 3, CONFIG)
    with pytest.raises(ConfigError, match="started with secagg on"):
        _start(store, secagg=False, resume=True)
    with pytest.raises(ConfigError, match="with 2 rounds: it has recorded 3"):
        _start(store, rounds=2, resume=True)
    _start(store, "new-run", resume=True, started_at="2026-05-09T11:00:00Z")  # a missing run is started
    assert [r.run_id for r in store.runs()] == [RUN, "new-run"]


def test_everything_survives_close_and_reopen(path: Path) -> None:
    # Arrange
    with RunStore(path) as store:
        _start(store)
        _record(store, 1, 2)
        before = (store.runs(), store.rounds(RUN), store.site_spend(RUN), store.refusals(RUN))

    # Act
    with RunStore(path, create=False) as reopened:
        after = (reopened.runs(), reopened.rounds(RUN), reopened.site_spend(RUN), reopened.refusals(RUN))

    # Assert
    assert after == before
    assert after[1][1].participation[0].epsilon == EPS_A2


# --- append-only -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "match"),
    [
        ("UPDATE rounds SET seconds = 0", "append-only"),
        ("DELETE FROM rounds", "append-only"),
        ("UPDATE participation SET status = 'answered'", "append-only"),
        ("DELETE FROM participation", "append-only"),
        ("UPDATE metrics SET value = 1", "append-only"),
        ("DELETE FROM sampled", "append-only"),
        ("DELETE FROM events", "append-only"),
        ("UPDATE meta SET value = '0'", "append-only"),
        ("DELETE FROM runs", "runs cannot be deleted"),
        ("UPDATE runs SET config = '{}'", "are fixed"),
    ],
)
def test_raw_update_or_delete_is_refused(recorded_file: Path, statement: str, match: str) -> None:
    # Arrange
    conn = _raw(recorded_file)

    # Act / Assert
    with pytest.raises(sqlite3.IntegrityError, match=match):
        conn.execute(statement)
    conn.close()


# --- foreign and missing files -----------------------------------------------------------------


def test_garbage_file_raises_one_line_run_dir_error(path: Path) -> None:
    # Arrange
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database at all\n" * 40)

    # Act / Assert
    with pytest.raises(RunDirError, match="not an SQLite file") as info:
        RunStore(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes().startswith(b"not a database")


def test_other_sqlite_files_and_newer_schema_raise_run_dir_error(tmp_path: Path) -> None:
    # Arrange
    foreign, ledger, newer = (tmp_path / name for name in ("photos.sqlite", "ledger.sqlite", "newer.sqlite"))
    for file, app, version in ((ledger, "fedface-privacy-ledger", "1"), (newer, "fedface-run-store", "99")):
        conn = _raw(file)
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("application", app), ("schema_version", version)])
        conn.close()
    conn = _raw(foreign)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()

    # Act / Assert
    with pytest.raises(RunDirError, match="not a fedface run store .it has tables photos"):
        RunStore(foreign)
    with pytest.raises(RunDirError, match="'fedface-privacy-ledger'"):
        RunStore(ledger)
    with pytest.raises(RunDirError, match="schema version 99, newer"):
        RunStore(newer)


def test_missing_file_without_create_raises_and_creates_nothing(path: Path) -> None:
    with pytest.raises(RunDirError, match="no run store at"):
        RunStore(path, create=False)

    assert not path.parent.exists()


# --- concurrent reading ------------------------------------------------------------------------


def test_reader_sees_committed_rounds_while_a_writer_holds_its_transaction(path: Path) -> None:
    # Arrange: two rounds committed; a second connection opens a write transaction and inserts
    # round 3 without committing
    with RunStore(path) as writer:
        _start(writer)
        _record(writer, 1, 2)
        conn = _raw(path)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO rounds (run_id, round, started_at, seconds, checkpoint, recorded_at) "
            "VALUES (?, 3, '2026-05-09T10:03:00+00:00', 1.0, NULL, '2026-05-09T10:03:01+00:00')",
            (RUN,),
        )

        # Act: a console opens the store and reads while the transaction is open
        try:
            with RunStore(path, create=False) as reader:
                during = ([r.round for r in reader.rounds(RUN)], reader.run(RUN).rounds_done)
                conn.execute("COMMIT")
                after = [r.round for r in reader.rounds(RUN)]
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    # Assert
    assert during == ([1, 2], 2)
    assert after == [1, 2, 3]
