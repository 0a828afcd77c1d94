"""Unit tests for fedface.common.errors: the exception tree and its exit-code table."""

from __future__ import annotations

import inspect

import pytest

from fedface.common import errors
from fedface.common.errors import EXIT_CODES, CorruptImageError, FedFaceError


def _error_classes() -> list[type[FedFaceError]]:
    """Every FedFaceError subclass defined in fedface.common.errors (not the base itself)."""
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, FedFaceError) and obj is not FedFaceError and obj.__module__ == errors.__name__
    ]


def test_exit_codes_every_code_has_non_empty_one_line_help() -> None:
    # Arrange / Act
    problems = {
        code: text for code, text in EXIT_CODES.items() if not text.strip() or "\n" in text
    }

    # Assert
    assert EXIT_CODES, "the exit-code table is empty"
    assert problems == {}


def test_exit_codes_do_not_reuse_reserved_codes() -> None:
    # 0 is success, 1 an unexpected failure (a bug), 2 a usage error from the CLI parser.
    assert not {0, 1, 2} & set(EXIT_CODES)


def test_error_classes_each_have_a_distinct_code_in_the_table() -> None:
    # Arrange
    classes = _error_classes()

    # Act
    codes = [cls.exit_code for cls in classes]

    # Assert
    assert len(classes) >= 7
    assert len(set(codes)) == len(codes), dict(zip([c.__name__ for c in classes], codes, strict=True))
    assert set(codes) <= set(EXIT_CODES)


def test_exit_codes_every_code_is_used_by_an_error_class() -> None:
    # A code in the table that no exception carries is dead help text.
    used = {cls.exit_code for cls in _error_classes()}

    assert set(EXIT_CODES) == used


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_error_instance_help_is_its_codes_table_line(cls: type[FedFaceError]) -> None:
    # Arrange
    err = cls("x", "y") if cls is CorruptImageError else cls("x")

    # Act / Assert
    assert err.help == EXIT_CODES[cls.exit_code]


def test_subclass_without_exit_code_raises_type_error() -> None:
    with pytest.raises(TypeError, match="must declare an exit_code"):

        class NoCode(FedFaceError):  # noqa: F841 - the definition itself must fail
            pass


def test_subclass_of_a_concrete_error_without_own_exit_code_raises_type_error() -> None:
    # Inheriting ConfigError's code silently would let two classes share one code.
    with pytest.raises(TypeError, match="must declare an exit_code"):

        class Inherited(errors.ConfigError):  # noqa: F841
            pass


@pytest.mark.parametrize("code", [1, 99])
def test_subclass_with_code_missing_from_table_raises_type_error(code: int) -> None:
    with pytest.raises(TypeError, match=rf"exit_code={code} has no entry"):
        type("Unlisted", (FedFaceError,), {"exit_code": code})


def test_subclass_with_code_in_table_is_accepted() -> None:
    # Act
    cls = type("Listed", (FedFaceError,), {"exit_code": 3})

    # Assert
    assert cls("boom").help == EXIT_CODES[3]


def test_corrupt_image_error_message_names_path_and_reason_on_one_line() -> None:
    # Arrange
    path = "/data/orl/s1/3.pgm"
    reason = "UnidentifiedImageError: cannot identify image file"

    # Act
    err = CorruptImageError(path, reason)
    message = str(err)

    # Assert
    assert path in message
    assert reason in message
    assert "\n" not in message
    assert (err.path, err.reason) == (path, reason)
    assert err.exit_code == 5
