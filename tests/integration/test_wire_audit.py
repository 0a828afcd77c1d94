"""The wire audit: every message the sites send in a real SecAgg+ round (Flower's simulation
engine, SecAgg+ workflow, DP-SGD at every site), as it leaves each site's ClientApp after
SecAgg+ has masked it, carries in the clear only what ``fedface.common.wire`` lists.

The record is taken by ``fedface.client.wire_log``, the outermost mod of each site. The test
fails on any record, key or value that is not accounted for: a clear metric outside
``wire.CLEAR_REPLY_KEYS`` (the training loss once was one), an unmasked array, an unknown
SecAgg+ field, or an error reply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedface.common import wire
from fedface.common.crypto import masks
from fedface.common.config import TrainConfig
from fedface.simulations.simulate import run_federated

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

# What each SecAgg+ stage's reply carries besides fedface's own reply (Flower's protocol):
# public keys (and the name of the site's mask scheme), encrypted key shares, the masked vector,
# and the shares that unmask the sum.
SECAGG_REPLY_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, masks.MASK_SCHEME_KEY},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}
# The compatibility layer's FitRes records (Flower's NumPyClient reply) in a training reply.
FITRES_METRICS = "fitres.metrics"
FITRES_OTHER = {"fitres.num_examples": {"num_examples"}, "fitres.status": {"code", "message"}}
FITRES_ARRAYS = "fitres.parameters"


def _scenario(orl_root: Path, **federation: Any) -> TrainConfig:
    """3 sites of 4 ORL people at 32x32, a tiny encoder, one round, SecAgg+, DP at epsilon 8."""
    return TrainConfig.from_mapping(
        {
            "data": {"root": str(orl_root), "image-size": [32, 32]},
            "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
            "evaluation": {"shift-tta": 0, "occlusion-box": 8},
            "training": {"batch-size": 16, "device": "cpu"},
            "privacy": {"epsilon": 8.0},
            "federation": {"sites": 3, "rounds": 1, "identities-per-site": 4, "test-identities": 10, "secagg": True, **federation},
        }
    )


@pytest.fixture(scope="module")
def wire_log(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("wire")
    cfg = _scenario(orl_root)
    log = tmp / "wire.jsonl"
    result = run_federated(cfg, out_dir=tmp / "run", wire_log=log)
    assert result.completed, result.error
    assert [r["answered"] for r in result.history] == [3]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_message_a_site_sends_is_accounted_for(wire_log: list[dict[str, Any]]) -> None:
    problems: list[str] = []
    for entry in wire_log:
        where = f"node {entry['node']} stage {entry.get('stage')}"
        if "error" in entry:
            problems.append(f"{where}: an error reply {entry['error']}")
            continue
        stage = entry["stage"]
        if stage not in SECAGG_REPLY_KEYS:
            problems.append(f"{where}: a training reply outside SecAgg+")
            continue
        for name, record in entry["records"].items():
            keys = set(record["items"])
            if name == RECORD_KEY_CONFIGS:
                extra = keys - SECAGG_REPLY_KEYS[stage]
            elif name == FITRES_METRICS and stage == Stage.COLLECT_MASKED_VECTORS:
                extra = keys - wire.CLEAR_REPLY_KEYS
                extra |= {k for k, v in record["items"].items() if isinstance(v, (dict, list))}  # scalars only
            elif name in FITRES_OTHER and stage == Stage.COLLECT_MASKED_VECTORS:
                extra = keys - FITRES_OTHER[name]
            elif name == FITRES_ARRAYS and stage == Stage.COLLECT_MASKED_VECTORS:
                extra = {f"unmasked array {k}" for k in keys}  # SecAgg+ sends the update masked, as bytes
            else:
                extra = {f"record {name}"}
            problems += [f"{where}: {name}: {k}" for k in sorted(extra)]

    assert problems == []


def test_each_site_ran_every_secagg_stage_and_sent_its_masked_update(wire_log: list[dict[str, Any]]) -> None:
    stages: dict[int, list[str]] = {}
    for entry in wire_log:
        stages.setdefault(entry["node"], []).append(entry.get("stage"))
    assert len(stages) == 3
    for seen in stages.values():
        assert seen == [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK]
    masked = [e for e in wire_log if e["stage"] == Stage.COLLECT_MASKED_VECTORS]
    for entry in masked:
        vector = entry["records"][RECORD_KEY_CONFIGS]["items"][Key.MASKED_PARAMETERS]
        assert vector["list"] > 0 and vector["of"] == ["bytes"]
        metrics = entry["records"][FITRES_METRICS]["items"]
        assert metrics[wire.M_STATUS] == wire.ANSWERED
        assert "loss" not in metrics


def test_the_clear_list_has_no_training_loss() -> None:
    assert not any("loss" in key for key in wire.CLEAR_REPLY_KEYS)


def test_a_round_with_fewer_updates_than_min_sites_per_aggregate_is_never_unmasked(tmp_path: Path, orl_root: Path) -> None:
    # three sites train, but the server needs four updates in a sum: it must stop before unmasking
    from fedface.server.app import too_few_reason

    cfg = _scenario(orl_root, **{"min-sites-per-aggregate": 4})
    log = tmp_path / "wire.jsonl"

    result = run_federated(cfg, out_dir=tmp_path / "run", wire_log=log)

    stages = [json.loads(line).get("stage") for line in log.read_text().splitlines()]
    assert stages.count(Stage.COLLECT_MASKED_VECTORS) == 3  # each site trained and sent its masked vector
    assert Stage.UNMASK not in stages  # ... and no site was asked for the shares that unmask the sum
    assert not result.completed
    assert result.history[0]["reasons"] == {too_few_reason(3, 4): 3}
