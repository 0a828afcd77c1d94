"""Seeded site partitions for federated simulation, on the real ORL and Yale A faces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedface.common.data import (
    PARTITION_FORMAT,
    FaceSet,
    SitePartition,
    load_faces,
    partition_sites,
)
from fedface.common.errors import SplitError

SIZE = (16, 16)


@pytest.fixture(scope="module")
def orl(orl_root: Path) -> FaceSet:
    return load_faces(orl_root, size=SIZE)


@pytest.fixture(scope="module")
def orl30(orl: FaceSet) -> FaceSet:
    """ORL's first 30 identities (the other 10 names stay, without images)."""
    return orl.subset(np.flatnonzero(orl.labels < 30))


@pytest.fixture(scope="module")
def yale(yale_a_root: Path) -> FaceSet:
    return load_faces(yale_a_root, size=SIZE)


def _site_labels(faces: FaceSet, partition: SitePartition) -> list[set[int]]:
    return [set(faces.labels[idx].tolist()) for idx in partition.sites]


def _all_indices(partition: SitePartition) -> np.ndarray:
    return np.concatenate(partition.sites)


# ------------------------------------------------------------------------- identity-disjoint


def test_partition_default_identities_disjoint_and_every_image_placed(orl: FaceSet) -> None:
    # Act
    partition = partition_sites(orl, sites=4, seed=0)
    # Assert
    labels = _site_labels(orl, partition)
    assert all(not (a & b) for i, a in enumerate(labels) for b in labels[i + 1 :])
    assert np.array_equal(np.sort(_all_indices(partition)), np.arange(len(orl)))
    for idx in partition.sites:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


@pytest.mark.parametrize(("sites", "sizes"), [(6, {6, 7}), (40, {1}), (1, {40})])
def test_partition_default_spreads_identities_evenly(
    orl: FaceSet, sites: int, sizes: set[int]
) -> None:
    # Act
    partition = partition_sites(orl, sites=sites, seed=1)
    # Assert
    counts = [len(labels) for labels in _site_labels(orl, partition)]
    assert len(counts) == sites and sum(counts) == 40
    assert set(counts) == sizes


def test_partition_exact_identities_per_site_leaves_the_rest_unused(orl: FaceSet) -> None:
    # Act
    partition = partition_sites(orl, sites=3, identities_per_site=5, seed=2)
    # Assert
    labels = _site_labels(orl, partition)
    assert [len(s) for s in labels] == [5, 5, 5]
    assert len(set().union(*labels)) == 15
    assert [idx.size for idx in partition.sites] == [50, 50, 50]


def test_partition_counts_only_identities_with_images(orl30: FaceSet) -> None:
    # Act
    partition = partition_sites(orl30, sites=30, seed=0)
    # Assert
    assert set().union(*_site_labels(orl30, partition)) == set(range(30))
    with pytest.raises(SplitError, match=r"cannot give 31 sites .* the data has 30 identities"):
        partition_sites(orl30, sites=31, seed=0)


@pytest.mark.parametrize(
    ("sites", "per_site", "numbers"),
    [
        (41, None, "cannot give 41 sites a distinct identity each: the data has 40 identities"),
        (5, 9, "that needs 45 identities and the data has 40"),
    ],
)
def test_partition_too_few_identities_raises_split_error_naming_the_fix(
    orl: FaceSet, sites: int, per_site: int | None, numbers: str
) -> None:
    # Act
    with pytest.raises(SplitError) as info:
        partition_sites(orl, sites=sites, identities_per_site=per_site, seed=0)
    # Assert
    message = str(info.value)
    assert numbers in message and "\n" not in message
    assert message.endswith(
        "lower --sites or identities-per-site, or allow recurring identities"
    )


@pytest.mark.parametrize(("sites", "per_site"), [(0, None), (2, 0), (True, None)])
def test_partition_count_below_one_raises_split_error(
    orl: FaceSet, sites: int, per_site: int | None
) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match=r"site partition needs \w+ >= 1"):
        partition_sites(orl, sites=sites, identities_per_site=per_site)


@pytest.mark.parametrize("skew", [-0.1, 1.0, 1.5, math.nan])
def test_partition_skew_outside_unit_interval_raises_value_error(
    orl: FaceSet, skew: float
) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=r"skew must lie in \[0, 1\)"):
        partition_sites(orl, sites=2, skew=skew)


# -------------------------------------------------------------------------------- recurring


def test_partition_recurring_100_sites_on_30_identities(orl30: FaceSet) -> None:
    # Act
    partition = partition_sites(orl30, sites=100, recurring=True, seed=0)
    # Assert: every site holds images, none twice, and identities recur across sites
    every = _all_indices(partition)
    assert len(partition.sites) == 100 and all(idx.size > 0 for idx in partition.sites)
    assert np.unique(every).size == every.size
    labels = _site_labels(orl30, partition)
    assert all(1 <= len(s) <= 3 for s in labels)
    holders = np.bincount([k for s in labels for k in s], minlength=30)
    assert holders.max() > 1
    assert partition.params["identities_per_site"] is None


def test_partition_recurring_explicit_identities_per_site(orl: FaceSet) -> None:
    # Act
    partition = partition_sites(orl, sites=20, identities_per_site=4, recurring=True, seed=3)
    # Assert: 80 draws over 40 identities, 10 images each: every draw gets images
    assert [len(s) for s in _site_labels(orl, partition)] == [4] * 20
    every = _all_indices(partition)
    assert np.unique(every).size == every.size


def test_partition_recurring_keeps_duplicate_groups_at_one_site(yale: FaceSet) -> None:
    # Arrange: Yale A has nine pairs of pixel-identical images
    ids, counts = np.unique(yale.groups, return_counts=True)
    assert np.sum(counts > 1) == 9
    # Act
    partition = partition_sites(yale, sites=40, recurring=True, seed=4)
    # Assert
    site_groups = [set(yale.groups[idx].tolist()) for idx in partition.sites]
    assert all(not (a & b) for i, a in enumerate(site_groups) for b in site_groups[i + 1 :])


def test_partition_recurring_more_sites_than_images_raises_split_error(orl: FaceSet) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match=r"left \d+ of 401 sites without images .* lower --sites"):
        partition_sites(orl, sites=401, identities_per_site=1, recurring=True, seed=0)


def test_partition_recurring_too_many_identities_per_site_raises_split_error(
    orl30: FaceSet,
) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match="cannot draw 31 distinct identities per site from 30"):
        partition_sites(orl30, sites=2, identities_per_site=31, recurring=True)


# ------------------------------------------------------------------------------------ skew


@pytest.mark.parametrize("recurring", [False, True])
def test_partition_skew_thins_but_keeps_each_identity(orl: FaceSet, recurring: bool) -> None:
    # Arrange
    flat = partition_sites(orl, sites=8, recurring=recurring, seed=5)
    # Act
    skewed = partition_sites(orl, sites=8, recurring=recurring, skew=0.9, seed=5)
    # Assert: same identities per site, fewer images, >= 1 image per (site, identity)
    assert _site_labels(orl, skewed) == _site_labels(orl, flat)
    assert _all_indices(skewed).size < _all_indices(flat).size
    for kept, full in zip(skewed.sites, flat.sites, strict=True):
        assert np.all(np.isin(kept, full))
        assert set(orl.labels[kept].tolist()) == set(orl.labels[full].tolist())
    sizes = [np.bincount(orl.labels[idx]) for idx in skewed.sites]
    assert len({int(n) for s in sizes for n in s if n}) > 1  # unequal per-identity counts


def test_partition_skew_zero_keeps_every_image(orl: FaceSet) -> None:
    # Act
    partition = partition_sites(orl, sites=5, skew=0.0, seed=6)
    # Assert
    assert _all_indices(partition).size == len(orl)
    assert all(np.all(np.bincount(orl.labels[idx])[list(s)] == 10) for idx, s in zip(
        partition.sites, _site_labels(orl, partition), strict=True
    ))


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("recurring", [False, True])
def test_partition_same_seed_reproducible_other_seed_differs(
    orl: FaceSet, recurring: bool
) -> None:
    # Act
    first = partition_sites(orl, sites=7, recurring=recurring, skew=0.5, seed=11)
    again = partition_sites(orl, sites=7, recurring=recurring, skew=0.5, seed=11)
    other = partition_sites(orl, sites=7, recurring=recurring, skew=0.5, seed=12)
    # Assert
    assert first == again
    assert first != other


def test_partition_params_record_the_arguments_and_remake_it(orl: FaceSet) -> None:
    # Arrange
    partition = partition_sites(orl, sites=3, identities_per_site=2, skew=0.3, seed=9)
    # Act
    remade = partition_sites(orl, **partition.params)
    # Assert
    assert partition.params == {
        "sites": 3,
        "identities_per_site": 2,
        "skew": 0.3,
        "recurring": False,
        "seed": 9,
    }
    assert remade == partition


def test_partition_identities_names_sorted(orl: FaceSet) -> None:
    # Arrange
    partition = partition_sites(orl, sites=4, seed=0)
    # Act
    names = partition.identities(orl, 2)
    # Assert
    expected = {orl.identity_names[k] for k in orl.labels[partition.sites[2]].tolist()}
    assert names == sorted(expected) and len(names) == 10


def test_partition_image_at_two_sites_raises_split_error() -> None:
    # Act / Assert
    with pytest.raises(SplitError, match="puts 1 images at more than one site"):
        SitePartition(sites=(np.array([0, 1]), np.array([1, 2])), params={})


# ------------------------------------------------------------------------------ save / load


def test_partition_save_load_round_trip(tmp_path: Path, orl30: FaceSet) -> None:
    # Arrange
    partition = partition_sites(orl30, sites=12, recurring=True, skew=0.4, seed=8)
    path = tmp_path / "partition.json"
    # Act
    partition.save(path, orl30)
    loaded = SitePartition.load(path, orl30)
    # Assert
    assert loaded == partition
    assert [p.name for p in tmp_path.iterdir()] == ["partition.json"]  # no temp file left
    record = json.loads(path.read_text())
    assert record["format"] == PARTITION_FORMAT
    assert record["sites"][0]["images"] == [orl30.sources[i] for i in partition.sites[0]]
    assert record["sites"][0]["identities"] == partition.identities(orl30, 0)


def test_partition_load_unknown_path_raises_split_error(tmp_path: Path, orl: FaceSet) -> None:
    # Arrange: a tampered file that lists an image the data lacks
    partition = partition_sites(orl, sites=2, seed=0)
    path = tmp_path / "partition.json"
    partition.save(path, orl)
    record = json.loads(path.read_text())
    record["sites"][1]["images"][0] = "/nowhere/s99/1.pgm"
    path.write_text(json.dumps(record))
    # Act
    with pytest.raises(SplitError) as info:
        SitePartition.load(path, orl)
    # Assert
    message = str(info.value)
    assert message.startswith(f"1 images listed in {path} are not in the loaded data")
    assert "/nowhere/s99/1.pgm" in message and "\n" not in message
    assert message.endswith("load the same data directory the partition was made from")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "cannot read partition file"),
        ('{"format": "fedface-split/1"}', "is not a fedface site partition"),
        (
            '{"format": "fedface-partition/1", "params": {"sites": 1}, "sites": []}',
            "params must have exactly the keys",
        ),
    ],
)
def test_partition_load_malformed_file_raises_split_error(
    tmp_path: Path, orl: FaceSet, text: str, match: str
) -> None:
    # Arrange
    path = tmp_path / "partition.json"
    path.write_text(text)
    # Act
    with pytest.raises(SplitError, match=match) as info:
        SitePartition.load(path, orl)
    # Assert
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_partition_load_image_at_two_sites_raises_split_error(
    tmp_path: Path, orl: FaceSet
) -> None:
    # Arrange
    partition = partition_sites(orl, sites=2, seed=0)
    path = tmp_path / "partition.json"
    partition.save(path, orl)
    record = json.loads(path.read_text())
    record["sites"][1]["images"].append(record["sites"][0]["images"][0])
    path.write_text(json.dumps(record))
    # Act / Assert
    with pytest.raises(SplitError, match=f"malformed partition file {path}: .* more than one site"):
        SitePartition.load(path, orl)


def test_partition_load_missing_file_raises_split_error(tmp_path: Path, orl: FaceSet) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match="does not exist"):
        SitePartition.load(tmp_path / "none.json", orl)
