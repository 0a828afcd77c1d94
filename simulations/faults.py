"""Fault injection: a site's training killed with SIGKILL at random points, again and again.

:func:`ledger_kills` runs a real :class:`~fedface.client.site.Site` (ORL faces, a small GRU
encoder, DP-SGD, its own ledger and receipt key) in a child process that trains round after
round; after each round returns, the child records that the round's update *left the site*
(one line with its signed receipt, flushed and fsynced: what the server would now hold). The
parent kills the child with SIGKILL at a random moment, in whatever it is doing (opening the
ledger, charging, training, signing, recording), and after every kill checks, from the files
alone:

- the ledger is intact (:meth:`~fedface.common.privacy.ledger.PrivacyLedger.verify`: hash
  chains, gap-free ids, counters, triggers) and SQLite's own ``integrity_check`` passes;
- the ledger never reports less spend than what left: every round recorded as left has its
  session in the ledger (``entries_lost`` counts those that do not), and a torn record (the
  kill landed inside the write) counts as left;
- every receipt that left still verifies against the ledger
  (:func:`~fedface.common.privacy.receipts.check_ledger_against`: signature, chain, nothing
  receipted missing).

Then a new child starts where the ledger says the site is. Children are forked from a parent
that has imported torch and fedface and loaded the faces once (a fork costs milliseconds; a
fresh interpreter two seconds), and the parent itself never trains, so no thread pool is
forked.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedface.common.config import TrainConfig

RUN_ID = "kill-run"
PLANNED_ROUNDS = 10_000  # far more than a test trains: the run's epsilon is never reached


@dataclass
class KillReport:
    """What :func:`ledger_kills` found."""

    kills: int
    sessions: int  # charged sessions in the ledger at the end
    left: int  # rounds recorded as having left the site (torn records included)
    entries_lost: int  # rounds that left without their session in the ledger (must be 0)
    receipts_checked: int
    problems: list[str] = field(default_factory=list)  # one line per failed check (must be empty)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kills": self.kills,
            "sessions": self.sessions,
            "left": self.left,
            "entries_lost": self.entries_lost,
            "receipts_checked": self.receipts_checked,
            "problems": self.problems,
            "wall_s": self.wall_s,
        }


def kill_config(orl: Path) -> TrainConfig:
    """A small private site: ORL at 32x32, a tiny GRU encoder, DP-SGD at epsilon 8 per run."""
    return TrainConfig.from_mapping(
        {
            "data": {"root": str(orl), "image-size": [32, 32]},
            "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
            "evaluation": {"shift-tta": 0, "occlusion-box": 8},
            "training": {"batch-size": 16, "device": "cpu"},
            "privacy": {"epsilon": 8.0},
        },
        source="ledger kill test",
    )


def _read_left(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of rounds that left, and how many torn ones follow them."""
    if not path.exists():
        return [], 0
    records, torn = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            torn += 1
    return records, torn


def _child(cfg: TrainConfig, faces: Any, state: Path, left_path: Path) -> None:
    """Train round after round, recording each round that left; never returns (killed)."""
    import torch

    from fedface.client.site import Site
    from fedface.common import wire
    from fedface.common.models import build_encoder, encoder_weights
    from fedface.common.privacy.ledger import PrivacyLedger

    torch.set_num_threads(1)
    site = Site("site-k", cfg, faces, state, state / "ledger.sqlite")
    with PrivacyLedger(site.ledger_path) as ledger:
        done = [s.round or 0 for s in ledger.sessions()]
    round_ = max(done, default=0) + 1
    torch.manual_seed(0)
    weights = encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))
    with left_path.open("ab", buffering=0) as out:
        while True:
            result = site.train_round(
                weights, run_id=RUN_ID, round_=round_, rounds=PLANNED_ROUNDS, local_epochs=1, lr=1e-2, secagg=True, peers=3
            )
            # the update has left: what the server now holds (its receipt included)
            out.write(json.dumps({"round": round_, "receipt": result.metrics[wire.M_RECEIPT]}).encode() + b"\n")
            os.fsync(out.fileno())
            weights = result.weights
            round_ += 1


def _check(state: Path, left_path: Path) -> tuple[int, int, int, int, list[str]]:
    """(sessions, left, lost, receipts checked, problems) of the site's files as they are now."""
    from fedface.common.errors import LedgerError
    from fedface.common.privacy.ledger import PrivacyLedger
    from fedface.common.privacy.receipts import check_ledger_against, parse_receipt, receipt_key

    problems: list[str] = []
    ledger_path = state / "ledger.sqlite"
    records, torn = _read_left(left_path)
    if not ledger_path.exists():
        lost = len(records) + torn
        return 0, lost, lost, 0, ([] if lost == 0 else ["no ledger, yet updates left"])
    # opened as the site would open it next (after a crash SQLite recovers its write-ahead log)
    conn = sqlite3.connect(ledger_path)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if verdict != "ok":
        problems.append(f"SQLite integrity_check: {verdict}")
    with PrivacyLedger(ledger_path) as ledger:
        try:
            ledger.verify()
        except LedgerError as exc:
            problems.append(f"verify: {exc}")
        charged = {s.round for s in ledger.sessions() if s.run_id == RUN_ID}
        sessions = len(ledger.sessions())
        lost = sum(1 for r in records if r["round"] not in charged)
        if torn and sessions < len(records) + torn:
            lost += len(records) + torn - sessions
        checked = 0
        if records:
            key = receipt_key(state, create=False)
            receipts = [parse_receipt(r["receipt"], key.public_key) for r in records]
            try:
                check_ledger_against(ledger, receipts, public_key=key.public_key)
                checked = len(receipts)
            except LedgerError as exc:
                problems.append(f"receipts: {exc}")
    return sessions, len(records) + torn, lost, checked, problems


def ledger_kills(orl: Path, work: Path, *, kills: int = 100, window_s: float = 1.5, seed: int = 0) -> KillReport:
    """Kill a training site ``kills`` times with SIGKILL, each at a moment drawn uniformly in
    ``[0, window_s]`` after it started, and check its ledger and receipts after every kill."""
    from fedface.common.data import load_faces

    t0 = time.perf_counter()
    cfg = kill_config(orl)
    faces = load_faces(orl, size=(32, 32))
    faces = faces.subset(np.flatnonzero(faces.labels < 4))  # 40 faces of 4 people
    state = work / "site"
    left_path = work / "left.jsonl"
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("fork")
    report = KillReport(kills=0, sessions=0, left=0, entries_lost=0, receipts_checked=0)
    for _ in range(kills):
        child = ctx.Process(target=_child, args=(cfg, faces, state, left_path), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.0, window_s))
        child.kill()  # SIGKILL
        child.join()
        report.kills += 1
        sessions, left, lost, checked, problems = _check(state, left_path)
        report.sessions, report.left, report.receipts_checked = sessions, left, checked
        report.entries_lost = max(report.entries_lost, lost)
        report.problems += [f"after kill {report.kills}: {p}" for p in problems]
    report.wall_s = time.perf_counter() - t0
    return report


__all__ = ["KillReport", "kill_config", "ledger_kills"]
