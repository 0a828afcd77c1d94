"""The server's copy of the sites' ledger receipts (fedface.server.receipts, through the run
store): each receipt is checked on arrival and kept with the problem found; the export for
`fedface privacy verify` keeps the evidence of a rollback and leaves out what no key vouches for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedface.common.privacy.accounting import Mechanism
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.privacy.receipts import issue_receipt, read_receipts, receipt_key
from fedface.server.receipts import export_receipts
from fedface.server.store import Participation, RunStore

MECH = Mechanism(noise_multiplier=2.0, sample_rate=0.5, steps=4, max_grad_norm=1.0, delta=1e-5, accountant="rdp")


def _record(store: RunStore, round_: int, receipts: dict[str, str]) -> None:
    store.record_round(
        "run", round_, started_at="2026-12-01T00:00:00+00:00", seconds=1.0, sampled=sorted(receipts),
        participation=[Participation(site=s, status="answered", examples=10) for s in sorted(receipts)],
        metrics={"verif_acc": 0.8}, receipts=receipts,
    )


def test_each_receipt_is_kept_with_what_the_server_found_and_the_export_keeps_the_evidence(tmp_path: Path) -> None:
    # Arrange: site-a's ledger and key, three charges; a stranger's key; a run of five rounds
    key, stranger = receipt_key(tmp_path / "site-a"), receipt_key(tmp_path / "stranger")
    with PrivacyLedger(tmp_path / "site-a" / "ledger.sqlite") as ledger:
        charged = [ledger.charge("site-a", MECH, run_id="run", round=r, examples=10) for r in (1, 2, 3)]
        good = [issue_receipt(ledger, s, key).to_json() for s in charged]
        foreign = issue_receipt(ledger, charged[2], stranger).to_json()
    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run("run", config={}, sites=1, rounds=5, secagg=True)

    # Act: in order; then another key's; then an unreadable one; then one whose session went back
    _record(store, 1, {"site-a": good[0]})
    _record(store, 2, {"site-a": good[2]})
    _record(store, 3, {"site-a": foreign})
    _record(store, 4, {"site-a": "not a receipt"})
    _record(store, 5, {"site-a": good[1]})

    # Assert
    kept = store.receipts(site="site-a")
    assert [r.problem_kind for r in kept] == [None, None, "foreign-key", "unreadable", "not-following"]
    assert all(r.problem for r in kept[2:])
    out = tmp_path / "site-a.receipts"
    assert export_receipts(kept, out) == 3
    exported = read_receipts(out, key.public_key)  # all signed by the site's own key
    assert [r.session_id for r in exported] == [1, 3, 2]
    store.close()


def test_receipts_rows_are_append_only(tmp_path: Path) -> None:
    import sqlite3

    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("run", config={}, sites=1, rounds=1, secagg=True)
        _record(store, 1, {"site-a": "not a receipt"})
    with sqlite3.connect(tmp_path / "runs.sqlite") as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM receipts")
