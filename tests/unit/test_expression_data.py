"""The expression data sets (FER2013, CK+, JAFFE) on the real files: layouts, the shared
vocabulary, subjects, crops and subject-disjoint folds."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from fedface.common.config import TrainConfig
from fedface.common.data import detect_layout, load_faces, split_open_set_folds
from fedface.common.data.expressions import EXPRESSION_CLASSES, canonical_expression
from fedface.common.data.sources import load_image
from fedface.common.errors import ConfigError, DataNotFoundError
from fedface.simulations.centralized import expression_labels, prepare_task_data

SIZE = (48, 48)


@pytest.fixture(scope="module")
def ckplus(ckplus_root: Path):  # type: ignore[no-untyped-def]
    return load_faces(ckplus_root, size=SIZE)


@pytest.fixture(scope="module")
def jaffe(jaffe_root: Path):  # type: ignore[no-untyped-def]
    return load_faces(jaffe_root, size=SIZE)


def _fer_sample(tmp_path: Path, fer_root: Path, per_class: int = 6, part: str = "train") -> Path:
    """A small FER2013-shaped tree of links to real FER2013 images (never copies in the repo)."""
    root = tmp_path / "fer"
    for emotion in sorted(os.listdir(fer_root / "train")):
        (root / part / emotion).mkdir(parents=True)
        for name in sorted(os.listdir(fer_root / "train" / emotion))[:per_class]:
            (root / part / emotion / name).symlink_to(fer_root / "train" / emotion / name)
    return root


def test_layouts_are_detected_for_each_expression_set(ckplus_root: Path, jaffe_root: Path, fer_root: Path) -> None:
    assert detect_layout(ckplus_root) == "expression-folder"
    assert detect_layout(fer_root / "train") == "expression-folder"
    assert detect_layout(fer_root) == "fer2013"
    assert detect_layout(jaffe_root) == "jaffe"


def test_ckplus_subjects_come_from_file_names_and_contempt_is_left_out(ckplus, ckplus_root: Path) -> None:  # type: ignore[no-untyped-def]
    on_disk = sum(len(os.listdir(ckplus_root / d)) for d in os.listdir(ckplus_root))
    contempt = len(os.listdir(ckplus_root / "contempt"))

    assert len(ckplus) == on_disk - contempt
    assert all(n.startswith("S") and len(n) == 4 for n in ckplus.identity_names)
    # every image's subject is the S### prefix of its file name
    for i in range(0, len(ckplus), 97):
        assert Path(ckplus.sources[i]).name.startswith(ckplus.identity_names[int(ckplus.labels[i])] + "_")
    assert set(ckplus.attributes["expression"]) <= set(EXPRESSION_CLASSES)
    assert "contempt" not in ckplus.attributes["expression"]
    assert ckplus.image_size == SIZE


def test_ckplus_contempt_is_logged_with_its_count(ckplus_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedface.common.data.expressions"):
        load_faces(ckplus_root, size=(16, 16))
    assert any("left out 54 'contempt' images" in r.getMessage() for r in caplog.records)


def test_jaffe_codes_map_to_the_shared_vocabulary(jaffe) -> None:  # type: ignore[no-untyped-def]
    assert jaffe.identity_names == ("KA", "KL", "KM", "KR", "MK", "NA", "NM", "TM", "UY", "YM")
    assert len(jaffe) == 213
    assert set(jaffe.attributes["expression"]) == set(EXPRESSION_CLASSES)
    first = jaffe.sources.index(next(s for s in jaffe.sources if s.endswith("KA.AN1.39.tiff")))
    assert jaffe.attributes["expression"][first] == "angry"


def test_jaffe_is_cropped_to_the_face_by_default(jaffe_root: Path) -> None:
    path = jaffe_root / "KA.AN1.39.tiff"
    whole = load_image(path, size=SIZE, crop=(0.0, 0.0, 1.0, 1.0))
    faces = load_faces(jaffe_root, size=SIZE)
    cropped = faces.images[faces.sources.index(str(path))]

    assert not np.allclose(whole, cropped)
    # the default crop equals the layout's documented box
    assert np.array_equal(cropped, load_image(path, size=SIZE, crop=(0.28, 0.23, 0.88, 0.77)))


def test_fer2013_release_layout_reads_its_train_folder_only(tmp_path: Path, fer_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _fer_sample(tmp_path, fer_root, per_class=3)
    for emotion in os.listdir(root / "train"):
        (root / "test" / emotion).mkdir(parents=True)
        first = sorted(os.listdir(root / "train" / emotion))[0]
        (root / "test" / emotion / first).symlink_to(root / "train" / emotion / first)

    with caplog.at_level(logging.INFO, logger="fedface.common.data.expressions"):
        faces = load_faces(root, size=SIZE)
    test_only = load_faces(root / "test", size=SIZE)

    # the official test part never enters the training folds; it is read on its own
    assert faces.layout == "fer2013"
    assert len(faces) == 7 * 3
    assert set(faces.attributes["part"]) == {"train"}
    assert any("test/ left out" in r.getMessage() for r in caplog.records)
    assert len(test_only) == 7


def test_pixel_identical_copies_share_one_subject(tmp_path: Path, fer_root: Path) -> None:
    root = _fer_sample(tmp_path, fer_root, per_class=3)
    first = sorted(os.listdir(root / "train" / "happy"))[0]
    (root / "train" / "happy" / "copy.jpg").symlink_to(root / "train" / "happy" / first)

    faces = load_faces(root / "train", size=SIZE)

    # FER2013 does not say who is who: every image is its own subject, except that a
    # pixel-identical copy shares its subject
    assert faces.num_identities == len(faces) - 1
    for g in np.unique(faces.groups):
        assert len(set(faces.labels[faces.groups == g].tolist())) == 1


def test_fer2013_copies_never_straddle_the_validation_fold(fer_root: Path) -> None:
    # FER2013 train holds 1,035 groups of pixel-identical images (measured)
    faces = load_faces(fer_root / "train", size=(8, 8))
    split = split_open_set_folds(faces, folds=10, seed=0)[0]

    assert faces.num_identities < len(faces)
    assert not set(faces.groups[split.train].tolist()) & set(faces.groups[split.test].tolist())


def test_expression_labels_use_the_vocabulary_indices(ckplus) -> None:  # type: ignore[no-untyped-def]
    faces, labels = expression_labels(ckplus)

    assert [EXPRESSION_CLASSES[k] for k in labels] == list(faces.attributes["expression"])
    assert EXPRESSION_CLASSES.index("neutral") not in set(labels.tolist())  # CK+ peak frames


def test_expression_labels_of_a_narrower_vocabulary_drop_the_rest(jaffe) -> None:  # type: ignore[no-untyped-def]
    faces, labels = expression_labels(jaffe, ("happy", "sad"))

    assert set(faces.attributes["expression"]) == {"happy", "sad"}
    assert set(labels.tolist()) == {0, 1}


def test_identity_data_is_refused_for_the_expression_task(orl_root: Path) -> None:
    with pytest.raises(ConfigError, match="labelled with expressions"):
        expression_labels(load_faces(orl_root, size=(16, 16)))


def test_subject_folds_never_share_a_subject(ckplus) -> None:  # type: ignore[no-untyped-def]
    folds = split_open_set_folds(ckplus, folds=10, seed=0)

    tested = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tested), np.arange(len(ckplus)))  # every image tested once
    for f in folds:
        assert not set(ckplus.labels[f.train]) & set(ckplus.labels[f.test])


def test_jaffe_ten_folds_are_leave_one_subject_out(jaffe, jaffe_root: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig.from_mapping(
        {"data": {"root": str(jaffe_root), "image-size": [48, 48]}, "split": {"kind": "open-set", "folds": 10, "fold": 3}, "training": {"task": "expression"}}
    )
    data = prepare_task_data(cfg, jaffe)

    assert len(set(data.test.labels.tolist())) == 1
    assert data.class_names == EXPRESSION_CLASSES


def test_fer_validation_part_is_fixed_by_the_split_seed_not_the_training_seed(tmp_path: Path, fer_root: Path) -> None:
    root = _fer_sample(tmp_path, fer_root, per_class=10)
    faces = load_faces(root / "train", size=SIZE)
    base = {"data": {"root": str(root / "train"), "image-size": [48, 48]}, "split": {"kind": "open-set", "folds": 10}}
    a = prepare_task_data(TrainConfig.from_mapping({**base, "training": {"task": "expression", "seed": 1}}), faces)
    b = prepare_task_data(TrainConfig.from_mapping({**base, "training": {"task": "expression", "seed": 2}}), faces)

    assert np.array_equal(a.split.test, b.split.test)
    assert len(a.test) == 7  # a tenth of 70


@pytest.mark.parametrize("name", ["anger", "Angry", "sadness", "surprised", "happiness"])
def test_folder_synonyms_map_to_the_vocabulary(name: str) -> None:
    assert canonical_expression(name) in EXPRESSION_CLASSES


def test_bad_crop_is_a_config_error(jaffe_root: Path) -> None:
    with pytest.raises(ConfigError, match="crop must be"):
        load_image(jaffe_root / "KA.AN1.39.tiff", crop=(0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ConfigError, match="data.crop"):
        TrainConfig.from_mapping({"data": {"crop": [0.2, 0.2, 0.1, 0.9]}})


def test_empty_expression_folder_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "happy").mkdir()
    with pytest.raises(DataNotFoundError):
        load_faces(tmp_path, layout="expression-folder")
