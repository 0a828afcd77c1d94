"""A site's own privacy policy (fedface.client.policy), enforced by the site: each request that
asks for more privacy loss than the policy allows is refused with its named reason before
anything is trained or charged; requests for less are served as asked; the site's mod, not the
server, says how a request came.

Sites hold the 40 real ORL faces of identities s1..s4 at 32x32 with a tiny GRU encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

import fedface.client.site as site_module
from fedface.client.app import FIT_CONFIG, SecAggRequestError, SiteFailure, private_errors_mod, site_mod
from fedface.client.policy import PolicyRefusal, RoundRequest, check_request
from fedface.client.site import Site
from fedface.client.siteconfig import SiteConfig
from fedface.common import wire
from fedface.common.config import SitePolicyConfig, TrainConfig
from fedface.common.data import FaceSet, load_faces
from fedface.common.errors import ConfigError, CorruptImageError
from fedface.common.models import build_encoder, encoder_weights
from fedface.common.privacy.ledger import PrivacyLedger

TINY: dict[str, dict[str, Any]] = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
    "evaluation": {"shift-tta": 0, "occlusion-box": 8},
    "training": {"batch-size": 16, "device": "cpu"},
    "privacy": {"epsilon": 4.0},
}


def _config(**sections: dict[str, Any]) -> TrainConfig:
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return TrainConfig.from_mapping(raw)


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> FaceSet:
    all_faces = load_faces(orl_root, size=(32, 32))
    return all_faces.subset(np.flatnonzero(all_faces.labels < 4))


def _weights(cfg: TrainConfig) -> list[np.ndarray]:
    torch.manual_seed(0)
    return encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))


def _site(faces: FaceSet, tmp_path: Path, cfg: TrainConfig, policy: SitePolicyConfig) -> Site:
    return Site("site-a", cfg, faces, tmp_path / "state", tmp_path / "ledger.sqlite", policy=policy)


def _train(site: Site, cfg: TrainConfig, *, run_id: str = "run", round_: int = 1, rounds: int = 2, secagg: bool = True, peers: int | None = 3) -> Any:
    return site.train_round(_weights(cfg), run_id=run_id, round_=round_, rounds=rounds, local_epochs=1, lr=1e-2, secagg=secagg, peers=peers)


def _sessions(path: Path) -> int:
    if not path.exists():
        return 0
    with PrivacyLedger(path) as ledger:
        return len(ledger.sessions())


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a refused request must not train")

    monkeypatch.setattr(site_module, "train_epoch_dp", refuse)
    monkeypatch.setattr(site_module, "train_epoch", refuse)


POLICY = SitePolicyConfig(budget_epsilon=20.0, epsilon_per_run=8.0)

VIOLATIONS = [
    pytest.param({"secagg": False, "peers": None}, {}, wire.REASON_SECAGG, id="secagg-off"),
    pytest.param({"peers": 2}, {}, wire.REASON_PEERS, id="too-few-peers"),
    pytest.param({}, {"privacy": {"epsilon": float("inf")}}, wire.REASON_NON_PRIVATE, id="eps-inf"),
    pytest.param({}, {"privacy": {"epsilon": 4.0, "delta": 0.5}}, wire.REASON_DELTA, id="delta-too-large"),
    pytest.param({}, {"privacy": {"epsilon": 9.0}}, wire.REASON_EPSILON_PER_RUN, id="epsilon-per-run"),
    # a fixed noise so small that the run as planned would pass epsilon-per-run
    pytest.param({}, {"privacy": {"epsilon": None, "noise-multiplier": 0.3}}, wire.REASON_EPSILON_PER_RUN, id="fixed-noise-per-run"),
]


@pytest.mark.parametrize(("how", "sections", "reason"), VIOLATIONS)
def test_a_request_outside_the_policy_is_refused_with_its_reason_and_nothing_trained_or_charged(
    faces: FaceSet, tmp_path: Path, no_training: None, how: dict[str, Any], sections: dict[str, Any], reason: str
) -> None:
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw[section].update(values)
    raw["privacy"] = {k: v for k, v in raw["privacy"].items() if v is not None}
    cfg = TrainConfig.from_mapping(raw)
    site = _site(faces, tmp_path, cfg, POLICY)

    result = _train(site, cfg, **how)

    assert result.metrics[wire.M_STATUS] == wire.REFUSED
    assert result.metrics[wire.M_REASON] == reason
    assert result.examples == 0
    assert _sessions(site.ledger_path) == 0
    assert not (site.state_dir / "head.pt").exists()


def test_a_new_run_id_per_round_gains_nothing_past_the_lifetime_budget(faces: FaceSet, tmp_path: Path) -> None:
    # Arrange: each "run" asks for the full epsilon-per-run in a single round
    cfg = _config(privacy={"epsilon": 4.0})
    site = _site(faces, tmp_path, cfg, SitePolicyConfig(budget_epsilon=6.0, epsilon_per_run=4.0))

    # Act
    results = [_train(site, cfg, run_id=f"run-{i}", rounds=1) for i in range(4)]

    # Assert: each run's own epsilon fits the cap, but the runs compose into one lifetime spend
    statuses = [r.metrics[wire.M_STATUS] for r in results]
    answered = statuses.count(wire.ANSWERED)
    assert statuses == [wire.ANSWERED] * answered + [wire.REFUSED] * (4 - answered) and 1 <= answered < 4
    assert all(r.metrics[wire.M_REASON] == wire.REASON_BUDGET for r in results[answered:])
    assert all(r.metrics[wire.M_RUN_EPSILON] <= 4.0 for r in results[:answered])
    assert _sessions(site.ledger_path) == answered
    with PrivacyLedger(site.ledger_path) as ledger:
        assert ledger.spend("site-a").epsilon <= 6.0
    # the refused run alone would have fitted its per-run cap: only the lifetime budget stops it
    assert all(r.metrics[wire.M_REMAINING] < 4.0 for r in results[answered:])


def test_the_server_may_ask_for_less_privacy_loss(faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config(privacy={"epsilon": 2.0, "delta": 1e-7, "accountant": "prv"})
    site = _site(faces, tmp_path, cfg, SitePolicyConfig(budget_epsilon=20.0, epsilon_per_run=8.0, delta=1e-5, accountant="rdp"))

    result = _train(site, cfg, rounds=1)

    assert result.metrics[wire.M_STATUS] == wire.ANSWERED
    assert result.metrics[wire.M_RUN_EPSILON] <= 2.0
    with PrivacyLedger(site.ledger_path) as ledger:
        (session,) = ledger.sessions()
        budget = ledger.budget("site-a")
    assert session.mechanism.delta == 1e-7  # the smaller delta, as asked
    assert session.mechanism.accountant == "rdp"  # the site's accountant, not the scenario's
    assert budget is not None and (budget.epsilon, budget.delta) == (20.0, 1e-5)


def test_non_private_rounds_only_when_the_policy_allows_them(faces: FaceSet, tmp_path: Path) -> None:
    cfg = _config(privacy={"epsilon": float("inf")})
    site = _site(faces, tmp_path, cfg, SitePolicyConfig(allow_non_private=True))

    result = _train(site, cfg)

    assert result.metrics[wire.M_STATUS] == wire.ANSWERED
    assert not site.ledger_path.exists()


@pytest.mark.parametrize("ledger_delta", [1e-5, 1e-3])
def test_a_smaller_budget_already_in_the_ledger_is_kept(faces: FaceSet, tmp_path: Path, ledger_delta: float) -> None:
    # (at a larger delta than the policy's, the budget is re-recorded at the policy's delta, never raised)
    cfg = _config()
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.set_budget("site-a", epsilon=5.0, delta=ledger_delta)
    site = _site(faces, tmp_path, cfg, SitePolicyConfig(budget_epsilon=50.0))

    result = _train(site, cfg)

    assert result.metrics[wire.M_BUDGET] == 5.0
    assert result.metrics[wire.M_DELTA] == 1e-5


def test_check_request_min_peers_counts_this_site() -> None:
    policy = SitePolicyConfig(min_peers=3)
    check_request(policy, RoundRequest(private=True, epsilon=1.0, delta=1e-5, secagg=True, peers=3))
    with pytest.raises(PolicyRefusal, match="too few peers"):
        check_request(policy, RoundRequest(private=True, epsilon=1.0, delta=1e-5, secagg=True, peers=2))


# --- the site's mod: how the request came, never the server's word ------------------------------


@pytest.fixture(autouse=True)
def _flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds a Message for the run of the process it runs in: give this one a run."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _train_message(*, secagg_stage: str | None, injected: dict[str, Any]) -> Message:
    content = RecordDict()
    content.config_records[FIT_CONFIG] = ConfigRecord({wire.CFG_ROUND: 1, **injected})
    if secagg_stage is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: secagg_stage, Key.SOURCE_LIST: [11, 12, 13, 14], Key.CIPHERTEXT_LIST: [b"", b"", b"", b""]})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_site_mod_drops_local_keys_the_server_sends_on_a_clear_request() -> None:
    seen: dict[str, Any] = {}

    def call_next(msg: Message, _ctxt: Any) -> Message:
        seen.update(dict(msg.content.config_records[FIT_CONFIG]))
        return msg

    msg = _train_message(secagg_stage=None, injected={wire.LOCAL_SECAGG: True, wire.LOCAL_PEERS: 99, "fedface.local.other": 1})

    site_mod(msg, _context(), call_next)

    assert seen[wire.LOCAL_SECAGG] is False
    assert wire.LOCAL_PEERS not in seen and "fedface.local.other" not in seen


def _context(*, agreed: list[int] | None = None, node_config: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None) -> Context:
    """A node's Flower context; ``agreed``: the neighbours this site agreed SecAgg+ keys with."""
    state = RecordDict()
    if agreed is not None:
        state.config_records[RECORD_KEY_STATE] = ConfigRecord({"ss2_dict:K": agreed, "ss2_dict:V": [b"k" * 32] * len(agreed)})
    return Context(run_id=1, node_id=10, node_config=node_config or {}, state=state, run_config=run_config or {})


def _masked_vector_request(sources: list[int], ciphertexts: int | None = None, injected: dict[str, Any] | None = None) -> Message:
    msg = _train_message(secagg_stage=None, injected={wire.CFG_RUN_ID: "run", **(injected or {})})
    n = len(sources) if ciphertexts is None else ciphertexts
    msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: sources, Key.CIPHERTEXT_LIST: [b"c"] * n}
    )
    return msg


def _seen_by_secaggplus(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import fedface.client.app as app_module

    seen: dict[str, Any] = {}

    def fake_secaggplus(msg: Message, _ctxt: Any, _call_next: Any) -> Message:
        seen.update(dict(msg.content.config_records[FIT_CONFIG]))
        return msg

    monkeypatch.setattr(app_module, "secaggplus_mod", fake_secaggplus)
    return seen


def test_site_mod_counts_the_peers_it_agreed_keys_with(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _seen_by_secaggplus(monkeypatch)

    site_mod(_masked_vector_request([11, 12, 13, 14], injected={wire.LOCAL_PEERS: 99}), _context(agreed=[11, 12, 13, 14]), lambda m, c: m)

    assert seen[wire.LOCAL_SECAGG] is True
    assert seen[wire.LOCAL_PEERS] == 5  # four neighbours whose shares arrived, and this site


@pytest.mark.parametrize(
    ("sources", "ciphertexts"),
    [
        pytest.param([11, 11], None, id="a-repeated-source"),  # the same pairwise mask twice: a sum of two passing as three
        pytest.param([11, 77], None, id="a-source-without-an-agreed-key"),
        pytest.param([11, 12], 1, id="fewer-ciphertexts-than-sources"),
    ],
)
def test_site_mod_refuses_a_masked_vector_request_that_does_not_match_its_key_agreement_before_training(
    monkeypatch: pytest.MonkeyPatch, sources: list[int], ciphertexts: int | None
) -> None:
    seen = _seen_by_secaggplus(monkeypatch)

    with pytest.raises(SecAggRequestError, match="refused before training"):
        site_mod(_masked_vector_request(sources, ciphertexts), _context(agreed=[11, 12]), lambda m, c: m)

    assert seen == {}  # Flower's mod (which trains first) was never called


def test_site_mod_pins_the_first_run_id_of_a_flower_run() -> None:
    ctxt = _context()
    seen: list[dict[str, Any]] = []

    def call_next(msg: Message, _ctxt: Any) -> Message:
        seen.append(dict(msg.content.config_records[FIT_CONFIG]))
        return msg

    for run_id in ("run-a", "run-b"):
        site_mod(_train_message(secagg_stage=None, injected={wire.CFG_RUN_ID: run_id, wire.LOCAL_RUN_ID: run_id}), ctxt, call_next)

    assert [c[wire.LOCAL_RUN_ID] for c in seen] == ["run-a", "run-a"]


def test_a_new_run_id_within_one_flower_run_is_refused(faces: FaceSet, tmp_path: Path, no_training: None) -> None:
    # the per-run cap counts one run id's sessions: a server may not rotate ids inside a run
    cfg = _config()
    site = _site(faces, tmp_path, cfg, POLICY)

    result = site.train_round(
        _weights(cfg), run_id="run-b", round_=2, rounds=2, local_epochs=1, lr=1e-2, secagg=True, peers=3, pinned_run_id="run-a"
    )

    assert (result.metrics[wire.M_STATUS], result.metrics[wire.M_REASON]) == (wire.REFUSED, wire.REASON_RUN_ID)
    assert _sessions(site.ledger_path) == 0


@pytest.mark.parametrize(("local_epochs", "rounds", "round_"), [(0, 2, 1), (-1, 2, 1), (1, 0, 1), (1, 2, 0)])
def test_a_malformed_round_config_is_refused_before_anything_is_charged(
    faces: FaceSet, tmp_path: Path, no_training: None, local_epochs: int, rounds: int, round_: int
) -> None:
    cfg = _config(privacy={"noise-multiplier": 1.0, "epsilon": None})
    site = _site(faces, tmp_path, cfg, POLICY)

    result = site.train_round(_weights(cfg), run_id="run", round_=round_, rounds=rounds, local_epochs=local_epochs, lr=1e-2, secagg=True, peers=3)

    assert result.metrics[wire.M_REASON] == wire.REASON_BAD_REQUEST
    assert _sessions(site.ledger_path) == 0


def test_private_errors_mod_sends_the_server_only_the_kind_of_a_site_error() -> None:
    def fails(_msg: Message, _ctxt: Any) -> Message:
        raise CorruptImageError(Path("/data/faces/alice_smith/001.jpg"), "truncated")

    with pytest.raises(SiteFailure) as caught:
        private_errors_mod(_train_message(secagg_stage=None, injected={}), _context(), fails)

    assert "CorruptImageError" in str(caught.value)
    assert "alice" not in str(caught.value)


def test_a_deployed_site_takes_its_own_policy_and_name_not_the_scenarios(tmp_path: Path, orl_root: Path) -> None:
    # a scenario (the server's word) with a permissive [site-policy] and another data set name
    import tomli_w

    import fedface.client.app as app_module

    scenario = {**TINY, "privacy": {"epsilon": 4.0, "dataset": "fresh-name", "ledger": str(tmp_path / "elsewhere.sqlite")},
                "site-policy": {"allow-non-private": True, "require-secagg": False, "min-peers": 1}}
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'name = "hospital-a"\ndata = "{orl_root}"\nstate-dir = "state"\n[policy]\nbudget-epsilon = 5.0\n')

    site = app_module._site_for_flwr_run(
        _context(node_config={"site-config": str(site_toml)}, run_config={"scenario-toml": tomli_w.dumps(scenario)})
    )

    assert site.policy == SiteConfig.from_toml(site_toml).policy
    assert not site.policy.allow_non_private and site.policy.require_secagg and site.policy.min_peers == 3
    assert site.dataset == "hospital-a"
    assert site.ledger_path == tmp_path / "state" / "ledger.sqlite"


# --- a deployed site's config: its policy, with a budget ----------------------------------------


def test_a_deployed_site_config_needs_a_lifetime_budget(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('name = "a"\ndata = "faces"\nstate-dir = "state"\n')
    with pytest.raises(ConfigError, match=r"no lifetime privacy budget.*\[policy\]"):
        SiteConfig.from_toml(path)
    path.write_text('name = "a"\ndata = "faces"\nstate-dir = "state"\nbudget-epsilon = 5.0\n')
    with pytest.raises(ConfigError, match=r"now lives in the \[policy\] table"):
        SiteConfig.from_toml(path)
    path.write_text('name = "a"\ndata = "faces"\nstate-dir = "state"\n[policy]\nbudget-epsilon = 5.0\nmin-peer = 2\n')
    with pytest.raises(ConfigError, match="policy.min-peer: unknown key"):
        SiteConfig.from_toml(path)


def test_a_deployed_site_config_reads_its_policy(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('name = "a"\ndata = "faces"\nstate-dir = "state"\n[policy]\nbudget-epsilon = 5.0\nepsilon-per-run = 2.0\nmin-peers = 4\n')

    sc = SiteConfig.from_toml(path)

    assert sc.policy.budget_epsilon == 5.0 and sc.policy.epsilon_per_run == 2.0 and sc.policy.min_peers == 4
    assert sc.policy.require_secagg and not sc.policy.allow_non_private


def test_policy_rejects_a_per_run_cap_above_the_budget() -> None:
    with pytest.raises(ValueError, match="cannot exceed budget-epsilon"):
        SitePolicyConfig(budget_epsilon=2.0, epsilon_per_run=3.0)


def test_planning_and_charging_wait_for_the_ledger_lock(faces: FaceSet, tmp_path: Path) -> None:
    # another request of the same site holds the ledger: this one may not plan from the same prior sessions
    import threading

    cfg = _config(privacy={"noise-multiplier": 1.0, "epsilon": None})
    site = _site(faces, tmp_path, cfg, POLICY)
    done: list[Any] = []

    with site_module._ledger_lock(site.ledger_path):
        worker = threading.Thread(target=lambda: done.append(_train(site, cfg)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and _sessions(site.ledger_path) == 0  # waiting, nothing charged
    worker.join(timeout=60)

    assert done and done[0].metrics[wire.M_STATUS] == wire.ANSWERED
    assert _sessions(site.ledger_path) == 1


@pytest.mark.parametrize("secagg", [True, False], ids=["secagg", "clear"])
def test_a_site_whose_training_diverged_sends_nothing(secagg: bool) -> None:
    # NaN weights would spoil a SecAgg+ sum for every site (the server refuses it) and mean
    # nothing in the clear: the site fails the round with a public error instead of sending them.
    from types import SimpleNamespace

    from fedface.client.app import DivergedUpdateError, SiteClient
    from fedface.client.site import RoundResult

    cfg = _config()
    sent = _weights(cfg)
    diverged = [w.copy() for w in sent]
    diverged[0][0] = np.nan
    site = SimpleNamespace(train_round=lambda *a, **k: RoundResult(weights=diverged, examples=40, metrics={}))
    config = {wire.CFG_RUN_ID: "run", wire.CFG_ROUND: 1, wire.CFG_ROUNDS: 2, wire.CFG_LOCAL_EPOCHS: 1, wire.CFG_LR: 0.01, wire.LOCAL_SECAGG: secagg}

    with pytest.raises(DivergedUpdateError, match="not sent"):
        SiteClient(site).fit(sent, config)  # type: ignore[arg-type]
