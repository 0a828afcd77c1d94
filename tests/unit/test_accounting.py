"""Unit tests for fedface.common.privacy.accounting: epsilon by Opacus' accountants, noise
calibration that never overshoots, and display rounding that never flatters."""

from __future__ import annotations

import math
import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedface.common.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    Mechanism,
    calibrate_noise,
    compute_epsilon,
    epsilon_lower,
    epsilon_upper,
    format_epsilon,
)

DELTA = 1e-5
# Distinct (sigma, q) per entry, so the history reaches Opacus exactly as given.
HETEROGENEOUS = [(1.0, 0.01, 1000), (2.0, 0.05, 300), (0.8, 0.1, 50)]


def _opacus_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon by a fresh Opacus accountant, computed independently of fedface."""
    acct = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acct.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' advisory "optimal order" warnings
        return float(acct.get_epsilon(delta=delta))


def _mechanism(**overrides: object) -> Mechanism:
    fields: dict[str, object] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 1000,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "accountant": "rdp",
    }
    fields.update(overrides)
    return Mechanism(**fields)  # type: ignore[arg-type]


# --- compute_epsilon ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accountant", "golden"),
    [("rdp", 2.1013652716430564), ("prv", 1.838371637017295)],
)
def test_compute_epsilon_one_session_matches_pinned_golden_value(accountant: str, golden: float) -> None:
    # Golden values of Opacus 1.5 for sigma 1.0, q 0.01, 1000 steps, delta 1e-5: a change in
    # the accountants (or in how fedface calls them) shows up here.
    # Act
    eps = compute_epsilon([(1.0, 0.01, 1000)], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    # Assert
    assert eps == pytest.approx(golden, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_compute_epsilon_heterogeneous_history_equals_fresh_opacus_accountant(accountant: str) -> None:
    # Arrange
    expected = _opacus_epsilon(accountant, HETEROGENEOUS)

    # Act
    eps = compute_epsilon(HETEROGENEOUS, delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    # Assert
    assert eps == pytest.approx(expected, rel=1e-9, abs=0)
    assert eps > compute_epsilon(HETEROGENEOUS[:2], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]


def test_compute_epsilon_rdp_repeated_entries_equal_opacus_on_the_unmerged_history() -> None:
    # Equal (sigma, q) entries are merged before composing; for RDP that is the same sum.
    # Arrange
    history = [(1.0, 0.02, 200), (1.5, 0.05, 100), (1.0, 0.02, 300), (1.0, 0.02, 50)]

    # Act
    eps = compute_epsilon(history, delta=DELTA, accountant="rdp")

    # Assert
    assert eps == pytest.approx(_opacus_epsilon("rdp", history), rel=1e-9, abs=0)


def test_compute_epsilon_prv_repeated_entries_match_opacus_on_the_unmerged_history() -> None:
    # Arrange
    history = [(1.0, 0.05, 100)] * 3

    # Act
    eps = compute_epsilon(history, delta=DELTA, accountant="prv")

    # Assert: merged (one entry of 300 steps) and unmerged numerical compositions agree
    assert eps == pytest.approx(_opacus_epsilon("prv", history), rel=1e-6)
    assert eps == _opacus_epsilon("prv", [(1.0, 0.05, 300)])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_compute_epsilon_zero_step_entries_are_ignored(accountant: str) -> None:
    # Act
    with_zero = compute_epsilon([(0.5, 0.3, 0), (1.0, 0.01, 1000)], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    # Assert
    assert with_zero == compute_epsilon([(1.0, 0.01, 1000)], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]


@pytest.mark.parametrize("history", [[], [(1.0, 0.1, 0)], [(0.0, 0.5, 0)]])
def test_compute_epsilon_history_without_steps_is_zero(history: list[tuple[float, float, int]]) -> None:
    assert compute_epsilon(history, delta=DELTA, accountant="rdp") == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_compute_epsilon_noiseless_session_is_infinite(accountant: str) -> None:
    # Act
    eps = compute_epsilon([(1.0, 0.01, 100), (0.0, 0.01, 1)], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    # Assert
    assert eps == math.inf


@pytest.mark.parametrize(
    ("history", "delta", "accountant", "match"),
    [
        ([(1.0, 0.1, 10)], 0.0, "rdp", "delta must be in"),
        ([(1.0, 0.1, 10)], 1.0, "rdp", "delta must be in"),
        ([(1.0, 0.1, 10)], -1e-5, "rdp", "delta must be in"),
        ([(1.0, 0.0, 10)], DELTA, "rdp", "sample_rate must be in"),
        ([(1.0, 1.5, 10)], DELTA, "rdp", "sample_rate must be in"),
        ([(1.0, 0.1, -1)], DELTA, "rdp", "steps must be an integer"),
        ([(1.0, 0.1, 2.5)], DELTA, "rdp", "steps must be an integer"),
        ([(-1.0, 0.1, 10)], DELTA, "rdp", "noise_multiplier must be"),
        ([(math.nan, 0.1, 10)], DELTA, "rdp", "noise_multiplier must be"),
        ([(1.0, 0.1)], DELTA, "rdp", "history entry must be"),
        ([(1.0, 0.1, 10)], DELTA, "gdp", "accountant must be one of rdp, prv"),
    ],
)
def test_compute_epsilon_bad_input_raises_value_error(
    history: list[tuple[float, float, int]], delta: float, accountant: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        compute_epsilon(history, delta=delta, accountant=accountant)  # type: ignore[arg-type]


def test_compute_epsilon_prv_extreme_parameters_raise_value_error_suggesting_rdp() -> None:
    # Low noise at a high sample rate would need a PRV grid of ~1e8 points (gigabytes).
    with pytest.raises(ValueError, match="use the rdp accountant"):
        compute_epsilon([(0.3, 0.5, 2000)], delta=DELTA, accountant="prv")


# --- calibrate_noise ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accountant", "sample_rate", "steps"),
    [("rdp", 0.01, 1000), ("prv", 0.05, 100)],
)
def test_calibrate_noise_one_session_lands_tightly_under_target(accountant: str, sample_rate: float, steps: int) -> None:
    # Arrange
    target = 4.0

    # Act
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=sample_rate, steps=steps, accountant=accountant  # type: ignore[arg-type]
    )

    # Assert: at most the target, and 1 % less noise would spend clearly more
    eps = _opacus_epsilon(accountant, [(sigma, sample_rate, steps)])
    eps_less_noise = _opacus_epsilon(accountant, [(0.99 * sigma, sample_rate, steps)])
    assert eps <= target
    assert eps_less_noise > target * (1 - 0.02)
    assert eps >= target * (1 - 2e-3)


def test_calibrate_noise_with_prior_lands_the_total_at_or_under_target() -> None:
    # Arrange: two earlier sessions on the same data set already spend part of the budget
    prior = [(1.0, 0.02, 300), (1.5, 0.05, 200)]
    target = 6.0
    prior_eps = compute_epsilon(prior, delta=DELTA, accountant="rdp")

    # Act
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=0.02, steps=500, accountant="rdp", prior=prior
    )

    # Assert
    total = _opacus_epsilon("rdp", [*prior, (sigma, 0.02, 500)])
    alone = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.02, steps=500, accountant="rdp")
    assert 0 < prior_eps < target
    assert target * (1 - 2e-3) <= total <= target
    assert sigma > alone  # the prior spend leaves less room: more noise is needed


def test_calibrate_noise_prior_just_under_target_leaves_a_session_at_high_noise() -> None:
    # Arrange: the prior spends 99 % of the target, so epsilon barely moves with the new noise
    prior = [(0.8, 0.1, 300)]
    target = compute_epsilon(prior, delta=DELTA, accountant="rdp") / 0.99

    # Act
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.05, steps=100, accountant="rdp", prior=prior)

    # Assert
    total = _opacus_epsilon("rdp", [*prior, (sigma, 0.05, 100)])
    assert target * (1 - 2e-3) <= total <= target
    assert sigma > calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.05, steps=100, accountant="rdp")


def test_calibrate_noise_prior_already_at_target_raises_naming_its_epsilon() -> None:
    # Arrange
    prior = [(0.8, 0.1, 500)]
    prior_eps = compute_epsilon(prior, delta=DELTA, accountant="rdp")

    # Act / Assert
    with pytest.raises(ValueError, match=rf"already spend epsilon {format_epsilon(prior_eps)}"):
        calibrate_noise(
            target_epsilon=prior_eps, delta=DELTA, sample_rate=0.01, steps=10, accountant="rdp", prior=prior
        )


def test_calibrate_noise_infinite_target_or_no_steps_needs_no_noise() -> None:
    # Act
    for_inf = calibrate_noise(target_epsilon=math.inf, delta=DELTA, sample_rate=0.1, steps=100, accountant="rdp")
    for_no_steps = calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=0, accountant="rdp")

    # Assert
    assert (for_inf, for_no_steps) == (0.0, 0.0)


def test_calibrate_noise_unreachable_target_raises() -> None:
    with pytest.raises(ValueError, match=re.escape(f"even noise multiplier {MAX_NOISE_MULTIPLIER:g}")):
        calibrate_noise(target_epsilon=1e-6, delta=DELTA, sample_rate=1.0, steps=1000, accountant="rdp")


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan])
def test_calibrate_noise_non_positive_target_raises(target: float) -> None:
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.1, steps=10, accountant="rdp")


@settings(max_examples=25, deadline=None)
@given(
    target=st.floats(0.5, 16.0),
    delta=st.floats(1e-7, 1e-3),
    sample_rate=st.floats(0.01, 1.0),
    steps=st.integers(1, 2000),
)
def test_calibrate_noise_never_overshoots_the_target(target: float, delta: float, sample_rate: float, steps: int) -> None:
    # Act
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp")

    # Assert: never over the target, and not needlessly under it
    eps = compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant="rdp")
    assert target * (1 - 2e-3) <= eps <= target


# --- display rounding --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(0.0, 1e6, allow_nan=False), digits=st.integers(0, 6))
def test_epsilon_upper_never_below_and_epsilon_lower_never_above_the_input(eps: float, digits: int) -> None:
    # Act
    up, down = epsilon_upper(eps, digits), epsilon_lower(eps, digits)

    # Assert
    assert down <= eps <= up
    assert up - down <= 10.0**-digits + 4 * math.ulp(eps)
    assert float(format_epsilon(eps, digits)) >= eps
    assert float(format_epsilon(eps, digits, rounding="down")) <= eps


@pytest.mark.parametrize(
    ("eps", "up", "down"),
    [(2.0001, "2.001", "2.000"), (2.1013652716430564, "2.102", "2.101"), (0.285, "0.285", "0.285"), (0.0, "0.000", "0.000")],
)
def test_format_epsilon_rounds_spent_up_and_remaining_down(eps: float, up: str, down: str) -> None:
    assert (format_epsilon(eps), format_epsilon(eps, rounding="down")) == (up, down)


def test_epsilon_rounding_keeps_infinity() -> None:
    assert (epsilon_upper(math.inf), epsilon_lower(math.inf), format_epsilon(math.inf)) == (math.inf, math.inf, "inf")


def test_epsilon_upper_nan_raises() -> None:
    with pytest.raises(ValueError, match="NaN"):
        epsilon_upper(math.nan)


# --- Mechanism ---------------------------------------------------------------------------------


def test_mechanism_history_entry_is_opacus_history_format() -> None:
    # Arrange
    mech = _mechanism(noise_multiplier=1.3, sample_rate=0.02, steps=250)

    # Act / Assert
    assert mech.history_entry() == (1.3, 0.02, 250)
    assert (mech.sampling, mech.secure_mode) == ("poisson", False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": -3}, "steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"sampling": "shuffle"}, "sampling must be 'poisson'"),
    ],
)
def test_mechanism_out_of_range_field_raises_value_error(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _mechanism(**overrides)
