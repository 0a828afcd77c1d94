"""Unit tests for fedface.common.privacy.receipts: the site's receipt key, signed receipts on the
wire and in files, and a ledger held against its receipts: a deleted last session, a restored
older backup, a reset sequence, a replaced ledger, a tampered or foreign receipt."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedface.common.errors import LedgerError
from fedface.common.privacy.accounting import Mechanism
from fedface.common.privacy.ledger import GENESIS_HASH, PrivacyLedger
from fedface.common.privacy.receipts import (
    RECEIPT_KEY_FILE,
    RECEIPT_PUBLIC_KEY_FILE,
    Receipt,
    ReceiptKey,
    check_ledger_against,
    check_receipt_follows,
    issue_receipt,
    load_public_key,
    parse_receipt,
    read_receipts,
    receipt_key,
    sign,
    verify_signature,
    write_receipts,
)

Site = tuple[Path, list[Receipt]]  # a closed ledger file and the receipts of its sessions
DELTA = 1e-5
DATASET = "hospital-a"
# The exact statements of the attack: remove the last session and put SQLite's counter back.
TRUNCATE = """
DROP TRIGGER sessions_no_delete;
DELETE FROM sessions WHERE id = (SELECT max(id) FROM sessions);
UPDATE sqlite_sequence SET seq = seq - 1 WHERE name='sessions';
CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'fedface ledger is append-only'); END;
"""


def _mech(sigma: float = 1.1, q: float = 0.05, steps: int = 40, accountant: str = "rdp") -> Mechanism:
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant=accountant,  # type: ignore[arg-type]
    )


def _charge(ledger: PrivacyLedger, key: ReceiptKey, run_id: str, rounds: range, accountant: str = "rdp") -> list[Receipt]:
    """Charge one session per round and issue its receipt, as a site does each round."""
    out = []
    for rnd in rounds:
        mech = _mech(1.0 + rnd / 10, accountant=accountant)
        session = ledger.charge(DATASET, mech, run_id=run_id, round=rnd, examples=400)
        out.append(issue_receipt(ledger, session, key))
    return out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def key(state: Path) -> ReceiptKey:
    return receipt_key(state)


@pytest.fixture
def site(state: Path, key: ReceiptKey) -> tuple[Path, list[Receipt]]:
    """A closed ledger with a budget and three charged rounds, and the receipts the server holds."""
    path = state / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA)
        receipts = _charge(ledger, key, "run-a", range(1, 4))
    return path, receipts


def _truncate(path: Path, table: str = "sessions") -> None:
    """Run the attack's statements on ``table`` of the closed ledger file."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(TRUNCATE.replace("sessions", table))
    conn.close()


def _check(path: Path, receipts: list[Receipt], key: ReceiptKey) -> None:
    with PrivacyLedger(path, create=False) as ledger:
        check_ledger_against(ledger, receipts, public_key=key.public_key)


def _backup(path: Path, copy: Path) -> None:
    """A consistent copy of a ledger in WAL mode: SQLite's backup API, as `.backup` does."""
    src, dst = sqlite3.connect(path), sqlite3.connect(copy)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def _roll_back_two_rounds(path: Path, key: ReceiptKey, copy: Path) -> list[Receipt]:
    """Back the ledger up, charge rounds 4 and 5 of run-a, restore the backup; the rounds' receipts."""
    _backup(path, copy)
    with PrivacyLedger(path) as ledger:
        receipts = _charge(ledger, key, "run-a", range(4, 6))
    _restore(copy, path)
    return receipts


def _restore(copy: Path, path: Path) -> None:
    """Copy a backup over a closed ledger (its -wal and -shm files are gone once it is closed)."""
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        extra.unlink(missing_ok=True)
    path.write_bytes(copy.read_bytes())


# --- the key -----------------------------------------------------------------------------------


def test_receipt_key_is_created_private_and_loaded_again_unchanged(state: Path, key: ReceiptKey) -> None:
    again = receipt_key(state)

    assert key.private_path == state / RECEIPT_KEY_FILE and key.public_path == state / RECEIPT_PUBLIC_KEY_FILE
    assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.public_path.stat().st_mode) == 0o644
    assert again.public_id == key.public_id
    assert load_public_key(key.public_path).public_bytes_raw() == key.public_key.public_bytes_raw()
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []


def test_receipt_key_is_never_overwritten_and_its_public_half_is_rewritten(state: Path, key: ReceiptKey) -> None:
    private = key.private_path.read_bytes()
    key.public_path.unlink()

    again = receipt_key(state)

    assert key.private_path.read_bytes() == private
    assert again.public_path.is_file() and again.public_id == key.public_id


def test_receipt_key_missing_without_create_is_a_ledger_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no receipt key at"):
        receipt_key(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []


def test_receipt_key_with_a_foreign_public_half_is_refused(state: Path, key: ReceiptKey, tmp_path: Path) -> None:
    other = receipt_key(tmp_path / "other")
    key.public_path.write_bytes(other.public_path.read_bytes())

    with pytest.raises(LedgerError, match="is not the public half of"):
        receipt_key(state)


# --- one receipt -------------------------------------------------------------------------------


def test_receipt_records_the_charge_and_the_chain_heads(state: Path, key: ReceiptKey) -> None:
    with PrivacyLedger(state / "ledger.sqlite") as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA)
        session = ledger.charge(DATASET, _mech(), run_id="run-a", round=2, examples=400)
        receipt = issue_receipt(ledger, session, key)
        heads = ledger.head()

    assert (receipt.session_id, receipt.session_hash) == heads["sessions"] == (1, receipt.session_hash)
    assert (receipt.budget_id, receipt.budget_hash) == heads["budgets"]
    assert receipt.ledger_id == receipt.session_hash[:32]
    assert (receipt.dataset, receipt.run_id, receipt.round) == (DATASET, "run-a", 2)
    assert (receipt.epsilon, receipt.delta, receipt.accountant) == (session.epsilon_after, DELTA, "rdp")
    assert receipt.public_key == key.public_id
    verify_signature(receipt, key.public_key)


def test_receipt_travels_as_one_short_line_and_parses_back_equal(site: Site, key: ReceiptKey) -> None:
    receipt = site[1][-1]

    text = receipt.to_json()

    assert isinstance(text, str) and "\n" not in text and len(text) < 700
    assert parse_receipt(text, key.public_key) == receipt
    assert Receipt.from_json(text) == receipt


def test_head_and_row_hash_of_an_empty_ledger(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.head() == {"budgets": (0, GENESIS_HASH), "sessions": (0, GENESIS_HASH)}
        assert ledger.row_hash("sessions", 1) is None
        with pytest.raises(ValueError, match="table must be one of"):
            ledger.row_hash("meta", 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: "not json", "not JSON"),
        (lambda r: json.dumps({k: v for k, v in json.loads(r).items() if k != "epsilon"}), "fields"),
        (lambda r: r.replace('"v":1', '"v":2'), "unknown version"),
        (lambda r: r.replace('"session_id":3', '"session_id":0'), "bad session_id 0"),
        (lambda r: r.replace('"accountant":"rdp"', '"accountant":"gdp"'), "bad accountant 'gdp'"),
    ],
)
def test_malformed_receipt_is_refused_with_one_line(site: Site, change, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LedgerError, match=message) as info:
        Receipt.from_json(change(site[1][-1].to_json()))
    assert "\n" not in str(info.value)


def test_tampered_receipt_fails_its_signature(site: Site, key: ReceiptKey) -> None:
    # Arrange: the epsilon lowered in the JSON
    raw = json.loads(site[1][-1].to_json())
    raw["epsilon"] = raw["epsilon"] / 2

    # Act / Assert
    with pytest.raises(LedgerError, match="fails its signature check: it was altered after the site signed it"):
        parse_receipt(json.dumps(raw), key.public_key)
    with pytest.raises(LedgerError, match="fails its signature check"):
        parse_receipt(json.dumps(raw))  # the key it carries does not vouch for it either


def test_receipt_of_another_key_is_refused(site: Site, key: ReceiptKey) -> None:
    other = Ed25519PrivateKey.generate()
    theirs = sign(site[1][-1], other)
    forged = dataclasses.replace(theirs, public_key=key.public_id)  # another key's signature, our key's name

    verify_signature(theirs)  # sound under the key it names ...
    with pytest.raises(LedgerError, match="not by this site's key"):
        verify_signature(theirs, key.public_key)  # ... but that is not this site's
    with pytest.raises(LedgerError, match="fails its signature check"):
        verify_signature(forged, key.public_key)


def test_unsigned_receipt_is_refused(site: Site, key: ReceiptKey) -> None:
    unsigned = dataclasses.replace(site[1][-1], signature="")

    with pytest.raises(LedgerError, match="is not signed"):
        verify_signature(unsigned, key.public_key)
    with pytest.raises(ValueError, match="sign the receipt"):
        unsigned.to_json()


# --- a ledger against its receipts -------------------------------------------------------------


def test_untouched_ledger_matches_its_receipts(site: Site, key: ReceiptKey) -> None:
    path, receipts = site

    with PrivacyLedger(path, create=False) as ledger:
        check = check_ledger_against(ledger, receipts, public_key=key.public_key)
        check_ledger_against(ledger, receipts[:1])  # an older receipt alone matches as well

    assert (check.receipts, check.latest, check.ledger_sessions, check.uncovered) == (3, receipts[-1], 3, 0)


def test_sessions_charged_after_the_latest_receipt_are_counted_as_uncovered(site: Site, key: ReceiptKey) -> None:
    path, receipts = site
    with PrivacyLedger(path) as ledger:
        ledger.charge(DATASET, _mech(), run_id="run-b", round=1, examples=400)
        check = check_ledger_against(ledger, receipts, public_key=key.public_key)

    assert (check.ledger_sessions, check.uncovered) == (4, 1)


def test_deleted_last_session_passes_verify_but_not_the_receipts(site: Site, key: ReceiptKey) -> None:
    # Arrange: the attack's exact statements
    path, receipts = site
    _truncate(path)

    # Act / Assert
    with PrivacyLedger(path, create=False) as ledger:
        ledger.verify()  # the ledger's own check cannot see it
        assert ledger.spend(DATASET).epsilon < receipts[-1].epsilon
        with pytest.raises(LedgerError) as info:
            check_ledger_against(ledger, receipts, public_key=key.public_key)
    message = str(info.value)
    assert message.startswith(f"privacy ledger {path} is behind its receipts: the receipt of session 3 (signed ")
    assert "run run-a round 3) vouches for sessions row 3" in message
    assert "the ledger's sessions end at row 2; the last sessions were deleted or an older backup restored" in message
    assert "restore the newest backup" in message and "\n" not in message


def test_deleted_session_then_charged_again_differs_from_its_receipt(site: Site, key: ReceiptKey) -> None:
    # Arrange: truncate, then charge again: session 3 exists once more, with other contents
    path, receipts = site
    _truncate(path)
    with PrivacyLedger(path) as ledger:
        ledger.charge(DATASET, _mech(9.0), run_id="run-b", round=1, examples=400)
        ledger.verify()

        # Act / Assert
        with pytest.raises(LedgerError, match=r"differs from its receipts: its sessions row 3 is not the one the receipt of session 3 "):
            check_ledger_against(ledger, receipts, public_key=key.public_key)


def test_restored_older_backup_is_behind_its_receipts(site: Site, key: ReceiptKey, tmp_path: Path) -> None:
    # Arrange: a backup after round 3, two more rounds charged and receipted, then the backup restored
    path, receipts = site
    receipts += _roll_back_two_rounds(path, key, tmp_path / "backup.sqlite")

    # Act / Assert
    with PrivacyLedger(path, create=False) as ledger:
        ledger.verify()
        with pytest.raises(LedgerError, match=r"is behind its receipts: the receipt of session 4 .* sessions end at row 3"):
            check_ledger_against(ledger, receipts, public_key=key.public_key)


def test_restored_backup_charged_past_its_receipts_differs_at_the_first_reused_session(
    site: Site, key: ReceiptKey, tmp_path: Path
) -> None:
    # Arrange: restore a backup of round 3 after round 5, then charge three rounds: six sessions again
    path, receipts = site
    receipts += _roll_back_two_rounds(path, key, tmp_path / "backup.sqlite")
    with PrivacyLedger(path) as ledger:
        _charge(ledger, key, "run-b", range(1, 4))

        # Act / Assert
        with pytest.raises(LedgerError, match=r"its sessions row 4 is not the one the receipt of session 4"):
            check_ledger_against(ledger, receipts, public_key=key.public_key)


def test_reset_sequence_alone_is_caught_by_verify(site: Site, key: ReceiptKey) -> None:
    path, receipts = site
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'sessions'")
    conn.close()

    with PrivacyLedger(path, create=False) as ledger, pytest.raises(LedgerError, match="fails its integrity check"):
        check_ledger_against(ledger, receipts, public_key=key.public_key)


def test_deleted_last_budget_is_behind_its_receipts(state: Path, key: ReceiptKey) -> None:
    # Arrange: a lowered budget, receipted, then removed to get the higher one back
    path = state / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA)
        ledger.set_budget(DATASET, epsilon=5.0, delta=DELTA)
        receipts = _charge(ledger, key, "run-a", range(1, 2))
    _truncate(path, "budgets")

    with pytest.raises(LedgerError, match="is behind its receipts: .* vouches for budgets row 2 .* budgets end at row 1"):
        _check(path, receipts, key)


def test_replaced_ledger_is_not_the_ledger_of_its_receipts(site: Site, key: ReceiptKey) -> None:
    # Arrange: the file removed and a new ledger charged more than the old one had
    path, receipts = site
    path.unlink()
    with PrivacyLedger(path) as ledger:
        _charge(ledger, key, "run-b", range(1, 5))

    expected = rf"is not the ledger of its receipts: the receipt of session 3 .* is of ledger {receipts[0].ledger_id}, this file is ledger "
    with pytest.raises(LedgerError, match=expected):
        _check(path, receipts, key)


def test_emptied_ledger_holds_no_session(site: Site, key: ReceiptKey) -> None:
    path, receipts = site
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        "DROP TRIGGER sessions_no_delete; DELETE FROM sessions; UPDATE sqlite_sequence SET seq = 0 WHERE name='sessions';"
        + TRUNCATE.strip().splitlines()[-1]
    )
    conn.close()

    with pytest.raises(LedgerError, match="this file holds no session; it was replaced by another file or emptied"):
        _check(path, receipts, key)


def test_ledger_below_a_receipted_epsilon_under_counts(site: Site, key: ReceiptKey) -> None:
    path, receipts = site
    claimed = sign(dataclasses.replace(receipts[-1], epsilon=receipts[-1].epsilon + 1.0), key)

    with pytest.raises(LedgerError, match=f"under-counts data set '{DATASET}': epsilon .* at delta 1e-05 \\(rdp\\)"):
        _check(path, [*receipts, claimed], key)


def test_prv_receipts_of_an_untouched_ledger_match(state: Path, key: ReceiptKey) -> None:
    path = state / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.set_budget(DATASET, epsilon=50.0, delta=DELTA, accountant="prv")
        receipts = _charge(ledger, key, "run-a", range(1, 4), accountant="prv")
        ledger.charge(DATASET, _mech(2.0, accountant="prv"), run_id="run-b", round=1, examples=400)

    _check(path, receipts, key)
    assert {r.accountant for r in receipts} == {"prv"}


def test_no_receipts_or_foreign_ones_are_refused(site: Site, key: ReceiptKey) -> None:
    path, receipts = site
    with PrivacyLedger(path, create=False) as ledger:
        with pytest.raises(LedgerError, match="no receipts to check privacy ledger"):
            check_ledger_against(ledger, [])
        with pytest.raises(LedgerError, match="not by this site's key"):
            check_ledger_against(ledger, [sign(receipts[0], Ed25519PrivateKey.generate())], public_key=key.public_key)
        with pytest.raises(LedgerError, match="signed by 2 different keys"):
            check_ledger_against(ledger, [receipts[0], sign(receipts[1], Ed25519PrivateKey.generate())])


# --- the server's view: one receipt after another ---------------------------------------------


def test_receipts_of_an_honest_site_follow_each_other(site: Site) -> None:
    first, second, third = site[1]

    check_receipt_follows(first, second)
    check_receipt_follows(second, third)
    check_receipt_follows(third, third)  # a repeated reply


def test_a_receipt_that_goes_back_is_refused_by_the_server(site: Site, key: ReceiptKey) -> None:
    # Arrange: the last session deleted, the round charged again: session 3 once more
    path, receipts = site
    _truncate(path)
    with PrivacyLedger(path) as ledger:
        again = _charge(ledger, key, "run-a", range(4, 5))[0]

    with pytest.raises(LedgerError, match="shows session 3 after its receipt of session 3 .* showed session 3: the site's ledger went"):
        check_receipt_follows(receipts[-1], again)
    with pytest.raises(LedgerError, match="shows session 2 after"):
        check_receipt_follows(receipts[-1], receipts[1])
    with pytest.raises(LedgerError, match="the site's key changed"):
        check_receipt_follows(receipts[0], sign(receipts[1], Ed25519PrivateKey.generate()))
    with pytest.raises(LedgerError, match="the site's ledger was replaced"):
        check_receipt_follows(receipts[0], sign(dataclasses.replace(receipts[1], ledger_id="f" * 32), key))
    with pytest.raises(LedgerError, match="below the .* the site's ledger went back"):
        check_receipt_follows(receipts[0], sign(dataclasses.replace(receipts[1], epsilon=0.1), key))


# --- receipt files -----------------------------------------------------------------------------


def test_receipts_file_round_trip_from_wire_strings(site: Site, key: ReceiptKey, tmp_path: Path) -> None:
    receipts = site[1]
    out = tmp_path / "export" / "receipts.jsonl"

    written = write_receipts(out, [r.to_json() for r in receipts])

    assert written == 3
    assert out.read_text().count("\n") == 3
    assert read_receipts(out, key.public_key) == receipts


def test_write_receipts_refuses_a_tampered_one_and_writes_nothing(site: Site, tmp_path: Path) -> None:
    raw = json.loads(site[1][0].to_json())
    raw["epsilon"] = 0.0
    out = tmp_path / "receipts.jsonl"

    with pytest.raises(LedgerError, match="fails its signature check"):
        write_receipts(out, [site[1][1].to_json(), json.dumps(raw)])
    assert not out.exists()


def test_read_receipts_names_the_line_of_a_tampered_receipt(site: Site, key: ReceiptKey, tmp_path: Path) -> None:
    out = tmp_path / "receipts.jsonl"
    write_receipts(out, site[1])
    lines = out.read_text().splitlines()
    lines[1] = lines[1].replace('"round":2', '"round":7')
    out.write_text("\n".join(lines) + "\n\n")

    expected = rf"^receipts file {out} line 2: the receipt of session 2 .* round 7\) fails its signature check"
    with pytest.raises(LedgerError, match=expected):
        read_receipts(out, key.public_key)
