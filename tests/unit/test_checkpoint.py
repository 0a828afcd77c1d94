"""Unit tests for fedface.common.checkpoint: save/load of trained models, safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedface.common.checkpoint import CHECKPOINT_FORMAT, Checkpoint, checkpoint_run_dir, find_checkpoint, load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.errors import CheckpointError
from fedface.common.models import GRUFaceEncoder, MarginHead


class _Marker:
    """Unpickling this would run ``os.mkdir(path)``: proof that code ran from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


class _Plain:
    """An ordinary user class: still not something a weights-only load may rebuild."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture
def checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    cfg = TrainConfig().with_overrides(
        {"model.hidden-size": 4, "model.embedding-dim": 8, "data.image-size": [32, 32], "evaluation.occlusion-box": 8}
    )
    encoder = GRUFaceEncoder(image_size=(32, 32), hidden_size=4, embedding_dim=8)
    head = MarginHead.cosface(8, 3)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    loss = head(encoder(torch.rand(2, 1, 32, 32)), torch.tensor([0, 2])).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    return Checkpoint(
        config=cfg,
        task="identity",
        epoch=7,
        num_classes=3,
        encoder_state=encoder.state_dict(),
        head_state=head.state_dict(),
        optimizer_state=optimizer.state_dict(),
        class_names=("s1", "s2", "s3"),
    )


@pytest.fixture
def saved(tmp_path: Path, checkpoint: Checkpoint) -> Path:
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path)
    return path


def _assert_one_line_naming(err: CheckpointError, path: Path) -> None:
    message = str(err)
    assert str(path) in message
    assert "\n" not in message
    # torch's own reasons carry terminal escapes and advise weights_only=False: never pass them on
    assert "\x1b" not in message
    assert "weights_only" not in message


def test_save_then_load_round_trips_every_field(checkpoint: Checkpoint, saved: Path) -> None:
    # Act
    loaded = load_checkpoint(saved)

    # Assert
    assert loaded.config == checkpoint.config
    assert (loaded.task, loaded.epoch, loaded.num_classes) == ("identity", 7, 3)
    assert loaded.class_names == ("s1", "s2", "s3")
    assert loaded.encoder_state.keys() == checkpoint.encoder_state.keys()
    for key, value in checkpoint.encoder_state.items():
        assert torch.equal(loaded.encoder_state[key], value), key
    assert torch.equal(loaded.head_state["centres.weight"], checkpoint.head_state["centres.weight"])
    assert loaded.optimizer_state["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert torch.equal(
        loaded.optimizer_state["state"][0]["exp_avg"], checkpoint.optimizer_state["state"][0]["exp_avg"]
    )


def test_loaded_encoder_state_loads_into_a_fresh_encoder(checkpoint: Checkpoint, saved: Path) -> None:
    # Arrange
    loaded = load_checkpoint(saved)
    encoder = GRUFaceEncoder(image_size=(32, 32), hidden_size=4, embedding_dim=8)

    # Act
    result = encoder.load_state_dict(loaded.encoder_state)

    # Assert
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(encoder.neck.project.weight, checkpoint.encoder_state["neck.project.weight"])


def test_save_writes_format_marker(saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)

    assert raw["format"] == CHECKPOINT_FORMAT


def test_load_missing_file_raises_checkpoint_error_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"

    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(path)

    _assert_one_line_naming(info.value, path)


def test_load_directory_raises_checkpoint_error_naming_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)

    _assert_one_line_naming(info.value, tmp_path)


@pytest.mark.parametrize("size", [0, 16, 4096])
def test_load_random_bytes_raises_checkpoint_error_naming_path(tmp_path: Path, size: int) -> None:
    # Arrange
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size)).tolist()))

    # Act
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)

    # Assert
    _assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_load_truncated_checkpoint_raises_checkpoint_error_naming_path(
    tmp_path: Path, saved: Path, keep: float
) -> None:
    # Arrange
    data = saved.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep)])

    # Act
    with pytest.raises(CheckpointError, match="unreadable") as info:
        load_checkpoint(path)

    # Assert
    _assert_one_line_naming(info.value, path)


@pytest.mark.parametrize(
    "payload",
    [{"weight": torch.zeros(2)}, [1, 2, 3], {"format": "other-checkpoint/1"}],
    ids=["state-dict", "list", "wrong-format"],
)
def test_load_torch_file_that_is_not_a_fedface_checkpoint_raises(tmp_path: Path, payload: object) -> None:
    # Arrange
    path = tmp_path / "model.pt"
    torch.save(payload, path)

    # Act
    with pytest.raises(CheckpointError, match="not a fedface checkpoint") as info:
        load_checkpoint(path)

    # Assert
    _assert_one_line_naming(info.value, path)


def test_load_checkpoint_missing_fields_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "task": "identity"}, path)

    with pytest.raises(CheckpointError, match="incomplete or malformed") as info:
        load_checkpoint(path)

    _assert_one_line_naming(info.value, path)


def test_load_checkpoint_with_invalid_embedded_config_raises_checkpoint_error(
    tmp_path: Path, saved: Path
) -> None:
    # Arrange: a well-formed file whose config no longer validates
    raw = torch.load(saved, weights_only=True)
    raw["config"]["training"]["epochs"] = 0
    path = tmp_path / "badconfig.pt"
    torch.save(raw, path)

    # Act
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)

    # Assert
    assert "training.epochs" in str(info.value)
    _assert_one_line_naming(info.value, path)


def test_load_never_runs_code_from_the_file(tmp_path: Path) -> None:
    # Arrange
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "payload": _Marker(marker)}, path)

    # Act
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)

    # Assert
    assert not marker.exists()
    _assert_one_line_naming(info.value, path)


def test_load_refuses_custom_class_instances(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "custom.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "extra": _Plain()}, path)

    # Act
    with pytest.raises(CheckpointError, match="unreadable") as info:
        load_checkpoint(path)

    # Assert
    _assert_one_line_naming(info.value, path)


def test_save_is_atomic_over_an_existing_checkpoint(
    tmp_path: Path, checkpoint: Checkpoint, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a second save that fails at the rename
    before = saved.read_bytes()

    def failing_replace(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)

    # Act
    with pytest.raises(OSError):
        checkpoint.save(saved)

    # Assert
    assert saved.read_bytes() == before
    assert load_checkpoint(saved).epoch == 7


def test_load_text_file_raises_checkpoint_error_naming_path(tmp_path: Path) -> None:
    # Arrange: what `fedface evaluate /etc/passwd` reads (torch.load fails with an IndexError)
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")

    # Act
    with pytest.raises(CheckpointError, match="unreadable") as info:
        load_checkpoint(path)

    # Assert
    _assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_checkpoint_with_non_finite_weights_raises_checkpoint_error(
    tmp_path: Path, checkpoint: Checkpoint, bad: float
) -> None:
    # Arrange
    state = {k: v.clone() for k, v in checkpoint.encoder_state.items()}
    state["neck.project.weight"][0, 0] = bad
    path = tmp_path / "nan.pt"
    Checkpoint(checkpoint.config, "identity", 1, 0, state, {}).save(path)

    # Act
    with pytest.raises(CheckpointError, match="NaN or infinite weights") as info:
        load_checkpoint(path)

    # Assert
    assert "neck.project.weight" in str(info.value)
    _assert_one_line_naming(info.value, path)


def test_load_checkpoint_whose_encoder_is_not_tensors_raises_checkpoint_error(tmp_path: Path, saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    raw["encoder"] = {"neck.project.weight": [1.0, 2.0]}
    path = tmp_path / "lists.pt"
    torch.save(raw, path)

    with pytest.raises(CheckpointError, match="not named tensors") as info:
        load_checkpoint(path)

    _assert_one_line_naming(info.value, path)


def test_encoder_only_checkpoint_round_trips(tmp_path: Path, checkpoint: Checkpoint) -> None:
    # Arrange: as the federated server writes a round (the heads stay at the sites)
    path = tmp_path / "checkpoints" / "round-0003.pt"
    Checkpoint(checkpoint.config, "identity", 3, 0, checkpoint.encoder_state, {}).save(path)

    # Act
    loaded = load_checkpoint(path)

    # Assert
    assert (loaded.num_classes, loaded.head_state, loaded.epoch) == (0, {}, 3)


def test_find_checkpoint_of_a_file_is_the_file(saved: Path) -> None:
    assert find_checkpoint(saved) == saved


def test_find_checkpoint_of_a_train_run_dir_is_its_checkpoint(saved: Path) -> None:
    assert find_checkpoint(saved.parent) == saved


def test_find_checkpoint_of_a_simulate_run_dir_is_its_highest_round(tmp_path: Path) -> None:
    # Arrange: rounds written out of order, and files that are no round checkpoint
    rounds = tmp_path / "checkpoints"
    rounds.mkdir()
    for name in ("round-0002.pt", "round-0010.pt", "round-0009.pt", "round-0011.pt.tmp", "round-last.pt", "notes.txt"):
        (rounds / name).write_bytes(b"")
    (rounds / "round-0012.pt").mkdir()

    # Act
    found = find_checkpoint(tmp_path)

    # Assert
    assert found == rounds / "round-0010.pt"


def test_find_checkpoint_in_a_dir_without_one_raises_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()

    with pytest.raises(CheckpointError, match="no checkpoint in") as info:
        find_checkpoint(tmp_path)

    _assert_one_line_naming(info.value, tmp_path)


def test_find_checkpoint_of_a_missing_path_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "nope"

    with pytest.raises(CheckpointError, match="not found") as info:
        find_checkpoint(path)

    _assert_one_line_naming(info.value, path)


@pytest.mark.parametrize(
    ("relative", "run"),
    [("run/checkpoint.pt", "run"), ("run/checkpoints/round-0020.pt", "run"), ("models/checkpoints/best.pt", "models/checkpoints")],
)
def test_checkpoint_run_dir_is_where_the_runs_split_is(tmp_path: Path, relative: str, run: str) -> None:
    assert checkpoint_run_dir(tmp_path / relative) == tmp_path / run
