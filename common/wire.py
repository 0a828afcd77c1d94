"""What crosses the network between the server and a site: the keys of round configs, the keys
of a site's reply metrics, and the statuses a site answers with. Defined once, here, so that
``fedface.server`` and ``fedface.client`` (which never import each other) agree.

A site's reply carries its encoder weights, or through SecAgg+ (when enabled) its update, its
weights less the round's (:func:`update_of`; the server sees only the masked sum and adds the
average to the weights it sent, :func:`apply_update`), and, in the clear, only the metrics in :data:`CLEAR_REPLY_KEYS`: its name
and status (and a refusal's reason), how many examples it trained on, its local training
time, its privacy spend as its ledger computed it, the DP-SGD parameters of the round and the
signed ledger receipt. Each is justified in docs/threat-model.md ("What a reply carries in the
clear"); none is computed from the images except through the DP mechanism's parameters and
the count of examples; the policy is the site's own configuration. The training loss is *not* sent: it is computed from the private
images without noise. The class centres (the margin head) and the images never leave the
site. ``tests/integration/test_wire_audit.py`` records every message a site sends in a real
SecAgg+ round and fails on any clear value outside this list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import numpy as np

# --- round config: server -> site ---------------------------------------------------------------
CFG_RUN_ID: Final = "fedface.run-id"
CFG_ROUND: Final = "fedface.round"
CFG_ROUNDS: Final = "fedface.rounds"  # planned rounds of the run: the site calibrates its noise for all of them
CFG_LOCAL_EPOCHS: Final = "fedface.local-epochs"
CFG_LR: Final = "fedface.lr"
CFG_PROXIMAL_MU: Final = "fedface.proximal-mu"

# --- facts a site's own mod adds to a training request (never taken from the server) ------------
LOCAL_PREFIX: Final = "fedface.local."  # any incoming key with this prefix is dropped first
LOCAL_SECAGG: Final = "fedface.local.secagg"  # True: the request came through SecAgg+'s stages
LOCAL_PEERS: Final = "fedface.local.peers"  # sites whose masks are tied to this one's (itself included)
LOCAL_RUN_ID: Final = "fedface.local.run-id"  # the first fedface run id this Flower run used at the site

# --- reply metrics: site -> server --------------------------------------------------------------
M_SITE: Final = "site"
M_STATUS: Final = "status"
M_REASON: Final = "reason"
M_EXAMPLES: Final = "examples"
M_TRAIN_S: Final = "train_s"
M_EPSILON: Final = "epsilon"  # the site's data set's total spend after this round (ledger)
M_DELTA: Final = "delta"
M_ACCOUNTANT: Final = "accountant"
M_BUDGET: Final = "budget_epsilon"
M_REMAINING: Final = "remaining"
M_NOISE: Final = "noise_multiplier"
M_SAMPLE_RATE: Final = "sample_rate"
M_STEPS: Final = "steps"
M_RUN_EPSILON: Final = "run_epsilon"  # this run's own spend at the site after this round
M_RECEIPT: Final = "receipt"  # the signed ledger receipt of this round's charge (JSON text)
M_CLIP: Final = "max_grad_norm"  # the round's DP-SGD clipping norm
M_POLICY: Final = "policy"  # the site's own privacy policy as it enforces it (JSON text: POLICY_FIELDS)

#: The fields of a site's reported policy (:data:`M_POLICY`), its ``[policy]`` keys.
POLICY_FIELDS: Final = (
    "budget-epsilon", "delta", "accountant", "epsilon-per-run", "require-secagg", "min-peers", "allow-non-private",
)

#: Every metric a site's reply may carry in the clear (docs/threat-model.md justifies each).
CLEAR_REPLY_KEYS: Final = frozenset(
    {
        M_SITE, M_STATUS, M_REASON, M_EXAMPLES, M_TRAIN_S, M_EPSILON, M_DELTA, M_ACCOUNTANT, M_BUDGET,
        M_REMAINING, M_NOISE, M_SAMPLE_RATE, M_STEPS, M_RUN_EPSILON, M_RECEIPT, M_CLIP, M_POLICY,
    }
)

# --- statuses ------------------------------------------------------------------------------------
Status = Literal["answered", "refused", "failed"]
ANSWERED: Final = "answered"
REFUSED: Final = "refused"
FAILED: Final = "failed"
REASON_BUDGET: Final = "budget exhausted"
# a site's policy (fedface.client.policy) refuses a request outside it with one of these
REASON_SECAGG: Final = "policy: secagg required"
REASON_NON_PRIVATE: Final = "policy: non-private round"
REASON_EPSILON_PER_RUN: Final = "policy: epsilon-per-run"
REASON_DELTA: Final = "policy: delta"
REASON_PEERS: Final = "policy: too few peers"
REASON_RUN_ID: Final = "policy: run id changed"  # one Flower run is one fedface run: no fresh id per round
REASON_BAD_REQUEST: Final = "policy: malformed round config"
#: Reasons after which a site will refuse every later round of the same run: not asked again.
FINAL_REASONS: Final = frozenset(
    {REASON_BUDGET, REASON_SECAGG, REASON_NON_PRIVATE, REASON_EPSILON_PER_RUN, REASON_DELTA, REASON_RUN_ID}
)

def update_of(weights: Sequence[np.ndarray], sent: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What a site sends through SecAgg+: its weights less the weights of the round (float32)."""
    if len(weights) != len(sent):
        raise ValueError(f"expected {len(sent)} model arrays, got {len(weights)}: the server and site configs differ")
    return [(np.asarray(w, dtype=np.float32) - np.asarray(s, dtype=np.float32)) for w, s in zip(weights, sent, strict=True)]


def apply_update(sent: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The weights of an averaged SecAgg+ update: the round's weights plus it, in their dtypes."""
    if len(update) != len(sent):
        raise ValueError(f"expected {len(sent)} model arrays in the aggregate, got {len(update)}")
    out = []
    for s, u in zip(sent, update, strict=True):
        base = np.asarray(s)
        total = base.astype(np.float64) + np.asarray(u, dtype=np.float64)
        out.append((np.rint(total) if np.issubdtype(base.dtype, np.integer) else total).astype(base.dtype))
    return out


__all__ = [
    "ANSWERED",
    "CFG_LOCAL_EPOCHS",
    "CFG_LR",
    "CFG_PROXIMAL_MU",
    "CFG_ROUND",
    "CFG_ROUNDS",
    "CFG_RUN_ID",
    "CLEAR_REPLY_KEYS",
    "FAILED",
    "FINAL_REASONS",
    "LOCAL_PEERS",
    "LOCAL_PREFIX",
    "LOCAL_RUN_ID",
    "LOCAL_SECAGG",
    "M_ACCOUNTANT",
    "M_BUDGET",
    "M_CLIP",
    "M_DELTA",
    "M_EPSILON",
    "M_EXAMPLES",
    "M_NOISE",
    "M_POLICY",
    "M_REASON",
    "M_RECEIPT",
    "M_REMAINING",
    "M_RUN_EPSILON",
    "M_SAMPLE_RATE",
    "M_SITE",
    "M_STATUS",
    "M_STEPS",
    "M_TRAIN_S",
    "REASON_BAD_REQUEST",
    "REASON_BUDGET",
    "REASON_DELTA",
    "REASON_EPSILON_PER_RUN",
    "REASON_NON_PRIVATE",
    "REASON_PEERS",
    "REASON_RUN_ID",
    "REASON_SECAGG",
    "REFUSED",
    "Status",
    "apply_update",
    "update_of",
]
