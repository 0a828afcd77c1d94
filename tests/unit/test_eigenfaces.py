"""Unit tests for fedface.common.eigenfaces: real ORL faces and a tiny synthetic expression set.

ORL is read straight from its PGM files with PIL (not through the project's loader) so that this
baseline is checked independently of the data pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from fedface.common.eigenfaces import Eigenfaces, eigenfaces_expression
from fedface.common.metrics import accuracy, identify

_SIZE = 64


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Run BLAS single-threaded: these matrices are tiny, and on a busy machine OpenBLAS's
    worker threads turn a 0.05 s SVD into several seconds."""
    with threadpool_limits(limits=1):
        yield


def _read_face(path: Path) -> np.ndarray:
    """One ORL image as 64x64 floats in [0, 1]."""
    with Image.open(path) as img:
        small = img.convert("L").resize((_SIZE, _SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def orl_split(orl_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ORL, files 1-5 of each subject for training and 6-10 for test, as (x, y, x, y)."""
    subjects = sorted(
        (d for d in orl_root.iterdir() if d.is_dir() and d.name.startswith("s")),
        key=lambda d: int(d.name[1:]),
    )
    x_train, y_train, x_test, y_test = [], [], [], []
    for label, subject in enumerate(subjects):
        files = sorted(subject.glob("*.pgm"), key=lambda f: int(f.stem))
        for f in files[:5]:
            x_train.append(_read_face(f))
            y_train.append(label)
        for f in files[5:]:
            x_test.append(_read_face(f))
            y_test.append(label)
    return np.stack(x_train), np.array(y_train), np.stack(x_test), np.array(y_test)


def test_eigenfaces_orl_five_train_five_test_rank1_at_least_085(
    orl_split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # Arrange
    x_train, y_train, x_test, y_test = orl_split
    model = Eigenfaces().fit(x_train)

    # Act
    result = identify(model.embed(x_train), y_train, model.embed(x_test), y_test)

    # Assert: published Eigenfaces on ORL with this split is about 0.9
    assert x_train.shape == (200, _SIZE, _SIZE)
    assert result["rank1"] >= 0.85


def test_eigenfaces_orl_embed_unit_norm_with_fitted_width(
    orl_split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x_train, _, x_test, _ = orl_split
    model = Eigenfaces(n_components=40).fit(x_train)

    emb = model.embed(x_test[:10])

    assert emb.shape == (10, 40)
    assert model.n_components_ == 40
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_eigenfaces_fit_twice_same_embeddings() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((30, 16, 16))

    first = Eigenfaces(n_components=0.9).fit(images).embed(images)
    second = Eigenfaces(n_components=0.9).fit(images).embed(images)

    np.testing.assert_array_equal(first, second)


def test_eigenfaces_embed_before_fit_raises_not_fitted() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        Eigenfaces().embed(np.zeros((2, 8, 8)))


def test_eigenfaces_embed_other_image_size_raises_value_error() -> None:
    model = Eigenfaces(n_components=3).fit(np.random.default_rng(1).random((10, 8, 8)))

    with pytest.raises(ValueError, match="resize"):
        model.embed(np.zeros((2, 9, 9)))


def test_eigenfaces_int_components_above_image_count_raises_value_error() -> None:
    images = np.random.default_rng(2).random((10, 8, 8))

    with pytest.raises(ValueError, match="n_components"):
        Eigenfaces(n_components=11).fit(images)


def _synthetic_expressions(
    n_subjects: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each subject shows three expressions; each expression brightens its own band of rows."""
    rng = np.random.default_rng(seed)
    expressions = np.array(["happy", "neutral", "surprised"])
    images, labels = [], []
    for _ in range(n_subjects):
        face = 0.3 + 0.2 * rng.random((12, 12))  # the subject's own appearance
        for k, name in enumerate(expressions):
            img = face + 0.05 * rng.standard_normal((12, 12))
            img[4 * k : 4 * k + 4] += 0.4
            images.append(np.clip(img, 0.0, 1.0))
            labels.append(name)
    return np.stack(images), np.array(labels)


def test_eigenfaces_expression_synthetic_predicts_training_labels_with_right_shape() -> None:
    # Arrange: 8 training subjects, 4 unseen test subjects
    x_train, y_train = _synthetic_expressions(8, seed=0)
    x_test, y_test = _synthetic_expressions(4, seed=1)

    # Act
    pred = eigenfaces_expression(x_train, y_train, x_test, n_components=10)

    # Assert
    assert pred.shape == (x_test.shape[0],)
    assert set(pred.tolist()) <= set(y_train.tolist())
    assert accuracy(pred, y_test) >= 0.9


def test_eigenfaces_expression_single_class_raises_value_error() -> None:
    x = np.random.default_rng(3).random((6, 8, 8))

    with pytest.raises(ValueError, match="two distinct"):
        eigenfaces_expression(x, np.array(["happy"] * 6), x)
