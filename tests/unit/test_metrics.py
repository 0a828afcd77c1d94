"""Unit tests for fedface.common.metrics on cases whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedface.common.errors import FedFaceError, SplitError
from fedface.common.metrics import (
    VerificationResult,
    accuracy,
    best_threshold,
    cross_validated_accuracy,
    equal_error_rate,
    identify,
    tar_at_far,
    verification_pairs,
    verify,
)


def _separable_embeddings(
    n_ids: int, per_id: int, *, noise: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One orthogonal direction per identity plus small noise: genuine cos ~1, impostor cos ~0."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = np.eye(n_ids)[labels] + noise * rng.standard_normal((labels.size, n_ids))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


# --- verification_pairs ------------------------------------------------------------------------


def test_verification_pairs_genuine_count_is_sum_of_binomials() -> None:
    # Arrange: identity sizes 3, 4, 1, 2 -> C(3,2) + C(4,2) + 0 + C(2,2) = 3 + 6 + 0 + 1
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 3])

    # Act
    _, _, same = verification_pairs(labels)

    # Assert
    assert int(same.sum()) == 10


def test_verification_pairs_default_ratio_balances_impostors() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 3])

    i, j, same = verification_pairs(labels)

    assert int((~same).sum()) == int(same.sum())
    assert np.array_equal(labels[i] == labels[j], same)


def test_verification_pairs_ratio_two_doubles_impostors() -> None:
    labels = np.repeat(np.arange(5), 3)

    _, _, same = verification_pairs(labels, impostors_per_genuine=2.0)

    assert int((~same).sum()) == 2 * int(same.sum())


def test_verification_pairs_any_labels_no_self_or_duplicate_pairs() -> None:
    labels = np.repeat(np.arange(6), 4)

    i, j, _ = verification_pairs(labels, impostors_per_genuine=3.0, seed=7)

    assert np.all(i < j)
    assert len(set(zip(i.tolist(), j.tolist()))) == i.size


def test_verification_pairs_same_seed_identical_other_seed_differs() -> None:
    labels = np.repeat(np.arange(8), 3)

    first = verification_pairs(labels, seed=3)
    second = verification_pairs(labels, seed=3)
    other = verification_pairs(labels, seed=4)

    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_verification_pairs_too_many_impostors_requested_raises_split_error() -> None:
    labels = np.array([0, 0, 0, 1])  # 3 genuine pairs, 3 impostor pairs

    with pytest.raises(SplitError, match="impostor pairs requested"):
        verification_pairs(labels, impostors_per_genuine=2.0)


def test_verification_pairs_singleton_identities_raise_split_error() -> None:
    with pytest.raises(SplitError, match="no genuine pair"):
        verification_pairs(np.arange(5))


# --- score-level helpers -----------------------------------------------------------------------


def test_best_threshold_tied_candidates_picks_lowest() -> None:
    # Arrange: thresholds 0.25 and 0.75 both classify 3 of 4 pairs correctly
    scores = np.array([0.0, 0.5, 1.0, 1.0])
    same = np.array([False, True, False, True])

    # Act
    thr, acc = best_threshold(scores, same)

    # Assert: accept-all (-1.0) gives 0.5; 0.25 gives 0.75 (misses the impostor at 1.0)
    assert thr == 0.25
    assert acc == 0.75


def test_equal_error_rate_known_crossing_is_one_third() -> None:
    # At threshold 0.5 one genuine of three is rejected and one impostor of three accepted.
    scores = np.array([0.9, 0.8, 0.3, 0.5, 0.2, 0.1])
    same = np.array([True, True, True, False, False, False])

    eer = equal_error_rate(scores, same)

    assert eer == pytest.approx(1 / 3)


def test_tar_at_far_one_impostor_above_all_genuines_is_conservative() -> None:
    # Arrange: 1,500 impostors; FAR 1e-3 allows 1.5 of them, so exactly one may be accepted.
    # One impostor beats every genuine; a second sits at the genuines' median.
    genuine = np.linspace(0.6, 0.95, 10)
    impostor = np.concatenate([[0.98, 0.775], np.linspace(-0.5, 0.3, 1498)])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(10, bool), np.zeros(1500, bool)])

    # Act
    tar = tar_at_far(scores, same, 1e-3)

    # Assert: the threshold must stay above 0.775 (accepting it would give FAR 2/1500 > 1e-3),
    # so exactly the 5 genuines above it count; interpolating to FAR 1e-3 would report ~0.75.
    assert tar == 0.5


def test_tar_at_far_far_exactly_reached_counts_as_within_target() -> None:
    # 1,000 impostors, one above every genuine: FAR 1/1000 == 1e-3 is within the target.
    scores = np.concatenate([np.full(4, 0.9), [0.95], np.zeros(999)])
    same = np.concatenate([np.ones(4, bool), np.zeros(1000, bool)])

    tar = tar_at_far(scores, same, 1e-3)

    assert tar == 1.0


def test_tar_at_far_too_few_impostors_returns_nan() -> None:
    scores = np.concatenate([np.ones(5), np.zeros(999)])
    same = np.concatenate([np.ones(5, bool), np.zeros(999, bool)])

    tar = tar_at_far(scores, same, 1e-3)

    assert math.isnan(tar)


@settings(max_examples=60, deadline=None)
@given(
    genuine=st.lists(st.integers(0, 20), min_size=1, max_size=15),
    impostor=st.lists(st.integers(0, 20), min_size=1, max_size=40),
    far=st.floats(0.05, 0.95),
)
def test_tar_at_far_any_scores_matches_brute_force_and_never_exceeds_far(
    genuine: list[int], impostor: list[int], far: float
) -> None:
    # Arrange: integer scores make ties common
    scores = np.array(genuine + impostor, dtype=float)
    same = np.array([True] * len(genuine) + [False] * len(impostor))
    g, imp = np.array(genuine, float), np.array(impostor, float)
    candidates = np.concatenate([np.unique(scores), [np.inf]])
    fars = np.array([np.mean(imp >= t) for t in candidates])
    tars = np.array([np.mean(g >= t) for t in candidates])

    # Act
    tar = tar_at_far(scores, same, far)

    # Assert
    if len(impostor) * far < 1:
        assert math.isnan(tar)
    else:
        assert tar == pytest.approx(tars[fars <= far].max())


def test_cross_validated_accuracy_narrow_margin_below_oracle() -> None:
    # Arrange: separable only by the gap between one impostor at 0.5 and one genuine at 0.6.
    # A threshold picked with the test fold's pairs would classify that fold perfectly; one
    # picked on the other folds misplaces whichever of the two marginal pairs it cannot see.
    genuine = np.concatenate([np.full(19, 1.0), [0.6]])
    impostor = np.concatenate([np.full(19, 0.0), [0.5]])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(20, bool), np.zeros(20, bool)])
    oracle_thr, oracle_acc = best_threshold(scores, same)

    # Act
    cv = cross_validated_accuracy(scores, same, n_folds=10, seed=0)

    # Assert: each fold holds 4 pairs, so each misclassified marginal pair costs 0.025
    assert oracle_acc == 1.0
    assert oracle_thr == pytest.approx(0.55)
    assert cv.mean in (pytest.approx(0.95), pytest.approx(0.975))
    assert len(cv.fold_thresholds) == 10


def test_cross_validated_accuracy_too_few_pairs_for_folds_raises() -> None:
    with pytest.raises(ValueError, match="n_folds"):
        cross_validated_accuracy(np.array([0.1, 0.9]), np.array([False, True]), n_folds=10)


# --- verify ------------------------------------------------------------------------------------


def test_verify_separable_embeddings_all_metrics_perfect() -> None:
    # Arrange: 10 identities x 5 images -> 100 genuine and 1,125 impostor pairs (enough for 1e-3)
    emb, labels = _separable_embeddings(10, 5)

    # Act
    res = verify(emb, labels)

    # Assert
    assert res.accuracy == 1.0
    assert res.accuracy_std == 0.0
    assert res.auc == 1.0
    assert res.eer == 0.0
    assert dict(res.tar_at_far) == {1e-2: 1.0, 1e-3: 1.0}
    assert (res.n_genuine, res.n_impostor) == (100, 1125)
    assert 0.2 < res.threshold < 0.9


def test_verify_random_embeddings_chance_level() -> None:
    rng = np.random.default_rng(123)
    labels = np.repeat(np.arange(20), 5)
    emb = rng.standard_normal((labels.size, 32))

    res = verify(emb, labels)

    assert res.auc == pytest.approx(0.5, abs=0.07)
    assert res.eer == pytest.approx(0.5, abs=0.07)
    assert res.accuracy == pytest.approx(0.5, abs=0.1)


def test_verify_unnormalised_input_same_as_normalised() -> None:
    emb, labels = _separable_embeddings(6, 4, noise=0.6, seed=1)
    scales = np.linspace(0.5, 7.0, labels.size)[:, None]

    res_scaled = verify(emb * scales, labels)
    res_unit = verify(emb, labels)

    assert res_scaled.to_dict() == pytest.approx(res_unit.to_dict(), nan_ok=True)


def test_verify_same_seed_same_result() -> None:
    emb, labels = _separable_embeddings(8, 4, noise=0.7, seed=2)

    first = verify(emb, labels, seed=5)
    second = verify(emb, labels, seed=5)

    assert first.to_dict() == pytest.approx(second.to_dict(), nan_ok=True)


def test_verify_few_impostor_pairs_tar_at_1e3_is_nan() -> None:
    # 5 identities x 4 images -> 160 impostor pairs: enough for FAR 1e-2, not for 1e-3
    emb, labels = _separable_embeddings(5, 4)

    res = verify(emb, labels)

    assert res.n_impostor == 160
    assert res.tar_at_far[1e-2] == 1.0
    assert math.isnan(res.tar_at_far[1e-3])
    assert math.isnan(res.to_dict()["tar_far1e-3"])


def test_verify_to_dict_has_documented_keys() -> None:
    emb, labels = _separable_embeddings(10, 5)

    keys = list(verify(emb, labels).to_dict())

    assert keys == [
        "accuracy",
        "accuracy_std",
        "auc",
        "eer",
        "tar_far1e-2",
        "tar_far1e-3",
        "threshold",
        "n_genuine",
        "n_impostor",
    ]


def test_verify_probes_equal_to_gallery_same_as_no_probes() -> None:
    emb, labels = _separable_embeddings(6, 4, noise=0.8, seed=3)

    with_probes = verify(emb, labels, probe_embeddings=emb.copy())
    without = verify(emb, labels)

    assert with_probes.to_dict() == pytest.approx(without.to_dict(), nan_ok=True)


def test_verify_negated_probes_auc_zero() -> None:
    # cos(e_i, -e_j) flips every score: genuine pairs now score lowest
    emb, labels = _separable_embeddings(10, 5)

    res = verify(emb, labels, probe_embeddings=-emb)

    assert res.auc == 0.0


def test_verify_probe_scores_pair_gallery_i_with_probe_j() -> None:
    # Arrange: in pairs i < j the probe side is j, so probe 0 is never used and the last probe is.
    emb, labels = _separable_embeddings(6, 4, noise=0.5, seed=4)
    rng = np.random.default_rng(9)
    probe_first_changed = emb.copy()
    probe_first_changed[0] = rng.standard_normal(emb.shape[1])
    probe_last_changed = emb.copy()
    probe_last_changed[-1] = -emb[-1]

    # Act
    base = verify(emb, labels, probe_embeddings=emb)
    first = verify(emb, labels, probe_embeddings=probe_first_changed)
    last = verify(emb, labels, probe_embeddings=probe_last_changed)

    # Assert
    assert first.to_dict() == pytest.approx(base.to_dict(), nan_ok=True)
    assert last.auc < base.auc


def test_verify_one_identity_raises_split_error() -> None:
    emb, _ = _separable_embeddings(1, 5)

    with pytest.raises(SplitError):
        verify(emb, np.zeros(5, int))


def test_verify_mismatched_probe_shape_raises_value_error() -> None:
    emb, labels = _separable_embeddings(4, 3)

    with pytest.raises(ValueError, match="probe_embeddings"):
        verify(emb, labels, probe_embeddings=emb[:-1])


def test_verification_result_is_frozen() -> None:
    emb, labels = _separable_embeddings(4, 3)
    res: VerificationResult = verify(emb, labels)

    with pytest.raises(AttributeError):
        res.auc = 0.0  # type: ignore[misc]


# --- identify ----------------------------------------------------------------------------------


def test_identify_hand_built_gallery_exact_ranks() -> None:
    # Arrange: six identities on the axes of R^6, so identity k's score is probe[k] / |probe|
    gallery = np.eye(6)
    gallery_labels = np.arange(6)
    probes = np.array(
        [
            [1.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # true 0 -> rank 1
            [0.9, 0.8, 0.1, 0.0, 0.0, 0.0],  # true 1 -> rank 2
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # true 5 -> rank 6
            [0.1, 0.2, 0.9, 0.3, 0.0, 0.0],  # true 2 -> rank 1
        ]
    )
    probe_labels = np.array([0, 1, 5, 2])

    # Act
    result = identify(gallery, gallery_labels, probes, probe_labels)

    # Assert
    assert result == {"rank1": 0.5, "rank5": 0.75}


def test_identify_several_gallery_images_uses_best_match() -> None:
    # Identity 0 has one image close to the probe and one far from it; mean would rank it 2nd.
    gallery = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    gallery_labels = np.array([0, 0, 1])
    probe = np.array([[0.0, 0.1, 1.0]])

    result = identify(gallery, gallery_labels, probe, np.array([0]), ranks=(1,))

    assert result == {"rank1": 1.0}


def test_identify_tied_identities_count_against_probe() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    probe = np.array([[1.0, 1.0]])  # equally close to both identities

    result = identify(gallery, np.array([0, 1]), probe, np.array([1]), ranks=(1, 2))

    assert result == {"rank1": 0.0, "rank2": 1.0}


def test_identify_string_labels_work() -> None:
    gallery = np.eye(3)
    labels = np.array(["carol", "alice", "bob"])

    result = identify(gallery, labels, np.eye(3) + 0.1, labels, ranks=(1,))

    assert result == {"rank1": 1.0}


def test_identify_probe_identity_missing_from_gallery_raises() -> None:
    gallery = np.eye(3)

    with pytest.raises(FedFaceError, match="no image in the gallery"):
        identify(gallery, np.array([0, 1, 2]), np.eye(3), np.array([0, 1, 7]))


def test_identify_rank_zero_raises_value_error() -> None:
    with pytest.raises(ValueError, match="ranks"):
        identify(np.eye(2), np.arange(2), np.eye(2), np.arange(2), ranks=(0,))


# --- accuracy ----------------------------------------------------------------------------------


def test_accuracy_three_of_four_right_is_075() -> None:
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75


def test_accuracy_shape_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        accuracy(np.array([1, 2]), np.array([1, 2, 3]))
