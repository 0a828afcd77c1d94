"""Unit tests for fedface.common.evaluation on real faces with a parameter-free pixel encoder.

The pixel encoder (standardised pixels, L2-normalised) has no weights, so every protocol's
numbers can be recomputed directly with fedface.common.metrics and compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedface.common.config import EvaluationConfig
from fedface.common.data import FaceSet, load_faces, occlude, occlusion_boxes, to_tensor
from fedface.common.evaluation import confusion_counts, expression_scores, evaluate_closed_set, evaluate_expression, evaluate_open_set
from fedface.common.metrics import identify
from fedface.common.models import standardize

CPU = torch.device("cpu")
SIZE = (32, 32)
EXPRESSIONS = ("happy", "normal", "sad", "sleepy", "surprised", "wink")


class PixelEncoder(nn.Module):
    """Standardised pixels as the embedding: a deterministic, weight-free face encoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(standardize(x).flatten(1), dim=1)


def _pixels(images: np.ndarray | torch.Tensor) -> np.ndarray:
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)
    with torch.no_grad():
        return PixelEncoder()(x).numpy()


@pytest.fixture(scope="module")
def orl(orl_root: Path) -> FaceSet:
    return load_faces(orl_root, size=SIZE)


@pytest.fixture(scope="module")
def gallery_probes(orl: FaceSet) -> tuple[FaceSet, FaceSet]:
    """Ten ORL identities: images 1-3 of each enrolled, images 4-10 as probes."""
    ten = np.flatnonzero(orl.labels < 10)
    position = np.arange(ten.size) % 10
    return orl.subset(ten[position < 3]), orl.subset(ten[position >= 3])


@pytest.fixture(scope="module")
def yale(yale_a_root: Path) -> FaceSet:
    return load_faces(yale_a_root, size=SIZE)


@pytest.fixture
def cfg() -> EvaluationConfig:
    return EvaluationConfig(flip_tta=False, shift_tta=0, occlusion_box=10, occlusion_placements=5, n_folds=5)


# --- closed set --------------------------------------------------------------------------------


def test_evaluate_closed_set_rank1_equals_identify_on_pixel_embeddings(
    gallery_probes: tuple[FaceSet, FaceSet], cfg: EvaluationConfig
) -> None:
    # Arrange
    gallery, probes = gallery_probes
    expected = identify(_pixels(gallery.images), gallery.labels, _pixels(probes.images), probes.labels)

    # Act
    out = evaluate_closed_set(PixelEncoder(), gallery, probes, cfg, device=CPU)

    # Assert
    assert out["rank1"] == pytest.approx(expected["rank1"])
    assert out["rank5"] == pytest.approx(expected["rank5"])
    assert 0.5 < out["rank1"] <= 1.0  # pixels alone recognise most ORL faces
    assert (out["gallery_images"], out["probe_images"]) == (30.0, 70.0)


def test_evaluate_closed_set_occluded_rank1_is_mean_over_boxes(
    gallery_probes: tuple[FaceSet, FaceSet], cfg: EvaluationConfig
) -> None:
    # Arrange
    gallery, probes = gallery_probes
    g_emb = _pixels(gallery.images)
    p_images = to_tensor(probes.images)
    boxes = occlusion_boxes(SIZE, cfg.occlusion_box, cfg.occlusion_placements)
    per_box = [identify(g_emb, gallery.labels, _pixels(occlude(p_images, box)), probes.labels)["rank1"] for box in boxes]

    # Act
    out = evaluate_closed_set(PixelEncoder(), gallery, probes, cfg, device=CPU)

    # Assert
    assert len(per_box) == 5
    assert out["occluded_rank1"] == pytest.approx(float(np.mean(per_box)))
    assert out["occluded_rank1"] < out["rank1"]  # blanking a fifth of a face costs pixels something


def test_evaluate_closed_set_without_occlusion_omits_occluded_keys(
    gallery_probes: tuple[FaceSet, FaceSet], cfg: EvaluationConfig
) -> None:
    gallery, probes = gallery_probes

    out = evaluate_closed_set(PixelEncoder(), gallery, probes, cfg, device=CPU, with_occlusion=False)

    assert "rank1" in out
    assert not [k for k in out if k.startswith("occluded_")]


def _mirror_symmetric(faces: FaceSet) -> FaceSet:
    """The faces averaged with their mirror images: flipping them changes nothing."""
    return FaceSet(
        images=np.ascontiguousarray((faces.images + faces.images[:, :, ::-1]) / 2),
        labels=faces.labels,
        identity_names=faces.identity_names,
        sources=faces.sources,
        groups=faces.groups,
        attributes={},
    )


def test_evaluate_closed_set_flip_tta_on_mirror_symmetric_faces_changes_nothing(
    gallery_probes: tuple[FaceSet, FaceSet],
) -> None:
    # Arrange: normalize(e(x) + e(flip x)) == e(x) when flip x == x
    gallery, probes = (_mirror_symmetric(fs) for fs in gallery_probes)
    on = EvaluationConfig(flip_tta=True, shift_tta=0, occlusion_box=10)
    off = EvaluationConfig(flip_tta=False, shift_tta=0, occlusion_box=10)

    # Act
    a = evaluate_closed_set(PixelEncoder(), gallery, probes, on, device=CPU, with_occlusion=False)
    b = evaluate_closed_set(PixelEncoder(), gallery, probes, off, device=CPU, with_occlusion=False)

    # Assert
    assert a == pytest.approx(b)


# --- open set ----------------------------------------------------------------------------------


def test_evaluate_open_set_reports_bounded_metrics_clean_and_occluded(orl: FaceSet, cfg: EvaluationConfig) -> None:
    # Arrange: ten identities the (weight-free) encoder never trained on
    faces = orl.subset(np.flatnonzero((orl.labels >= 10) & (orl.labels < 20))).relabel()

    # Act
    out = evaluate_open_set(PixelEncoder(), faces, cfg, device=CPU, seed=0)

    # Assert
    keys = ("verif_acc", "verif_auc", "tar_far1e-2", "rank1", "rank5")
    for key in (*keys, *(f"occluded_{k}" for k in keys)):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["verif_acc"] > 0.7
    assert out["verif_auc"] > 0.8
    assert out["occluded_verif_acc"] <= out["verif_acc"] + 0.02
    assert (out["test_images"], out["test_identities"]) == (100.0, 10.0)


def test_evaluate_open_set_rank1_uses_seeded_gallery_split(orl: FaceSet, cfg: EvaluationConfig) -> None:
    faces = orl.subset(np.flatnonzero(orl.labels < 10))

    first = evaluate_open_set(PixelEncoder(), faces, cfg, device=CPU, seed=3, with_occlusion=False)
    again = evaluate_open_set(PixelEncoder(), faces, cfg, device=CPU, seed=3, with_occlusion=False)

    assert first == again
    assert not [k for k in first if k.startswith("occluded_")]


# --- expression --------------------------------------------------------------------------------


def test_evaluate_expression_accuracy_matches_the_heads_predictions(yale: FaceSet, cfg: EvaluationConfig) -> None:
    # Arrange: Yale A expression images and a fixed linear head (class-mean pixel embeddings)
    keep = np.flatnonzero([c in EXPRESSIONS for c in yale.attributes["condition"]])
    images = yale.images[keep]
    labels = np.array([EXPRESSIONS.index(yale.attributes["condition"][i]) for i in keep])
    emb = _pixels(images)
    head = nn.Linear(emb.shape[1], len(EXPRESSIONS), bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.stack([emb[labels == k].mean(axis=0) for k in range(6)])))
        expected = float(np.mean(head(torch.from_numpy(emb)).argmax(dim=1).numpy() == labels))

    # Act
    out = evaluate_expression(PixelEncoder(), head, images, labels, cfg, device=CPU)

    # Assert
    assert out["expression_acc"] == pytest.approx(expected)
    assert 0.0 <= out["expression_acc"] <= 1.0
    assert 0.0 <= out["occluded_expression_acc"] <= 1.0
    assert out["test_images"] == float(len(labels))


def test_evaluate_expression_without_occlusion_omits_occluded_key(yale: FaceSet, cfg: EvaluationConfig) -> None:
    images = yale.images[:12]
    labels = np.arange(12) % 3
    head = nn.Linear(SIZE[0] * SIZE[1], 3)

    out = evaluate_expression(PixelEncoder(), head, images, labels, cfg, device=CPU, with_occlusion=False)

    assert set(out) == {"expression_acc", "expression_macro_f1", "recall_0", "recall_1", "recall_2", "test_images"}


def test_expression_scores_macro_f1_and_recall_weigh_every_present_class() -> None:
    # Arrange: 8 "happy" all right, 2 "disgust" all predicted happy: accuracy flatters
    labels = np.array([0] * 8 + [1] * 2)
    pred = np.zeros(10, dtype=np.int64)

    # Act
    out = expression_scores(labels, pred, ["happy", "disgust", "fear"])

    # Assert: accuracy 0.8, but disgust's recall 0 and macro-F1 over the two present classes
    assert out["expression_acc"] == pytest.approx(0.8)
    assert out["recall_happy"] == 1.0 and out["recall_disgust"] == 0.0
    assert "recall_fear" not in out  # absent from the test labels
    happy_f1 = 2 * 0.8 * 1.0 / 1.8
    assert out["expression_macro_f1"] == pytest.approx(happy_f1 / 2)


def test_confusion_counts_rows_are_true_classes() -> None:
    counts = confusion_counts(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)

    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_evaluate_closed_set_uses_shift_tta_from_the_config(gallery_probes: tuple[FaceSet, FaceSet]) -> None:
    # Arrange: pixel embeddings of shift-averaged faces are blurrier, so the figures move
    gallery, probes = gallery_probes
    plain = EvaluationConfig(flip_tta=False, shift_tta=0, occlusion_box=10)
    shifted = EvaluationConfig(flip_tta=False, shift_tta=3, occlusion_box=10)
    # Act
    a = evaluate_closed_set(PixelEncoder(), gallery, probes, plain, device=CPU)
    b = evaluate_closed_set(PixelEncoder(), gallery, probes, shifted, device=CPU)

    # Assert
    assert a != b
