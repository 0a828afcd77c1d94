"""Loading the real face data sets: layouts, preprocessing, duplicates and every error path."""

from __future__ import annotations

import importlib
import logging
import re
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
from fedface.common.data import (
    YALE_A_CONDITIONS,
    FaceSet,
    SkippedFile,
    detect_layout,
    load_faces,
)
from fedface.common.errors import (
    ConfigError,
    CorruptImageError,
    DataNotFoundError,
    UnknownLayoutError,
)
from PIL import Image

# The nine pixel-identical Yale A pairs listed in ../shared/data/README.md.
YALE_A_DUPLICATES = {
    ("subject04", frozenset({"sad", "normal"})),
    ("subject08", frozenset({"glasses", "normal"})),
    *((f"subject{n:02d}", frozenset({"normal", "noglasses"})) for n in (2, 3, 6, 7, 9, 12, 14)),
}


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def orl_faces(orl_root: Path) -> FaceSet:
    return load_faces(orl_root)


@pytest.fixture(scope="module")
def yale_faces(yale_a_root: Path) -> FaceSet:
    return load_faces(yale_a_root)


@pytest.fixture
def orl_copy(tmp_path: Path, orl_root: Path) -> Path:
    """Three ORL identities (s1, s2, s10) copied into tmp_path/orl."""
    root = tmp_path / "orl"
    for name in ("s1", "s2", "s10"):
        shutil.copytree(orl_root / name, root / name)
    return root


@pytest.fixture(scope="module")
def olivetti_home(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Path:
    """A scikit-learn Olivetti cache built from the real ORL images, written as sklearn does."""
    home = tmp_path_factory.mktemp("scikit_learn_data")
    rows = []
    for person in range(1, 41):
        for shot in range(1, 11):
            with Image.open(orl_root / f"s{person}" / f"{shot}.pgm") as im:
                small = np.asarray(im.convert("L").resize((64, 64), Image.Resampling.LANCZOS))
            # sklearn stores MATLAB's column-major rows and undoes it with .transpose(0, 2, 1)
            rows.append(small.astype(np.float32).T.reshape(-1) / 255.0)
    joblib.dump(np.stack(rows), home / "olivetti_py3.pkz", compress=6)
    return home


def _write_bytes(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


CORRUPTIONS = {
    "truncated-pgm": lambda real: real[:2000],
    "random-bytes": lambda real: np.random.default_rng(0).bytes(4000),
    "zero-length": lambda real: b"",
}


# -------------------------------------------------------------------------------------------- ORL


def test_load_faces_orl_real_data_gives_400_images_of_40_identities(orl_faces: FaceSet) -> None:
    # Arrange / Act: the module fixture loads ../shared/data/orl
    # Assert
    assert len(orl_faces) == 400
    assert orl_faces.num_identities == 40
    assert orl_faces.images.shape == (400, 64, 64)
    assert orl_faces.images.dtype == np.float32
    assert orl_faces.labels.dtype == np.int64
    assert 0.0 <= orl_faces.images.min() and orl_faces.images.max() <= 1.0
    assert np.array_equal(np.bincount(orl_faces.labels), np.full(40, 10))
    assert (
        orl_faces.layout == "orl" and orl_faces.skipped == () and dict(orl_faces.attributes) == {}
    )


def test_load_faces_orl_identity_names_sorted_naturally(orl_faces: FaceSet) -> None:
    # Assert: s2 comes before s10, and labels follow the names
    assert orl_faces.identity_names == tuple(f"s{k}" for k in range(1, 41))
    first_of_s10 = orl_faces.sources[int(np.flatnonzero(orl_faces.labels == 9)[0])]
    assert Path(first_of_s10).parent.name == "s10"
    assert Path(first_of_s10).name == "1.pgm"


def test_load_faces_custom_size_resizes_to_height_width(orl_copy: Path) -> None:
    # Act
    faces = load_faces(orl_copy, size=(56, 46))
    # Assert
    assert faces.images.shape == (30, 56, 46)


def test_load_faces_orl_readme_ignored(orl_copy: Path) -> None:
    # Arrange
    (orl_copy / "README").write_text("the ORL database\n")
    (orl_copy / "s1" / "notes.txt").write_text("not an image\n")
    # Act
    faces = load_faces(orl_copy)
    # Assert
    assert len(faces) == 30 and faces.identity_names == ("s1", "s2", "s10")


# ----------------------------------------------------------------------------------------- Yale A


def test_load_faces_yale_a_real_data_gives_165_images_with_conditions(yale_faces: FaceSet) -> None:
    # Assert
    assert len(yale_faces) == 165
    assert yale_faces.identity_names == tuple(f"subject{n:02d}" for n in range(1, 16))
    conditions = yale_faces.attributes["condition"]
    assert len(conditions) == 165
    assert sorted(set(conditions)) == sorted(YALE_A_CONDITIONS)
    for source, condition in zip(yale_faces.sources, conditions, strict=True):
        assert Path(source).name.split(".")[1] == condition


def test_load_faces_yale_a_duplicates_form_exactly_nine_pairs(yale_faces: FaceSet) -> None:
    # Act
    ids, counts = np.unique(yale_faces.groups, return_counts=True)
    pairs = {
        (
            yale_faces.identity_names[
                int(yale_faces.labels[np.flatnonzero(yale_faces.groups == g)[0]])
            ],
            frozenset(
                yale_faces.attributes["condition"][int(i)]
                for i in np.flatnonzero(yale_faces.groups == g)
            ),
        )
        for g in ids[counts > 1]
    }
    # Assert
    assert counts.max() == 2
    assert int(np.sum(counts == 2)) == 9
    assert pairs == YALE_A_DUPLICATES


def test_load_faces_yale_a_names_without_gif_load_the_same(
    tmp_path: Path, yale_a_root: Path, yale_faces: FaceSet
) -> None:
    # Arrange: the original release's names, without the .gif extension
    picked = ["subject01.happy", "subject01.wink", "subject02.sad", "subject02.normal"]
    for name in picked:
        shutil.copyfile(yale_a_root / f"{name}.gif", tmp_path / name)
    (tmp_path / "Readme.txt").write_text("Yale Face Database\n")
    # Act
    faces = load_faces(tmp_path)
    # Assert
    assert faces.layout == "yale-a"
    assert faces.identity_names == ("subject01", "subject02")
    by_name = {Path(s).name: i for i, s in enumerate(yale_faces.sources)}
    for i, source in enumerate(faces.sources):
        reference = by_name[Path(source).name + ".gif"]
        assert np.array_equal(faces.images[i], yale_faces.images[reference])
        assert faces.attributes["condition"][i] == yale_faces.attributes["condition"][reference]


# -------------------------------------------------------------------------------- Extended Yale B

_YALEB_NAME = re.compile(r"^yaleB\d+_P00A([+-]\d{3})E([+-]\d{2})\.pgm$")


def test_load_faces_extended_yale_b_real_data_parses_azimuth_and_elevation(
    yaleb_root: Path,
) -> None:
    # Act
    faces = load_faces(yaleb_root)
    # Assert
    assert len(faces) == 1710
    assert faces.num_identities == 27
    assert "yaleB14" not in faces.identity_names
    assert faces.identity_names[:2] == ("yaleB01", "yaleB02")
    for source, azimuth, elevation in zip(
        faces.sources, faces.attributes["azimuth"], faces.attributes["elevation"], strict=True
    ):
        match = _YALEB_NAME.match(Path(source).name)
        assert match is not None
        assert (azimuth, elevation) == (match.group(1), match.group(2))
    assert 0.0 <= faces.images.min() and faces.images.max() <= 1.0


def test_load_faces_extended_yale_b_ambient_and_info_files_ignored(
    tmp_path: Path, yaleb_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: one identity, three real images, an ambient shot and a text file
    person = tmp_path / "yaleB01"
    person.mkdir()
    names = ["yaleB01_P00A+000E+00.pgm", "yaleB01_P00A-035E+15.pgm", "yaleB01_P00A+130E+20.pgm"]
    for name in names:
        shutil.copyfile(yaleb_root / "yaleB01" / name, person / name)
    shutil.copyfile(yaleb_root / "yaleB01" / names[0], person / "yaleB01_P00_Ambient.pgm")
    (person / "yaleB01_P00.info").write_text("yaleB01_P00A+000E+00.pgm\n")
    # Act
    with caplog.at_level(logging.INFO, logger="fedface.common.data.sources"):
        faces = load_faces(tmp_path)
    # Assert
    assert faces.layout == "extended-yale-b"
    assert len(faces) == 3 and faces.skipped == ()
    assert sorted(zip(faces.attributes["azimuth"], faces.attributes["elevation"], strict=True)) == [
        ("+000", "+00"),
        ("+130", "+20"),
        ("-035", "+15"),
    ]
    assert any("ignored 1 Extended Yale B images" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------- ImageFolder and Olivetti


def test_load_faces_image_folder_of_pngs_matches_orl_pixels(
    tmp_path: Path, orl_root: Path, orl_faces: FaceSet
) -> None:
    # Arrange: colour PNGs of real ORL faces under arbitrary identity names
    root = tmp_path / "folder"
    expected = {}
    for identity, person in (("alice", "s3"), ("bob", "s7")):
        (root / identity).mkdir(parents=True)
        for shot in ("1", "2"):
            with Image.open(orl_root / person / f"{shot}.pgm") as im:
                im.convert("RGB").save(root / identity / f"face_{shot}.png")
            expected[f"{identity}/face_{shot}.png"] = orl_root / person / f"{shot}.pgm"
    (root / "alice" / "notes.txt").write_text("ignored\n")
    # Act
    faces = load_faces(root)
    # Assert
    assert faces.layout == "image-folder"
    assert faces.identity_names == ("alice", "bob")
    assert len(faces) == 4
    ref_index = {s: i for i, s in enumerate(orl_faces.sources)}
    for i, source in enumerate(faces.sources):
        key = "/".join(Path(source).parts[-2:])
        assert np.array_equal(faces.images[i], orl_faces.images[ref_index[str(expected[key])]])


def test_load_faces_olivetti_cache_gives_400_images_of_40_identities(
    olivetti_home: Path, orl_faces: FaceSet
) -> None:
    # Act
    faces = load_faces(olivetti_home)
    # Assert
    assert faces.layout == "olivetti"
    assert faces.images.shape == (400, 64, 64)
    assert faces.identity_names == tuple(f"s{k}" for k in range(1, 41))
    assert np.array_equal(np.bincount(faces.labels), np.full(40, 10))
    assert faces.sources[0] == "olivetti:0" and faces.sources[-1] == "olivetti:399"
    assert np.abs(faces.images - orl_faces.images).max() <= 1.0 / 255 + 1e-6  # same faces, upright


def test_load_faces_olivetti_matches_sklearn_reader(olivetti_home: Path) -> None:
    # Arrange
    from sklearn.datasets import fetch_olivetti_faces

    bunch = fetch_olivetti_faces(data_home=str(olivetti_home), download_if_missing=False)
    # Act
    faces = load_faces(olivetti_home)
    # Assert: same orientation and values, up to 8-bit quantisation
    assert np.array_equal(faces.labels, bunch.target)
    assert np.abs(faces.images - bunch.images).max() <= 0.5 / 255 + 1e-6


def test_load_faces_olivetti_corrupt_cache_raises_corrupt_image_error(tmp_path: Path) -> None:
    # Arrange
    cache = _write_bytes(tmp_path / "olivetti_py3.pkz", b"not a joblib pickle")
    # Act / Assert
    with pytest.raises(CorruptImageError) as info:
        load_faces(tmp_path)
    assert info.value.path == str(cache)


# -------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("orl_root", "orl"),
        ("yale_a_root", "yale-a"),
        ("yaleb_root", "extended-yale-b"),
        ("olivetti_home", "olivetti"),
    ],
)
def test_detect_layout_real_data_named_correctly(
    request: pytest.FixtureRequest, fixture: str, expected: str
) -> None:
    # Arrange
    root = request.getfixturevalue(fixture)
    # Act / Assert
    assert detect_layout(root) == expected


def test_detect_layout_renamed_identity_folders_is_image_folder(orl_copy: Path) -> None:
    # Arrange
    (orl_copy / "s1").rename(orl_copy / "person-a")
    (orl_copy / "s2").rename(orl_copy / "person-b")
    (orl_copy / "s10").rename(orl_copy / "person-c")
    # Act / Assert
    assert detect_layout(orl_copy) == "image-folder"


def test_detect_layout_loose_images_raises_one_line_unknown_layout(
    tmp_path: Path, orl_root: Path
) -> None:
    # Arrange
    shutil.copyfile(orl_root / "s1" / "1.pgm", tmp_path / "face.pgm")
    # Act
    with pytest.raises(UnknownLayoutError) as info:
        detect_layout(tmp_path)
    # Assert
    message = str(info.value)
    assert "\n" not in message
    assert (
        str(tmp_path) in message and "expected" in message and "ORL folders (sN/M.pgm)" in message
    )


# ----------------------------------------------------------------------------------------- errors


def test_load_faces_missing_root_raises_data_not_found_naming_path(tmp_path: Path) -> None:
    # Arrange
    missing = tmp_path / "nowhere"
    # Act
    with pytest.raises(DataNotFoundError) as info:
        load_faces(missing)
    # Assert
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_load_faces_empty_directory_raises_data_not_found(tmp_path: Path) -> None:
    # Act / Assert
    with pytest.raises(DataNotFoundError, match="holds no face images"):
        load_faces(tmp_path)


def test_load_faces_explicit_layout_without_matching_files_raises_data_not_found(
    orl_copy: Path,
) -> None:
    # Act / Assert
    with pytest.raises(DataNotFoundError, match=r"no Extended Yale B images"):
        load_faces(orl_copy, layout="extended-yale-b")


def test_load_faces_unknown_layout_name_raises_unknown_layout(orl_copy: Path) -> None:
    # Act / Assert
    with pytest.raises(
        UnknownLayoutError, match=r"unknown layout 'lfw': expected one of auto, orl"
    ):
        load_faces(orl_copy, layout="lfw")  # type: ignore[arg-type]


def test_load_faces_bad_size_raises_config_error(orl_copy: Path) -> None:
    # Act / Assert
    with pytest.raises(ConfigError, match="size must be"):
        load_faces(orl_copy, size=(64, 0))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_faces_corrupt_file_on_error_fail_raises_naming_path(
    orl_copy: Path, kind: str
) -> None:
    # Arrange
    bad = _write_bytes(
        orl_copy / "s2" / "11.pgm", CORRUPTIONS[kind]((orl_copy / "s2" / "1.pgm").read_bytes())
    )
    # Act
    with pytest.raises(CorruptImageError) as info:
        load_faces(orl_copy, on_error="fail")
    # Assert
    assert info.value.path == str(bad)
    assert info.value.reason
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_faces_corrupt_file_on_error_skip_records_it(
    orl_copy: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    bad = _write_bytes(
        orl_copy / "s2" / "11.pgm", CORRUPTIONS[kind]((orl_copy / "s2" / "1.pgm").read_bytes())
    )
    # Act
    with caplog.at_level(logging.WARNING, logger="fedface.common.data.sources"):
        faces = load_faces(orl_copy, on_error="skip")
    # Assert
    assert len(faces) == 30
    assert len(faces.skipped) == 1
    assert isinstance(faces.skipped[0], SkippedFile)
    assert faces.skipped[0].path == str(bad) and faces.skipped[0].reason
    assert str(bad) not in faces.sources
    assert [r.levelno for r in caplog.records if str(bad) in r.getMessage()] == [logging.WARNING]


def test_load_faces_corrupt_reasons_say_what_went_wrong(orl_copy: Path) -> None:
    # Arrange
    real = (orl_copy / "s1" / "1.pgm").read_bytes()
    for i, kind in enumerate(sorted(CORRUPTIONS)):
        _write_bytes(orl_copy / "s1" / f"{11 + i}.pgm", CORRUPTIONS[kind](real))
    # Act
    faces = load_faces(orl_copy, on_error="skip")
    # Assert: 11 = random bytes, 12 = truncated, 13 = empty
    reasons = {Path(s.path).name: s.reason for s in faces.skipped}
    assert "not a recognised image format" in reasons["11.pgm"]
    assert "truncated" in reasons["12.pgm"]
    assert reasons["13.pgm"] == "empty file (0 bytes)"


def test_load_faces_identity_without_readable_images_dropped(orl_copy: Path) -> None:
    # Arrange: every image of s2 replaced by garbage
    for image in (orl_copy / "s2").glob("*.pgm"):
        image.write_bytes(b"")
    # Act
    faces = load_faces(orl_copy, on_error="skip")
    # Assert
    assert faces.identity_names == ("s1", "s10")
    assert np.array_equal(np.unique(faces.labels), [0, 1])
    assert len(faces.skipped) == 10 and len(faces) == 20


def test_load_faces_all_images_unreadable_raises_data_not_found(orl_copy: Path) -> None:
    # Arrange
    for image in orl_copy.glob("*/*.pgm"):
        image.write_bytes(b"P5 92 112 255\n")
    # Act / Assert
    with pytest.raises(DataNotFoundError, match="all 30 files failed to decode"):
        load_faces(orl_copy, on_error="skip")


# ---------------------------------------------------------------------------------------- FaceSet


def test_faceset_subset_keeps_names_and_label_numbering(orl_faces: FaceSet) -> None:
    # Arrange
    picks = np.flatnonzero(np.isin(orl_faces.labels, [4, 9]))
    # Act
    part = orl_faces.subset(picks)
    # Assert
    assert len(part) == 20
    assert part.identity_names == orl_faces.identity_names
    assert set(part.labels.tolist()) == {4, 9}
    assert part.sources == tuple(orl_faces.sources[i] for i in picks)
    assert np.array_equal(part.images, orl_faces.images[picks])


def test_faceset_relabel_compacts_labels_and_names(orl_faces: FaceSet) -> None:
    # Arrange
    part = orl_faces.subset(np.flatnonzero(np.isin(orl_faces.labels, [4, 9])))
    # Act
    compact = part.relabel()
    # Assert
    assert compact.identity_names == ("s5", "s10")
    assert set(compact.labels.tolist()) == {0, 1}
    assert compact.num_identities == 2


def test_faceset_subset_boolean_mask_keeps_attributes(yale_faces: FaceSet) -> None:
    # Arrange
    mask = np.array([c == "wink" for c in yale_faces.attributes["condition"]])
    # Act
    winks = yale_faces.subset(mask)
    # Assert
    assert len(winks) == 15
    assert set(winks.attributes["condition"]) == {"wink"}


def test_faceset_repr_shows_counts_not_pixels(orl_faces: FaceSet) -> None:
    # Act / Assert
    assert (
        repr(orl_faces) == "FaceSet(images=400, identities=40, size=64x64, layout='orl', skipped=0)"
    )


def _isort_key(name: str) -> tuple[int, str]:
    """isort / ruff RUF022 order, as common/errors.py uses: CONSTANTS, Classes, functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize(
    "module",
    [
        "fedface.common.data",
        *(f"fedface.common.data.{m}" for m in ("faceset", "sources", "splits", "transforms")),
    ],
)
def test_data_modules_all_sorted_and_importable(module: str) -> None:
    # Arrange
    imported = importlib.import_module(module)
    # Act
    names = list(imported.__all__)
    # Assert
    assert names == sorted(names, key=_isort_key)
    assert all(hasattr(imported, name) for name in names)
