"""Differential privacy building blocks (in progress: see the differential-privacy issue).

:class:`PerSampleGRU` is ``nn.GRU`` with cheap, exact per-sample gradients for DP-SGD.
"""

from fedface.common.privacy.gru import PerSampleGRU

__all__ = ["PerSampleGRU"]
