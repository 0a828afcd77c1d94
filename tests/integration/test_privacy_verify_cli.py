"""`fedface privacy verify` end to end: a site's ledger held against the receipts the server
keeps, through a JSON-lines file; a deleted last session and a restored older backup pass the
ledger's own check but not this one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedface.common.privacy.accounting import Mechanism
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.privacy.receipts import Receipt, issue_receipt, receipt_key, sign, write_receipts
from fedface.simulations.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()
DELTA = 1e-5


def _charge_rounds(state: Path, rounds: range, run_id: str = "run-a") -> list[str]:
    """Charge one round each to the site's ledger; the receipts as they travel in the replies."""
    key = receipt_key(state)
    replies = []
    with PrivacyLedger(state / "ledger.sqlite") as ledger:
        for rnd in rounds:
            sigma = 1.0 + rnd / 10
            mech = Mechanism(noise_multiplier=sigma, sample_rate=0.05, steps=40, max_grad_norm=1.0, delta=DELTA, accountant="rdp")
            session = ledger.charge("hospital-a", mech, run_id=run_id, round=rnd, examples=400)
            replies.append(issue_receipt(ledger, session, key).to_json())
    return replies


def _verify(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["privacy", "verify", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """A site state directory with three charged rounds, and the server's receipts exported to a file."""
    state = tmp_path / "state"
    with PrivacyLedger(state / "ledger.sqlite") as ledger:
        ledger.set_budget("hospital-a", epsilon=50.0, delta=DELTA)
    receipts = tmp_path / "server" / "hospital-a.receipts.jsonl"
    write_receipts(receipts, _charge_rounds(state, range(1, 4)))
    return state, receipts


def test_untouched_ledger_matches_its_receipts(site: tuple[Path, Path]) -> None:
    state, receipts = site
    ledger = state / "ledger.sqlite"

    code, out, err = _verify("--ledger", str(ledger), "--receipts", str(receipts))
    json_code, json_out, _ = _verify("--ledger", str(ledger), "--receipts", str(receipts), "--format", "json")

    assert code == 0, err
    assert out.startswith(f"privacy ledger {ledger} (3 sessions) is intact and matches its 3 receipts (latest: receipt of session 3 ")
    assert json_code == 0
    payload = json.loads(json_out.strip().splitlines()[-1])
    assert payload["rollback_checked"] is True and payload["receipts"] == 3 and payload["sessions"] == 3
    assert payload["latest_receipt"]["session_id"] == 3 and payload["latest_receipt"]["round"] == 3
    assert payload["sessions_after_latest_receipt"] == 0


def test_without_receipts_only_the_ledgers_own_check_runs_and_says_so(site: tuple[Path, Path]) -> None:
    ledger = site[0] / "ledger.sqlite"

    code, out, err = _verify("--ledger", str(ledger), "--format", "json")

    assert code == 0, err
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["rollback_checked"] is False and payload["receipts"] is None and payload["sessions"] == 3
    assert "without --receipts a deleted last session or a restored older backup cannot be detected" in " ".join(err.split())


def test_deleted_last_session_passes_verify_but_fails_against_the_receipts(site: tuple[Path, Path]) -> None:
    # Arrange: the attack's exact statements on the SQLite file
    state, receipts = site
    ledger = state / "ledger.sqlite"
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.execute("DROP TRIGGER sessions_no_delete")
    conn.execute("DELETE FROM sessions WHERE id = (SELECT max(id) FROM sessions)")
    conn.execute("UPDATE sqlite_sequence SET seq = seq - 1 WHERE name='sessions'")
    conn.execute(
        "CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'fedface ledger is append-only'); END"
    )
    conn.close()
    with PrivacyLedger(ledger, create=False) as book:
        book.verify()  # the ledger's own check passes

    # Act
    own_code, _, _ = _verify("--ledger", str(ledger))
    code, _, err = _verify("--ledger", str(ledger), "--receipts", str(receipts))

    # Assert
    assert own_code == 0
    assert code == 11
    assert err.startswith(f"LedgerError: privacy ledger {ledger} is behind its receipts: the receipt of session 3 (signed ")
    assert "but the ledger's sessions end at row 2; the last sessions were deleted or an older backup restored" in err
    assert err.count("\n") == 1


def test_restored_older_backup_fails_against_the_receipts(site: tuple[Path, Path], tmp_path: Path) -> None:
    # Arrange: back up (SQLite's backup API: the file is in WAL mode), charge two rounds, restore the backup
    state, receipts = site
    ledger = state / "ledger.sqlite"
    backup = tmp_path / "backup.sqlite"
    src, dst = sqlite3.connect(ledger), sqlite3.connect(backup)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    more = _charge_rounds(state, range(4, 6))
    write_receipts(receipts, [*(r.to_json() for r in _read(receipts)), *more])
    ledger.write_bytes(backup.read_bytes())  # the ledger is closed: no -wal file beside it

    # Act
    code, _, err = _verify("--ledger", str(ledger), "--receipts", str(receipts))

    # Assert
    assert code == 11
    assert err.startswith(f"LedgerError: privacy ledger {ledger} is behind its receipts: the receipt of session 4 ")
    assert err.count("\n") == 1


def test_restored_backup_charged_again_fails_against_the_receipts(site: tuple[Path, Path], tmp_path: Path) -> None:
    state, receipts = site
    ledger = state / "ledger.sqlite"
    backup = tmp_path / "backup.sqlite"
    backup.write_bytes(ledger.read_bytes())  # closed: the main file is the whole ledger
    write_receipts(receipts, [*(r.to_json() for r in _read(receipts)), *_charge_rounds(state, range(4, 5))])
    ledger.write_bytes(backup.read_bytes())
    _charge_rounds(state, range(1, 3), run_id="run-b")

    code, _, err = _verify("--ledger", str(ledger), "--receipts", str(receipts))

    assert code == 11
    assert f"LedgerError: privacy ledger {ledger} differs from its receipts: its sessions row 4 is not the one" in err
    assert err.count("\n") == 1


def test_tampered_receipt_is_refused_for_its_signature(site: tuple[Path, Path]) -> None:
    # Arrange: the epsilon of the latest receipt lowered in the file
    state, receipts = site
    lines = receipts.read_text().splitlines()
    raw = json.loads(lines[-1])
    raw["epsilon"] = 0.5
    lines[-1] = json.dumps(raw)
    receipts.write_text("\n".join(lines) + "\n")

    code, _, err = _verify("--ledger", str(state / "ledger.sqlite"), "--receipts", str(receipts))

    assert code == 11
    assert err.startswith(f"LedgerError: receipts file {receipts} line 3: the receipt of session 3 ")
    assert "fails its signature check: it was altered after the site signed it" in err
    assert err.count("\n") == 1


def test_receipt_signed_by_another_key_is_refused(site: tuple[Path, Path]) -> None:
    state, receipts = site
    theirs = [sign(r, Ed25519PrivateKey.generate()) for r in _read(receipts)]
    write_receipts(receipts, theirs)

    code, _, err = _verify("--ledger", str(state / "ledger.sqlite"), "--receipts", str(receipts))

    assert code == 11
    assert err.startswith(f"LedgerError: receipts file {receipts} line 1: the receipt of session 1 ")
    assert "not by this site's key" in err and err.count("\n") == 1


def test_public_key_is_taken_from_the_state_dir_or_the_flag(site: tuple[Path, Path], tmp_path: Path) -> None:
    state, receipts = site
    moved = tmp_path / "elsewhere" / "ledger.sqlite"
    moved.parent.mkdir()
    moved.write_bytes((state / "ledger.sqlite").read_bytes())

    missing, _, err = _verify("--ledger", str(moved), "--receipts", str(receipts))
    by_dir, _, _ = _verify("--ledger", str(moved), "--receipts", str(receipts), "--state-dir", str(state))
    by_flag, _, _ = _verify("--ledger", str(moved), "--receipts", str(receipts), "--public-key", str(state / "receipt.pub"))

    assert missing == 11
    assert err == (
        f"LedgerError: no receipt public key at {moved.parent / 'receipt.pub'}: pass --public-key (the site's receipt.pub) "
        "or --state-dir\n"
    )
    assert (by_dir, by_flag) == (0, 0)


def test_empty_receipts_file_exits_11(site: tuple[Path, Path]) -> None:
    state, receipts = site
    receipts.write_text("\n")

    code, _, err = _verify("--ledger", str(state / "ledger.sqlite"), "--receipts", str(receipts))

    assert code == 11
    ledger = state / "ledger.sqlite"
    assert err == f"LedgerError: receipts file {receipts} holds no receipts: nothing to check privacy ledger {ledger} against\n"


def test_usage_errors_exit_2(site: tuple[Path, Path], tmp_path: Path) -> None:
    ledger = str(site[0] / "ledger.sqlite")

    assert _verify("--ledger", ledger, "--public-key", str(site[0] / "receipt.pub"))[0] == 2
    assert _verify("--ledger", ledger, "--receipts", str(tmp_path / "none.jsonl"))[0] == 2


def _read(receipts: Path) -> list[Receipt]:
    return [Receipt.from_json(line) for line in receipts.read_text().splitlines() if line.strip()]
