"""Unit tests for fedface.common.config: typed, kebab-case TOML configuration."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from pydantic import ValidationError

from fedface.common.config import (
    AugmentSection,
    HeadConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
)
from fedface.common.errors import ConfigError


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _config_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_mapping(raw, source="test.toml")
    return str(info.value)


# --- defaults and unknown keys -----------------------------------------------------------------


def test_train_config_defaults_validate_and_are_consistent() -> None:
    # Act
    cfg = TrainConfig()

    # Assert: the defaults pass the same validation a file goes through
    assert TrainConfig.from_mapping({}) == cfg
    assert cfg.evaluation.occlusion_box <= min(cfg.data.image_size)


def test_from_toml_unknown_key_names_dotted_key_and_source_file(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path, "[model]\nhiden-size = 3\n")

    # Act
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)

    # Assert
    message = str(info.value)
    assert "model.hiden-size" in message
    assert "unknown key" in message
    assert str(path) in message
    assert "\n" not in message


def test_from_toml_several_problems_all_reported_in_one_message(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path, "[model]\nhidden-size = 0\nbogus = 1\n[training]\nepochs = 0\nlr = -1.0\n")

    # Act
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)

    # Assert
    message = str(info.value)
    for key in ("model.hidden-size", "model.bogus", "training.epochs", "training.lr"):
        assert key in message
    assert "\n" not in message


def test_from_mapping_snake_case_keys_are_accepted_like_kebab_case() -> None:
    # populate_by_name: Python callers may use field names
    cfg = TrainConfig.from_mapping({"model": {"hidden_size": 16}})

    assert cfg.model.hidden_size == 16


def test_train_config_is_frozen() -> None:
    cfg = TrainConfig()

    with pytest.raises(ValidationError, match="frozen"):
        cfg.training.epochs = 3  # type: ignore[misc]


# --- bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"lr": -0.001}}, "training.lr"),
        ({"training": {"lr": 0.0}}, "training.lr"),
        ({"training": {"batch-size": 0}}, "training.batch-size"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"head": {"scale": 0.0}}, "head.scale"),
        ({"augment": {"flip-p": 1.5}}, "augment.flip-p"),
        ({"evaluation": {"n-folds": 1}}, "evaluation.n-folds"),
        ({"model": {"pooling": "median"}}, "model.pooling"),
        ({"data": {"image-size": [4, 4]}}, "image-size"),
    ],
)
def test_from_mapping_out_of_bounds_value_rejected_naming_key(raw: dict[str, Any], key: str) -> None:
    message = _config_error(raw)

    assert key in message
    assert "(test.toml)" in message


# --- cross-field rules -------------------------------------------------------------------------


def test_patches_pass_patch_size_not_dividing_image_size_rejected() -> None:
    message = _config_error(
        {"data": {"image-size": [30, 30]}, "model": {"passes": ["patches"], "patch-size": 8, "downsample": 1}}
    )

    assert "model.patch-size 8 must divide the image size read by the encoder, 30x30" in message


def test_patch_size_not_dividing_image_size_without_patches_pass_accepted() -> None:
    # Only the patches pass reads patches: rows/columns do not care about patch-size.
    cfg = TrainConfig.from_mapping({"data": {"image-size": [30, 30]}, "model": {"passes": ["rows"], "patch-size": 8}})

    assert cfg.model.patch_size == 8


def test_occlusion_box_larger_than_image_rejected() -> None:
    message = _config_error({"data": {"image-size": [16, 32]}, "evaluation": {"occlusion-box": 20}})

    assert "evaluation.occlusion-box 20 exceeds data.image-size 16x32" in message


def test_occlusion_box_equal_to_image_side_accepted() -> None:
    cfg = TrainConfig.from_mapping({"data": {"image-size": [16, 32]}, "evaluation": {"occlusion-box": 16}})

    assert cfg.evaluation.occlusion_box == 16


def test_scale_range_low_above_high_rejected() -> None:
    message = _config_error({"augment": {"scale-range": [1.2, 1.0]}})

    assert "augment.scale-range" in message


def test_scale_range_non_positive_low_rejected() -> None:
    message = _config_error({"augment": {"scale-range": [0.0, 1.0]}})

    assert "augment.scale-range" in message


def test_occlusion_min_above_max_rejected() -> None:
    message = _config_error({"augment": {"occlusion-min": 0.5, "occlusion-max": 0.3}})

    assert "augment.occlusion-min (0.5) must not exceed augment.occlusion-max (0.3)" in message


def test_repeated_pass_rejected() -> None:
    message = _config_error({"model": {"passes": ["rows", "columns", "rows"]}})

    assert "repeated" in message
    assert "model" in message


def test_empty_passes_rejected() -> None:
    message = _config_error({"model": {"passes": []}})

    assert "model.passes" in message


# --- TOML round trip and file errors -----------------------------------------------------------


def test_toml_round_trip_gives_equal_config(tmp_path: Path) -> None:
    # Arrange: a config that differs from the defaults in every section
    cfg = TrainConfig.from_mapping(
        {
            "data": {"root": str(tmp_path / "faces"), "layout": "orl", "image-size": [32, 48], "on-error": "skip"},
            "split": {"kind": "open-set", "test-identities": 4, "seed": 7},
            "model": {"passes": ["patches", "rows"], "hidden-size": 8, "patch-size": 8, "pooling": "last"},
            "head": {"kind": "combined", "m1": 1.1, "m2": 0.2, "m3": 0.1, "scale": 16.0},
            "augment": {"scale-range": [0.8, 1.25], "occlusion-min": 0.1, "occlusion-max": 0.2},
            "training": {"epochs": 2, "lr": 1e-3, "device": "cpu", "task": "expression"},
            "evaluation": {"flip-tta": False, "occlusion-box": 12, "occlusion-placements": 3},
        }
    )
    path = tmp_path / "resolved.toml"

    # Act
    path.write_text(tomli_w.dumps(cfg.to_toml_dict()), encoding="utf-8")
    loaded = TrainConfig.from_toml(path)

    # Assert
    assert loaded == cfg
    assert loaded.data.root == tmp_path / "faces"
    assert loaded.data.image_size == (32, 48)


def test_to_toml_dict_uses_kebab_case_keys() -> None:
    raw = TrainConfig().to_toml_dict()

    assert "hidden-size" in raw["model"]
    assert "hidden_size" not in raw["model"]


def test_from_toml_missing_file_one_line_error_naming_path(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "nope.toml"

    # Act
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)

    # Assert
    message = str(info.value)
    assert str(path) in message
    assert "not found" in message
    assert "\n" not in message


def test_from_toml_directory_one_line_error_naming_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(tmp_path)

    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_from_toml_invalid_toml_one_line_error_naming_path(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path, "[model\nhidden-size = = 3\n")

    # Act
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)

    # Assert
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 1" in message
    assert "\n" not in message


def test_from_toml_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "")

    assert TrainConfig.from_toml(path) == TrainConfig()


# --- overrides ---------------------------------------------------------------------------------


def test_with_overrides_applies_dotted_kebab_keys() -> None:
    # Act
    cfg = TrainConfig().with_overrides({"training.epochs": 5, "model.hidden-size": 8, "data.image-size": [32, 32]})

    # Assert
    assert cfg.training.epochs == 5
    assert cfg.model.hidden_size == 8
    assert cfg.data.image_size == (32, 32)


def test_with_overrides_keeps_other_values_and_original() -> None:
    # Arrange
    base = TrainConfig().with_overrides({"training.lr": 0.01})

    # Act
    cfg = base.with_overrides({"training.epochs": 3})

    # Assert
    assert cfg.training.lr == 0.01
    assert base.training.epochs == TrainingConfig().epochs


def test_with_overrides_ignores_none_values() -> None:
    base = TrainConfig().with_overrides({"training.epochs": 7})

    cfg = base.with_overrides({"training.epochs": None, "model.hidden-size": None})

    assert cfg == base


def test_with_overrides_bad_value_fails_revalidation() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig().with_overrides({"training.epochs": 0})

    assert "training.epochs" in str(info.value)
    assert "command-line flags" in str(info.value)


def test_with_overrides_breaking_cross_field_rule_fails() -> None:
    # image-size alone is fine, but the default occlusion box (20) no longer fits
    with pytest.raises(ConfigError, match="occlusion-box"):
        TrainConfig().with_overrides({"data.image-size": [16, 16]})


def test_with_overrides_unknown_key_fails() -> None:
    with pytest.raises(ConfigError, match="training.epoch"):
        TrainConfig().with_overrides({"training.epoch": 3})


# --- head margins ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (HeadConfig(kind="cosface", margin=0.3), (1.0, 0.0, 0.3)),
        (HeadConfig(kind="arcface", margin=0.5), (1.0, 0.5, 0.0)),
        (HeadConfig(kind="combined", margin=0.9, m1=1.2, m2=0.3, m3=0.1), (1.2, 0.3, 0.1)),
    ],
    ids=["cosface", "arcface", "combined"],
)
def test_head_config_margins_by_kind(head: HeadConfig, expected: tuple[float, float, float]) -> None:
    assert head.margins() == pytest.approx(expected)


# --- sections in isolation ---------------------------------------------------------------------


def test_model_config_rejects_unknown_pass() -> None:
    with pytest.raises(ValueError, match="passes"):
        ModelConfig(passes=("rows", "diagonals"))  # type: ignore[arg-type]


def test_augment_section_equal_scale_bounds_accepted() -> None:
    assert AugmentSection(scale_range=(1.0, 1.0)).scale_range == (1.0, 1.0)


# --- packaged scenario -------------------------------------------------------------------------


def test_packaged_baseline_scenario_loads() -> None:
    # Arrange
    resource = importlib.resources.files("fedface.simulations") / "scenarios" / "baseline.toml"

    # Act
    with importlib.resources.as_file(resource) as path:
        cfg = TrainConfig.from_toml(path)

    # Assert: the scenario's own values were read, not just the defaults
    assert cfg.model.passes == ("rows", "columns")
    assert cfg.head.kind == "cosface"
    assert cfg.data.image_size == (64, 64)


def _packaged(name: str) -> TrainConfig:
    resource = importlib.resources.files("fedface.simulations") / "scenarios" / name
    with importlib.resources.as_file(resource) as path:
        return TrainConfig.from_toml(path)


def test_every_packaged_scenario_loads() -> None:
    names = sorted(p.name for p in importlib.resources.files("fedface.simulations").joinpath("scenarios").iterdir() if p.name.endswith(".toml"))
    assert "lfw48_public.toml" in names
    for name in names:
        assert isinstance(_packaged(name), TrainConfig), name


def test_the_public_starts_of_private_fer2013_chain_into_its_model() -> None:
    # LFW at 48x48 -> CK+ -> FER2013 (--init-from each time) needs one encoder shape throughout
    lfw48, ckplus, fer = (_packaged(n) for n in ("lfw48_public.toml", "ckplus_public.toml", "fer2013_federated.toml"))
    assert lfw48.model == ckplus.model == fer.model
    assert lfw48.data.image_size == ckplus.data.image_size == fer.data.image_size == (48, 48)
    assert lfw48.training.task == "identity" and ckplus.training.task == fer.training.task == "expression"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"model": {"stem": [8], "passes": ["patches"]}}, "cannot include patches"),
        ({"model": {"stem": [8, 8, 8, 8, 8, 8]}}, "at most 5 stages"),
        ({"data": {"image-size": [36, 36]}, "evaluation": {"occlusion-box": 10}, "model": {"stem": [8, 8, 8], "downsample": 1}}, "must be divisible by 8"),
        ({"split": {"folds": 1}}, "at least 2"),
        ({"split": {"folds": 5, "fold": 5}}, "below split.folds"),
        ({"training": {"precision": "fp16"}}, "training.precision"),
    ],
    ids=["stem-patches", "stem-deep", "stem-divisible", "one-fold", "fold-out-of-range", "precision"],
)
def test_expression_recipe_settings_are_validated(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_mapping(raw)


def test_packaged_fer2013_recipe_is_valid_and_private_ready() -> None:
    from fedface.simulations.bench.common import scenario_config

    cfg = scenario_config("fer2013_expression.toml")

    assert cfg.training.task == "expression"
    assert cfg.model.stem and cfg.split.folds == 10
    assert cfg.data.image_size == (48, 48)
