"""Batched tensors, augmentation and occlusion on real ORL faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedface.common.data import (
    AugmentConfig,
    augment,
    load_faces,
    occlude,
    occlusion_boxes,
    to_tensor,
)
from fedface.common.errors import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st

STILL = dict(
    flip_p=0.0,
    max_rotate_deg=0.0,
    scale_range=(1.0, 1.0),
    max_translate=0.0,
    brightness=0.0,
    contrast=0.0,
)


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> torch.Tensor:
    """Eight real ORL faces (two people), shape (8, 1, 64, 64)."""
    loaded = load_faces(orl_root)
    picks = np.flatnonzero(np.isin(loaded.labels, [0, 1]))[[0, 1, 2, 3, 10, 11, 12, 13]]
    return to_tensor(loaded.images[picks])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------- to_tensor


def test_to_tensor_images_gets_channel_axis_float32() -> None:
    # Arrange
    images = np.random.default_rng(0).random((3, 5, 7))
    # Act
    tensor = to_tensor(images)
    # Assert
    assert tensor.shape == (3, 1, 5, 7) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0], torch.from_numpy(images.astype(np.float32)))


def test_to_tensor_read_only_array_converts_without_warning() -> None:
    # Arrange
    images = np.zeros((2, 4, 4), dtype=np.float32)
    images.setflags(write=False)
    # Act (filterwarnings=error turns torch's non-writable warning into a failure)
    tensor = to_tensor(images)
    # Assert
    assert tensor.shape == (2, 1, 4, 4)


def test_to_tensor_wrong_rank_raises_value_error() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        to_tensor(np.zeros((2, 1, 4, 4), dtype=np.float32))


# ---------------------------------------------------------------------------------------- augment


def test_augment_default_config_keeps_shape_dtype_and_range(faces: torch.Tensor) -> None:
    # Arrange
    before = faces.clone()
    # Act
    out = augment(faces, AugmentConfig(), _generator(0))
    # Assert
    assert out.shape == faces.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(faces, before)  # input untouched
    assert not torch.equal(out, faces)


def test_augment_same_seed_gives_same_batch(faces: torch.Tensor) -> None:
    # Act
    first = augment(faces, AugmentConfig(), _generator(7))
    second = augment(faces, AugmentConfig(), _generator(7))
    # Assert
    assert torch.equal(first, second)


def test_augment_different_seeds_give_different_batches(faces: torch.Tensor) -> None:
    # Act
    first = augment(faces, AugmentConfig(), _generator(1))
    second = augment(faces, AugmentConfig(), _generator(2))
    # Assert
    assert not torch.equal(first, second)


def test_augment_everything_off_returns_input_values(faces: torch.Tensor) -> None:
    # Arrange
    cfg = AugmentConfig(**STILL, occlusion_p=0.0)
    # Act
    out = augment(faces, cfg, _generator(0))
    # Assert
    assert torch.equal(out, faces) and out is not faces


def test_augment_certain_flip_mirrors_faces(faces: torch.Tensor) -> None:
    # Arrange
    cfg = AugmentConfig(**{**STILL, "flip_p": 1.0}, occlusion_p=0.0)
    # Act
    out = augment(faces, cfg, _generator(0))
    # Assert
    assert torch.allclose(out, faces.flip(-1), atol=1e-5)


def test_augment_small_rotation_stays_close_to_face(faces: torch.Tensor) -> None:
    # Arrange
    cfg = AugmentConfig(**{**STILL, "max_rotate_deg": 3.0}, occlusion_p=0.0)
    # Act
    out = augment(faces, cfg, _generator(0))
    # Assert: a few degrees move pixels a little, never wholesale
    difference = (out - faces).abs().mean(dim=(1, 2, 3))
    assert bool((difference > 0).all()) and float(difference.max()) < 0.1


def test_augment_box_occlusion_blanks_one_rectangle_of_drawn_size() -> None:
    # Arrange: white images so that only the occluder is black
    ones = torch.ones(32, 1, 40, 50)
    cfg = AugmentConfig(**STILL, occlusion_p=1.0, occlusion_min=0.2, occlusion_max=0.5, band_p=0.0)
    # Act
    out = augment(ones, cfg, _generator(3))
    # Assert
    for image in out[:, 0]:
        rows = torch.nonzero((image == 0).any(dim=1)).flatten()
        cols = torch.nonzero((image == 0).any(dim=0)).flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int((image == 0).sum()) == height * width  # a filled rectangle
        assert 8 <= height <= 20 and 10 <= width <= 25  # 0.2..0.5 of 40 and 50


def test_augment_band_occlusion_spans_full_width_or_height() -> None:
    # Arrange
    ones = torch.ones(32, 1, 40, 50)
    cfg = AugmentConfig(**STILL, occlusion_p=1.0, band_p=1.0)
    # Act
    out = augment(ones, cfg, _generator(4))
    # Assert
    blank = out[:, 0] == 0
    full_rows = blank.all(dim=2).any(dim=1)
    full_cols = blank.all(dim=1).any(dim=1)
    assert bool((full_rows | full_cols).all())
    assert bool(full_rows.any()) and bool(full_cols.any())


def test_augment_occlusion_probability_zero_leaves_no_black_box() -> None:
    # Arrange
    ones = torch.ones(16, 1, 32, 32)
    # Act
    out = augment(ones, AugmentConfig(**STILL, occlusion_p=0.0), _generator(0))
    # Assert
    assert bool((out == 1).all())


def test_augment_wrong_rank_raises_value_error() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment(torch.zeros(4, 32, 32), AugmentConfig())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rotate=st.floats(0, 45),
    zoom=st.tuples(st.floats(0.5, 1.0), st.floats(1.0, 2.0)),
    jitter=st.floats(0, 0.9),
    occlusion_p=st.floats(0, 1),
)
def test_augment_any_valid_config_output_in_unit_range(
    seed: int, rotate: float, zoom: tuple[float, float], jitter: float, occlusion_p: float
) -> None:
    # Arrange
    x = torch.rand(4, 1, 16, 12, generator=_generator(seed))
    cfg = AugmentConfig(
        max_rotate_deg=rotate,
        scale_range=zoom,
        brightness=jitter,
        contrast=jitter,
        occlusion_p=occlusion_p,
    )
    # Act
    out = augment(x, cfg, _generator(seed))
    # Assert
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_config_bad_values_reports_all_problems() -> None:
    # Act
    with pytest.raises(ConfigError) as info:
        AugmentConfig(flip_p=1.5, scale_range=(1.2, 0.8), occlusion_min=0.5, occlusion_max=0.2)
    # Assert
    message = str(info.value)
    assert "flip_p must be in [0, 1], got 1.5" in message
    assert "scale_range" in message and "occlusion_min" in message


# ---------------------------------------------------------------------------------------- occlude


def test_occlude_box_blanks_exactly_the_box(faces: torch.Tensor) -> None:
    # Arrange
    top, left, height, width = 10, 20, 15, 12
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[top : top + height, left : left + width] = True
    # Act
    out = occlude(faces, (top, left, height, width))
    # Assert
    assert bool((out[:, :, inside] == 0).all())
    assert torch.equal(out[:, :, ~inside], faces[:, :, ~inside])
    assert out.data_ptr() != faces.data_ptr()


def test_occlude_value_fills_with_value(faces: torch.Tensor) -> None:
    # Act
    out = occlude(faces, (0, 0, 4, 4), value=0.5)
    # Assert
    assert bool((out[:, :, :4, :4] == 0.5).all())


def test_occlude_box_outside_image_raises_value_error(faces: torch.Tensor) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="inside the 64x64 image"):
        occlude(faces, (50, 50, 20, 20))


# -------------------------------------------------------------------------------- occlusion_boxes


def test_occlusion_boxes_64_square_gives_documented_placements() -> None:
    # Act
    boxes = occlusion_boxes((64, 64))
    # Assert: left eye, right eye, nose, mouth, centre
    assert boxes == [
        (14, 10, 20, 20),
        (14, 34, 20, 20),
        (26, 22, 20, 20),
        (38, 22, 20, 20),
        (22, 22, 20, 20),
    ]


@pytest.mark.parametrize(
    ("size", "box"), [((64, 64), 20), ((112, 92), 40), ((32, 24), 24), ((64, 64), 64)]
)
def test_occlusion_boxes_any_size_within_bounds(size: tuple[int, int], box: int) -> None:
    # Act
    boxes = occlusion_boxes(size, box=box)
    # Assert
    assert len(boxes) == 5
    for top, left, height, width in boxes:
        assert (height, width) == (box, box)
        assert 0 <= top and top + height <= size[0]
        assert 0 <= left and left + width <= size[1]


def test_occlusion_boxes_fewer_placements_returns_prefix() -> None:
    # Act / Assert
    assert occlusion_boxes((64, 64), placements=2) == occlusion_boxes((64, 64))[:2]


def test_occlusion_boxes_box_larger_than_image_raises_value_error() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="occlusion box side"):
        occlusion_boxes((32, 24), box=30)
