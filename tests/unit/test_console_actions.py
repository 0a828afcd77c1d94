"""Unit tests of what the console's actions do to a federation, and of what the store keeps for it.

(a) The audit log (server.admin_log through RunStore): append-only, stop-run only for a running
    run, the latest of suspend/resume applies.
(b) The ServerApp's bookkeeping honours them (FedFaceRounds): a suspended site is not sampled, a
    resumed one is again; once a stop is requested no site is asked, the rounds left are not
    recorded and the run finishes ``stopped``.
(c) What the sites say about themselves (server.site_reports): the policy and mechanism of each
    reply are kept, and a malformed policy is kept as a problem, not trusted.
(d) The change feed the console's server-sent events follow (RunStore.cursor / changes).
"""

from __future__ import annotations

import json
import time
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedface.common import wire
from fedface.common.config import SitePolicyConfig
from fedface.common.errors import ConfigError, RunDirError
from fedface.server.app import run_outcome
from fedface.server.store import Participation, RunStore
from tests.unit.test_server_app import TINY, _answered, _config, _pairs, _proxy, _rounds, _weights, test_faces  # noqa: F401

RUN = "run-unit"  # the run _rounds starts


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    with RunStore(tmp_path / "runs.sqlite") as s:
        yield s  # type: ignore[misc]


def _start(store: RunStore, run_id: str = "r1") -> None:
    store.start_run(run_id, config={"data": {"root": "/faces/orl"}}, sites=3, rounds=3, secagg=True)


# --- (a) the audit log ------------------------------------------------------------------------


def test_stop_run_needs_a_running_run_of_the_store(store: RunStore) -> None:
    _start(store)
    with pytest.raises(RunDirError, match="no run 'nope'"):
        store.record_action("admin", "stop-run", "nope")
    store.finish_run("r1", status="completed")
    with pytest.raises(ConfigError, match="already completed"):
        store.record_action("admin", "stop-run", "r1")
    assert store.actions() == []


def test_the_latest_of_suspend_and_resume_applies(store: RunStore) -> None:
    store.record_action("admin", "suspend-site", "site-a", client="127.0.0.1")
    store.record_action("admin", "suspend-site", "site-b")
    store.record_action("admin", "resume-site", "site-a")

    assert set(store.suspended_sites()) == {"site-b"}
    store.record_action("admin", "suspend-site", "site-a")
    assert set(store.suspended_sites()) == {"site-a", "site-b"}
    actions = store.actions()
    assert [a.action for a in actions] == ["suspend-site", "resume-site", "suspend-site", "suspend-site"]  # newest first
    assert actions[-1].client == "127.0.0.1" and actions[-1].admin == "admin"
    with pytest.raises(ConfigError, match="needs a site name"):
        store.record_action("admin", "suspend-site", "")


def test_audit_rows_cannot_be_changed_or_removed(store: RunStore) -> None:
    store.record_action("admin", "login", None, client="127.0.0.1")
    conn = sqlite3.connect(store.path)
    try:
        for sql in ("UPDATE admin_actions SET admin = 'mallory'", "DELETE FROM admin_actions"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()
    assert [a.admin for a in store.actions()] == ["admin"]


def test_an_unknown_action_is_refused(store: RunStore) -> None:
    with pytest.raises(ValueError, match="admin action must be one of"):
        store.record_action("admin", "delete-run", "r1")  # type: ignore[arg-type]


# --- (b) the ServerApp honours them -------------------------------------------------------------


def test_a_suspended_site_is_not_sampled_until_resumed(tmp_path: Path, store: RunStore, test_faces) -> None:  # noqa: F811
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))
    rounds.collect(1, [(_proxy(c), _answered(f"site-{c}", w, 40)) for c in ("1", "2", "3")], [])
    rounds.evaluate(1, w)

    store.record_action("admin", "suspend-site", "site-2")
    kept = rounds.filter_sampled(2, _pairs(["1", "2", "3"], cfg))
    assert [c.cid for c, _ in kept] == ["1", "3"]
    # a node not heard from yet is suspended by its node name
    store.record_action("admin", "suspend-site", "node-9")
    assert [c.cid for c, _ in rounds.filter_sampled(2, _pairs(["1", "9"], cfg))] == ["1"]

    store.record_action("admin", "resume-site", "site-2")
    assert [c.cid for c, _ in rounds.filter_sampled(3, _pairs(["1", "2", "3"], cfg))] == ["1", "2", "3"]


def test_a_stopped_run_asks_no_site_records_no_more_rounds_and_finishes_stopped(
    tmp_path: Path, store: RunStore, test_faces  # noqa: F811
) -> None:
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))
    rounds.collect(1, [(_proxy(c), _answered(f"site-{c}", w, 40)) for c in ("1", "2", "3")], [])
    rounds.evaluate(1, w)

    store.record_action("admin", "stop-run", RUN)
    assert rounds.filter_sampled(2, _pairs(["1", "2", "3"], cfg)) == []
    assert rounds.evaluate(2, w) == {}  # nothing evaluated, recorded or checkpointed
    assert rounds.filter_sampled(3, _pairs(["1", "2", "3"], cfg)) == []
    assert rounds.evaluate(3, w) == {}

    assert [r.round for r in store.rounds(RUN)] == [1]
    assert not (tmp_path / "checkpoints" / "round-0002.pt").exists()
    status, error = run_outcome(rounds.history, cfg.federation.rounds, rounds.stopped)
    assert status == "stopped"
    assert error is not None and "stopped by admin in the console" in error and "after 1 of 4 rounds" in error
    store.finish_run(RUN, status=status, error=error)  # type: ignore[arg-type]
    assert store.run(RUN).status == "stopped"


def test_without_a_stop_the_outcome_is_unchanged() -> None:
    history = [{"answered": 3}, {"answered": 2}]
    assert run_outcome(history, 2) == ("completed", None)
    assert run_outcome(history, 3)[0] == "failed"


# --- (c) what the sites say about themselves -----------------------------------------------------


def test_each_replys_policy_and_mechanism_are_kept(tmp_path: Path, store: RunStore, test_faces) -> None:  # noqa: F811
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    policy = SitePolicyConfig(**{"budget-epsilon": 20.0, "min-peers": 4})
    reply = _answered("site-a", w, 40)
    reply.metrics.update({
        wire.M_POLICY: json.dumps({k: policy.model_dump(by_alias=True)[k] for k in wire.POLICY_FIELDS}),
        wire.M_NOISE: 1.25, wire.M_SAMPLE_RATE: 0.5, wire.M_STEPS: 10, wire.M_CLIP: 1.0,
    })
    bad = _answered("site-b", w, 40)
    bad.metrics[wire.M_POLICY] = json.dumps({"budget-epsilon": 1e9, "extra": "x"})
    rounds.filter_sampled(1, _pairs(["1", "2"], cfg))
    rounds.collect(1, [(_proxy("1"), reply), (_proxy("2"), bad)], [])
    rounds.evaluate(1, w)

    a, b = store.site_reports(run_id=RUN)
    assert (a.site, a.round, a.noise_multiplier, a.sample_rate, a.steps, a.max_grad_norm) == ("site-a", 1, 1.25, 0.5, 10, 1.0)
    assert a.policy is not None and a.policy["budget-epsilon"] == 20.0 and a.policy["min-peers"] == 4 and a.problem is None
    assert b.policy is None and b.problem is not None and "JSON object of" in b.problem
    assert b.noise_multiplier is None  # not reported, not invented
    assert store.site_reports(site="site-a") == [a]


def test_a_site_reports_the_policy_it_enforces() -> None:
    from fedface.client.site import Site

    site = Site.__new__(Site)  # only its policy is needed to report it
    site.policy = SitePolicyConfig(**{"budget-epsilon": 9.5, "require-secagg": True, "min-peers": 5})
    reported = json.loads(site.policy_json())
    assert set(reported) == set(wire.POLICY_FIELDS)
    assert reported["budget-epsilon"] == 9.5 and reported["min-peers"] == 5 and reported["require-secagg"] is True


# --- (d) the change feed -------------------------------------------------------------------------


def test_the_change_feed_names_each_new_row_once(store: RunStore) -> None:
    before = store.cursor()
    _start(store)
    store.record_round(
        "r1", 1, started_at="2026-12-01T10:00:00+00:00", seconds=1.0, sampled=["a"],
        participation=[Participation(site="a", status="answered", examples=3, epsilon=1.0, delta=1e-5, accountant="rdp")],
        metrics={"verif_acc": 0.5},
    )
    store.record_action("admin", "stop-run", "r1")

    changes = store.changes(before)
    assert [(kind, run) for kind, run, _ in changes] == [("event", "r1"), ("round", "r1"), ("action", "r1")]
    after = store.cursor()
    assert store.changes(after) == []
    assert all(np.greater_equal(after, before))


# --- review fixes: what a site or a resumed run cannot get past -----------------------------------


def test_a_stopped_run_samples_and_evaluates_nothing(tmp_path: Path, store: RunStore, test_faces, monkeypatch) -> None:  # noqa: F811
    """Once stopped, the strategy does not even sample (Flower's sampling waits for sites that
    may be gone) and the server does not evaluate."""
    from flwr.common import ndarrays_to_parameters

    from fedface.server import app as server_app

    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = server_app.make_strategy(rounds, w)
    store.record_action("admin", "stop-run", RUN)

    class NoSampling:
        def num_available(self) -> int:
            return 3

        def sample(self, *args: object, **kwargs: object) -> list[object]:
            raise AssertionError("a stopped run sampled sites")

    monkeypatch.setattr(server_app, "evaluate_open_set", lambda *a, **k: pytest.fail("a stopped run evaluated"))
    assert strategy.configure_fit(1, ndarrays_to_parameters(w), NoSampling()) == []  # type: ignore[arg-type]
    assert rounds.evaluate(1, w) == {}


def test_a_stop_applies_to_the_run_until_it_is_resumed(store: RunStore) -> None:
    _start(store)
    store.record_action("admin", "stop-run", "r1")
    assert store.stop_requested("r1") is not None
    store.finish_run("r1", status="stopped", error="stopped")
    time.sleep(0.001)
    store.start_run("r1", config={"data": {"root": "/faces/orl"}}, sites=3, rounds=3, secagg=True, resume=True)
    assert store.stop_requested("r1") is None  # the resumed run runs again
    store.record_action("admin", "stop-run", "r1")
    assert store.stop_requested("r1") is not None


def test_a_suspended_site_is_known_by_its_node_in_the_next_run(tmp_path: Path, store: RunStore, test_faces) -> None:  # noqa: F811
    """A deployment's node ids are stable: a site suspended after one run is not asked in round 1
    of the next, before it has answered in that run."""
    from fedface.server.app import FedFaceRounds

    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))
    rounds.collect(1, [(_proxy(c), _answered(f"site-{c}", w, 40)) for c in ("1", "2", "3")], [])
    rounds.evaluate(1, w)
    store.finish_run(RUN, status="completed")
    store.record_action("admin", "suspend-site", "site-2")

    store.start_run("next", config=cfg.to_toml_dict(), sites=3, rounds=2, secagg=True)
    second = FedFaceRounds(cfg=cfg, run_id="next", run_dir=tmp_path / "next", store=store, test_faces=test_faces)
    assert [c.cid for c, _ in second.filter_sampled(1, _pairs(["1", "2", "3"], cfg))] == ["1", "3"]


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "longer than"),
        ("[" * 1000 + "]" * 1000, "policy is not JSON"),  # nested past json's recursion limit: a problem, not a crash
        (json.dumps({k: "x" * 100 for k in wire.POLICY_FIELDS}), "at most 64 characters"),
        (json.dumps({k: {"nested": 1} for k in wire.POLICY_FIELDS}), "must be null, a boolean"),
    ],
)
def test_a_malicious_policy_is_a_problem_not_a_crash(tmp_path: Path, store: RunStore, test_faces, policy: str, problem: str) -> None:  # noqa: F811
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    reply = _answered("site-a", w, 40)
    reply.metrics[wire.M_POLICY] = policy
    reply.metrics[wire.M_REASON] = "r" * 1_000_000
    rounds.filter_sampled(1, _pairs(["1"], cfg))
    rounds.collect(1, [(_proxy("1"), reply)], [])
    rounds.evaluate(1, w)

    (report,) = store.site_reports(run_id=RUN)
    assert report.policy is None and report.problem is not None and problem in report.problem
    (record,) = store.rounds(RUN)
    assert len(record.participation[0].reason or "") == 500  # a site's text is capped


def test_a_sites_first_and_last_seen_follow_time_not_run_order(store: RunStore) -> None:
    """Runs are read by start; a run resumed after a later one must still move last-seen on."""
    from fedface.server.queries import site_rows

    def round_(run: str, n: int, at: str) -> None:
        store.record_round(
            run, n, started_at=at, seconds=1.0, sampled=["a"],
            participation=[Participation(site="a", status="answered", examples=3, epsilon=float(n), delta=1e-5, accountant="rdp")],
            metrics={},
        )

    _start(store, "A")
    round_("A", 1, "2026-12-01T10:00:00+00:00")
    store.finish_run("A", status="failed", error="crash")
    _start(store, "B")
    round_("B", 1, "2026-12-01T11:00:00+00:00")
    store.finish_run("B", status="completed")
    store.start_run("A", config={"data": {"root": "/faces/orl"}}, sites=3, rounds=3, secagg=True, resume=True)
    round_("A", 2, "2026-12-01T12:00:00+00:00")

    (row,) = site_rows(store)
    assert (row.first_seen, row.last_seen) == ("2026-12-01T10:00:00.000000+00:00", "2026-12-01T12:00:00.000000+00:00")
