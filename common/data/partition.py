"""Seeded partitions of a :class:`~fedface.common.data.faceset.FaceSet` into federated sites.

Each site of a federated simulation holds its own images. Two modes:

identity-disjoint (default)
    The identities are shuffled and dealt to the sites, so every person is at exactly one site
    (hospitals or campuses with their own people). ``identities_per_site=None`` spreads all
    identities as evenly as possible (site counts differ by at most 1); a number gives every
    site exactly that many identities and leaves the rest unused.
recurring
    For simulations with more sites than people (100 sites on 30 identities). Each site draws
    ``identities_per_site`` distinct identities (default ``min(K, 3)``), balanced so that every
    identity is drawn by about the same number of sites (counts differ by at most 1). An
    identity drawn by several sites has its images shuffled and dealt round-robin among them,
    emptiest site first, so **identities recur across sites but images never do**. A site
    that receives no image of a drawn identity (more sites drew it than it has images) drops
    that identity; a site left with no images at all is an error.

``skew`` in [0, 1) then makes the sites unequal: for every (site, identity) with n images it
keeps a seeded random ``max(1, ceil(n * (1 - skew * u)))`` of them, ``u ~ Uniform(0, 1)``.
``skew=0`` keeps everything; a kept identity always keeps at least one image.

Pixel-identical images (``FaceSet.groups``) are dealt as one unit, so a duplicate group never
sits at two sites (a group spanning identities, which no supported data set has, is logged).
A partition is a pure function of the data and its parameters (one
``numpy.random.default_rng(seed)`` stream) and records itself to JSON by the images' sources.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fedface.common.data.faceset import FaceSet
from fedface.common.data.splits import (
    _as_indices,
    _check_seed,
    _common_root,
    _name_some,
    _source_lookup,
)
from fedface.common.errors import SplitError
from fedface.common.io import atomic_write_json

__all__ = ["PARTITION_FORMAT", "SitePartition", "partition_sites"]

logger = logging.getLogger(__name__)

#: Value of the ``format`` key in a site partition's JSON record.
PARTITION_FORMAT = "fedface-partition/1"

_PARAM_KEYS = ("sites", "identities_per_site", "skew", "recurring", "seed")
_DEFAULT_RECURRING_IDENTITIES = 3
_DISJOINT_FIX = "lower --sites or identities-per-site, or allow recurring identities"


@dataclass(frozen=True, eq=False)
class SitePartition:
    """Which images (indices into the FaceSet that was partitioned) each site holds.

    Parameters
    ----------
    sites : tuple of numpy.ndarray
        One sorted int64 index array per site; no image is at two sites.
    params : dict
        The arguments of :func:`partition_sites` that made it: ``sites``,
        ``identities_per_site`` (as passed, ``None`` included), ``skew``, ``recurring`` and
        ``seed``; ``partition_sites(faces, **params)`` makes it again.

    Raises
    ------
    SplitError
        If there is no site or an image is at more than one site.

    Notes
    -----
    Two partitions are equal when their params and every site's indices are equal.
    """

    sites: tuple[np.ndarray, ...]
    params: dict[str, Any]

    def __post_init__(self) -> None:
        """Normalise every site to sorted int64 indices and check that no image repeats."""
        sites = tuple(_as_indices(s) for s in self.sites)
        if not sites:
            raise SplitError("a site partition needs at least one site")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "params", dict(self.params))
        every = np.concatenate(sites)
        repeated = every.size - np.unique(every).size
        if repeated:
            raise SplitError(f"a site partition puts {repeated} images at more than one site")

    def __eq__(self, other: object) -> bool:
        """Same params and the same indices at every site."""
        if not isinstance(other, SitePartition):
            return NotImplemented
        return (
            self.params == other.params
            and len(self.sites) == len(other.sites)
            and all(np.array_equal(a, b) for a, b in zip(self.sites, other.sites, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """Sizes only."""
        sizes = [int(s.size) for s in self.sites]
        return (
            f"SitePartition(sites={len(sizes)}, images={sum(sizes)}, "
            f"per_site={min(sizes)}..{max(sizes)}, params={self.params})"
        )

    def _check_fits(self, faces: FaceSet) -> None:
        """Raise SplitError unless every index points into ``faces``."""
        every = np.concatenate(self.sites)
        if every.size and (int(every.min()) < 0 or int(every.max()) >= len(faces)):
            raise SplitError(
                f"partition indices reach image {int(every.max())} but the FaceSet holds "
                f"{len(faces)} images: pass the FaceSet the partition was made from"
            )

    def identities(self, faces: FaceSet, site: int) -> list[str]:
        """The names of the identities with images at ``site``, sorted.

        Raises
        ------
        IndexError
            If ``site`` is not a site of this partition.
        SplitError
            If the partition does not fit ``faces``.
        """
        if not -len(self.sites) <= site < len(self.sites):
            raise IndexError(f"site {site} out of range for a partition of {len(self.sites)} sites")
        self._check_fits(faces)
        labels = np.unique(faces.labels[self.sites[site]])
        return sorted(faces.identity_names[int(k)] for k in labels)

    def to_json(self, faces: FaceSet) -> dict[str, Any]:
        """Describe the partition by the images' sources, ready for ``json.dump``.

        Returns
        -------
        dict
            ``format``, ``params``, ``layout``, ``root`` (the sources' common directory, or
            ``""``), ``identity_names`` (all of the set's names) and ``sites``: per site,
            ``identities`` (sorted names) and ``images`` (sources, in index order).

        Raises
        ------
        SplitError
            If the partition does not fit ``faces``.
        """
        self._check_fits(faces)
        return {
            "format": PARTITION_FORMAT,
            "params": dict(self.params),
            "layout": faces.layout,
            "root": _common_root(faces.sources),
            "identity_names": list(faces.identity_names),
            "sites": [
                {
                    "identities": self.identities(faces, k),
                    "images": [faces.sources[int(i)] for i in idx],
                }
                for k, idx in enumerate(self.sites)
            ],
        }

    def save(self, path: str | Path, faces: FaceSet) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temporary file, then ``os.replace``).

        Raises
        ------
        SplitError
            If the partition does not fit ``faces``.
        OSError
            If the file cannot be written; no partial file is left behind.
        """
        path = Path(path)
        atomic_write_json(path, self.to_json(faces))
        logger.debug(
            "saved partition of %d images over %d sites to %s",
            sum(int(s.size) for s in self.sites),
            len(self.sites),
            path,
        )

    @classmethod
    def load(cls, path: str | Path, faces: FaceSet) -> SitePartition:
        """Read a partition written by :meth:`save`, mapping its sources back to ``faces``.

        Sources are matched exactly first, then relative to each side's common directory
        (as :meth:`fedface.common.data.Split.load` does), so a partition survives moving the
        data directory.

        Raises
        ------
        SplitError
            If the file is missing, unreadable or malformed, or lists an image that ``faces``
            lacks; the one-line message names the file and the fix.
        """
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SplitError(
                f"partition file {path} does not exist: pass a partition.json written by a run"
            ) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SplitError(
                f"cannot read partition file {path}: {_one_line(str(exc))}; "
                "write it again with partition_sites"
            ) from exc
        params, site_sources = _parse_record(record, path)
        wanted = [s for sources in site_sources for s in sources]
        lookup = _source_lookup(faces, wanted, str(record.get("root", "")))
        missing = [s for s in wanted if s not in lookup]
        if missing:
            raise SplitError(
                f"{len(missing)} images listed in {path} are not in the loaded data "
                f"(e.g. {_name_some(missing)}): load the same data directory the partition "
                "was made from"
            )
        try:
            indices = (np.array([lookup[s] for s in src], dtype=np.int64) for src in site_sources)
            return cls(sites=tuple(indices), params=params)
        except SplitError as exc:
            raise SplitError(
                f"malformed partition file {path}: {exc}; write it again with partition_sites "
                "(never edit it by hand)"
            ) from exc


def _one_line(text: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(text.split())


def _parse_record(record: Any, path: Path) -> tuple[dict[str, Any], list[list[str]]]:
    """Check a loaded JSON record's shape; return its params and per-site sources."""

    def bad(what: str) -> SplitError:
        return SplitError(
            f"{path} is not a fedface site partition ({what}): expected format "
            f"{PARTITION_FORMAT!r} with params and sites; write it again with partition_sites"
        )

    if not isinstance(record, dict) or record.get("format") != PARTITION_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise bad(f"format {found!r}")
    raw = record.get("params")
    if not isinstance(raw, dict) or sorted(raw) != sorted(_PARAM_KEYS):
        raise bad(f"params must have exactly the keys {', '.join(_PARAM_KEYS)}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    per_site = raw["identities_per_site"]
    if not (
        is_int(raw["sites"])
        and is_int(raw["seed"])
        and (per_site is None or is_int(per_site))
        and isinstance(raw["skew"], (int, float))
        and not isinstance(raw["skew"], bool)
        and isinstance(raw["recurring"], bool)
    ):
        raise bad("params of the wrong type")
    sites = record.get("sites")
    if (
        not isinstance(sites, list)
        or len(sites) != raw["sites"]
        or not all(
            isinstance(s, dict)
            and isinstance(s.get("images"), list)
            and all(isinstance(src, str) for src in s["images"])
            for s in sites
        )
    ):
        raise bad(f"sites must be a list of {raw['sites']} entries with an images list each")
    params = {
        "sites": int(raw["sites"]),
        "identities_per_site": None if per_site is None else int(per_site),
        "skew": float(raw["skew"]),
        "recurring": bool(raw["recurring"]),
        "seed": int(raw["seed"]),
    }
    return params, [list(s["images"]) for s in sites]


def _check_count(name: str, value: Any) -> int:
    """Validate a count that must be an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SplitError(f"site partition needs {name} >= 1 (an integer), got {value!r}")
    return int(value)


def _check_skew(skew: Any) -> float:
    """Validate ``skew`` in [0, 1)."""
    if isinstance(skew, bool) or not isinstance(skew, (int, float, np.floating, np.integer)):
        raise ValueError(f"skew must be a number in [0, 1), got {skew!r}")
    value = float(skew)
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"skew must lie in [0, 1), got {skew!r}")
    return value


def _members(faces: FaceSet, present: np.ndarray) -> dict[int, np.ndarray]:
    """Image indices (ascending) of each present label."""
    order = np.argsort(faces.labels, kind="stable")
    bounds = np.searchsorted(faces.labels[order], np.append(present, np.iinfo(np.int64).max))
    return {
        int(label): order[bounds[i] : bounds[i + 1]].astype(np.int64)
        for i, label in enumerate(present)
    }


def _deal_disjoint(
    members: dict[int, np.ndarray],
    present: np.ndarray,
    sites: int,
    per_site: int | None,
    rng: np.random.Generator,
) -> list[dict[int, np.ndarray]]:
    """Shuffle the identities and deal them to the sites; each identity to one site."""
    available = int(present.size)
    if per_site is None and sites > available:
        raise SplitError(
            f"cannot give {sites} sites a distinct identity each: the data has {available} "
            f"identities; {_DISJOINT_FIX}"
        )
    if per_site is not None and sites * per_site > available:
        raise SplitError(
            f"cannot give {sites} sites {per_site} distinct identities each: that needs "
            f"{sites * per_site} identities and the data has {available}; {_DISJOINT_FIX}"
        )
    order = rng.permutation(present)
    if per_site is None:
        chunks = np.array_split(order, sites)
    else:
        chunks = [order[s * per_site : (s + 1) * per_site] for s in range(sites)]
    return [{int(label): members[int(label)] for label in chunk} for chunk in chunks]


def _deal_recurring(
    members: dict[int, np.ndarray],
    groups: np.ndarray,
    present: np.ndarray,
    sites: int,
    per_site: int,
    rng: np.random.Generator,
) -> list[dict[int, np.ndarray]]:
    """Balanced draw of identities per site, then each identity's images dealt among its sites."""
    available = int(present.size)
    if per_site > available:
        raise SplitError(
            f"recurring site partition cannot draw {per_site} distinct identities per site from "
            f"{available} identities: lower identities-per-site or load more identities"
        )
    # Each site takes the identities drawn least so far, ties broken at random: every identity
    # ends up drawn by about sites * per_site / available sites (counts differ by at most 1).
    drawn = np.zeros(available, dtype=np.int64)
    holders: list[list[int]] = [[] for _ in range(available)]
    for site in range(sites):
        picks = np.lexsort((rng.random(available), drawn))[:per_site]
        drawn[picks] += 1
        for pos in picks:
            holders[int(pos)].append(site)
    # Deal each identity's images (whole duplicate groups) round-robin among its holders,
    # emptiest holder first, so that sites are not left empty while others hold several.
    load = np.zeros(sites, dtype=np.int64)
    held: list[dict[int, list[np.ndarray]]] = [{} for _ in range(sites)]
    for pos in rng.permutation(available):
        owners = np.asarray(holders[int(pos)], dtype=np.int64)
        if owners.size == 0:
            continue
        label = int(present[pos])
        idx = members[label]
        units = np.unique(groups[idx])
        units = units[rng.permutation(units.size)]
        owners = owners[np.lexsort((rng.random(owners.size), load[owners]))]
        for j, group in enumerate(units):
            site = int(owners[j % owners.size])
            unit = idx[groups[idx] == group]
            held[site].setdefault(label, []).append(unit)
            load[site] += unit.size
    empty = np.flatnonzero(load == 0)
    if empty.size:
        images = sum(int(m.size) for m in members.values())
        raise SplitError(
            f"recurring site partition left {empty.size} of {sites} sites without images "
            f"(e.g. {_name_some([f'site {int(s)}' for s in empty])}): more sites drew their "
            f"identities than those identities have images ({images} images in all); "
            "lower --sites, raise identities-per-site or load more images"
        )
    return [
        {label: np.sort(np.concatenate(parts)) for label, parts in site_held.items()}
        for site_held in held
    ]


def _thin(held: list[dict[int, np.ndarray]], skew: float, rng: np.random.Generator) -> None:
    """Per (site, identity), keep a seeded random max(1, ceil(n * (1 - skew * u))) of n images."""
    for site_held in held:
        for label in sorted(site_held):
            idx = site_held[label]
            n = int(idx.size)
            keep = min(n, max(1, math.ceil(n * (1.0 - skew * float(rng.random())))))
            if keep < n:
                site_held[label] = np.sort(rng.choice(idx, size=keep, replace=False))


def _warn_shared_groups(groups: np.ndarray, sites: Sequence[np.ndarray]) -> None:
    """Warn (with a count) when a duplicate group has images at several sites."""
    site_of = np.concatenate([np.full(s.size, k, dtype=np.int64) for k, s in enumerate(sites)])
    pairs = np.unique(np.stack([groups[np.concatenate(sites)], site_of]), axis=1)
    _, counts = np.unique(pairs[0], return_counts=True)
    shared = int(np.sum(counts > 1))
    if shared:
        logger.warning(
            "%d groups of pixel-identical images (labelled as different identities) sit at "
            "more than one site",
            shared,
        )


def partition_sites(
    faces: FaceSet,
    *,
    sites: int,
    identities_per_site: int | None = None,
    skew: float = 0.0,
    recurring: bool = False,
    seed: int = 0,
) -> SitePartition:
    """Partition a FaceSet's images among federated sites (see the module docstring).

    Parameters
    ----------
    faces : FaceSet
        The images; only identities that have images count.
    sites : int
        Number of sites (>= 1).
    identities_per_site : int, optional
        Identity-disjoint: ``None`` spreads all identities evenly, a number gives every site
        exactly that many (``sites * identities_per_site`` identities used). Recurring: the
        distinct identities each site draws, default ``min(K, 3)`` for the K identities present.
    skew : float, default 0.0
        Heterogeneity of images per identity, in [0, 1); 0 keeps every image.
    recurring : bool, default False
        Let identities recur across sites (images still never do).
    seed : int, default 0
        Seed for ``numpy.random.default_rng``; the same seed gives the same partition.

    Returns
    -------
    SitePartition
        One sorted index array per site, and the arguments in ``params``.

    Raises
    ------
    SplitError
        If a count is below 1, there are too few identities for an identity-disjoint partition,
        or a recurring partition would leave a site without images.
    ValueError
        If ``skew`` is not in [0, 1).
    ConfigError
        If ``seed`` is not a non-negative integer.
    """
    seed = _check_seed(seed)
    n_sites = _check_count("sites", sites)
    per_site = (
        None
        if identities_per_site is None
        else _check_count("identities_per_site", identities_per_site)
    )
    skew_value = _check_skew(skew)
    present = np.unique(faces.labels)
    members = _members(faces, present)
    rng = np.random.default_rng(seed)
    if recurring:
        if per_site is None:
            per_site_drawn = min(int(present.size), _DEFAULT_RECURRING_IDENTITIES)
        else:
            per_site_drawn = per_site
        held = _deal_recurring(members, faces.groups, present, n_sites, per_site_drawn, rng)
    else:
        held = _deal_disjoint(members, present, n_sites, per_site, rng)
    if skew_value > 0.0:
        _thin(held, skew_value, rng)
    arrays = tuple(
        np.concatenate([site_held[label] for label in sorted(site_held)])
        if site_held
        else np.zeros(0, dtype=np.int64)
        for site_held in held
    )
    params = {
        "sites": n_sites,
        "identities_per_site": per_site,
        "skew": skew_value,
        "recurring": bool(recurring),
        "seed": seed,
    }
    partition = SitePartition(sites=arrays, params=params)
    _warn_shared_groups(faces.groups, partition.sites)
    logger.debug("partitioned %d images into %r", len(faces), partition)
    return partition
