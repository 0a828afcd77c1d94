"""Seeded open-set, closed-set and gallery/probe splits on the real ORL and Yale A sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedface.common.data import (
    SPLIT_FORMAT,
    FaceSet,
    Split,
    load_faces,
    split_closed_set,
    split_gallery_probe,
    split_open_set,
)
from fedface.common.errors import ConfigError, SplitError


@pytest.fixture(scope="module")
def orl(orl_root: Path) -> FaceSet:
    return load_faces(orl_root)


@pytest.fixture(scope="module")
def yale(yale_a_root: Path) -> FaceSet:
    return load_faces(yale_a_root)


def _duplicate_groups(faces: FaceSet) -> np.ndarray:
    ids, counts = np.unique(faces.groups, return_counts=True)
    return ids[counts > 1]


# --------------------------------------------------------------------------------------- open set


def test_split_open_set_orl_identities_disjoint_with_requested_sizes(orl: FaceSet) -> None:
    # Act
    split = split_open_set(orl, test_identities=10, seed=0)
    # Assert
    train_ids, test_ids = (
        set(orl.labels[split.train].tolist()),
        set(orl.labels[split.test].tolist()),
    )
    assert not train_ids & test_ids
    assert len(test_ids) == 10 and len(train_ids) == 30
    assert split.test.size == 100 and split.train.size == 300
    assert split.kind == "open-set" and dict(split.params) == {"test_identities": 10}


def test_split_open_set_indices_sorted_int64_and_cover_everything(orl: FaceSet) -> None:
    # Act
    split = split_open_set(orl, test_identities=5, seed=3)
    # Assert
    for side in (split.train, split.test):
        assert side.dtype == np.int64 and np.all(np.diff(side) > 0)
    assert np.array_equal(np.union1d(split.train, split.test), np.arange(len(orl)))


def test_split_open_set_same_seed_reproducible_other_seed_differs(orl: FaceSet) -> None:
    # Act
    first = split_open_set(orl, test_identities=10, seed=42)
    again = split_open_set(orl, test_identities=10, seed=42)
    other = split_open_set(orl, test_identities=10, seed=43)
    # Assert
    assert first == again
    assert not np.array_equal(first.test, other.test)


@pytest.mark.parametrize("test_identities", [0, 40, 41])
def test_split_open_set_impossible_count_raises_split_error(
    orl: FaceSet, test_identities: int
) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match=r"open-set split needs 1 <= test_identities < 40"):
        split_open_set(orl, test_identities=test_identities, seed=0)


def test_split_open_set_negative_seed_raises_config_error(orl: FaceSet) -> None:
    # Act / Assert
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        split_open_set(orl, test_identities=5, seed=-1)


# ------------------------------------------------------------------------------------- closed set


def test_split_closed_set_orl_five_per_identity_each_side(orl: FaceSet) -> None:
    # Act
    split = split_closed_set(orl, train_per_identity=5, seed=0)
    # Assert
    assert np.array_equal(np.bincount(orl.labels[split.train], minlength=40), np.full(40, 5))
    assert np.array_equal(np.bincount(orl.labels[split.test], minlength=40), np.full(40, 5))
    assert np.intersect1d(split.train, split.test).size == 0
    assert split.kind == "closed-set" and dict(split.params) == {"train_per_identity": 5}


@pytest.mark.parametrize("seed", range(20))
def test_split_closed_set_yale_duplicate_pairs_never_straddle(yale: FaceSet, seed: int) -> None:
    # Act
    split = split_closed_set(yale, train_per_identity=5, seed=seed)
    # Assert
    straddling = np.intersect1d(yale.groups[split.train], yale.groups[split.test])
    assert straddling.size == 0
    assert np.array_equal(np.bincount(yale.labels[split.train], minlength=15), np.full(15, 5))


def test_split_closed_set_yale_duplicates_reach_both_sides_across_seeds(yale: FaceSet) -> None:
    # Act: over several seeds, pairs go to train sometimes and to test sometimes
    pair_sides = set()
    for seed in range(10):
        split = split_closed_set(yale, train_per_identity=5, seed=seed)
        for g in _duplicate_groups(yale):
            pair_sides.add(bool(np.isin(np.flatnonzero(yale.groups == g), split.train).all()))
    # Assert
    assert pair_sides == {True, False}


def test_split_closed_set_same_seed_reproducible_other_seed_differs(orl: FaceSet) -> None:
    # Act
    first = split_closed_set(orl, train_per_identity=5, seed=9)
    again = split_closed_set(orl, train_per_identity=5, seed=9)
    other = split_closed_set(orl, train_per_identity=5, seed=10)
    # Assert
    assert first == again
    assert first != other


def test_split_closed_set_too_few_images_raises_split_error_naming_identities(orl: FaceSet) -> None:
    # Arrange: s3 and s7 keep only four images each
    short = np.isin(orl.labels, [2, 6]) & (np.arange(len(orl)) % 10 >= 4)
    faces = orl.subset(np.flatnonzero(~short))
    # Act
    with pytest.raises(SplitError) as info:
        split_closed_set(faces, train_per_identity=5, seed=0)
    # Assert
    assert str(info.value) == (
        "closed-set split needs at least 6 images per identity (5 + 1); 2 identities have fewer: "
        "s3 (4), s7 (4); lower the per-identity count or drop those identities"
    )


def test_split_closed_set_all_images_to_train_raises_split_error(orl: FaceSet) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match=r"at least 11 images per identity"):
        split_closed_set(orl, train_per_identity=10, seed=0)


def _two_pairs(yale: FaceSet) -> FaceSet:
    """subject04's real duplicate pair (sad = normal) plus another image twice: two groups of 2."""
    members = np.flatnonzero(yale.labels == 3)
    pair = [int(i) for i in members if yale.attributes["condition"][int(i)] in ("sad", "normal")]
    other = next(int(i) for i in members if int(i) not in pair)
    return yale.subset(np.array([*pair, other, other]))


def test_split_closed_set_group_counts_as_its_size(yale: FaceSet) -> None:
    # Arrange
    faces = _two_pairs(yale)
    # Act
    split = split_closed_set(faces, train_per_identity=2, seed=0)
    # Assert: one whole pair on each side
    assert split.train.size == 2 and split.test.size == 2
    assert len(set(faces.groups[split.train].tolist())) == 1


def test_split_closed_set_count_splitting_a_pair_raises_split_error(yale: FaceSet) -> None:
    # Arrange
    faces = _two_pairs(yale)
    # Act / Assert
    with pytest.raises(
        SplitError, match="cannot put exactly 1 images of subject04 on one side without splitting"
    ):
        split_closed_set(faces, train_per_identity=1, seed=0)


# -------------------------------------------------------------------------------- gallery / probe


def test_split_gallery_probe_one_per_identity(orl: FaceSet) -> None:
    # Act
    gallery, probe = split_gallery_probe(orl.labels, gallery_per_identity=1, seed=0)
    # Assert
    assert np.array_equal(np.bincount(orl.labels[gallery]), np.ones(40, dtype=np.int64))
    assert probe.size == 360 and np.intersect1d(gallery, probe).size == 0


def test_split_gallery_probe_groups_keep_duplicates_together(yale: FaceSet) -> None:
    # Act
    for seed in range(10):
        gallery, probe = split_gallery_probe(
            yale.labels, gallery_per_identity=1, seed=seed, groups=yale.groups
        )
        # Assert
        assert np.intersect1d(yale.groups[gallery], yale.groups[probe]).size == 0


def test_split_gallery_probe_seeded_reproducible(orl: FaceSet) -> None:
    # Act
    first = split_gallery_probe(orl.labels, gallery_per_identity=2, seed=5)
    again = split_gallery_probe(orl.labels, gallery_per_identity=2, seed=5)
    other = split_gallery_probe(orl.labels, gallery_per_identity=2, seed=6)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_split_gallery_probe_too_few_images_raises_split_error() -> None:
    # Act / Assert
    with pytest.raises(SplitError, match=r"label 1 \(1\)"):
        split_gallery_probe(np.array([0, 0, 0, 1]), gallery_per_identity=2, seed=0)


# ------------------------------------------------------------------------------------ save / load


def test_split_save_load_round_trip(tmp_path: Path, yale: FaceSet) -> None:
    # Arrange
    split = split_closed_set(yale, train_per_identity=6, seed=4)
    path = tmp_path / "split.json"
    # Act
    split.save(path, yale)
    loaded = Split.load(path, yale)
    # Assert
    assert loaded == split
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temp file left


def test_split_to_json_records_sources_and_identities(orl: FaceSet) -> None:
    # Arrange
    split = split_open_set(orl, test_identities=4, seed=1)
    # Act
    record = split.to_json(orl)
    # Assert
    assert record["format"] == SPLIT_FORMAT
    assert (record["kind"], record["seed"], record["params"]) == (
        "open-set",
        1,
        {"test_identities": 4},
    )
    assert record["train"] == [orl.sources[i] for i in split.train]
    assert record["test"] == [orl.sources[i] for i in split.test]
    assert record["identity_names"] == list(orl.identity_names)
    assert len(record["test_identities"]) == 4 and len(record["train_identities"]) == 36
    json.dumps(record)  # serialisable as is


def test_split_load_after_data_moved_maps_by_relative_path(
    tmp_path: Path, orl_root: Path, orl: FaceSet
) -> None:
    # Arrange: record paths under another root, as if made on another machine
    split = split_open_set(orl, test_identities=10, seed=2)
    record = split.to_json(orl)
    moved = {
        key: [s.replace(str(orl_root), "/elsewhere/orl") for s in record[key]]
        for key in ("train", "test")
    }
    record.update(moved, root=record["root"].replace(str(orl_root), "/elsewhere/orl"))
    path = tmp_path / "split.json"
    path.write_text(json.dumps(record))
    # Act
    loaded = Split.load(path, orl)
    # Assert
    assert loaded == split


def test_split_load_missing_source_raises_split_error(tmp_path: Path, orl: FaceSet) -> None:
    # Arrange
    split = split_closed_set(orl, train_per_identity=5, seed=0)
    path = tmp_path / "split.json"
    split.save(path, orl)
    smaller = orl.subset(np.flatnonzero(orl.labels != 0))
    # Act
    with pytest.raises(SplitError) as info:
        Split.load(path, smaller)
    # Assert
    assert str(info.value).startswith(
        f"10 images listed in {path} are not in the loaded data (e.g. "
    )
    assert "load the same data directory the split was made from" in str(info.value)


def test_split_load_not_a_split_file_raises_split_error(tmp_path: Path, orl: FaceSet) -> None:
    # Arrange
    path = tmp_path / "split.json"
    path.write_text('{"kind": "open-set"}')
    # Act / Assert
    with pytest.raises(SplitError, match="is not a fedface split"):
        Split.load(path, orl)


def test_split_load_missing_file_raises_split_error(tmp_path: Path, orl: FaceSet) -> None:
    # Act / Assert
    with pytest.raises(SplitError, match="does not exist"):
        Split.load(tmp_path / "none.json", orl)


def test_split_to_json_other_faceset_raises_split_error(orl: FaceSet) -> None:
    # Arrange
    split = split_closed_set(orl, train_per_identity=5, seed=0)
    # Act / Assert
    with pytest.raises(SplitError, match="pass the FaceSet the split was made from"):
        split.to_json(orl.subset(np.arange(100)))
