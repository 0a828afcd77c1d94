"""Differential-privacy accounting of DP-SGD sessions, as pure functions on Opacus' accountants.

A private training session is a Poisson-subsampled Gaussian mechanism run for some steps
(:class:`Mechanism`). Its privacy loss, and that of several sessions over the same data set
composed, is computed by a *fresh* Opacus accountant (``rdp`` or ``prv``) given the sessions'
history of ``(noise_multiplier, sample_rate, steps)`` entries: no privacy maths is written
here. Each call builds its own accountant, so nothing here holds state.

Conventions, each on the safe side of the guarantee:

* An entry with ``steps == 0`` spends nothing and is dropped; an entry with noise 0 and steps
  is a release of the raw gradients: epsilon is ``inf``.
* Entries with the same ``(noise_multiplier, sample_rate)`` are merged (their steps added)
  before composing, as Opacus' own accountant records repeated steps. The composition is the
  same; it keeps the PRV accountant's cost from growing with the number of federated rounds.
* :func:`calibrate_noise` returns a noise multiplier whose epsilon, recomputed by
  :func:`compute_epsilon` exactly as a ledger will, is at most the target: never above.
* Displayed epsilons are rounded *up* (:func:`epsilon_upper`), remaining budgets *down*
  (:func:`epsilon_lower`).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

logger = logging.getLogger(__name__)

Accountant = Literal["rdp", "prv"]
"""Name of an Opacus accountant: ``rdp`` (Rényi DP, Mironov et al.) or ``prv`` (numerical
composition of privacy loss random variables, Gopi et al.; tighter, slower)."""

History = Sequence[tuple[float, float, int]]
"""Opacus' history format: ``(noise_multiplier, sample_rate, steps)`` per entry."""

ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

MAX_NOISE_MULTIPLIER = 1e6
"""Calibration gives up above this noise multiplier (as Opacus' ``get_noise_multiplier``)."""

# The PRV accountant discretises each entry's privacy loss on a grid whose size grows with the
# epsilon of the history and the square root of its steps; extreme parameters would need
# gigabytes. Above these many grid points compute_epsilon refuses and points at rdp.
_PRV_EPS_ERROR = 0.01  # Opacus' default accuracy of PRVAccountant.get_epsilon
_PRV_MAX_GRID = 1 << 22  # points of one entry's grid (32 MiB of float64)
_PRV_MAX_TOTAL_GRID = 1 << 24  # points over all (merged) entries

# Opacus' RDP orders that are integers (the warm start of calibration uses only these).
_INTEGER_ORDERS = [alpha for alpha in RDPAccountant.DEFAULT_ALPHAS if float(alpha).is_integer()]

_CALIBRATION_EPS_RTOL = 1e-3  # stop when the calibrated epsilon is this close under the target
_CALIBRATION_SIGMA_RTOL = 1e-9  # ... or when the noise bracket is this narrow
_CALIBRATION_MAX_EVALS = 200


@dataclass(frozen=True)
class Mechanism:
    """One private training session's DP-SGD parameters, as charged to a privacy ledger.

    Parameters
    ----------
    noise_multiplier
        Gaussian noise standard deviation over the clipping norm (sigma). Larger is more
        private. ``0`` means no noise: epsilon is then ``inf``.
    sample_rate
        Poisson sampling rate ``q`` in ``(0, 1]``: each example joins each step's batch
        independently with this probability. Smaller is more private.
    steps
        Optimizer steps of the session (``>= 0``). Fewer is more private.
    max_grad_norm
        Per-example gradient clipping norm ``C > 0``. Does not change epsilon (the noise scales
        with it); recorded for audit.
    delta
        The delta in ``(0, 1)`` the noise was calibrated for.
    accountant
        The accountant the noise was calibrated with.
    sampling
        Batch sampling; only ``"poisson"``, which the accountants assume.
    secure_mode
        Whether sampling and noise drew from a cryptographically secure generator.

    Raises
    ------
    ValueError
        When a field is out of range.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: Accountant
    sampling: Literal["poisson"] = "poisson"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        _check_entry((self.noise_multiplier, self.sample_rate, self.steps))
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        _check_delta(self.delta)
        _check_accountant(self.accountant)
        if self.sampling != "poisson":
            raise ValueError(f"sampling must be 'poisson' (what the accountants assume), got {self.sampling!r}")
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"secure_mode must be a bool, got {self.secure_mode!r}")

    def history_entry(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)``: the session in Opacus' history format."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


def compute_epsilon(history: History, *, delta: float, accountant: Accountant) -> float:
    """Epsilon of the composition of ``history`` at ``delta``, by a fresh Opacus accountant.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` entries, e.g. every session ever run on one
        data set. Order does not matter.
    delta
        Target delta in ``(0, 1)``. A smaller delta gives a larger epsilon.
    accountant
        ``"rdp"`` or ``"prv"``. PRV's result is its upper bound (``eps_upper``).

    Returns
    -------
    float
        Epsilon (``>= 0``); ``0.0`` for an empty history or one of zero steps; ``inf`` when an
        entry with steps has no noise.

    Raises
    ------
    ValueError
        On a delta, sample rate, noise multiplier or step count out of range, an unknown
        accountant, or when the PRV accountant cannot handle the parameters (the message
        suggests ``rdp``).
    """
    _check_delta(delta)
    _check_accountant(accountant)
    entries = _merged(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    if accountant == "prv":
        return _prv_epsilon(entries, delta)
    return _run_accountant("rdp", entries, delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    prior: History = (),
) -> float:
    """The smallest noise multiplier for which ``prior`` plus this session stays within target.

    Like Opacus' ``get_noise_multiplier``, but composing the new session ``(sigma,
    sample_rate, steps)`` with the ``prior`` sessions of the same data set, so that a session
    can be calibrated to land the data set's *total* epsilon at the target. The search is a
    safeguarded secant method on log-epsilon against log-sigma, started from where a cheap
    upper bound (RDP at integer orders only) reaches the target; every epsilon it relies on is
    computed by :func:`compute_epsilon`, exactly as a ledger will compute it.

    Parameters
    ----------
    target_epsilon
        Epsilon the composition of ``prior`` and the session may reach (``> 0``; ``inf``
        means no privacy and gives ``0.0``).
    delta
        Target delta in ``(0, 1)``; use the one the ledger accounts with.
    sample_rate
        Poisson sampling rate ``q`` in ``(0, 1]`` of the session.
    steps
        Steps of the session (``>= 0``; ``0`` spends nothing and gives ``0.0``).
    accountant
        ``"rdp"`` or ``"prv"``; use the one the ledger accounts with.
    prior
        Sessions already charged to the data set, in Opacus' history format.

    Returns
    -------
    float
        A noise multiplier ``sigma`` with ``compute_epsilon([*prior, (sigma, q, steps)]) <=
        target_epsilon``, verified by recomputation; the epsilon is within about 0.1 % under
        the target (or sigma within 1e-9 relative of the smallest such sigma).

    Raises
    ------
    ValueError
        On parameters out of range, when ``prior`` alone already reaches the target (the
        message names its epsilon), or when even noise ``1e6`` is not enough.
    """
    if math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    _check_delta(delta)
    _check_accountant(accountant)
    _check_entry((1.0, sample_rate, steps))
    prior_entries = list(prior)
    prior_epsilon = compute_epsilon(prior_entries, delta=delta, accountant=accountant)
    if math.isinf(target_epsilon):
        return 0.0
    if prior_epsilon >= target_epsilon:
        raise ValueError(
            f"the prior sessions already spend epsilon {format_epsilon(prior_epsilon)} >= target "
            f"{target_epsilon:g} (delta {delta:g}, {accountant}): no noise can fit another session"
        )
    if steps == 0:
        return 0.0

    def epsilon_at(sigma: float) -> float:
        history = [*prior_entries, (sigma, sample_rate, steps)]
        try:
            return compute_epsilon(history, delta=delta, accountant=accountant)
        except ValueError:
            # Only PRV fails, and at small noise (a huge grid): count it as over target, the
            # safe side (the search moves to more noise).
            return math.inf

    def proxy_at(sigma: float) -> float:
        # RDP over Opacus' integer orders only: an upper bound of the rdp epsilon (fewer
        # orders to minimise over), ~100x cheaper; only used to find where to start.
        history = _merged([*prior_entries, (sigma, sample_rate, steps)])
        try:
            return _run_accountant("rdp", history, delta, alphas=_INTEGER_ORDERS)
        except (ArithmeticError, ValueError):
            return math.inf

    describe = f"delta {delta:g}, q {sample_rate:g}, {steps} steps, {accountant}"
    try:
        start = _search(_memoized(proxy_at), target_epsilon, 1.0, describe)
    except ValueError:
        start = 1.0
    sigma = _search(_memoized(epsilon_at), target_epsilon, start, describe)

    # Verify: recompute as a ledger will, and move up if (against expectation) over target.
    for _ in range(100):
        history = [*prior_entries, (sigma, sample_rate, steps)]
        if compute_epsilon(history, delta=delta, accountant=accountant) <= target_epsilon:
            return sigma
        sigma *= 1.001
    raise RuntimeError(f"calibrated noise {sigma:g} fails its verification against target {target_epsilon:g} ({describe})")


def epsilon_upper(eps: float, digits: int = 3) -> float:
    """``eps`` rounded *up* to ``digits`` decimals (``inf`` stays ``inf``): never below ``eps``.

    For display: a spent epsilon must never look smaller than it is.

    Raises
    ------
    ValueError
        When ``eps`` is NaN or ``digits`` is negative.
    """
    return _round_directed(eps, digits, up=True)


def epsilon_lower(eps: float, digits: int = 3) -> float:
    """``eps`` rounded *down* to ``digits`` decimals (``inf`` stays ``inf``): never above ``eps``.

    For display of a remaining budget: it must never look larger than it is.

    Raises
    ------
    ValueError
        When ``eps`` is NaN or ``digits`` is negative.
    """
    return _round_directed(eps, digits, up=False)


def format_epsilon(eps: float, digits: int = 3, *, rounding: Literal["up", "down"] = "up") -> str:
    """``"inf"``, or ``eps`` with ``digits`` decimals rounded up (spent) or down (remaining)."""
    if math.isinf(eps):
        return "inf" if eps > 0 else "-inf"
    value = epsilon_upper(eps, digits) if rounding == "up" else epsilon_lower(eps, digits)
    return f"{value:.{digits}f}"


# --- helpers -----------------------------------------------------------------------------------


def _is_real(value: object) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_delta(delta: float) -> None:
    """Raise ValueError unless 0 < delta < 1."""
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    """Raise ValueError unless the accountant is one fedface supports."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _check_entry(entry: tuple[float, float, int]) -> None:
    """Raise ValueError unless an entry is (finite sigma >= 0, q in (0, 1], integer steps >= 0)."""
    try:
        sigma, q, steps = entry
    except (TypeError, ValueError):
        raise ValueError(f"a history entry must be (noise_multiplier, sample_rate, steps), got {entry!r}") from None
    if not _is_real(sigma) or not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}")
    if not _is_real(q) or not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _merged(history: History) -> list[tuple[float, float, int]]:
    """Validated entries with steps, those of equal (sigma, q) merged, in first-seen order."""
    steps_of: dict[tuple[float, float], int] = {}
    for entry in history:
        _check_entry(entry)
        sigma, q, steps = entry
        if steps:
            key = (float(sigma), float(q))
            steps_of[key] = steps_of.get(key, 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in steps_of.items()]


def _run_accountant(name: str, entries: list[tuple[float, float, int]], delta: float, **kwargs: Any) -> float:
    """get_epsilon of a fresh Opacus accountant; its advisory warnings go to the DEBUG log."""
    acct = create_accountant(mechanism=name)
    acct.history = list(entries)
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        eps = float(acct.get_epsilon(delta=delta, **kwargs))
    for warning in caught:
        # e.g. "Optimal order is the largest alpha": the bound is valid, only not the tightest.
        logger.debug("opacus %s accountant: %s", name, warning.message)
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"the {name} accountant returned epsilon {eps!r} for {entries!r} at delta {delta:g}")
    return eps


def _prv_epsilon(entries: list[tuple[float, float, int]], delta: float) -> float:
    """PRV epsilon (upper bound), refusing parameters whose discretisation would be too large."""
    hint = "use the rdp accountant for these parameters"
    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    total_steps = sum(steps for _, _, steps in entries)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            # The grid PRVAccountant._get_domain will build: half-width L, mesh as in Opacus.
            half_width = compute_safe_domain_size(
                prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in entries],
                max_self_compositions=[steps for _, _, steps in entries],
                eps_error=_PRV_EPS_ERROR,
                delta_error=delta_error,
            )
        mesh = _PRV_EPS_ERROR / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
        points = 2 * float(half_width) / mesh
    except (ArithmeticError, ValueError, RuntimeError) as exc:
        raise ValueError(f"the prv accountant cannot size its grid for {entries!r}: {exc}; {hint}") from exc
    if not math.isfinite(points) or points > _PRV_MAX_GRID or points * len(entries) > _PRV_MAX_TOTAL_GRID:
        raise ValueError(
            f"the prv accountant would need a grid of {points:.3g} points per entry for {entries!r} "
            f"at delta {delta:g} (at most {_PRV_MAX_GRID} allowed); {hint}"
        )
    try:
        return _run_accountant("prv", entries, delta)
    except (ArithmeticError, ValueError, RuntimeError, MemoryError) as exc:
        raise ValueError(f"the prv accountant failed for {entries!r} at delta {delta:g}: {exc}; {hint}") from exc


def _memoized(fn: Callable[[float], float]) -> Callable[[float], float]:
    """``fn`` with its results cached by argument."""
    cache: dict[float, float] = {}

    def cached(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = fn(sigma)
        return cache[sigma]

    return cached


def _search(epsilon_at: Callable[[float], float], target: float, start: float, describe: str) -> float:
    """A sigma with ``epsilon_at(sigma) <= target`` and within the calibration tolerance of it.

    ``epsilon_at`` falls as sigma grows. A secant method on ``log(epsilon)`` against
    ``log(sigma)``, aimed just inside the tolerance, from ``start``; safeguarded: steps out
    at least doubling (up) or halving (down) after three tries, candidates kept inside the
    bracket once there is one, and bisection when the bracket stops halving.
    """
    tolerance = _CALIBRATION_EPS_RTOL * target
    aim = math.log(target - tolerance / 2)
    low, high = 0.0, math.inf  # epsilon(low) > target >= epsilon(high); epsilon(0) is inf
    points: list[tuple[float, float]] = []  # (log sigma, log epsilon) of finite evaluations
    ups = downs = 0  # steps taken outward without a bracket
    widths: list[float] = []
    sigma = start
    for _ in range(_CALIBRATION_MAX_EVALS):
        eps = epsilon_at(sigma)
        if eps <= target:
            high = min(high, sigma)
        else:
            low = max(low, sigma)
        if high < math.inf and (
            target - epsilon_at(high) <= tolerance or high - low <= _CALIBRATION_SIGMA_RTOL * high
        ):
            return high
        if high == math.inf and low >= MAX_NOISE_MULTIPLIER:
            break
        if sigma > 0 and 0 < eps < math.inf:
            points.append((math.log(sigma), math.log(eps)))

        # Candidate: secant through the last two points, else epsilon ~ 1/sigma from the last.
        guess = math.nan
        if len(points) >= 2 and points[-1][1] != points[-2][1]:
            (x1, y1), (x2, y2) = points[-2], points[-1]
            slope = (x2 - x1) / (y2 - y1)
            if slope < 0:
                # capped: near a prior that almost reaches the target the line is nearly flat
                guess = math.exp(min(x2 + (aim - y2) * slope, math.log(MAX_NOISE_MULTIPLIER) + 1.0))
        if math.isnan(guess):
            guess = sigma * eps / target if 0 < eps < math.inf else sigma * (2.0 if eps > target else 0.5)

        if high == math.inf:  # all over target so far: go up
            guess = max(guess, low * (1.01 if ups < 3 else 2.0))
            sigma = min(guess, low * 1e3, MAX_NOISE_MULTIPLIER)
            ups += 1
        elif low == 0.0:  # all within target so far: go down
            guess = min(guess, high * (1 - 2 * _CALIBRATION_EPS_RTOL) if downs < 3 else high / 2)
            sigma = max(guess, high / 100)
            downs += 1
        else:  # bracketed: stay inside, bisect when the bracket stops halving
            width = high - low
            widths.append(width)
            if len(widths) >= 3 and widths[-1] > widths[-3] / 2:
                sigma = low + width / 2
                widths.clear()
            else:
                sigma = min(max(guess, low + 0.02 * width), high - 0.02 * width)
        if high < math.inf and sigma < 1e-6:
            return high
    if high < math.inf:
        return high
    raise ValueError(
        f"target epsilon {target:g} is out of reach: even noise multiplier {MAX_NOISE_MULTIPLIER:g} "
        f"spends more ({describe})"
    )


def _round_directed(eps: float, digits: int, *, up: bool) -> float:
    """eps rounded up or down to digits decimals, the result checked against eps."""
    if math.isnan(eps):
        raise ValueError("epsilon is NaN")
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    if math.isinf(eps):
        return eps
    scale = 10**digits
    units = math.ceil(eps * scale) if up else math.floor(eps * scale)
    # eps * scale is itself rounded; step one unit further if that put the result on the wrong side.
    while (units / scale < eps) if up else (units / scale > eps):
        units += 1 if up else -1
    return units / scale


__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "Accountant",
    "History",
    "Mechanism",
    "calibrate_noise",
    "compute_epsilon",
    "epsilon_lower",
    "epsilon_upper",
    "format_epsilon",
]
