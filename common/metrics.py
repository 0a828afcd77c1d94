"""Face-verification and identification metrics.

All similarities are cosine similarities. Embeddings arrive as float arrays of shape ``(N, D)``;
callers L2-normalise them, and every function here normalises them again (a zero vector stays
zero, so its similarity to anything is 0).

Verification protocol (:func:`verify`)
--------------------------------------
The images are those of held-out identities (never seen in training). A *pair* is two distinct
images ``i < j``; it is *genuine* when both show the same identity and an *impostor* pair otherwise.
The score of a pair is ``cos(e_i, e_j)``, or ``cos(e_i, p_j)`` when probe embeddings ``p`` (for
example of occluded versions of the same images) are given: an enrolled clean face against a
probe. A pair is declared "same" when its score is ``>= threshold``.

* **Accuracy** follows the LFW protocol. The pair set is *balanced*: every genuine pair plus an
  equal number of impostor pairs drawn at random without replacement
  (:func:`verification_pairs`), so that chance accuracy is 0.5. The pairs are shuffled with the
  seed and cut into ``n_folds`` (default 10) folds of near-equal size. For each fold the
  threshold is chosen on the *other* folds only (the midpoint between adjacent distinct sorted
  scores, or just outside the score range, that maximises accuracy there; ties go to the lowest
  such threshold) and accuracy is measured on the held-out fold. ``accuracy`` and
  ``accuracy_std`` are the mean and the population standard deviation over folds; ``threshold``
  is the mean of the per-fold thresholds.
* **AUC, EER and TAR@FAR** use *all* pairs ``i < j``. Balancing would throw away most impostor
  pairs, and a false-accept rate of 1e-3 can only be resolved with at least 1,000 impostor pairs;
  100 held-out images already give about 5,000. These quantities are threshold-free summaries of
  the score distributions, so unbalanced classes do not bias them.
* **TAR@FAR is conservative**: the reported TAR is that of the operating point with the highest
  TAR among those whose FAR does not exceed the target (equivalently the lowest threshold whose
  FAR is ``<= target``); it is never interpolated towards a point whose FAR exceeds the target.
  Tied scores are accepted or rejected together (as in :func:`sklearn.metrics.roc_curve`). When
  ``n_impostor * far < 1`` no threshold can show a FAR that small, and the TAR is reported as
  ``nan`` rather than as a number that means nothing.
* **EER** is the rate at which the false-accept and false-reject curves cross, interpolated
  linearly between the two ROC points that bracket the crossing.

Identification protocol (:func:`identify`)
------------------------------------------
Closed-set: every probe identity has images in the gallery. An identity's score for a probe is the
highest cosine similarity over that identity's gallery images. The rank of the true identity is
``1 +`` the number of *other* identities scoring at least as high (ties count against the probe,
which keeps the result deterministic and never optimistic). Rank-k accuracy is the fraction of
probes whose rank is ``<= k``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score, roc_curve

from fedface.common.errors import SplitError

logger = logging.getLogger(__name__)

__all__ = [
    "CrossValidatedAccuracy",
    "VerificationResult",
    "accuracy",
    "best_threshold",
    "cross_validated_accuracy",
    "equal_error_rate",
    "identify",
    "tar_at_far",
    "verification_pairs",
    "verify",
]

_EPS = 1e-12
# Second entropy stream of the seed, used for the fold shuffle (the first samples impostor pairs).
_FOLD_STREAM = 1


def _far_key(far: float) -> str:
    """Key of a TAR@FAR entry in :meth:`VerificationResult.to_dict`, e.g. ``tar_far1e-3``."""
    return "tar_far" + np.format_float_scientific(far, trim="-", exp_digits=1)


@dataclass(frozen=True)
class VerificationResult:
    """Verification metrics of one set of held-out images (see the module docstring).

    Attributes
    ----------
    accuracy : float
        Mean over folds of the held-out accuracy at the threshold chosen on the other folds,
        on the balanced pair set.
    accuracy_std : float
        Population standard deviation of the per-fold accuracies.
    auc : float
        Area under the ROC curve over all pairs.
    eer : float
        Equal error rate over all pairs.
    tar_at_far : Mapping[float, float]
        True-accept rate at each target false-accept rate, over all pairs; ``nan`` where there
        are too few impostor pairs to resolve the target (``n_impostor * far < 1``).
    threshold : float
        Mean of the per-fold cosine thresholds (a pair is "same" when its score is ``>=`` it).
    n_genuine : int
        Number of genuine pairs among all pairs.
    n_impostor : int
        Number of impostor pairs among all pairs.
    """

    accuracy: float
    accuracy_std: float
    auc: float
    eer: float
    tar_at_far: Mapping[float, float]
    threshold: float
    n_genuine: int
    n_impostor: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the metrics as a flat dictionary.

        Returns
        -------
        dict[str, float | int]
            Keys ``accuracy``, ``accuracy_std``, ``auc``, ``eer``, one ``tar_far<far>`` per target
            (``tar_far1e-2``, ``tar_far1e-3`` by default), ``threshold``, ``n_genuine`` and
            ``n_impostor``.
        """
        out: dict[str, float | int] = {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "auc": self.auc,
            "eer": self.eer,
        }
        for far, tar in self.tar_at_far.items():
            out[_far_key(far)] = tar
        out["threshold"] = self.threshold
        out["n_genuine"] = self.n_genuine
        out["n_impostor"] = self.n_impostor
        return out


@dataclass(frozen=True)
class CrossValidatedAccuracy:
    """Per-fold results of :func:`cross_validated_accuracy`.

    Attributes
    ----------
    fold_accuracies : tuple[float, ...]
        Accuracy on each held-out fold.
    fold_thresholds : tuple[float, ...]
        Threshold chosen on the other folds for each fold.
    """

    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean of the per-fold accuracies."""
        return float(np.mean(self.fold_accuracies))

    @property
    def std(self) -> float:
        """Population standard deviation of the per-fold accuracies."""
        return float(np.std(self.fold_accuracies))

    @property
    def threshold(self) -> float:
        """Mean of the per-fold thresholds."""
        return float(np.mean(self.fold_thresholds))


def _normalise(x: NDArray[np.floating], name: str) -> NDArray[np.float64]:
    """Return ``x`` as float64 rows of unit L2 norm (zero rows stay zero)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values; check the encoder's output")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: NDArray[np.float64] = arr / np.maximum(norms, _EPS)
    return out


def _labels_1d(labels: NDArray[np.generic], n: int | None, name: str) -> NDArray[np.generic]:
    """Return ``labels`` as a 1-D array, checking its length against ``n``."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} embeddings")
    return arr


def _scores_and_truth(
    scores: NDArray[np.floating], is_same: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Validate a score vector and its genuine/impostor mask."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_same, dtype=bool)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"scores and is_same must be 1-D of equal length, got shapes {s.shape} and {y.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or infinite values")
    return s, y


def _require_both_classes(y: NDArray[np.bool_]) -> None:
    """Raise unless ``y`` holds at least one genuine and one impostor pair."""
    n_genuine = int(y.sum())
    n_impostor = int(y.size - n_genuine)
    if n_genuine == 0 or n_impostor == 0:
        raise SplitError(
            "verification needs at least one genuine and one impostor pair, got "
            f"{n_genuine} genuine and {n_impostor} impostor pairs: evaluate on at least two "
            "identities, at least one of them with two or more images"
        )


def verification_pairs(
    labels: NDArray[np.generic],
    *,
    impostors_per_genuine: float = 1.0,
    seed: int = 0,
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.bool_]]:
    """Build the pair list for verification accuracy.

    Every genuine pair ``i < j`` (same label) is kept; impostor pairs ``i < j`` (different labels)
    are drawn uniformly without replacement, ``round(impostors_per_genuine * n_genuine)`` of them.

    Parameters
    ----------
    labels : np.ndarray
        Identity label of each image, shape ``(N,)``.
    impostors_per_genuine : float, default 1.0
        Number of impostor pairs per genuine pair; 1.0 gives the balanced set of the LFW protocol.
    seed : int, default 0
        Seed of the impostor sample; the same labels and seed always give the same pairs.

    Returns
    -------
    i, j : np.ndarray
        Indices of the two images of each pair, with ``i < j``; pairs sorted by ``(i, j)``.
    is_same : np.ndarray
        Boolean mask, true for genuine pairs.

    Raises
    ------
    ValueError
        If ``labels`` is not 1-D or ``impostors_per_genuine`` is not positive.
    SplitError
        If there is no genuine pair, or fewer impostor pairs exist than are requested.

    Examples
    --------
    >>> i, j, same = verification_pairs(np.array([0, 0, 1, 1]))
    >>> int(same.sum()), int((~same).sum())
    (2, 2)
    """
    lab = _labels_1d(labels, None, "labels")
    if not impostors_per_genuine > 0:
        raise ValueError(f"impostors_per_genuine must be > 0, got {impostors_per_genuine}")
    ii, jj = np.triu_indices(lab.shape[0], k=1)
    same = lab[ii] == lab[jj]
    n_genuine = int(same.sum())
    if n_genuine == 0:
        raise SplitError(
            f"no genuine pair among {lab.shape[0]} images: every identity has a single image; "
            "evaluate on identities with at least two images each"
        )
    impostor_idx = np.flatnonzero(~same)
    n_wanted = int(round(impostors_per_genuine * n_genuine))
    if n_wanted > impostor_idx.size:
        raise SplitError(
            f"{n_wanted} impostor pairs requested ({impostors_per_genuine} per genuine pair x "
            f"{n_genuine} genuine pairs) but only {impostor_idx.size} exist: lower "
            "impostors_per_genuine or evaluate on more identities"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(impostor_idx, size=n_wanted, replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(same), chosen]))
    return ii[keep], jj[keep], same[keep]


def best_threshold(scores: NDArray[np.floating], is_same: NDArray[np.bool_]) -> tuple[float, float]:
    """Find the threshold that maximises verification accuracy on the given pairs.

    Candidates are the midpoints between adjacent distinct sorted scores, plus one point below
    the lowest and one above the highest score (everything accepted / everything rejected). A pair
    is declared genuine when its score is ``>=`` the threshold. Among equally good candidates
    the lowest threshold wins. The search is one sort and two cumulative sums.

    Parameters
    ----------
    scores : np.ndarray
        Similarity of each pair, shape ``(P,)``.
    is_same : np.ndarray
        True for genuine pairs, shape ``(P,)``.

    Returns
    -------
    threshold : float
        The chosen threshold.
    accuracy : float
        Accuracy on these pairs at that threshold.

    Raises
    ------
    ValueError
        If the inputs are malformed or empty.

    Examples
    --------
    >>> best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]))
    (0.5, 1.0)
    """
    s, y = _scores_and_truth(scores, is_same)
    if s.size == 0:
        raise ValueError("best_threshold needs at least one pair")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    uniq = np.unique(s_sorted)
    candidates = np.concatenate([[uniq[0] - 1.0], (uniq[:-1] + uniq[1:]) / 2.0, [uniq[-1] + 1.0]])
    n_below = np.searchsorted(s_sorted, candidates, side="left")  # pairs rejected
    genuine_cum = np.concatenate([[0], np.cumsum(y_sorted)])
    impostor_below = n_below - genuine_cum[n_below]
    genuine_above = genuine_cum[-1] - genuine_cum[n_below]
    correct = impostor_below + genuine_above
    best = int(np.argmax(correct))  # first maximum: lowest threshold
    return float(candidates[best]), float(correct[best] / s.size)


def cross_validated_accuracy(
    scores: NDArray[np.floating],
    is_same: NDArray[np.bool_],
    *,
    n_folds: int = 10,
    seed: int = 0,
) -> CrossValidatedAccuracy:
    """Estimate verification accuracy by k-fold cross-validation of the threshold.

    The pairs are shuffled with ``seed`` and split into ``n_folds`` folds of near-equal size. For
    each fold, :func:`best_threshold` is run on the other folds only and the accuracy at that
    threshold is measured on the fold, so no fold sees its own labels when its threshold is set.

    Parameters
    ----------
    scores : np.ndarray
        Similarity of each pair, shape ``(P,)``.
    is_same : np.ndarray
        True for genuine pairs, shape ``(P,)``.
    n_folds : int, default 10
        Number of folds, between 2 and ``P``.
    seed : int, default 0
        Seed of the shuffle that assigns pairs to folds.

    Returns
    -------
    CrossValidatedAccuracy
        Per-fold accuracies and thresholds, with their mean and standard deviation.

    Raises
    ------
    ValueError
        If the inputs are malformed or ``n_folds`` is out of range.
    """
    s, y = _scores_and_truth(scores, is_same)
    if not 2 <= n_folds <= s.size:
        raise ValueError(
            f"n_folds must be between 2 and the number of pairs ({s.size}), got {n_folds}"
        )
    perm = np.random.default_rng([seed, _FOLD_STREAM]).permutation(s.size)
    folds = np.array_split(perm, n_folds)
    accuracies: list[float] = []
    thresholds: list[float] = []
    for k, test in enumerate(folds):
        train = np.concatenate([f for m, f in enumerate(folds) if m != k])
        thr, _ = best_threshold(s[train], y[train])
        accuracies.append(float(np.mean((s[test] >= thr) == y[test])))
        thresholds.append(thr)
    return CrossValidatedAccuracy(tuple(accuracies), tuple(thresholds))


def equal_error_rate(scores: NDArray[np.floating], is_same: NDArray[np.bool_]) -> float:
    """Compute the equal error rate, where false-accept and false-reject rates meet.

    Parameters
    ----------
    scores : np.ndarray
        Similarity of each pair, shape ``(P,)``.
    is_same : np.ndarray
        True for genuine pairs, shape ``(P,)``.

    Returns
    -------
    float
        The EER in ``[0, 1]``, interpolated linearly between the two ROC points that bracket the
        crossing of the FAR and FRR curves.

    Raises
    ------
    ValueError
        If the inputs are malformed.
    SplitError
        If there is no genuine or no impostor pair.
    """
    s, y = _scores_and_truth(scores, is_same)
    _require_both_classes(y)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at 1 (accept nothing), ends at -1 (accept everything)
    k = int(np.argmax(gap <= 0.0))
    if k == 0:
        return float(fpr[0])
    d0, d1 = gap[k - 1], gap[k]
    t = d0 / (d0 - d1)
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def tar_at_far(scores: NDArray[np.floating], is_same: NDArray[np.bool_], far: float) -> float:
    """Compute the true-accept rate at a target false-accept rate, conservatively.

    Parameters
    ----------
    scores : np.ndarray
        Similarity of each pair, shape ``(P,)``.
    is_same : np.ndarray
        True for genuine pairs, shape ``(P,)``.
    far : float
        Target false-accept rate, in ``(0, 1)``.

    Returns
    -------
    float
        The highest TAR among thresholds whose FAR is ``<= far`` (never interpolated towards a
        FAR above the target); ``nan`` when ``n_impostor * far < 1``, i.e. when the impostor
        pairs are too few to resolve that FAR.

    Raises
    ------
    ValueError
        If the inputs are malformed or ``far`` is outside ``(0, 1)``.
    SplitError
        If there is no genuine or no impostor pair.

    Examples
    --------
    >>> s = np.array([0.9, 0.8, 0.7, 0.85, 0.75, 0.2, 0.1])
    >>> same = np.array([True, True, True, False, False, False, False])
    >>> tar_at_far(s, same, 0.25)  # one impostor in four may pass: accept down to 0.8
    0.6666666666666666
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    s, y = _scores_and_truth(scores, is_same)
    _require_both_classes(y)
    n_impostor = int((~y).sum())
    if n_impostor * far < 1.0:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.max(tpr[fpr <= far]))


def verify(
    embeddings: NDArray[np.floating],
    labels: NDArray[np.generic],
    *,
    probe_embeddings: NDArray[np.floating] | None = None,
    n_folds: int = 10,
    seed: int = 0,
    far_targets: tuple[float, ...] = (1e-2, 1e-3),
) -> VerificationResult:
    """Evaluate face verification on pairs of held-out images.

    See the module docstring for the protocol: accuracy by ``n_folds``-fold cross-validation on
    the balanced pair set of :func:`verification_pairs`; AUC, EER and TAR@FAR over all pairs.

    Parameters
    ----------
    embeddings : np.ndarray
        Embeddings of the images, shape ``(N, D)``; L2-normalised here again.
    labels : np.ndarray
        Identity of each image, shape ``(N,)``.
    probe_embeddings : np.ndarray or None, default None
        Embeddings of other versions of the same images (e.g. occluded), shape ``(N, D)``. When
        given, the score of pair ``(i, j)`` is ``cos(embeddings[i], probe_embeddings[j])``.
    n_folds : int, default 10
        Number of cross-validation folds for the accuracy.
    seed : int, default 0
        Seed of the impostor sample and of the fold assignment.
    far_targets : tuple[float, ...], default (1e-2, 1e-3)
        False-accept rates at which to report the TAR, each in ``(0, 1)``.

    Returns
    -------
    VerificationResult
        The metrics.

    Raises
    ------
    ValueError
        If shapes disagree, values are not finite, or a parameter is out of range.
    SplitError
        If the images do not give at least one genuine and one impostor pair.
    """
    emb = _normalise(embeddings, "embeddings")
    lab = _labels_1d(labels, emb.shape[0], "labels")
    if probe_embeddings is None:
        probe = emb
    else:
        probe = _normalise(probe_embeddings, "probe_embeddings")
        if probe.shape != emb.shape:
            raise ValueError(
                f"probe_embeddings must have the shape of embeddings {emb.shape}, got {probe.shape}"
            )
    for far in far_targets:
        if not 0.0 < far < 1.0:
            raise ValueError(f"every far target must be in (0, 1), got {far}")
    sim = emb @ probe.T

    ii, jj = np.triu_indices(emb.shape[0], k=1)
    all_scores = sim[ii, jj]
    all_same = lab[ii] == lab[jj]
    _require_both_classes(all_same)

    pi, pj, p_same = verification_pairs(lab, impostors_per_genuine=1.0, seed=seed)
    cv = cross_validated_accuracy(sim[pi, pj], p_same, n_folds=n_folds, seed=seed)

    n_genuine = int(all_same.sum())
    n_impostor = int(all_same.size - n_genuine)
    tars = {far: tar_at_far(all_scores, all_same, far) for far in far_targets}
    result = VerificationResult(
        accuracy=cv.mean,
        accuracy_std=cv.std,
        auc=float(roc_auc_score(all_same, all_scores)),
        eer=equal_error_rate(all_scores, all_same),
        tar_at_far=MappingProxyType(tars),
        threshold=cv.threshold,
        n_genuine=n_genuine,
        n_impostor=n_impostor,
    )
    logger.debug(
        "verify: %d images, %d genuine / %d impostor pairs, %d balanced pairs in %d folds",
        emb.shape[0],
        n_genuine,
        n_impostor,
        p_same.size,
        n_folds,
    )
    return result


def identify(
    gallery: NDArray[np.floating],
    gallery_labels: NDArray[np.generic],
    probes: NDArray[np.floating],
    probe_labels: NDArray[np.generic],
    *,
    ranks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Evaluate closed-set identification of probes against a gallery.

    Each gallery identity scores a probe with the highest cosine similarity over its gallery
    images. The true identity's rank is ``1 +`` the number of other identities scoring at least
    as high (ties count against the probe).

    Parameters
    ----------
    gallery : np.ndarray
        Enrolled embeddings, shape ``(G, D)``.
    gallery_labels : np.ndarray
        Identity of each gallery embedding, shape ``(G,)``.
    probes : np.ndarray
        Probe embeddings, shape ``(P, D)``.
    probe_labels : np.ndarray
        True identity of each probe, shape ``(P,)``.
    ranks : tuple[int, ...], default (1, 5)
        The ranks ``k >= 1`` to report; a rank above the number of identities gives 1.0.

    Returns
    -------
    dict[str, float]
        ``{"rank1": ..., "rank5": ...}``: for each k, the fraction of probes whose true identity
        is among the top k identities.

    Raises
    ------
    ValueError
        If shapes disagree, values are not finite, a rank is below 1, or there are no probes.
    SplitError
        If some probe identity has no image in the gallery.

    Examples
    --------
    >>> g = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> identify(g, np.array([0, 1]), np.array([[0.9, 0.1]]), np.array([0]), ranks=(1,))
    {'rank1': 1.0}
    """
    gal = _normalise(gallery, "gallery")
    prb = _normalise(probes, "probes")
    g_lab = _labels_1d(gallery_labels, gal.shape[0], "gallery_labels")
    p_lab = _labels_1d(probe_labels, prb.shape[0], "probe_labels")
    if gal.shape[1] != prb.shape[1]:
        raise ValueError(
            "gallery and probes must share the embedding size, got "
            f"{gal.shape[1]} and {prb.shape[1]}"
        )
    if prb.shape[0] == 0 or gal.shape[0] == 0:
        raise ValueError("identify needs at least one gallery image and one probe")
    bad_ranks = [k for k in ranks if k < 1]
    if bad_ranks:
        raise ValueError(f"ranks must be >= 1, got {bad_ranks}")

    identities, g_idx = np.unique(g_lab, return_inverse=True)
    p_idx = np.searchsorted(identities, p_lab)
    p_idx_clipped = np.minimum(p_idx, identities.size - 1)
    is_known = identities[p_idx_clipped] == p_lab
    if not np.all(is_known):
        n_missing = np.unique(p_lab[~is_known]).size
        raise SplitError(
            f"{int((~is_known).sum())} probes of {n_missing} identities have no image in the "
            "gallery; closed-set identification needs every probe identity enrolled"
        )

    order = np.argsort(g_idx, kind="stable")
    starts = np.searchsorted(g_idx[order], np.arange(identities.size))
    sim = prb @ gal[order].T
    identity_scores = np.maximum.reduceat(sim, starts, axis=1)  # (P, n_identities)
    true_scores = identity_scores[np.arange(prb.shape[0]), p_idx_clipped]
    rank = (identity_scores >= true_scores[:, None]).sum(axis=1)  # includes the true identity
    return {f"rank{k}": float(np.mean(rank <= k)) for k in ranks}


def accuracy(pred: NDArray[np.generic], true: NDArray[np.generic]) -> float:
    """Fraction of predictions equal to the true labels.

    Parameters
    ----------
    pred : np.ndarray
        Predicted labels, shape ``(N,)``.
    true : np.ndarray
        True labels, shape ``(N,)``.

    Returns
    -------
    float
        ``mean(pred == true)``.

    Raises
    ------
    ValueError
        If the shapes differ or the arrays are empty.

    Examples
    --------
    >>> accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    0.75
    """
    p = np.asarray(pred)
    t = np.asarray(true)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("accuracy of an empty prediction is undefined")
    return float(np.mean(p == t))
