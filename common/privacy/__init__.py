"""Differential privacy at a site: per-sample gradients, DP-SGD, accounting and the ledger (docs/privacy.md).

:class:`PerSampleGRU` is ``nn.GRU`` with cheap, exact per-sample gradients for DP-SGD.
:mod:`~fedface.common.privacy.accounting` computes and calibrates epsilon with Opacus'
accountants; :class:`PrivacyLedger` is a site's append-only record of the sessions charged to
each data set and their budgets.
"""

from fedface.common.privacy.accounting import (
    Accountant,
    History,
    Mechanism,
    calibrate_noise,
    compute_epsilon,
    epsilon_lower,
    epsilon_upper,
    format_epsilon,
)
from fedface.common.privacy.gru import PerSampleGRU
from fedface.common.privacy.ledger import Budget, PrivacyLedger, Session, Spend, default_ledger_path

__all__ = [
    "Accountant",
    "Budget",
    "History",
    "Mechanism",
    "PerSampleGRU",
    "PrivacyLedger",
    "Session",
    "Spend",
    "calibrate_noise",
    "compute_epsilon",
    "default_ledger_path",
    "epsilon_lower",
    "epsilon_upper",
    "format_epsilon",
]
