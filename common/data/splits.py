"""Seeded, reproducible train/test splits of a :class:`~fedface.common.data.faceset.FaceSet`.

Two protocols:

open-set
    identity-disjoint: a seeded choice of identities goes to test, the rest to train (face
    verification on unseen people).
closed-set
    every identity is in both sides: ``train_per_identity`` images of each go to train and
    the rest to test (identification of enrolled people).

Pixel-identical images (``FaceSet.groups``, e.g. Yale A's nine duplicate pairs) always land on
one side, so a test image never has an exact copy in train. Every split is a pure function of
the data and the seed (``numpy.random.default_rng(seed)``), and records itself to JSON by the
images' sources so that a run directory says exactly which images it used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fedface.common.data.faceset import FaceSet
from fedface.common.errors import ConfigError, SplitError
from fedface.common.io import atomic_write_text

__all__ = [
    "SPLIT_FORMAT",
    "Split",
    "split_closed_set",
    "split_gallery_probe",
    "split_open_set",
    "split_open_set_folds",
]

logger = logging.getLogger(__name__)

#: Value of the ``format`` key in a split's JSON record.
SPLIT_FORMAT = "fedface-split/1"

_KINDS = ("open-set", "closed-set")
_OLIVETTI_PREFIX = "olivetti:"
_MAX_NAMED = 5


def _as_indices(values: np.ndarray | Sequence[int]) -> np.ndarray:
    """Sorted int64 copy of an index list."""
    return np.sort(np.asarray(values, dtype=np.int64).reshape(-1))


def _name_some(names: Sequence[str]) -> str:
    """The first few names, then a count of the rest."""
    shown = ", ".join(names[:_MAX_NAMED])
    rest = len(names) - _MAX_NAMED
    return shown + (f" and {rest} more" if rest > 0 else "")


def _check_seed(seed: int) -> int:
    """Validate a seed for ``numpy.random.default_rng``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"split seed must be an integer >= 0, got {seed!r}")
    return int(seed)


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test partition of a FaceSet's images.

    Parameters
    ----------
    kind : str
        ``"open-set"`` or ``"closed-set"``.
    seed : int
        The seed it was drawn with.
    params : Mapping[str, int]
        The protocol's sizes: ``{"test_identities": k}`` or ``{"train_per_identity": k}``.
    train, test : numpy.ndarray
        Sorted int64 indices into the FaceSet; disjoint.

    Raises
    ------
    SplitError
        If ``kind`` is unknown or train and test overlap.

    Notes
    -----
    Two splits are equal when kind, seed, params and both index arrays are equal.
    """

    kind: str
    seed: int
    params: Mapping[str, int]
    train: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        """Normalise the indices to sorted int64 and check the partition."""
        if self.kind not in _KINDS:
            raise SplitError(f"split kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        train, test = _as_indices(self.train), _as_indices(self.test)
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "test", test)
        object.__setattr__(self, "params", {str(k): int(v) for k, v in self.params.items()})
        overlap = np.intersect1d(train, test)
        if overlap.size:
            raise SplitError(f"a split's train and test overlap in {overlap.size} images")

    def __eq__(self, other: object) -> bool:
        """Same kind, seed, params and indices."""
        if not isinstance(other, Split):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.seed == other.seed
            and dict(self.params) == dict(other.params)
            and np.array_equal(self.train, other.train)
            and np.array_equal(self.test, other.test)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """Sizes only."""
        return (
            f"Split(kind={self.kind!r}, seed={self.seed}, params={dict(self.params)}, "
            f"train={self.train.size}, test={self.test.size})"
        )

    def _check_fits(self, faces: FaceSet) -> None:
        """Raise SplitError unless every index points into ``faces``."""
        top = max(int(self.train.max(initial=-1)), int(self.test.max(initial=-1)))
        if (
            top >= len(faces)
            or min(int(self.train.min(initial=0)), int(self.test.min(initial=0))) < 0
        ):
            raise SplitError(
                f"split indices reach image {top} but the FaceSet holds {len(faces)} images: "
                "pass the FaceSet the split was made from"
            )

    def to_json(self, faces: FaceSet) -> dict[str, Any]:
        """Describe the split by the images' sources, ready for ``json.dump``.

        Parameters
        ----------
        faces : FaceSet
            The set the split indexes into.

        Returns
        -------
        dict
            ``format``, ``kind``, ``seed``, ``params``, ``layout``, ``root`` (the sources'
            common directory, or ``""``), ``identity_names`` (all of the set's names),
            ``train_identities``/``test_identities`` (names present on each side) and
            ``train``/``test`` (the sources of the images, in index order).

        Raises
        ------
        SplitError
            If the split does not fit ``faces``.
        """
        self._check_fits(faces)
        names = faces.identity_names

        def side(idx: np.ndarray) -> tuple[list[str], list[str]]:
            labels = np.unique(faces.labels[idx])
            return [faces.sources[int(i)] for i in idx], [names[int(k)] for k in labels]

        train_sources, train_ids = side(self.train)
        test_sources, test_ids = side(self.test)
        return {
            "format": SPLIT_FORMAT,
            "kind": self.kind,
            "seed": self.seed,
            "params": dict(self.params),
            "layout": faces.layout,
            "root": _common_root(faces.sources),
            "identity_names": list(names),
            "train_identities": train_ids,
            "test_identities": test_ids,
            "train": train_sources,
            "test": test_sources,
        }

    def save(self, path: Path, faces: FaceSet) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temporary file, then ``os.replace``).

        Parameters
        ----------
        path : pathlib.Path
            Destination file; its directory must exist. An existing file is replaced whole.
        faces : FaceSet
            The set the split indexes into.

        Raises
        ------
        SplitError
            If the split does not fit ``faces``.
        OSError
            If the directory is missing or not writable; no partial file is left behind.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"directory {path.parent} does not exist")
        atomic_write_text(path, json.dumps(self.to_json(faces), indent=1) + "\n")
        logger.debug(
            "saved %s split (%d train, %d test) to %s",
            self.kind,
            self.train.size,
            self.test.size,
            path,
        )

    @staticmethod
    def load(path: Path, faces: FaceSet) -> Split:
        """Read a split written by :meth:`save` and map its sources back to indices of ``faces``.

        Sources are matched exactly first; if some are missing and both the file and ``faces``
        hold file paths, they are matched relative to each side's common directory, so a
        split survives moving the data directory.

        Parameters
        ----------
        path : pathlib.Path
            The JSON file.
        faces : FaceSet
            The set to index into (loaded the same way as when the split was made).

        Returns
        -------
        Split

        Raises
        ------
        SplitError
            If the file is missing, malformed, or lists a source that ``faces`` lacks.
        """
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SplitError(
                f"split file {path} does not exist: pass a split.json written by a run"
            ) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SplitError(f"cannot read split file {path}: {exc}") from exc
        keys = ("kind", "seed", "params", "train", "test")
        if (
            not isinstance(record, dict)
            or record.get("format") != SPLIT_FORMAT
            or any(k not in record for k in keys)
        ):
            raise SplitError(
                f"{path} is not a fedface split: expected format {SPLIT_FORMAT!r} "
                f"with keys {', '.join(keys)}"
            )
        train_sources, test_sources = list(record["train"]), list(record["test"])
        lookup = _source_lookup(faces, train_sources + test_sources, str(record.get("root", "")))
        missing = [s for s in train_sources + test_sources if s not in lookup]
        if missing:
            raise SplitError(
                f"{len(missing)} images listed in {path} are not in the loaded data "
                f"(e.g. {_name_some(missing)}): load the same data directory the split "
                "was made from"
            )
        try:
            return Split(
                kind=str(record["kind"]),
                seed=int(record["seed"]),
                params={str(k): int(v) for k, v in dict(record["params"]).items()},
                train=np.array([lookup[s] for s in train_sources], dtype=np.int64),
                test=np.array([lookup[s] for s in test_sources], dtype=np.int64),
            )
        except (TypeError, ValueError) as exc:
            raise SplitError(f"malformed split file {path}: {exc}") from exc


def _is_path_source(source: str) -> bool:
    """Whether a source is a file path (not ``olivetti:<index>``)."""
    return not source.startswith(_OLIVETTI_PREFIX)


def _common_root(sources: Sequence[str]) -> str:
    """Common directory of file sources, or ``""`` when there is none."""
    paths = [s for s in sources if _is_path_source(s)]
    if not paths or len(paths) != len(sources):
        return ""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # mixed absolute and relative paths, or different drives
        return ""


def _source_lookup(faces: FaceSet, wanted: Sequence[str], saved_root: str) -> dict[str, int]:
    """Map each listed source to its index in ``faces``: exactly, else relative to the roots."""
    exact = {s: i for i, s in enumerate(faces.sources)}
    if all(s in exact for s in wanted):
        return exact
    now_root = _common_root(faces.sources)
    if not saved_root or not now_root:
        return exact
    relative = {os.path.relpath(s, now_root): i for i, s in enumerate(faces.sources)}
    lookup = dict(exact)
    for s in wanted:
        if s not in lookup and _is_path_source(s):
            key = os.path.relpath(s, saved_root)
            if key in relative:
                lookup[s] = relative[key]
    return lookup


def _choose_groups(sizes: Sequence[int], need: int) -> list[int] | None:
    """Positions of groups (tried in the given order) whose sizes add up to exactly ``need``."""
    if need == 0:
        return []
    chosen: list[int] = []
    total = 0
    for pos, size in enumerate(sizes):
        if total + size <= need:
            chosen.append(pos)
            total += size
        if total == need:
            return chosen
    # Greedy fell short (only possible with several multi-image groups): exact subset sum.
    reach: dict[int, list[int]] = {0: []}
    for pos, size in enumerate(sizes):
        for total, picks in list(reach.items()):
            target = total + size
            if target <= need and target not in reach:
                reach[target] = [*picks, pos]
        if need in reach:
            return reach[need]
    return None


def _per_identity(
    labels: np.ndarray,
    groups: np.ndarray,
    names: Sequence[str],
    *,
    take: int,
    min_rest: int,
    rng: np.random.Generator,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Per identity, put exactly ``take`` images (whole groups) on side A and the rest on side B."""
    present = np.unique(labels)
    short = [
        f"{names[int(k)]} ({int(np.sum(labels == k))})"
        for k in present
        if int(np.sum(labels == k)) < take + min_rest
    ]
    if short:
        need = take + min_rest
        raise SplitError(
            f"{what} needs at least {need} images per identity ({take} + {min_rest}); "
            f"{len(short)} identities have fewer: {_name_some(short)}; lower the per-identity "
            "count or drop those identities"
        )
    side_of: dict[int, bool] = {}  # group id -> True for side A; spans identities if needed
    in_a = np.zeros(labels.shape[0], dtype=bool)
    for k in present:
        members = np.flatnonzero(labels == k)
        ids, counts = np.unique(groups[members], return_counts=True)
        forced = sum(
            int(c) for g, c in zip(ids, counts, strict=True) if side_of.get(int(g)) is True
        )
        free = [(int(g), int(c)) for g, c in zip(ids, counts, strict=True) if int(g) not in side_of]
        order = rng.permutation(len(free))
        picks = (
            _choose_groups([free[i][1] for i in order], take - forced) if forced <= take else None
        )
        if picks is None:
            raise SplitError(
                f"{what}: cannot put exactly {take} images of {names[int(k)]} on one side "
                "without splitting a group of pixel-identical images; choose another count"
            )
        chosen = {free[int(order[p])][0] for p in picks}
        for g, _ in free:
            side_of[g] = g in chosen
        in_a[members] = [side_of[int(g)] for g in groups[members]]
    return np.flatnonzero(in_a).astype(np.int64), np.flatnonzero(~in_a).astype(np.int64)


def _warn_straddling(groups: np.ndarray, train: np.ndarray, test: np.ndarray) -> None:
    """Warn (with a count) when duplicate groups fall on both sides."""
    both = np.intersect1d(groups[train], groups[test])
    if both.size:
        logger.warning(
            "%d groups of pixel-identical images fall on both sides of the split", both.size
        )


def split_open_set(faces: FaceSet, *, test_identities: int, seed: int) -> Split:
    """Identity-disjoint split: a seeded choice of identities forms the test side.

    Parameters
    ----------
    faces : FaceSet
        The images to split; only identities with images count.
    test_identities : int
        How many identities go to test (all their images); at least 1, and at least one
        identity must remain for training.
    seed : int
        Seed for ``numpy.random.default_rng``; the same seed gives the same split.

    Returns
    -------
    Split
        ``kind="open-set"``, ``params={"test_identities": test_identities}``.

    Raises
    ------
    SplitError
        If ``test_identities`` is not in 1..K-1 for the K identities present.
    ConfigError
        If ``seed`` is not a non-negative integer.
    """
    seed = _check_seed(seed)
    present = np.unique(faces.labels)
    if not 1 <= test_identities < present.size:
        raise SplitError(
            f"open-set split needs 1 <= test_identities < {present.size} (the identities present), "
            f"got {test_identities}: lower test_identities or load more identities"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(present, size=int(test_identities), replace=False)
    is_test = np.isin(faces.labels, chosen)
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    _warn_straddling(faces.groups, train, test)
    return Split("open-set", seed, {"test_identities": int(test_identities)}, train, test)


def split_open_set_folds(faces: FaceSet, *, folds: int, seed: int) -> list[Split]:
    """Identity-disjoint K-fold splits: every identity is held out in exactly one fold.

    The identities are shuffled with ``seed`` and dealt into ``folds`` near-equal groups;
    fold k tests on group k and trains on the rest (ORL with ``folds=4``: 30 train / 10 test
    identities per fold, covering all 40 once). Averaging over folds removes most of the
    luck of which identities happen to be held out.

    Raises
    ------
    SplitError
        If ``folds`` is not in 2..K for the K identities present.
    """
    seed = _check_seed(seed)
    present = np.unique(faces.labels)
    if not 2 <= folds <= present.size:
        raise SplitError(
            f"open-set folds need 2 <= folds <= {present.size} (the identities present), got {folds}"
        )
    order = np.random.default_rng(seed).permutation(present)
    splits = []
    for k, chosen in enumerate(np.array_split(order, folds)):
        is_test = np.isin(faces.labels, chosen)
        train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        _warn_straddling(faces.groups, train, test)
        params = {"folds": int(folds), "fold": k, "test_identities": int(chosen.size)}
        splits.append(Split("open-set", seed, params, train, test))
    return splits


def split_closed_set(faces: FaceSet, *, train_per_identity: int, seed: int) -> Split:
    """Per-identity split: ``train_per_identity`` images of every identity train, the rest test.

    Pixel-identical images (same ``faces.groups`` id) stay together; a group counts as its
    size towards ``train_per_identity``.

    Parameters
    ----------
    faces : FaceSet
        The images to split.
    train_per_identity : int
        Images of each identity that go to train (>= 1); each identity needs at least one more
        for test.
    seed : int
        Seed for ``numpy.random.default_rng``; the same seed gives the same split.

    Returns
    -------
    Split
        ``kind="closed-set"``, ``params={"train_per_identity": train_per_identity}``.

    Raises
    ------
    SplitError
        If ``train_per_identity < 1``, an identity has no more than ``train_per_identity``
        images (all such identities are named), or duplicate groups make the exact count
        impossible.
    ConfigError
        If ``seed`` is not a non-negative integer.
    """
    seed = _check_seed(seed)
    if train_per_identity < 1:
        raise SplitError(
            f"closed-set split needs train_per_identity >= 1, got {train_per_identity}"
        )
    rng = np.random.default_rng(seed)
    train, test = _per_identity(
        faces.labels,
        faces.groups,
        faces.identity_names,
        take=int(train_per_identity),
        min_rest=1,
        rng=rng,
        what="closed-set split",
    )
    return Split("closed-set", seed, {"train_per_identity": int(train_per_identity)}, train, test)


def split_gallery_probe(
    labels: np.ndarray,
    *,
    gallery_per_identity: int = 1,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a set of images into an enrolment gallery and probes, per identity.

    Parameters
    ----------
    labels : numpy.ndarray
        Identity label per image, shape (N,).
    gallery_per_identity : int, default 1
        Images of each identity enrolled in the gallery (>= 1). An identity with exactly this
        many images has no probe (it still acts as a distractor in the gallery).
    seed : int
        Seed for ``numpy.random.default_rng``.
    groups : numpy.ndarray, optional
        Duplicate group per image (``FaceSet.groups``): pixel-identical images are kept on
        one side, so a probe never has an exact copy in the gallery. Default: no groups.

    Returns
    -------
    gallery, probe : numpy.ndarray
        Sorted int64 positions into ``labels``.

    Raises
    ------
    SplitError
        If ``gallery_per_identity < 1``, an identity has fewer images than that, or the
        groups make the exact count impossible.
    ConfigError
        If ``seed`` is not a non-negative integer.
    """
    seed = _check_seed(seed)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if label_arr.size and int(label_arr.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(label_arr.min())}")
    if gallery_per_identity < 1:
        raise SplitError(
            f"gallery/probe split needs gallery_per_identity >= 1, got {gallery_per_identity}"
        )
    if groups is None:
        group_arr = np.arange(label_arr.size, dtype=np.int64)
    else:
        group_arr = np.asarray(groups, dtype=np.int64).reshape(-1)
        if group_arr.shape != label_arr.shape:
            raise ValueError(
                f"groups must have the shape of labels {label_arr.shape}, got {group_arr.shape}"
            )
    top = int(label_arr.max(initial=-1)) + 1
    names = [f"label {k}" for k in range(top)]
    return _per_identity(
        label_arr,
        group_arr,
        names,
        take=int(gallery_per_identity),
        min_rest=0,
        rng=np.random.default_rng(seed),
        what="gallery/probe split",
    )
