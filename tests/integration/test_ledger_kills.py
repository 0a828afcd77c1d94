"""A site's training killed with SIGKILL at random points, 100 times (fedface.simulations.faults):
the ledger never reports less spend than the updates that left the site, its receipts still
verify, and it is never corrupt. Then the checker itself is shown to catch a lost entry and a
damaged ledger, so that its zeros mean something."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)  # the parent forks its children: no thread pool in it
from pathlib import Path
from fedface.simulations.faults import ledger_kills
report = ledger_kills(Path(sys.argv[1]), Path(sys.argv[2]), kills=int(sys.argv[3]), window_s=1.5, seed=int(sys.argv[4]))
print(json.dumps(report.to_json()))
"""


@pytest.fixture(scope="module")
def killed(orl_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    work = tmp_path_factory.mktemp("kills")
    # a fresh interpreter: forking the test process (whose torch may hold threads) could hang
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(orl_root), str(work), "100", "0"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), work


def test_a_hundred_kills_lose_no_ledger_entry_and_leave_it_intact(killed: tuple[dict[str, object], Path]) -> None:
    report, _ = killed

    assert report["kills"] == 100
    assert report["problems"] == []
    assert report["entries_lost"] == 0
    assert isinstance(report["left"], int) and report["left"] > 100  # many rounds left between the kills
    assert isinstance(report["sessions"], int) and report["sessions"] >= report["left"]
    assert report["receipts_checked"] > 0


def test_the_checker_catches_a_lost_entry_and_a_damaged_ledger(killed: tuple[dict[str, object], Path]) -> None:
    from fedface.simulations.faults import _check

    _, work = killed
    state, left = work / "site", work / "left.jsonl"
    records = left.read_text().splitlines()
    last = json.loads(records[-1])
    # an update that left without its session (as if the site had charged after sending)
    with left.open("a") as fh:
        fh.write(json.dumps({"round": 10**6, "receipt": last["receipt"]}) + "\n")

    _, _, lost, _, problems = _check(state, left)

    assert lost == 1 and problems == []

    # a session row changed on disk behind the ledger's back (its triggers dropped first): the
    # hash chain no longer holds
    import sqlite3

    with sqlite3.connect(state / "ledger.sqlite") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
        for name in names:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE sessions SET examples = examples + 1 WHERE id = 1")

    _, _, _, _, problems = _check(state, left)

    assert any(p.startswith("verify:") or p.startswith("receipts:") for p in problems), problems
