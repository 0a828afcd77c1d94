"""Which benchmark runs are reused: a run counts only for the same config, starting checkpoint,
split (and a federated run's site partition), and a finished run of something else is kept aside,
never deleted (`fedface.simulations.bench.runs`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedface.common.config import TrainConfig
from fedface.common.federated import federation_data
from fedface.common.data import load_faces
from fedface.simulations.bench.runs import FEDERATED_RECORD, clear_run_dir, finished, reusable_federated, train_or_reuse

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


IDENTITY = TINY + """
[split]
kind = "open-set"
[training]
epochs = 1
batch-size = 64
[evaluation]
flip-tta = false
shift-tta = 0
"""


def test_a_finished_identity_run_is_reused_and_a_changed_one_is_kept_aside(tmp_path: Path, orl_root: Path) -> None:
    # an identity run writes no confusion counts: it must still count as finished (a full LFW
    # pre-training is an hour of training; it was once deleted and retrained on every rerun)
    path = tmp_path / "identity.toml"
    path.write_text(IDENTITY, encoding="utf-8")
    cfg = TrainConfig.from_toml(path).with_overrides({"data.root": str(orl_root)})
    faces = load_faces(orl_root, size=cfg.data.image_size)
    run_dir = tmp_path / "runs" / "lfw-seed1"
    reused: list[str] = []
    first = train_or_reuse(cfg, run_dir, faces, reused)
    stamp = (run_dir / "checkpoint.pt").stat().st_mtime_ns

    again = train_or_reuse(cfg.with_overrides({"training.threads": 1}), run_dir, faces, reused)

    assert reused == [str(run_dir)]
    assert again["metrics"]["verif_acc"] == pytest.approx(first["metrics"]["verif_acc"])
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == stamp  # not retrained

    # another config: trained anew, and the finished run that was there is kept, whole, beside it
    train_or_reuse(cfg.with_overrides({"training.lr": 5e-4}), run_dir, faces, reused)
    kept = [p for p in run_dir.parent.iterdir() if p.name.startswith("lfw-seed1.replaced-")]
    assert len(kept) == 1
    assert finished(kept[0], cfg, faces) is not None
    assert finished(run_dir, cfg.with_overrides({"training.lr": 5e-4}), faces) is not None


def test_clear_run_dir_removes_only_what_an_interrupted_run_left(tmp_path: Path) -> None:
    assert clear_run_dir(tmp_path / "absent") is None

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.json").write_text("{}", encoding="utf-8")
    assert clear_run_dir(partial) is None
    assert not partial.exists()

    federated = tmp_path / "fed"
    federated.mkdir()
    (federated / FEDERATED_RECORD).write_text('{"completed": true}', encoding="utf-8")
    moved = clear_run_dir(federated)
    assert moved is not None and not federated.exists()
    assert (moved / FEDERATED_RECORD).read_text(encoding="utf-8") == '{"completed": true}'

    # an interrupted federation: no record, but round checkpoints and its sites' ledgers
    for name, inner in (("rounds", "run/checkpoints/round-3.pt"), ("ledgers", "ledgers/site-0/privacy-ledger.sqlite")):
        run = tmp_path / name
        (run / inner).parent.mkdir(parents=True)
        (run / inner).write_bytes(b"kept")
        kept = clear_run_dir(run)
        assert kept is not None and (kept / inner).read_bytes() == b"kept", name
