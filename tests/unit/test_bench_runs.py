"""Which benchmark runs are reused: a federated run's record counts only for the same config,
starting checkpoint, split and site partition (`fedface.simulations.bench.runs`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedface.common.config import TrainConfig
from fedface.common.federated import federation_data
from fedface.simulations.bench.runs import FEDERATED_RECORD, reusable_federated

TINY = """
[model]
passes = ["rows"]
hidden-size = 8
embedding-dim = 8
downsample = 4
[federation]
sites = 3
rounds = 1
"""


@pytest.fixture
def cfg(tmp_path: Path, orl_root: Path) -> TrainConfig:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return TrainConfig.from_toml(path).with_overrides({"data.root": str(orl_root)})


def _record(run_dir: Path, cfg: TrainConfig, *, made_with: TrainConfig | None = None, completed: bool = True, init: str | None = None) -> None:
    """What `federated_or_reuse` leaves behind: the run's split and partition, then its record."""
    fed = federation_data(made_with or cfg)
    (run_dir / "run").mkdir(parents=True)
    fed.split.save(run_dir / "run" / "split.json", fed.faces)
    fed.partition.save(run_dir / "run" / "partition.json", fed.train)
    record = {"completed": completed, "config": cfg.to_toml_dict(), "init_sha256": init, "final": {"verif_acc": 0.5}, "history": []}
    (run_dir / FEDERATED_RECORD).write_text(json.dumps(record), encoding="utf-8")


def test_a_finished_run_of_the_same_config_and_data_is_reused(tmp_path: Path, cfg: TrainConfig) -> None:
    _record(tmp_path / "run", cfg)

    done = reusable_federated(tmp_path / "run", cfg)

    assert done is not None and done["final"] == {"verif_acc": 0.5}
    # how it was executed does not matter
    assert reusable_federated(tmp_path / "run", cfg.with_overrides({"training.threads": 2})) is not None


def test_another_config_an_unfinished_run_or_no_record_is_run_again(tmp_path: Path, cfg: TrainConfig) -> None:
    _record(tmp_path / "done", cfg)
    _record(tmp_path / "unfinished", cfg, completed=False)

    assert reusable_federated(tmp_path / "done", cfg.with_overrides({"federation.rounds": 2})) is None
    assert reusable_federated(tmp_path / "done", cfg.with_overrides({"privacy.epsilon": 4.0})) is None
    assert reusable_federated(tmp_path / "unfinished", cfg) is None
    assert reusable_federated(tmp_path / "nothing", cfg) is None


def test_a_run_on_other_data_or_another_partition_is_run_again(tmp_path: Path, cfg: TrainConfig) -> None:
    # the record says this config, but the run's sites were dealt with another seed (e.g. the
    # data folder held other faces when it ran)
    _record(tmp_path / "run", cfg, made_with=cfg.with_overrides({"federation.seed": 7, "split.seed": 7}))

    assert reusable_federated(tmp_path / "run", cfg) is None


def test_a_run_from_another_starting_checkpoint_is_run_again(tmp_path: Path, cfg: TrainConfig) -> None:
    start = tmp_path / "start.pt"
    start.write_bytes(b"a checkpoint")
    fine_tuned = cfg.with_overrides({"training.init-from": str(start)})
    _record(tmp_path / "run", fine_tuned, init=hashlib.sha256(b"a checkpoint").hexdigest())
    assert reusable_federated(tmp_path / "run", fine_tuned) is not None

    start.write_bytes(b"retrained since")  # same path, other content
    assert reusable_federated(tmp_path / "run", fine_tuned) is None
