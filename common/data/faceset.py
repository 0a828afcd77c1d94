"""The in-memory face data set that every loader returns and every split indexes into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FaceSet", "SkippedFile"]


@dataclass(frozen=True)
class SkippedFile:
    """A file that a loader could not decode and left out (``on_error="skip"``).

    Parameters
    ----------
    path : str
        The file's path as the loader saw it.
    reason : str
        One line saying why it could not be read (the decoder's error).
    """

    path: str
    reason: str


@dataclass(frozen=True, eq=False, repr=False)
class FaceSet:
    """Preprocessed grey face images with their identities, provenance and attributes.

    All per-image fields are aligned: entry ``i`` of ``images``, ``labels``, ``sources``,
    ``groups`` and of every ``attributes`` value describes the same image.

    Parameters
    ----------
    images : numpy.ndarray
        float32 array of shape (N, H, W) with values in [0, 1].
    labels : numpy.ndarray
        int64 array of shape (N,): index into ``identity_names``.
    identity_names : tuple of str
        The identities, in label order. After :meth:`subset` some may have no image left;
        :meth:`relabel` drops those.
    sources : tuple of str
        Per image, the file it was read from, or ``"olivetti:<index>"`` for the
        scikit-learn Olivetti cache.
    groups : numpy.ndarray
        int64 array of shape (N,): images whose decoded source pixels are identical share a
        group id. Splits keep a group on one side so that a duplicate never leaks from train
        to test.
    attributes : Mapping[str, tuple of str]
        Per-image string attributes, one tuple of length N per key (Yale A: ``condition``;
        Extended Yale B: ``azimuth`` and ``elevation``); empty for other layouts.
    skipped : tuple of SkippedFile, default ()
        Files left out because they could not be read.
    layout : str, default ""
        The layout the set was loaded as (``"orl"``, ``"yale-a"``, ...).

    Raises
    ------
    ValueError
        If the per-image fields disagree in length or a label is out of range.

    Notes
    -----
    The dataclass is frozen but its arrays stay writable (a read-only array makes
    ``torch.from_numpy`` warn); treat them as read-only. Equality is identity.
    """

    images: np.ndarray
    labels: np.ndarray
    identity_names: tuple[str, ...]
    sources: tuple[str, ...]
    groups: np.ndarray
    attributes: Mapping[str, tuple[str, ...]]
    skipped: tuple[SkippedFile, ...] = ()
    layout: str = ""

    def __post_init__(self) -> None:
        """Check that the per-image fields line up."""
        n = len(self.labels)
        if self.images.ndim != 3:
            raise ValueError(f"FaceSet.images must have shape (N, H, W), got {self.images.shape}")
        if self.images.shape[0] != n or len(self.sources) != n or len(self.groups) != n:
            raise ValueError(
                f"FaceSet fields disagree in length: images {self.images.shape[0]}, labels {n}, "
                f"sources {len(self.sources)}, groups {len(self.groups)}"
            )
        for key, values in self.attributes.items():
            if len(values) != n:
                raise ValueError(
                    f"FaceSet attribute {key!r} has {len(values)} values for {n} images"
                )
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.identity_names)):
            raise ValueError(
                f"FaceSet labels must lie in 0..{len(self.identity_names) - 1}, "
                f"got {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        """Number of images."""
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        """Counts and shape only: never the pixels or the names."""
        size = "x".join(str(s) for s in self.images.shape[1:])
        return (
            f"FaceSet(images={len(self)}, identities={self.num_identities}, size={size}, "
            f"layout={self.layout!r}, skipped={len(self.skipped)})"
        )

    @property
    def num_identities(self) -> int:
        """Number of entries in ``identity_names`` (some may be absent after :meth:`subset`)."""
        return len(self.identity_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: np.ndarray | Sequence[int]) -> FaceSet:
        """Select images by position, keeping ``identity_names`` and the label numbering.

        Parameters
        ----------
        indices : numpy.ndarray or sequence of int
            Integer positions (any order, repeats allowed) or a boolean mask of length N.

        Returns
        -------
        FaceSet
            A new set with copies of the selected images; ``skipped`` and ``layout`` are kept.

        Raises
        ------
        IndexError
            If an index is out of range.
        ValueError
            If a boolean mask has the wrong length or the indices are not integers.
        """
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"subset indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset index out of range for a FaceSet of {len(self)} images")
        positions = idx.tolist()
        return FaceSet(
            images=self.images[idx],
            labels=self.labels[idx],
            identity_names=self.identity_names,
            sources=tuple(self.sources[i] for i in positions),
            groups=self.groups[idx],
            attributes={k: tuple(v[i] for i in positions) for k, v in self.attributes.items()},
            skipped=self.skipped,
            layout=self.layout,
        )

    def relabel(self) -> FaceSet:
        """Compact the labels to 0..K'-1 over the identities present, in their current order.

        Returns
        -------
        FaceSet
            A new set whose ``identity_names`` lists only identities that have images; the
            images themselves are shared with this set, not copied.
        """
        present = np.unique(self.labels)
        labels = np.searchsorted(present, self.labels).astype(np.int64)
        return FaceSet(
            images=self.images,
            labels=labels,
            identity_names=tuple(self.identity_names[int(i)] for i in present),
            sources=self.sources,
            groups=self.groups,
            attributes=dict(self.attributes),
            skipped=self.skipped,
            layout=self.layout,
        )
