"""`fedface evaluate` on every checkpoint fedface writes, on run directories, and on files that
are no checkpoint (one-line CheckpointError, exit 8, never a traceback).

The run directories are made cheaply, shaped as `fedface train` and `fedface simulate` write
them: a tiny untrained GRU encoder at 32x32 and the split of real ORL faces in split.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedface.common.checkpoint import Checkpoint, load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet, Split, load_faces, split_closed_set, split_open_set
from fedface.common.evaluation import evaluate_open_set
from fedface.common.models import build_encoder, build_margin_head
from fedface.simulations.cli import app

pytestmark = pytest.mark.integration

TINY: dict[str, dict[str, Any]] = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
    "training": {"device": "cpu", "threads": 1},
    "evaluation": {"shift-tta": 0, "occlusion-box": 8, "occlusion-placements": 2},
}

runner = CliRunner()


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def _encoder_state(cfg: TrainConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_encoder(cfg.model, image_size=cfg.data.image_size).state_dict()


def _round_checkpoint(cfg: TrainConfig, number: int, state: dict[str, torch.Tensor]) -> Checkpoint:
    """A round checkpoint as the federated server writes it: the encoder only."""
    return Checkpoint(config=cfg, task="identity", epoch=number, num_classes=0, encoder_state=state, head_state={})


def _evaluate_quietly(*args: str) -> Any:
    """`fedface evaluate ARGS -q`: only warnings and errors on stderr."""
    return runner.invoke(app, ["evaluate", *args, "-q"])


def _assert_one_line_error(result: Any, start: str) -> None:
    assert result.exit_code == 8, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def cfg(orl_root: Path) -> TrainConfig:
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["data"]["root"] = str(orl_root)
    return TrainConfig.from_mapping(raw)


@pytest.fixture(scope="module")
def faces(cfg: TrainConfig) -> FaceSet:
    return load_faces(cfg.data.root, size=cfg.data.image_size)


@pytest.fixture(scope="module")
def simulate_run(tmp_path_factory: pytest.TempPathFactory, cfg: TrainConfig, faces: FaceSet) -> Path:
    """A `fedface simulate` run directory: 10 held-out ORL people in split.json, two rounds."""
    run = tmp_path_factory.mktemp("simulate") / "run"
    run.mkdir()
    split_open_set(faces, test_identities=10, seed=0).save(run / "split.json", faces)
    for number in (1, 2):
        _round_checkpoint(cfg, number, _encoder_state(cfg, seed=number)).save(run / "checkpoints" / f"round-{number:04d}.pt")
    return run


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory, cfg: TrainConfig, faces: FaceSet) -> Path:
    """A `fedface train` run directory: a closed-set split and a checkpoint with its margin head."""
    run = tmp_path_factory.mktemp("train") / "run"
    run.mkdir()
    split_closed_set(faces, train_per_identity=5, seed=0).save(run / "split.json", faces)
    head = build_margin_head(cfg.head, embedding_dim=cfg.model.embedding_dim, num_classes=faces.num_identities)
    Checkpoint(
        config=cfg,
        task="identity",
        epoch=2,
        num_classes=faces.num_identities,
        encoder_state=_encoder_state(cfg, seed=5),
        head_state=head.state_dict(),
    ).save(run / "checkpoint.pt")
    return run


def test_evaluate_round_checkpoint_measures_the_held_out_people_as_the_server_does(
    simulate_run: Path, cfg: TrainConfig, faces: FaceSet
) -> None:
    # Arrange: the server's own measure of round 1, on the run's held-out identities
    path = simulate_run / "checkpoints" / "round-0001.pt"
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    encoder.load_state_dict(load_checkpoint(path).encoder_state)
    test = faces.subset(Split.load(simulate_run / "split.json", faces).test)
    server = evaluate_open_set(encoder, test, cfg.evaluation, device=torch.device("cpu"), with_occlusion=False)

    # Act
    result = runner.invoke(app, ["evaluate", str(path), "--format", "json", "-q"])

    # Assert
    assert result.exit_code == 0, result.output
    metrics = _last_json(result.stdout)
    assert metrics["checkpoint"] == str(path)
    assert metrics["test_identities"] == 10.0
    assert metrics["verif_acc"] == pytest.approx(server["verif_acc"])
    assert metrics["rank1"] == pytest.approx(server["rank1"])
    assert 0.0 <= metrics["occluded_verif_acc"] <= 1.0


def test_evaluate_simulate_run_dir_evaluates_its_last_round(simulate_run: Path) -> None:
    last = simulate_run / "checkpoints" / "round-0002.pt"
    direct = _last_json(runner.invoke(app, ["evaluate", str(last), "--format", "json", "-q"]).stdout)

    result = runner.invoke(app, ["evaluate", str(simulate_run), "--format", "json", "-q"])

    assert result.exit_code == 0, result.output
    assert _last_json(result.stdout) == direct


def test_evaluate_train_run_dir_evaluates_its_checkpoint(train_run: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(train_run), "--format", "json", "-q"])

    assert result.exit_code == 0, result.output
    metrics = _last_json(result.stdout)
    assert metrics["checkpoint"] == str(train_run / "checkpoint.pt")
    assert metrics["protocol"].startswith("test part of the closed-set split")
    assert (metrics["gallery_images"], metrics["probe_images"]) == (200.0, 200.0)


def test_evaluate_round_checkpoint_on_other_data_treats_every_identity_as_unseen(
    simulate_run: Path, yale_a_root: Path
) -> None:
    path = simulate_run / "checkpoints" / "round-0002.pt"

    result = runner.invoke(app, ["evaluate", str(path), "--data", str(yale_a_root), "--format", "json", "-q"])

    assert result.exit_code == 0, result.output
    metrics = _last_json(result.stdout)
    assert metrics["protocol"] == "all images, unseen identities"
    assert metrics["test_identities"] == 15.0
    assert 0.0 <= metrics["verif_acc"] <= 1.0


def test_evaluate_text_output_names_the_checkpoint_picked(simulate_run: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(simulate_run)])

    assert result.exit_code == 0, result.output
    assert "round-0002.pt" in " ".join(result.stderr.split())
    assert result.stdout.strip().splitlines()[-1].startswith("verif_acc=")


def _text(path: Path, real: bytes) -> None:
    path.write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")


def _truncated(path: Path, real: bytes) -> None:
    path.write_bytes(real[: len(real) // 2])


def _random(path: Path, real: bytes) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _empty(path: Path, real: bytes) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("make", [_text, _truncated, _random, _empty], ids=["text", "truncated", "random", "empty"])
def test_evaluate_unreadable_checkpoint_exits_8_with_one_line(tmp_path: Path, simulate_run: Path, make: Any) -> None:
    # Arrange: the bad file where a round checkpoint would be, beside a valid split.json
    path = tmp_path / "round-0001.pt"
    make(path, (simulate_run / "checkpoints" / "round-0001.pt").read_bytes())

    # Act
    result = _evaluate_quietly(str(path))

    # Assert
    _assert_one_line_error(result, f"CheckpointError: checkpoint {path} is unreadable")


def test_evaluate_run_dir_without_checkpoint_exits_8(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()

    result = _evaluate_quietly(str(tmp_path))

    _assert_one_line_error(result, f"CheckpointError: no checkpoint in {tmp_path}")


def test_evaluate_checkpoint_whose_weights_overflow_exits_8(tmp_path: Path, simulate_run: Path, cfg: TrainConfig) -> None:
    # Arrange: finite weights, one corrupted exponent away from infinite embeddings
    state = _encoder_state(cfg, seed=1)
    state["neck.project.weight"] *= 1e37
    path = tmp_path / "checkpoints" / "round-0001.pt"
    _round_checkpoint(cfg, 1, state).save(path)

    # Act
    result = _evaluate_quietly(str(path), "--split", str(simulate_run / "split.json"))

    # Assert
    _assert_one_line_error(result, f"CheckpointError: checkpoint {path} is corrupt")


def test_evaluate_checkpoint_whose_weights_do_not_fit_its_model_exits_8(tmp_path: Path, cfg: TrainConfig) -> None:
    wider = cfg.with_overrides({"model.hidden-size": 16})
    path = tmp_path / "checkpoint.pt"
    _round_checkpoint(cfg, 1, _encoder_state(wider, seed=0)).save(path)

    result = _evaluate_quietly(str(path), "--data", str(cfg.data.root))

    _assert_one_line_error(result, f"CheckpointError: checkpoint {path} is malformed: its weights do not fit")


def test_evaluate_expression_checkpoint_without_head_exits_8(tmp_path: Path, cfg: TrainConfig, yale_a_root: Path) -> None:
    expression = cfg.with_overrides({"training.task": "expression", "split.kind": "open-set"})
    path = tmp_path / "checkpoint.pt"
    Checkpoint(config=expression, task="expression", epoch=1, num_classes=0, encoder_state=_encoder_state(cfg, 0), head_state={}).save(path)

    result = _evaluate_quietly(str(path), "--data", str(yale_a_root))

    _assert_one_line_error(result, f"CheckpointError: checkpoint {path} holds no expression head")
