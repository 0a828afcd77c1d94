"""Unit tests for fedface.client.site: one site's federated round without the Flower runtime.

A site holds the 40 real ORL faces of identities s1..s4 at 32x32 and trains a tiny GRU encoder
(hidden 8, embedding 8): DP planned once for all rounds and charged before training, refusal
on an exhausted budget, the margin head kept on disk, the encoder weights' wire format, and
FedProx's proximal term.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedface.client.site as site_module
from fedface.client.site import RoundResult, Site
from fedface.common import wire
from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet, load_faces
from fedface.common.models import build_encoder, encoder_weights, load_encoder_weights
from fedface.common.privacy.accounting import compute_epsilon
from fedface.common.privacy.ledger import PrivacyLedger

RUN = "run-test"
TINY: dict[str, dict[str, Any]] = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
    "evaluation": {"shift-tta": 0, "occlusion-box": 8},
    "training": {"batch-size": 16, "device": "cpu"},
    # these tests train the head without DP too; tests/unit/test_policy.py checks the refusals
    "site-policy": {"allow-non-private": True},
}


def _config(**sections: dict[str, Any]) -> TrainConfig:
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return TrainConfig.from_mapping(raw)


@pytest.fixture(scope="module")
def site_faces(orl_root: Path) -> FaceSet:
    """The 40 ORL faces of identities s1..s4 at 32x32."""
    faces = load_faces(orl_root, size=(32, 32))
    return faces.subset(np.flatnonzero(faces.labels < 4))


def _site(faces: FaceSet, tmp_path: Path, cfg: TrainConfig, name: str = "site-a") -> Site:
    state = tmp_path / name
    return Site(name, cfg, faces, state, state / "ledger.sqlite")


def _initial(cfg: TrainConfig, seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))


def _round(site: Site, weights: list[np.ndarray], round_: int, *, rounds: int = 3, **kwargs: Any) -> RoundResult:
    # as the site's mod reports a request that came through SecAgg+ with 3 sites' masks
    args: dict[str, Any] = {"run_id": RUN, "local_epochs": 1, "lr": 1e-2, "secagg": True, "peers": 3}
    args.update(kwargs)
    return site.train_round(weights, round_=round_, rounds=rounds, **args)


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True))))


# --- privacy: planned once, charged per round --------------------------------------------------


def test_private_site_spends_its_epsilon_over_the_planned_rounds(site_faces: FaceSet, tmp_path: Path) -> None:
    # Arrange
    cfg = _config(privacy={"epsilon": 4.0})
    site = _site(site_faces, tmp_path, cfg)
    weights = _initial(cfg)

    # Act
    results = []
    for r in (1, 2, 3):
        result = _round(site, weights, r, rounds=3)
        results.append(result)
        weights = result.weights

    # Assert
    epsilons = [res.metrics[wire.M_EPSILON] for res in results]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[-1] <= 4.0
    assert epsilons[-1] == pytest.approx(4.0, rel=1e-2)
    for res in results:
        assert res.metrics[wire.M_STATUS] == wire.ANSWERED
        assert res.metrics[wire.M_SITE] == "site-a"
        assert res.examples == res.metrics[wire.M_EXAMPLES] == len(site_faces) == site.examples == 40
        assert res.metrics[wire.M_ACCOUNTANT] == "rdp"
        assert res.metrics[wire.M_DELTA] == pytest.approx(1e-5)
    with PrivacyLedger(site.ledger_path) as ledger:
        sessions = ledger.sessions("site-a")
        spend = ledger.spend("site-a")
    assert len(sessions) == 3
    assert [s.round for s in sessions] == [1, 2, 3]
    assert {s.run_id for s in sessions} == {RUN}
    assert len({s.mechanism.noise_multiplier for s in sessions}) == 1
    assert sessions[0].mechanism.noise_multiplier == results[0].metrics[wire.M_NOISE]
    assert [s.epsilon_after for s in sessions] == pytest.approx(epsilons, rel=1e-12)
    assert spend.epsilon == pytest.approx(epsilons[-1], rel=1e-9)


def test_mechanism_is_calibrated_for_all_rounds_not_one(site_faces: FaceSet, tmp_path: Path) -> None:
    site = _site(site_faces, tmp_path, _config(privacy={"epsilon": 4.0}))

    three = site.mechanism(rounds=3, local_epochs=1)
    one = site.mechanism(rounds=1, local_epochs=1)

    assert three.sample_rate == pytest.approx(16 / 40)
    assert three.steps == one.steps == round(40 / 16)
    assert three.noise_multiplier > one.noise_multiplier
    total = compute_epsilon([three.history_entry()] * 3, delta=1e-5, accountant="rdp")
    assert total <= 4.0
    assert total == pytest.approx(4.0, rel=1e-2)


def test_site_refuses_a_round_past_its_budget_without_training(
    site_faces: FaceSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a budget between the spend after round 1 and after round 2
    probe = _site(site_faces, tmp_path / "probe", _config(privacy={"epsilon": 4.0}))
    mech = probe.mechanism(rounds=3, local_epochs=1)
    after_1 = compute_epsilon([mech.history_entry()], delta=mech.delta, accountant=mech.accountant)
    after_2 = compute_epsilon([mech.history_entry()] * 2, delta=mech.delta, accountant=mech.accountant)
    budget = (after_1 + after_2) / 2
    cfg = _config(privacy={"epsilon": 4.0}, **{"site-policy": {"budget-epsilon": budget}})
    site = _site(site_faces, tmp_path, cfg)
    first = _round(site, _initial(cfg), 1)
    assert first.metrics[wire.M_STATUS] == wire.ANSWERED
    assert first.metrics[wire.M_EPSILON] == pytest.approx(after_1, rel=1e-9)
    assert first.metrics[wire.M_BUDGET] == pytest.approx(budget)
    head_path = site.state_dir / "head.pt"
    head_bytes = head_path.read_bytes()
    head_mtime = head_path.stat().st_mtime_ns
    weights = first.weights

    def no_training(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a refused round must not train")

    monkeypatch.setattr(site_module, "train_epoch_dp", no_training)
    monkeypatch.setattr(site_module, "train_epoch", no_training)

    # Act
    second = _round(site, weights, 2)

    # Assert
    m = second.metrics
    assert m[wire.M_STATUS] == wire.REFUSED
    assert m[wire.M_REASON] == wire.REASON_BUDGET == "budget exhausted"
    assert second.examples == 0
    assert len(second.weights) == len(weights)
    assert all(np.array_equal(a, b) for a, b in zip(second.weights, weights, strict=True))
    assert m[wire.M_REMAINING] >= 0
    assert m[wire.M_REMAINING] == pytest.approx(budget - after_1, rel=1e-9)
    assert m[wire.M_EPSILON] == pytest.approx(after_1, rel=1e-9)
    assert m[wire.M_BUDGET] == pytest.approx(budget)
    assert m[wire.M_TRAIN_S] == 0.0
    with PrivacyLedger(site.ledger_path) as ledger:
        assert len(ledger.sessions()) == 1
        assert ledger.budget("site-a") is not None
    assert head_path.read_bytes() == head_bytes
    assert head_path.stat().st_mtime_ns == head_mtime


def test_budget_from_policy_is_set_once_and_kept_in_the_ledger(site_faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config(privacy={"epsilon": 4.0}, **{"site-policy": {"budget-epsilon": 100.0}})
    site = _site(site_faces, tmp_path, cfg)
    weights = _initial(cfg)

    _round(site, weights, 1)
    _round(site, weights, 2)

    with PrivacyLedger(site.ledger_path) as ledger:
        budget = ledger.budget("site-a")
        assert budget is not None and budget.epsilon == 100.0
        spend = ledger.spend("site-a")
    assert spend.sessions == 2
    assert spend.remaining == pytest.approx(100.0 - spend.epsilon)


# --- the head stays at the site -----------------------------------------------------------------


def test_head_persists_in_state_dir_and_a_new_site_object_loads_it(site_faces: FaceSet, tmp_path: Path) -> None:
    # Arrange
    cfg = _config()
    site = _site(site_faces, tmp_path, cfg)
    initial = _initial(cfg)
    head_path = site.state_dir / "head.pt"
    assert not head_path.exists()

    # Act
    result = _round(site, initial, 1)

    # Assert: training happened, the encoder's shapes came back, the head was saved
    assert head_path.is_file()
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    expected_shapes = [tuple(v.shape) for v in encoder.state_dict().values()]
    assert [w.shape for w in result.weights] == expected_shapes
    assert all(w.dtype == np.float32 for w in result.weights)
    assert _distance(result.weights, initial) > 0
    saved = torch.load(head_path, map_location="cpu", weights_only=True)
    reopened = Site("site-a", cfg, site_faces, site.state_dir, site.ledger_path)
    loaded = reopened._head().state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key].cpu()), key
    fresh = _site(site_faces, tmp_path, cfg, name="other")._head().state_dict()
    assert any(not torch.equal(saved[k], fresh[k].cpu()) for k in saved)


def test_next_round_continues_from_the_saved_head(site_faces: FaceSet, tmp_path: Path) -> None:
    """Round 2 of a restarted site (a new Site object on a copy of the state directory) equals
    round 2 of the running one; a site without the head trains to other weights."""
    cfg = _config()
    running = _site(site_faces, tmp_path, cfg, name="running")
    after_1 = _round(running, _initial(cfg), 1).weights
    shutil.copytree(running.state_dir, tmp_path / "restarted")
    restarted = Site("running", cfg, site_faces, tmp_path / "restarted", tmp_path / "restarted" / "ledger.sqlite")
    headless = _site(site_faces, tmp_path, cfg, name="headless")

    from_running = _round(running, after_1, 2).weights
    from_restart = _round(restarted, after_1, 2).weights
    from_headless = _round(headless, after_1, 2).weights

    assert all(np.array_equal(a, b) for a, b in zip(from_restart, from_running, strict=True))
    assert _distance(from_restart, from_headless) > 0


def test_non_private_site_writes_no_ledger_and_reports_no_epsilon(site_faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config()
    site = _site(site_faces, tmp_path, cfg)

    result = _round(site, _initial(cfg), 1)

    assert not cfg.privacy.enabled
    assert not site.ledger_path.exists()
    assert result.metrics[wire.M_STATUS] == wire.ANSWERED
    assert result.examples == 40
    for key in (wire.M_EPSILON, wire.M_DELTA, wire.M_BUDGET, wire.M_REMAINING, wire.M_NOISE):
        assert key not in result.metrics
    assert set(result.metrics) <= wire.CLEAR_REPLY_KEYS  # and no training loss among them
    assert result.metrics[wire.M_TRAIN_S] > 0


# --- the encoder's wire format -----------------------------------------------------------------


def test_encoder_weights_round_trip() -> None:
    cfg = _config()
    torch.manual_seed(1)
    source = build_encoder(cfg.model, image_size=cfg.data.image_size)
    torch.manual_seed(2)
    target = build_encoder(cfg.model, image_size=cfg.data.image_size)

    weights = encoder_weights(source)
    load_encoder_weights(target, weights)

    assert len(weights) == len(source.state_dict())
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    first = next(iter(source.state_dict().values())).clone()
    weights[0][...] = 0  # copies: changing them leaves the encoder alone
    assert torch.equal(next(iter(source.state_dict().values())), first)


def test_load_encoder_weights_with_wrong_count_names_it() -> None:
    cfg = _config()
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    weights = encoder_weights(encoder)
    n = len(weights)

    with pytest.raises(ValueError, match=rf"expected {n} encoder arrays, got {n - 1}"):
        load_encoder_weights(encoder, weights[:-1])


# --- FedProx -----------------------------------------------------------------------------------


def test_fedprox_keeps_the_update_near_the_global_weights(site_faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config()
    initial = _initial(cfg)

    plain = _round(_site(site_faces, tmp_path, cfg, "plain"), initial, 1, local_epochs=3, lr=1e-3).weights
    again = _round(_site(site_faces, tmp_path, cfg, "again"), initial, 1, local_epochs=3, lr=1e-3).weights
    prox = _round(_site(site_faces, tmp_path, cfg, "prox"), initial, 1, local_epochs=3, lr=1e-3, proximal_mu=1e3).weights

    assert _distance(plain, again) == 0.0  # same seed: the comparison is fair
    assert _distance(prox, initial) > 0
    assert _distance(prox, initial) < 0.5 * _distance(plain, initial)


def test_a_grown_plan_recalibrates_the_remaining_rounds_within_the_runs_epsilon(site_faces: FaceSet, tmp_path: Path) -> None:
    # Arrange: four rounds planned, two trained, then the run resumed with six rounds planned
    cfg = _config(privacy={"epsilon": 4.0})
    site = _site(site_faces, tmp_path, cfg)
    weights = _initial(cfg)
    for r in (1, 2):
        weights = _round(site, weights, r, rounds=4, run_id="run", lr=1e-3).weights

    # Act
    for r in (3, 4, 5, 6):
        res = _round(site, weights, r, rounds=6, run_id="run", lr=1e-3)
        weights = res.weights

    # Assert: more noise for the added rounds, and the run still ends within its epsilon
    sessions = PrivacyLedger(tmp_path / "site-a" / "ledger.sqlite").sessions("site-a")
    sigmas = [s.mechanism.noise_multiplier for s in sessions]
    assert sigmas[0] == sigmas[1] < sigmas[2] == sigmas[5]
    total = compute_epsilon([s.mechanism.history_entry() for s in sessions], delta=1e-5, accountant="rdp")
    assert 4.0 * 0.99 <= total <= 4.0
    assert res.metrics[wire.M_EPSILON] == pytest.approx(total, abs=1e-9)


def test_a_round_past_the_plan_is_refused(site_faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config(privacy={"epsilon": 4.0})
    site = _site(site_faces, tmp_path, cfg)

    res = _round(site, _initial(cfg), 3, rounds=2, run_id="run", lr=1e-3)

    assert res.metrics[wire.M_STATUS] == wire.REFUSED and res.examples == 0
    assert res.metrics[wire.M_REASON] == wire.REASON_BUDGET


# --- expression task: the expression head is shared, the site's people never are ----------------

EXPR_TINY = {
    "data": {"image-size": [16, 16]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 1, "stem": [4], "passes": ["rows"]},
    "evaluation": {"shift-tta": 0, "occlusion-box": 4},
    "training": {"task": "expression", "batch-size": 16, "device": "cpu", "label-smoothing": 0.1},
    "site-policy": {"allow-non-private": True},
}


@pytest.fixture(scope="module")
def jaffe_faces(jaffe_root: Path) -> FaceSet:
    return load_faces(jaffe_root, size=(16, 16))


def _expr_initial(cfg: TrainConfig) -> list[np.ndarray]:
    from fedface.common.models import ExpressionHead, shared_weights

    torch.manual_seed(0)
    return shared_weights(build_encoder(cfg.model, image_size=cfg.data.image_size), ExpressionHead(8, 7))


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_expression_site_trains_on_expressions_and_shares_encoder_and_head(
    jaffe_faces: FaceSet, tmp_path: Path, private: bool
) -> None:
    # Arrange: one JAFFE subject per site would be typical; two here
    faces = jaffe_faces.subset(np.flatnonzero(jaffe_faces.labels < 2))
    cfg = TrainConfig.from_mapping({**EXPR_TINY, **({"privacy": {"epsilon": 8.0}} if private else {})})
    site = _site(faces, tmp_path, cfg)
    weights = _expr_initial(cfg)

    # Act
    result = _round(site, weights, 1)

    # Assert: the site's labels are the 7 expressions, not its 2 people
    assert set(site.labels.tolist()) <= set(range(7)) and len(set(site.labels.tolist())) > 2
    assert result.metrics[wire.M_STATUS] == wire.ANSWERED
    # encoder + head arrays, in the shape the server sent, and both trained
    assert [w.shape for w in result.weights] == [w.shape for w in weights]
    n_enc = len(build_encoder(cfg.model, image_size=cfg.data.image_size).state_dict())
    assert _distance(result.weights[n_enc:], weights[n_enc:]) > 0  # the head moved
    assert _distance(result.weights[:n_enc], weights[:n_enc]) > 0
    # nothing kept on disk for a head that is shared
    assert not (tmp_path / "site-a" / "head.pt").exists()
    if private:
        assert wire.M_RUN_EPSILON in result.metrics


def test_trainable_gru_freezes_the_stem_at_the_site(jaffe_faces: FaceSet, tmp_path: Path) -> None:
    cfg = TrainConfig.from_mapping({**EXPR_TINY, "privacy": {"epsilon": 8.0, "trainable": "gru"}})
    site = _site(jaffe_faces.subset(np.flatnonzero(jaffe_faces.labels < 2)), tmp_path, cfg)
    weights = _expr_initial(cfg)
    keys = list(build_encoder(cfg.model, image_size=cfg.data.image_size).state_dict())

    result = _round(site, weights, 1)

    for key, before, after in zip(keys, weights, result.weights, strict=False):
        if key.startswith("stem."):
            assert np.array_equal(before, after), key  # frozen: no noise added either
        elif key.startswith("rnns."):
            assert not np.array_equal(before, after), key
