"""A site's own privacy policy, checked by the site before it trains or charges anything.

The policy (:class:`~fedface.common.config.SitePolicyConfig`) comes from the site's own
configuration: ``[policy]`` in a deployed site's ``site.toml``, ``[site-policy]`` of the
scenario for simulated sites. What the server asks for in a round (its scenario: private or
not, epsilon, delta; how the request arrived: through SecAgg+ or in the clear, and with how
many peers) is a :class:`RoundRequest`; :func:`check_request` refuses any request that asks
for more privacy loss than the policy allows, with one of the named reasons of
:mod:`fedface.common.wire`:

=============================  ===================================================================
``policy: secagg required``    the request came in the clear and the policy requires SecAgg+
``policy: too few peers``      fewer sites than ``min-peers`` (this one included) are tied to
                               this site's update by SecAgg+'s masks
``policy: non-private round``  the server asks for training without DP-SGD
                               (``allow-non-private`` is off)
``policy: delta``              the server's delta is larger than the policy's
``policy: epsilon-per-run``    the run would spend more than ``epsilon-per-run``
``budget exhausted``           the lifetime budget would be passed (the ledger's charge refuses)
=============================  ===================================================================

The server may ask for *less*: a smaller epsilon or delta is used as asked. The site also
accounts with its own accountant, whatever the scenario names.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedface.common import wire
from fedface.common.config import SitePolicyConfig
from fedface.common.privacy.accounting import format_epsilon


class PolicyRefusal(Exception):
    """A request outside the site's policy: ``reason`` is one of wire's named reasons,
    ``detail`` says what was asked and what the policy allows."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of a site for one round, and how the request reached it.

    ``secagg`` and ``peers`` are what the site's own mod saw (the request came through
    SecAgg+'s stages; the sites whose masks are tied to this one's update, itself included);
    they are never taken from the server's config.
    """

    private: bool
    epsilon: float | None  # the run's target epsilon (None: a fixed noise multiplier)
    delta: float
    secagg: bool
    peers: int | None


def check_request(policy: SitePolicyConfig, request: RoundRequest) -> None:
    """Refuse (:class:`PolicyRefusal`) a round request outside ``policy``; see the module docstring."""
    if policy.require_secagg and not request.secagg:
        raise PolicyRefusal(wire.REASON_SECAGG, "the training request came in the clear; this site sends updates only through SecAgg+")
    if request.secagg and (request.peers is None or request.peers < policy.min_peers):
        raise PolicyRefusal(
            wire.REASON_PEERS,
            f"SecAgg+ ties {request.peers if request.peers is not None else 'an unknown number of'} sites' masks to this "
            f"site's update (itself included); its policy needs at least {policy.min_peers}",
        )
    if not request.private:
        if not policy.allow_non_private:
            raise PolicyRefusal(wire.REASON_NON_PRIVATE, "the server asks for training without DP-SGD; this site trains only privately")
        return
    if request.delta > policy.delta:
        raise PolicyRefusal(wire.REASON_DELTA, f"the server asks for delta {request.delta:g}; this site accepts at most {policy.delta:g}")
    if request.epsilon is not None:
        check_run_epsilon(policy, request.epsilon, what="the server asks for a run epsilon of")


def check_run_epsilon(policy: SitePolicyConfig, epsilon: float, *, what: str = "this run would spend epsilon") -> None:
    """Refuse a run whose (planned or composed) epsilon passes ``epsilon-per-run``."""
    cap = policy.epsilon_per_run
    if cap is not None and epsilon > cap:
        raise PolicyRefusal(wire.REASON_EPSILON_PER_RUN, f"{what} {format_epsilon(epsilon)}; this site allows at most {cap:g} per run")


__all__ = ["PolicyRefusal", "RoundRequest", "check_request", "check_run_epsilon"]
