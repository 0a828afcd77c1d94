"""Unit tests for fedface.server.app without the Flower runtime: FedFaceRounds' bookkeeping
(round configs, refusals, collection, evaluation, checkpoints, the run store), the strategy's
handling of refusals, and SecAgg+'s share defaults.

Sites are fake ClientProxy objects (a ``cid``) answering real ``flwr.common.FitRes`` values;
the server evaluates a tiny GRU encoder on 10 real held-out ORL identities at 32x32.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM

from fedface.common import wire
from fedface.common.checkpoint import load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.errors import ConfigError
from fedface.common.data import FaceSet, load_faces
from fedface.common.models import build_encoder, encoder_weights
from fedface.server.app import ROUND_ABORTED, FedFaceRounds, make_strategy, secagg_workflow, too_few_reason
from fedface.server.store import RunStore

RUN = "run-unit"
TINY: dict[str, dict[str, Any]] = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
    "evaluation": {"shift-tta": 0, "occlusion-box": 8},
    "training": {"batch-size": 16, "device": "cpu", "lr": 0.004},
    "federation": {"sites": 3, "rounds": 4, "local-epochs": 2},
}


def _config(**sections: dict[str, Any]) -> TrainConfig:
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return TrainConfig.from_mapping(raw)


@pytest.fixture(scope="module")
def test_faces(orl_root: Path) -> FaceSet:
    """The 100 ORL faces of the last 10 identities at 32x32 (the server's held-out people)."""
    faces = load_faces(orl_root, size=(32, 32))
    return faces.subset(np.flatnonzero(faces.labels >= 30))


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    with RunStore(tmp_path / "runs.sqlite") as s:
        yield s  # type: ignore[misc]


def _rounds(cfg: TrainConfig, store: RunStore, faces: FaceSet, run_dir: Path, **kwargs: Any) -> FedFaceRounds:
    store.start_run(RUN, config=cfg.to_toml_dict(), sites=cfg.federation.sites, rounds=cfg.federation.rounds, secagg=True)
    return FedFaceRounds(cfg=cfg, run_id=RUN, run_dir=run_dir, store=store, test_faces=faces, **kwargs)


def _weights(cfg: TrainConfig, seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))


def _proxy(cid: str) -> Any:
    return SimpleNamespace(cid=cid)


def _answered(site: str, weights: list[np.ndarray], examples: int, epsilon: float = 1.5) -> FitRes:
    metrics = {
        wire.M_SITE: site,
        wire.M_STATUS: wire.ANSWERED,
        wire.M_EXAMPLES: examples,
        wire.M_TRAIN_S: 0.25,
        wire.M_EPSILON: epsilon,
        wire.M_DELTA: 1e-5,
        wire.M_ACCOUNTANT: "rdp",
        wire.M_RUN_EPSILON: epsilon,
    }
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), examples, metrics)


def _refused(site: str, weights: list[np.ndarray], reason: str = wire.REASON_BUDGET) -> FitRes:
    metrics = {
        wire.M_SITE: site,
        wire.M_STATUS: wire.REFUSED,
        wire.M_REASON: reason,
        wire.M_EXAMPLES: 40,
        wire.M_TRAIN_S: 0.0,
        wire.M_EPSILON: 2.0,
        wire.M_DELTA: 1e-5,
        wire.M_ACCOUNTANT: "rdp",
        wire.M_BUDGET: 2.5,
        wire.M_REMAINING: 0.5,
    }
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 0, metrics)


def _pairs(cids: list[str], cfg: TrainConfig) -> list[tuple[Any, FitIns]]:
    ins = FitIns(ndarrays_to_parameters(_weights(cfg)), {})
    return [(_proxy(cid), ins) for cid in cids]


# --- round config --------------------------------------------------------------------------------


def test_round_config_carries_the_wire_keys(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config()
    rounds = _rounds(cfg, store, test_faces, tmp_path)

    config = rounds.round_config(2)

    assert config == {
        wire.CFG_RUN_ID: RUN,
        wire.CFG_ROUND: 2,
        wire.CFG_ROUNDS: 4,
        wire.CFG_LOCAL_EPOCHS: 2,
        wire.CFG_LR: 0.004,
        wire.CFG_PROXIMAL_MU: 0.0,
    }


def test_round_config_sends_the_proximal_term_only_for_fedprox(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config(federation={"strategy": "fedprox", "proximal-mu": 0.3})
    rounds = _rounds(cfg, store, test_faces, tmp_path)

    assert rounds.round_config(1)[wire.CFG_PROXIMAL_MU] == 0.3


def test_round_config_of_a_resumed_run_numbers_rounds_from_first_round(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    cfg = _config()
    rounds = _rounds(cfg, store, test_faces, tmp_path, first_round=3)

    config = rounds.round_config(1)

    assert config[wire.CFG_ROUND] == 3
    assert config[wire.CFG_ROUNDS] == 4


# --- sampling and collecting ---------------------------------------------------------------------


def test_filter_sampled_drops_sites_that_refused_for_an_exhausted_budget(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    # Arrange: round 1, site-b refuses (budget), site-c refuses for another reason
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    kept_1 = rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))
    rounds.collect(
        1,
        [(_proxy("1"), _answered("site-a", w, 40)), (_proxy("2"), _refused("site-b", w)), (_proxy("3"), _refused("site-c", w, reason="maintenance"))],
        [],
    )

    # Act
    kept_2 = rounds.filter_sampled(2, _pairs(["3", "1", "2"], cfg))

    # Assert
    assert [c.cid for c, _ in kept_1] == ["1", "2", "3"]
    assert [c.cid for c, _ in kept_2] == ["3", "1"]
    assert rounds.exhausted == {"2"}


def test_collect_totals_answering_examples_and_records_refusals_and_failures(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    # Arrange
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1", "2", "3", "4", "5"], cfg))
    failed_reply = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "site crashed"), ndarrays_to_parameters([]), 0, {})

    # Act
    total = rounds.collect(
        1,
        [(_proxy("1"), _answered("site-a", w, 40)), (_proxy("2"), _refused("site-b", w)), (_proxy("3"), _answered("site-c", w, 25))],
        [(_proxy("4"), failed_reply), TimeoutError("no reply in 60 s")],
    )

    # Assert
    assert total == 65
    log = rounds.rounds[1]
    by_site = {p.site: p for p in log.participation}
    assert list(by_site) == ["site-a", "site-b", "site-c", "node-4"]
    assert by_site["site-a"].status == "answered" and by_site["site-a"].examples == 40
    assert by_site["site-a"].epsilon == 1.5 and by_site["site-a"].accountant == "rdp"
    assert by_site["site-b"].status == "refused" and by_site["site-b"].reason == "budget exhausted"
    assert by_site["site-b"].examples == 0
    assert by_site["site-b"].budget_epsilon == 2.5 and by_site["site-b"].remaining == 0.5
    assert by_site["node-4"].status == "failed"
    assert "site crashed" in (by_site["node-4"].reason or "")
    assert len(log.failures) == 1 and "TimeoutError" in log.failures[0]
    assert rounds.site_name("1") == "site-a"
    assert rounds.site_name("4") == "node-4"


# --- evaluation, checkpoints and the run store ---------------------------------------------------


def test_evaluate_round_0_reports_the_starting_encoder_and_records_no_round(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config()
    seen: list[tuple[int, dict[str, Any]]] = []
    rounds = _rounds(cfg, store, test_faces, tmp_path, on_round=lambda n, row: seen.append((n, row)))

    metrics = rounds.evaluate(0, _weights(cfg))

    assert 0.0 <= metrics["verif_acc"] <= 1.0
    assert 0.0 <= metrics["verif_auc"] <= 1.0
    assert metrics["test_identities"] == 10.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert store.rounds(RUN) == []
    assert not (tmp_path / "checkpoints").exists()
    assert rounds.history == []
    assert rounds.initial == metrics
    assert seen == [(0, {"round": 0, "initial": True, **metrics})]


def test_evaluate_after_a_round_checkpoints_and_records_it(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    # Arrange: three sites answer or refuse under the names they report; a fourth node fails
    cfg = _config()
    w = _weights(cfg, seed=3)
    seen: list[tuple[int, dict[str, Any]]] = []
    rounds = _rounds(cfg, store, test_faces, tmp_path, on_round=lambda n, row: seen.append((n, row)))
    rounds.filter_sampled(1, _pairs(["11", "12", "13", "14"], cfg))
    failed_reply = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "oom"), ndarrays_to_parameters([]), 0, {})
    rounds.collect(
        1,
        [(_proxy("11"), _answered("site-000", w, 40, epsilon=1.25)), (_proxy("12"), _refused("site-001", w)), (_proxy("13"), _answered("site-002", w, 30))],
        [(_proxy("14"), failed_reply)],
    )

    # Act
    metrics = rounds.evaluate(1, w)

    # Assert: checkpoint
    ckpt_path = tmp_path / "checkpoints" / "round-0001.pt"
    assert ckpt_path.is_file()
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.epoch == 1
    for a, b in zip(ckpt.encoder_state.values(), w, strict=True):
        assert np.array_equal(a.numpy(), b)
    # the run store
    (record,) = store.rounds(RUN)
    assert record.round == 1
    assert record.sampled == ["site-000", "site-001", "site-002", "node-14"]
    assert [p.site for p in record.participation] == ["site-000", "site-001", "site-002", "node-14"]
    assert [p.status for p in record.participation] == ["answered", "refused", "answered", "failed"]
    assert record.checkpoint == str(ckpt_path)
    assert record.metrics["verif_acc"] == pytest.approx(metrics["verif_acc"])
    assert record.seconds >= 0
    ((rnd, refusal),) = store.refusals(RUN)
    assert rnd == 1 and refusal.site == "site-001" and refusal.reason == "budget exhausted"
    assert store.site_spend(RUN)["site-000"].epsilon == 1.25
    # the history row and the progress callback
    (row,) = rounds.history
    assert (row["round"], row["answered"], row["refused"], row["failed"], row["sampled"]) == (1, 2, 1, 1, 4)
    assert row["max_epsilon"] == 1.5  # the run's own spend, from the sites that trained
    assert row["max_lifetime_epsilon"] == 2.0  # every site's lifetime spend, the refusing one's too
    assert seen == [(1, row)]


def test_evaluate_of_a_resumed_run_numbers_checkpoints_from_first_round(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path, first_round=3)
    rounds.filter_sampled(1, _pairs(["1"], cfg))
    rounds.collect(1, [(_proxy("1"), _answered("site-a", w, 40))], [])

    rounds.evaluate(1, w)

    assert (tmp_path / "checkpoints" / "round-0003.pt").is_file()
    assert [r.round for r in store.rounds(RUN)] == [3]


def test_evaluate_of_a_round_with_no_site_sampled_records_an_empty_round(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    """Every site exhausted: nobody is asked, the round is still recorded (and checkpointed)."""
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1"], cfg))
    rounds.collect(1, [(_proxy("1"), _refused("site-a", w))], [])
    rounds.evaluate(1, w)

    assert rounds.filter_sampled(2, _pairs(["1"], cfg)) == []
    rounds.evaluate(2, w)

    second = store.rounds(RUN)[1]
    assert second.round == 2 and second.sampled == [] and second.participation == []
    assert rounds.history[-1]["answered"] == 0


def test_evaluate_of_a_round_aborted_before_aggregation_records_every_sampled_site_failed(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    """A SecAgg+ stage lost too many sites: Flower skips aggregate_fit and evaluates anyway."""
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))

    rounds.evaluate(1, w)  # no collect(): the round never reached the strategy

    (record,) = store.rounds(RUN)
    assert [p.status for p in record.participation] == ["failed"] * 3
    assert all(p.reason == ROUND_ABORTED for p in record.participation)
    row = rounds.history[-1]
    assert (row["answered"], row["refused"], row["failed"], row["sampled"]) == (0, 0, 3, 3)


# --- the strategy --------------------------------------------------------------------------------


def test_aggregate_fit_with_every_site_refused_keeps_the_global_encoder(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, w)
    rounds.filter_sampled(1, _pairs(["1", "2"], cfg))

    result = strategy.aggregate_fit(1, [(_proxy("1"), _refused("site-a", w)), (_proxy("2"), _refused("site-b", w))], [])

    assert result == (None, {})
    assert [p.status for p in rounds.rounds[1].participation] == ["refused", "refused"]


def test_aggregate_fit_averages_only_the_answering_sites_by_examples(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    cfg = _config(federation={"secagg": False})  # a clear round: each site's weights reach the strategy
    a, b, c = _weights(cfg, 1), _weights(cfg, 2), _weights(cfg, 3)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, a)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))

    params, _ = strategy.aggregate_fit(
        1,
        [
            (_proxy("1"), _answered("site-a", a, 10)),
            (_proxy("2"), _refused("site-b", b)),
            (_proxy("3"), _answered("site-c", c, 30)),
            (_proxy("4"), _answered("site-d", c, 20)),
        ],
        [],
    )

    assert params is not None
    for got, wa, wc in zip(parameters_to_ndarrays(params), a, c, strict=True):
        np.testing.assert_allclose(got, (10 * wa + 50 * wc) / 60, rtol=1e-5, atol=1e-6)


def test_a_secagg_round_adds_the_unmasked_average_update_to_the_weights_it_sent(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    # Through SecAgg+ the sites send updates; what the strategy averages must be the weights
    # sent plus the average update, not the update alone (that would zero the model).
    cfg = _config(federation={"secagg": True})
    sent = _weights(cfg, 1)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, sent)
    manager = SimpleClientManager()
    for cid in ("1", "2", "3"):
        manager.register(_proxy(cid))
    strategy.configure_fit(1, ndarrays_to_parameters(sent), manager)
    update = [np.full_like(w, -0.02) for w in sent]
    results = _round_results(True, sent, update)

    params, _ = strategy.aggregate_fit(1, results, [])

    assert params is not None
    for got, w in zip(parameters_to_ndarrays(params), sent, strict=True):
        np.testing.assert_allclose(got, w - 0.02, rtol=0, atol=1e-6)


def test_aggregate_fit_refuses_to_sum_fewer_updates_than_min_sites_per_aggregate(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    # Arrange: two of three sites trained; the third refused, so the sum would be of two
    cfg = _config()
    a, b = _weights(cfg, 1), _weights(cfg, 2)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, a)
    rounds.filter_sampled(1, _pairs(["1", "2", "3"], cfg))

    # Act
    result = strategy.aggregate_fit(
        1, [(_proxy("1"), _answered("site-a", a, 10)), (_proxy("2"), _refused("site-b", b)), (_proxy("3"), _answered("site-c", b, 30))], []
    )

    # Assert: no aggregate; the trained sites are recorded with why their updates were not used
    assert result == (None, {})
    participation = {p.site: p for p in rounds.rounds[1].participation}
    assert participation["site-b"].status == "refused"
    for site in ("site-a", "site-c"):
        assert participation[site].status == "failed"
        assert participation[site].reason == too_few_reason(2, 3)
        assert participation[site].epsilon == 1.5  # the spend it reported stays on record


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        pytest.param(lambda w: [w[0] * np.nan, *w[1:]], "array 0 holds NaN, infinite", id="nan"),
        pytest.param(lambda w: [np.full_like(w[0], np.inf), *w[1:]], "array 0 holds NaN, infinite", id="inf"),
        pytest.param(lambda w: w[:-1], "arrays where the model has", id="an-array-missing"),
        pytest.param(lambda w: [w[0].reshape(-1), *w[1:]], "array 0 of shape", id="a-wrong-shape"),
    ],
)
def test_a_clear_round_leaves_out_an_update_no_honest_site_sends_and_averages_the_others(
    tmp_path: Path, store: RunStore, test_faces: FaceSet, bad: Any, why: str
) -> None:
    # A site (malicious or broken) replies with NaN, Inf or other shapes: FedAvg would spread
    # NaN into every weight or fail on the shapes. It is recorded as failed, with why; the
    # round averages the three others.
    cfg = _config(federation={"secagg": False})
    sent = _weights(cfg, 0)
    a, c = _weights(cfg, 1), _weights(cfg, 3)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, sent)
    manager = SimpleClientManager()
    for cid in ("1", "2", "3", "4"):
        manager.register(_proxy(cid))
    strategy.configure_fit(1, ndarrays_to_parameters(sent), manager)

    params, _ = strategy.aggregate_fit(
        1,
        [
            (_proxy("1"), _answered("site-a", a, 10)),
            (_proxy("2"), _answered("site-b", bad(_weights(cfg, 2)), 40)),
            (_proxy("3"), _answered("site-c", c, 30)),
            (_proxy("4"), _answered("site-d", c, 20)),
        ],
        [],
    )

    assert params is not None
    for got, wa, wc in zip(parameters_to_ndarrays(params), a, c, strict=True):
        np.testing.assert_allclose(got, (10 * wa + 50 * wc) / 60, rtol=1e-5, atol=1e-6)
    participation = {p.site: p for p in rounds.rounds[1].participation}
    assert participation["site-b"].status == "failed" and why in (participation["site-b"].reason or "")
    assert [participation[s].status for s in ("site-a", "site-c", "site-d")] == ["answered"] * 3


def test_strategy_configure_fit_skips_exhausted_sites_and_sends_the_round_config(
    tmp_path: Path, store: RunStore, test_faces: FaceSet
) -> None:
    cfg = _config()
    w = _weights(cfg)
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    strategy = make_strategy(rounds, w)
    manager = SimpleClientManager()
    for cid in ("1", "2", "3"):
        manager.register(_proxy(cid))
    params = strategy.initialize_parameters(manager)
    assert params is not None
    strategy.configure_fit(1, params, manager)
    strategy.aggregate_fit(
        1, [(_proxy("1"), _answered("site-a", w, 40)), (_proxy("2"), _refused("site-b", w)), (_proxy("3"), _answered("site-c", w, 40))], []
    )

    pairs = strategy.configure_fit(2, params, manager)

    assert sorted(c.cid for c, _ in pairs) == ["1", "3"]
    assert all(ins.config[wire.CFG_ROUND] == 2 and ins.config[wire.CFG_RUN_ID] == RUN for _, ins in pairs)


def test_make_strategy_picks_fedadam_when_asked(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config(federation={"strategy": "fedadam", "server-lr": 0.05})
    rounds = _rounds(cfg, store, test_faces, tmp_path)

    strategy = make_strategy(rounds, _weights(cfg))

    assert isinstance(strategy, FedAdam)
    assert strategy.eta == 0.05
    assert strategy.eta_l == 0.004
    fedavg = FedFaceRounds(cfg=_config(), run_id=RUN, run_dir=tmp_path, store=store, test_faces=test_faces)
    assert type(make_strategy(fedavg, _weights(cfg))).__mro__[1] is FedAvg


def test_make_strategy_picks_fedavgm_with_its_momentum(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config(federation={"strategy": "fedavgm", "server-momentum": 0.5})
    strategy = make_strategy(_rounds(cfg, store, test_faces, tmp_path), _weights(cfg))

    assert isinstance(strategy, FedAvgM)
    assert (strategy.server_momentum, strategy.server_learning_rate) == (0.5, 1.0)


def _round_results(secagg: bool, weights: list[np.ndarray], step: list[np.ndarray]) -> list[tuple[Any, FitRes]]:
    """Three sites that each moved ``weights`` by ``step``, as the strategy receives them: in a
    clear round each site's weights; through SecAgg+ the unmasked average of their updates
    (``step``), one array list shared by every result."""
    if secagg:
        shared = _answered("site-0", step, 40).parameters
        results = [(_proxy(str(i)), _answered(f"site-{i}", step, 40)) for i in range(3)]
        for _, res in results:
            res.parameters = shared
        return results
    moved = [w + s for w, s in zip(weights, step, strict=True)]
    return [(_proxy(str(i)), _answered(f"site-{i}", moved, 40)) for i in range(3)]


@pytest.mark.parametrize("secagg", [False, True], ids=["clear", "secagg"])
def test_fedavgm_carries_momentum_across_rounds(tmp_path: Path, store: RunStore, test_faces: FaceSet, secagg: bool) -> None:
    # Arrange: every round the sites move the weights by the same step d; with momentum b the
    # server moves them by d, then (1 + b) d: the momentum is real, not FedAvg renamed. Through
    # SecAgg+ the sites send the step itself and the server adds it to the weights it sent.
    cfg = _config(federation={"strategy": "fedavgm", "server-momentum": 0.5, "secagg": secagg})
    w0 = _weights(cfg)
    strategy = make_strategy(_rounds(cfg, store, test_faces, tmp_path), w0)
    manager = SimpleClientManager()
    for cid in ("0", "1", "2"):
        manager.register(_proxy(cid))
    params = ndarrays_to_parameters(w0)
    d = [np.full_like(w, 0.01) for w in w0]

    # Act
    strategy.configure_fit(1, params, manager)
    after1, _ = strategy.aggregate_fit(1, _round_results(secagg, w0, d), [])
    w1 = parameters_to_ndarrays(after1)
    strategy.configure_fit(2, after1, manager)
    after2, _ = strategy.aggregate_fit(2, _round_results(secagg, w1, d), [])
    w2 = parameters_to_ndarrays(after2)

    # Assert
    for a, b, c, step in zip(w0, w1, w2, d, strict=True):
        np.testing.assert_allclose(b - a, step, atol=1e-6)
        np.testing.assert_allclose(c - b, 1.5 * step, atol=1e-6)


# --- SecAgg+ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sites", "shares"), [(2, 1.0), (3, 1.0), (10, 1.0), (20, 0.5), (100, 0.1)])
def test_secagg_defaults_are_fractions_of_the_sites_asked_each_round(sites: int, shares: float) -> None:
    # Fractions follow the sites actually sampled in a round (fewer once some refuse): all of
    # them up to 10 neighbours, two thirds of the shares to unmask (Flower rounds per round).
    cfg = _config(federation={"sites": sites})

    workflow = secagg_workflow(cfg, sites)

    assert workflow.num_shares == pytest.approx(shares)
    assert workflow.reconstruction_threshold == pytest.approx(2 / 3)


def test_secagg_respects_fixed_shares_and_threshold_from_the_config() -> None:
    cfg = _config(federation={"sites": 10, "num-shares": 5, "reconstruction-threshold": 3})

    workflow = secagg_workflow(cfg, 10)

    assert workflow.num_shares == 5
    assert workflow.reconstruction_threshold == 3


@pytest.mark.parametrize(
    ("shares", "threshold", "match"),
    [
        (2, 0, "odd number above 2"),
        (4, 0, "odd number above 2"),  # Flower 1.42 aborts every round with an even count
        (11, 0, "cannot exceed sites"),
        (5, 5, "less than"),
        (5, 9, "less than"),
        (5, 1, "at least 2"),
        (0, 10, "less than the shares per site"),
    ],
)
def test_secagg_invalid_fixed_shares_or_threshold_is_a_config_error(shares: int, threshold: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(federation={"sites": 10, "num-shares": shares, "reconstruction-threshold": threshold})


def test_expression_run_evaluates_expressions_and_checkpoints_the_shared_head(
    tmp_path: Path, store: RunStore, jaffe_root: Path
) -> None:
    # Arrange: an expression run whose server holds out two JAFFE subjects
    from fedface.common.data.expressions import EXPRESSION_CLASSES

    cfg = TrainConfig.from_mapping(
        {
            "data": {"image-size": [16, 16]},
            "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 1, "stem": [4], "passes": ["rows"]},
            "evaluation": {"shift-tta": 0, "occlusion-box": 4},
            "training": {"task": "expression", "device": "cpu"},
            "federation": {"sites": 3, "rounds": 2},
        }
    )
    faces = load_faces(jaffe_root, size=(16, 16))
    held_out = faces.subset(np.flatnonzero(faces.labels < 2))
    rounds = _rounds(cfg, store, held_out, tmp_path)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    initial = rounds.initial_weights(encoder)

    # Act
    out = rounds.evaluate(1, initial)

    # Assert: encoder + 7-class head; expression metrics on the held-out subjects' images
    assert len(initial) == len(encoder.state_dict()) + 2
    assert out["test_images"] == len(held_out)
    assert 0.0 <= out["expression_acc"] <= 1.0 and "expression_macro_f1" in out
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "round-0001.pt")
    assert ckpt.task == "expression" and tuple(ckpt.class_names) == EXPRESSION_CLASSES
    assert ckpt.head_state and ckpt.num_classes == 7


def test_identity_run_shares_the_encoder_alone(tmp_path: Path, store: RunStore, test_faces: FaceSet) -> None:
    cfg = _config()
    rounds = _rounds(cfg, store, test_faces, tmp_path)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)

    assert len(rounds.initial_weights(encoder)) == len(encoder.state_dict())
    assert rounds.head is None
