"""What crosses the network between the server and a site: the keys of round configs, the keys
of a site's reply metrics, and the statuses a site answers with. Defined once, here, so that
``fedface.server`` and ``fedface.client`` (which never import each other) agree.

A site's reply carries its encoder weights (through SecAgg+ when enabled: the server sees only
their masked sum) and, in the clear, the metrics below: its status, how many examples it
trained on, and its privacy spend as its ledger computed it. The class centres (the margin
head) and the images never leave the site.
"""

from __future__ import annotations

from typing import Final, Literal

# --- round config: server -> site ---------------------------------------------------------------
CFG_RUN_ID: Final = "fedface.run-id"
CFG_ROUND: Final = "fedface.round"
CFG_ROUNDS: Final = "fedface.rounds"  # planned rounds of the run: the site calibrates its noise for all of them
CFG_LOCAL_EPOCHS: Final = "fedface.local-epochs"
CFG_LR: Final = "fedface.lr"
CFG_PROXIMAL_MU: Final = "fedface.proximal-mu"

# --- reply metrics: site -> server --------------------------------------------------------------
M_SITE: Final = "site"
M_STATUS: Final = "status"
M_REASON: Final = "reason"
M_EXAMPLES: Final = "examples"
M_TRAIN_S: Final = "train_s"
M_LOSS: Final = "loss"
M_EPSILON: Final = "epsilon"  # the site's data set's total spend after this round (ledger)
M_DELTA: Final = "delta"
M_ACCOUNTANT: Final = "accountant"
M_BUDGET: Final = "budget_epsilon"
M_REMAINING: Final = "remaining"
M_NOISE: Final = "noise_multiplier"
M_SAMPLE_RATE: Final = "sample_rate"
M_STEPS: Final = "steps"

# --- statuses ------------------------------------------------------------------------------------
Status = Literal["answered", "refused", "failed"]
ANSWERED: Final = "answered"
REFUSED: Final = "refused"
FAILED: Final = "failed"
REASON_BUDGET: Final = "budget exhausted"

__all__ = [
    "ANSWERED",
    "CFG_LOCAL_EPOCHS",
    "CFG_LR",
    "CFG_PROXIMAL_MU",
    "CFG_ROUND",
    "CFG_ROUNDS",
    "CFG_RUN_ID",
    "FAILED",
    "M_ACCOUNTANT",
    "M_BUDGET",
    "M_DELTA",
    "M_EPSILON",
    "M_EXAMPLES",
    "M_LOSS",
    "M_NOISE",
    "M_REASON",
    "M_REMAINING",
    "M_SAMPLE_RATE",
    "M_SITE",
    "M_STATUS",
    "M_STEPS",
    "M_TRAIN_S",
    "REASON_BUDGET",
    "REFUSED",
    "Status",
]
