"""`fedface bench policy`: what a site's own privacy policy costs per round.

One real site (the packaged federated recipe: its share of ORL at 64x64, DP-SGD at epsilon 8
over ``--rounds`` rounds, as one site of ``--sites``) trains its rounds through
:meth:`~fedface.client.site.Site.train_round`, as a federated site does. The work the policy
adds to a round is timed inside those real rounds, not apart from them:

- checking the request (:func:`~fedface.client.policy.check_request`),
- recording the policy's lifetime budget in the ledger (``Site._apply_budget``),
- composing the run as planned for ``epsilon-per-run`` (``compute_epsilon`` +
  :func:`~fedface.client.policy.check_run_epsilon`),
- composing the run's own spend for the reply (``compute_epsilon``).

Timed apart, as the other new per-round work: issuing and signing the round's ledger receipt
(``issue_receipt``; the key is loaded once per site).

Reported per round (median over the rounds after the first, which also builds the ledger and
the receipt key): ``policy_s``, ``receipt_s``, ``round_s`` (the whole round: policy, ledger
charge, receipt, training) and the ratios ``policy_over_round``, ``receipt_over_round``.
The site mod's bookkeeping (a few dictionary writes per message) and the server's count of
updates before unmasking are not timed: both are far below a millisecond.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from fedface.common.config import TrainConfig
from fedface.simulations.bench.common import scenario_config
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors


class _Timer:
    """Wraps callables and adds up the seconds they take (only calls made from ``caller``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any], caller: str | None = None) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if caller is not None and sys._getframe(1).f_code.co_name != caller:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def policy(
    orl: Annotated[Path, typer.Option(help="ORL faces (or any layout fedface reads).")] = Path("../shared/data/orl"),
    scenario: Annotated[Optional[Path], typer.Option("--scenario", "-c", help="Recipe (default: packaged scenarios/federated.toml).")] = None,
    rounds: Annotated[int, typer.Option(help="Rounds the site trains (its DP plan covers them all).")] = 6,
    sites: Annotated[int, typer.Option(help="Sites the faces are dealt to (the benchmark trains site 0).")] = 10,
    epsilon: Annotated[float, typer.Option(help="The run's epsilon at the site.")] = 8.0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Seconds per round of a site's policy checks against its whole round (real DP-SGD rounds on ORL)."""
    import fedface.client.site as site_module
    from fedface.client.site import Site
    from fedface.common.federated import federation_data, site_name
    from fedface.common.models import build_encoder, encoder_weights

    setup_logging(verbose, quiet=not verbose)
    torch.set_num_threads(1)
    with user_errors(), tempfile.TemporaryDirectory(prefix="fedface-bench-policy-") as tmp:
        base = TrainConfig.from_toml(scenario) if scenario is not None else scenario_config("federated.toml")
        cfg = base.with_overrides({"data.root": str(orl), "privacy.epsilon": epsilon, "federation.sites": sites, "federation.rounds": rounds})
        fed = federation_data(cfg)
        site = Site(site_name(0), cfg, fed.site_faces(0), Path(tmp) / "state", Path(tmp) / "ledger.sqlite",
                    policy=cfg.site_policy.model_copy(update={"budget_epsilon": 100.0, "epsilon_per_run": epsilon}))
        timer, receipts = _Timer(), _Timer()
        saved_receipt = site_module.issue_receipt
        site_module.issue_receipt = receipts.wrap(saved_receipt)  # type: ignore[assignment]
        saved = (site_module.check_request, site_module.check_run_epsilon, site_module.compute_epsilon, Site._apply_budget)
        site_module.check_request = timer.wrap(saved[0])  # type: ignore[assignment]
        site_module.check_run_epsilon = timer.wrap(saved[1])  # type: ignore[assignment]
        site_module.compute_epsilon = timer.wrap(saved[2], caller="train_round")  # type: ignore[assignment]
        Site._apply_budget = timer.wrap(saved[3])  # type: ignore[method-assign]
        torch.manual_seed(cfg.training.seed)
        weights = encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))
        policy_s, receipt_s, round_s = [], [], []
        try:
            for r in range(1, rounds + 1):
                timer.seconds = receipts.seconds = 0.0
                t0 = time.perf_counter()
                result = site.train_round(weights, run_id="bench-policy", round_=r, rounds=rounds,
                                          local_epochs=cfg.federation.local_epochs, lr=cfg.training.lr, secagg=True, peers=sites)
                round_s.append(time.perf_counter() - t0)
                policy_s.append(timer.seconds)
                receipt_s.append(receipts.seconds)
                if result.examples == 0:
                    raise RuntimeError(f"the site refused round {r}: {result.metrics}")
                weights = result.weights
                err_console.print(
                    f"round {r}/{rounds}: round {round_s[-1]:.2f} s, policy checks {policy_s[-1] * 1e3:.2f} ms, "
                    f"receipt {receipt_s[-1] * 1e3:.2f} ms"
                )
        finally:
            site_module.check_request, site_module.check_run_epsilon, site_module.compute_epsilon, Site._apply_budget = saved  # type: ignore[assignment, method-assign]
            site_module.issue_receipt = saved_receipt  # type: ignore[assignment]
    later = slice(1, None) if rounds > 1 else slice(None)
    med_policy, med_round = statistics.median(policy_s[later]), statistics.median(round_s[later])
    med_receipt = statistics.median(receipt_s[later])
    result_json = {
        "bench": "policy",
        "site_images": site.examples,
        "rounds": rounds,
        "epsilon": epsilon,
        "policy_s": med_policy,
        "round_s": med_round,
        "policy_over_round": med_policy / med_round,
        "receipt_s": med_receipt,
        "receipt_over_round": med_receipt / med_round,
        "policy_s_all": policy_s,
        "receipt_s_all": receipt_s,
        "round_s_all": round_s,
    }
    err_console.print(
        f"policy checks {med_policy * 1e3:.2f} ms and receipt {med_receipt * 1e3:.2f} ms of a {med_round:.2f} s round "
        f"({100 * med_policy / med_round:.3f}% and {100 * med_receipt / med_round:.3f}%)"
    )
    print_json(result_json)


__all__ = ["policy"]
