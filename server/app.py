"""The coordinator: a Flower ``ServerApp`` running fedface's federated rounds.

Each round (Flower's compatibility workflow, the only one with SecAgg+ in Flower 1.42):

1. sample sites (sites known to have refused for an exhausted budget are not asked again);
   send the global encoder and the round config (:mod:`fedface.common.wire`);
2. with ``federation.secagg`` (default) the updates travel through Flower's SecAgg+ workflow:
   the server unmasks only their weighted sum; each site's reply metrics (status, examples,
   privacy spend) come in the clear;
3. unless at least ``federation.min-sites-per-aggregate`` sites' updates would enter the sum,
   abort the round before unmasking (SecAgg+: :class:`~fedface.server.secagg.GuardedSecAggPlus`)
   or before averaging (clear rounds), and record why: the sum of fewer updates shows too much
   of each. SecAgg+ masks come from ChaCha20 and an unmasked sum that honest sites could not
   have produced is refused (:mod:`fedface.server.secagg`);
4. average (FedAvg weighted by examples; FedAdam as an option; FedProx's proximal term is
   applied at the sites), evaluate the new global encoder on the held-out identities
   (verification accuracy, AUC, TAR@FAR), checkpoint it, and write the round to the run store
   (who was asked, who answered, refused or failed and why, metrics, reported spend, timing).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Context, FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation engine's grid

from fedface.common import wire
from fedface.common.checkpoint import Checkpoint
from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet
from fedface.common.data.expressions import expression_classes, expression_labels
from fedface.common.evaluation import evaluate_expression, evaluate_open_set
from fedface.common.models import ExpressionHead, build_encoder, load_shared_weights, shared_weights
from fedface.server import site_reports
from fedface.server.admin_log import AdminAction
from fedface.server.secagg import GuardedSecAggPlus, secagg_workflow, too_few_reason
from fedface.server.store import Participation, RunStore

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class _RoundLog:
    started: float = 0.0
    started_at: str = ""
    sampled: list[str] = field(default_factory=list)
    participation: list[Participation] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    collected: bool = False  # the strategy received the round's results (aggregate_fit ran)
    run_epsilon: dict[str, float] = field(default_factory=dict)  # each site's spend in this run so far
    receipts: dict[str, str] = field(default_factory=dict)  # each site's signed ledger receipt (JSON)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # each site's policy and mechanism as reported


SIMULATION_PULL_INTERVAL_S = 0.01
MAX_REASON = 500  # characters of a site's refusal reason kept (it is the site's text)
MAX_SITE_NAME = 128  # characters of the name a site reports

ROUND_ABORTED = "round aborted before aggregation: a secure-aggregation stage lost too many sites (run with -v for Flower's log)"


class FedFaceRounds:
    """The bookkeeping fedface adds to a Flower strategy: round configs, refusals, the server's
    evaluation on held-out identities, checkpoints and the run store.

    Sites are named by what they report (``wire.M_SITE``); a node not heard from yet is
    ``node-<id>``. ``on_round(number, row)`` is called after each training round, and once
    before the first with the starting encoder's metrics (``row["initial"]`` True).
    """

    def __init__(
        self,
        *,
        cfg: TrainConfig,
        run_id: str,
        run_dir: Path,
        store: RunStore,
        test_faces: FaceSet,
        on_round: RoundCallback | None = None,
        first_round: int = 1,
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.run_dir = run_dir
        self.store = store
        self.test_faces = test_faces
        # the name each node reported, in this or an earlier run of the store (a deployment's
        # node ids are stable: a suspended site is recognised before it answers again)
        self.names: dict[str, str] = store.node_names()
        self.on_round = on_round
        self.first_round = first_round
        self.exhausted: set[str] = set()
        self.rounds: dict[int, _RoundLog] = {}
        self.history: list[dict[str, Any]] = []
        self.initial: dict[str, float] | None = None  # the starting encoder's metrics (round 0)
        self.secagg_rounds: dict[int, bool] = {}  # rounds whose kind was chosen per round (AlternatingFit)
        self.sent: dict[int, list[np.ndarray]] = {}  # the weights each round sent (its sites' updates are added to them)
        self.stopped: AdminAction | None = None  # the console's stop request, once seen
        self.encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
        # an expression run shares its expression head (7 shared classes, no identity) with the
        # encoder, and the server measures expression accuracy on the held-out part
        self.head: ExpressionHead | None = None
        self.classes: tuple[str, ...] = ()
        if cfg.training.task == "expression":
            self.classes = expression_classes(test_faces)
            self.test_faces, self.test_labels = expression_labels(test_faces, self.classes)
            self.head = ExpressionHead(cfg.model.embedding_dim, len(self.classes))

    def initial_weights(self, encoder: Any, head: Any = None) -> list[np.ndarray]:
        """The arrays a run starts from: ``encoder``'s, and for an expression run ``head``'s (or
        a fresh head's, seeded by ``training.seed``)."""
        if self.head is None:
            return shared_weights(encoder, None)
        if head is None:
            torch.manual_seed(self.cfg.training.seed)
            head = ExpressionHead(self.cfg.model.embedding_dim, len(self.classes))
        return shared_weights(encoder, head)

    def round_config(self, server_round: int) -> dict[str, Any]:
        fc = self.cfg.federation
        return {
            wire.CFG_RUN_ID: self.run_id,
            wire.CFG_ROUND: self.first_round - 1 + server_round,
            wire.CFG_ROUNDS: fc.rounds,
            wire.CFG_LOCAL_EPOCHS: fc.local_epochs,
            wire.CFG_LR: self.cfg.training.lr,
            wire.CFG_PROXIMAL_MU: fc.proximal_mu if fc.strategy == "fedprox" else 0.0,
        }

    def stop_requested(self) -> bool:
        """Whether the console asked to stop this run (since it last started or resumed); once
        seen, every round left is skipped."""
        if self.stopped is None:
            self.stopped = self.store.stop_requested(self.run_id)
            if self.stopped is not None:
                logger.warning(
                    "run %s: stopped by %s in the console at %s; the rounds left are skipped",
                    self.run_id, self.stopped.admin, self.stopped.at,
                )
        return self.stopped is not None

    def filter_sampled(self, server_round: int, pairs: list[tuple[ClientProxy, FitIns]]) -> list[tuple[ClientProxy, FitIns]]:
        """The sampled sites to ask: none once the console asked to stop the run (the rounds left
        are skipped, not recorded), else all but the sites known to refuse every round and the
        sites suspended in the console (by the name they reported, or ``node-<id>`` before)."""
        if self.stop_requested():
            return []
        suspended = self.store.suspended_sites()
        keep = [(c, ins) for c, ins in pairs if c.cid not in self.exhausted and self.site_name(c.cid) not in suspended]
        if len(keep) < len(pairs) and suspended:
            names = sorted(self.site_name(c.cid) for c, _ in pairs if self.site_name(c.cid) in suspended)
            if names:
                logger.info("round %d: suspended sites not sampled: %s", self.first_round - 1 + server_round, ", ".join(names))
        log = _RoundLog(started=time.perf_counter(), started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        log.sampled = [c.cid for c, _ in keep]
        self.rounds[server_round] = log
        return keep

    def collect(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> int:
        """Record each site's answer; returns the total examples of the answering sites."""
        log = self.rounds.setdefault(server_round, _RoundLog(started=time.perf_counter()))
        log.collected = True
        total = 0
        for proxy, res in results:
            m = res.metrics
            site = str(m.get(wire.M_SITE, self.site_name(proxy.cid)))[:MAX_SITE_NAME]
            self.names[proxy.cid] = site
            status = str(m.get(wire.M_STATUS, wire.ANSWERED))
            if status == wire.REFUSED and m.get(wire.M_REASON) in wire.FINAL_REASONS:
                self.exhausted.add(proxy.cid)  # it would refuse every later round of this run too
            if wire.M_RUN_EPSILON in m:
                log.run_epsilon[site] = float(m[wire.M_RUN_EPSILON])  # type: ignore[arg-type]
            if wire.M_RECEIPT in m:
                log.receipts[site] = str(m[wire.M_RECEIPT])
            log.reports[site] = {**site_reports.from_metrics(m), "node": proxy.cid}
            if status == wire.ANSWERED:
                total += int(res.num_examples)
            log.participation.append(
                Participation(
                    site=site,
                    status=status,  # type: ignore[arg-type]
                    reason=str(m[wire.M_REASON])[:MAX_REASON] if wire.M_REASON in m else None,
                    examples=int(res.num_examples),
                    train_s=_float(m.get(wire.M_TRAIN_S)),
                    epsilon=_float(m.get(wire.M_EPSILON)),
                    delta=_float(m.get(wire.M_DELTA)),
                    accountant=str(m[wire.M_ACCOUNTANT]) if wire.M_ACCOUNTANT in m else None,
                    budget_epsilon=_float(m.get(wire.M_BUDGET)),
                    remaining=_float(m.get(wire.M_REMAINING)),
                )
            )
        for failure in failures:
            if isinstance(failure, tuple):
                site = self.site_name(failure[0].cid)
                detail = failure[1].status.message if hasattr(failure[1], "status") else str(failure[1])
                log.participation.append(Participation(site=site, status="failed", reason=f"failed reply: {detail}"[:MAX_REASON]))
            else:
                # Flower does not say which site an exception came from: counted, not attributed
                log.failures.append(f"{type(failure).__name__}: {failure}"[:MAX_REASON])
        return total

    def abort(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any], reason: str) -> None:
        """Record a round aborted before aggregation: each site that trained is recorded as
        failed with ``reason`` (its spend as reported; its update was never unmasked), the
        others as they answered."""
        self.collect(server_round, results, failures)
        log = self.rounds[server_round]
        log.participation = [
            replace(p, status="failed", reason=reason) if p.status == wire.ANSWERED else p for p in log.participation
        ]
        logger.warning("round %d: %s; the global encoder is unchanged", self.first_round - 1 + server_round, reason)

    def reject(self, server_round: int, reasons: dict[str, str]) -> None:
        """Record the nodes of ``reasons`` (node id -> why) as failed in round ``server_round``:
        their clear updates were not ones an honest site sends and were left out of the average.
        (By node, not by the name a site reports: a site cannot have another's update dropped.)"""
        log = self.rounds[server_round]
        reasons = {self.site_name(cid): why for cid, why in reasons.items()}
        log.participation = [replace(p, status="failed", reason=reasons[p.site][:MAX_REASON]) if p.site in reasons else p for p in log.participation]
        for site, why in reasons.items():
            logger.warning("round %d: the update of %s was left out: %s", self.first_round - 1 + server_round, site, why)

    def is_secagg(self, server_round: int) -> bool:
        """Whether round ``server_round`` runs (ran) through SecAgg+."""
        return self.secagg_rounds.get(server_round, self.cfg.federation.secagg)

    def site_name(self, cid: str) -> str:
        """The name a node reported, or ``node-<id>`` before it has answered."""
        return self.names.get(cid, f"node-{cid}")

    def evaluate(self, server_round: int, weights: list[np.ndarray]) -> dict[str, float]:
        """Verification on the held-out identities (an expression run: expression accuracy on the
        held-out part); after a training round, also checkpoint and record it."""
        if server_round > 0 and self.stopped is not None:
            return {}  # a round skipped after the console's stop: nothing trained, evaluated or recorded
        load_shared_weights(self.encoder, self.head, weights)
        cpu = torch.device("cpu")
        if self.head is not None:
            metrics = evaluate_expression(
                self.encoder, self.head, self.test_faces.images, self.test_labels, self.cfg.evaluation,
                device=cpu, with_occlusion=False, class_names=self.classes,
            )
        else:
            metrics = evaluate_open_set(self.encoder, self.test_faces, self.cfg.evaluation, device=cpu, with_occlusion=False)
        out = {k: float(v) for k, v in metrics.items()}
        if server_round == 0:
            # the starting encoder (random, --init-from, or a resumed run's): reported as round 0,
            # not recorded as a training round
            if self.head is not None:
                logger.info("initial model: expression accuracy %.4f", out.get("expression_acc", float("nan")))
            else:
                logger.info("initial encoder: verification accuracy %.4f", out.get("verif_acc", float("nan")))
            self.initial = out
            if self.on_round is not None:
                self.on_round(self.first_round - 1, {"round": self.first_round - 1, "initial": True, **out})
            return out
        number = self.first_round - 1 + server_round
        ckpt_path = self.run_dir / "checkpoints" / f"round-{number:04d}.pt"
        Checkpoint(
            config=self.cfg,
            task=self.cfg.training.task,
            epoch=number,
            num_classes=len(self.classes),
            encoder_state={k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()},
            head_state={k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()} if self.head is not None else {},
            optimizer_state={},
            scheduler_state={},
            class_names=self.classes,
        ).save(ckpt_path)
        log = self.rounds.get(server_round, _RoundLog(started=time.perf_counter()))
        if log.sampled and not log.collected:
            # The round ended before the strategy saw any result: a SecAgg+ stage lost too many
            # sites (or the sites could not run it) and Flower skipped the aggregation.
            logger.warning("round %d: aborted before any update was aggregated; the global encoder is unchanged", number)
            for cid in log.sampled:
                log.participation.append(
                    Participation(site=self.site_name(cid), status="failed", reason=ROUND_ABORTED)
                )
        seconds = time.perf_counter() - log.started
        self.store.record_round(
            self.run_id,
            number,
            started_at=log.started_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            seconds=seconds,
            sampled=[self.site_name(cid) for cid in log.sampled],
            participation=log.participation,
            metrics=out,
            checkpoint=str(ckpt_path),
            receipts=log.receipts,
            reports=log.reports,
        )
        row = {
            "round": number,
            "seconds": seconds,
            "answered": sum(p.status == "answered" for p in log.participation),
            "refused": sum(p.status == "refused" for p in log.participation),
            "failed": sum(p.status == "failed" for p in log.participation) + len(log.failures),
            "sampled": len(log.sampled),
            # the run's own spend (largest over the sites) and the largest lifetime spend of a
            # site's data set (every run it joined), as the sites' ledgers composed them
            "max_epsilon": max(log.run_epsilon.values(), default=None),
            "max_lifetime_epsilon": max((p.epsilon for p in log.participation if p.epsilon is not None), default=None),
            "secagg": self.is_secagg(server_round),
            # why sites refused or failed this round, with how many sites gave each reason
            "reasons": dict(Counter(p.reason for p in log.participation if p.reason)),
            **out,
        }
        self.history.append(row)
        if self.on_round is not None:
            self.on_round(number, row)
        return out


def update_problem(arrays: list[np.ndarray], sent: list[np.ndarray] | None) -> str | None:
    """Why a site's clear reply is not a model an honest site sends: other array counts or
    shapes than the round sent, or a NaN or infinite value (FedAvg would spread it into every
    weight); None when it is one."""
    if sent is not None:
        if len(arrays) != len(sent):
            return f"update refused: {len(arrays)} arrays where the model has {len(sent)}"
        for i, (a, s) in enumerate(zip(arrays, sent, strict=True)):
            if a.shape != s.shape:
                return f"update refused: array {i} of shape {a.shape}, not {s.shape}"
    for i, a in enumerate(arrays):
        if not np.issubdtype(a.dtype, np.floating) or a.dtype.itemsize < 4 or not np.isfinite(a).all():
            return f"update refused: array {i} holds NaN, infinite or non-float32/64 values ({a.dtype})"
    return None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def make_strategy(rounds: FedFaceRounds, initial: list[np.ndarray]) -> FedAvg:
    """The Flower strategy of ``rounds.cfg.federation.strategy`` with fedface's bookkeeping."""
    fc = rounds.cfg.federation
    base: type[FedAvg] = {"fedadam": FedAdam, "fedavgm": FedAvgM}.get(fc.strategy, FedAvg)

    class Strategy(base):  # type: ignore[valid-type, misc]
        def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
            if rounds.stop_requested():
                return []  # before sampling: Flower's sampling waits for enough sites, which may be gone
            pairs = super().configure_fit(server_round, parameters, client_manager)
            rounds.sent = {server_round: parameters_to_ndarrays(parameters)}  # (only the current round's)
            return rounds.filter_sampled(server_round, pairs)

        def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
            answered = [(c, r) for c, r in results if r.num_examples > 0]
            rejected: dict[str, str] = {}  # node id -> why its clear update was left out
            if not rounds.is_secagg(server_round):
                # a clear round: each site's weights are here to check (SecAgg+ checks its own: server/secagg.py)
                sent = rounds.sent.get(server_round)
                for proxy, res in answered:
                    why = update_problem(parameters_to_ndarrays(res.parameters), sent)
                    if why is not None:
                        rejected[proxy.cid] = why
                answered = [(c, r) for c, r in answered if c.cid not in rejected]
            if answered and len(answered) < fc.min_sites_per_aggregate:
                # a clear round (SecAgg+ rounds stop before unmasking: GuardedSecAggPlus)
                rounds.abort(server_round, results, failures, too_few_reason(len(answered), fc.min_sites_per_aggregate))
                if rejected:
                    rounds.reject(server_round, rejected)
                return None, {}
            total = rounds.collect(server_round, results, failures)
            if rejected:
                rounds.reject(server_round, rejected)
            if total == 0 or not answered:
                logger.warning("round %d: no site trained (all refused or failed); the global encoder is unchanged", server_round)
                return None, {}
            if rounds.is_secagg(server_round):
                # SecAgg+ carried the sites' updates (their weights less the round's: client/app.py)
                # and unmasked their weighted average, which every result now holds: added to the
                # weights the round sent, it is the weighted average of the sites' weights
                merged = ndarrays_to_parameters(
                    wire.apply_update(rounds.sent[server_round], parameters_to_ndarrays(answered[0][1].parameters))
                )
                for _, res in answered:
                    res.parameters = merged
            return super().aggregate_fit(server_round, answered, failures)

    kwargs: dict[str, Any] = {
        "fraction_fit": fc.fraction_fit,
        "fraction_evaluate": 0.0,
        "min_fit_clients": min(fc.min_sites, fc.sites),
        "min_available_clients": min(fc.min_sites, fc.sites),
        "min_evaluate_clients": 0,
        "on_fit_config_fn": rounds.round_config,
        "evaluate_fn": lambda r, w, _c: (0.0, rounds.evaluate(r, w)),
        "accept_failures": True,
        "initial_parameters": ndarrays_to_parameters(initial),
        # per-site figures go to the run store (FedFaceRounds.collect); Flower's history gets counts
        "fit_metrics_aggregation_fn": lambda pairs: {"sites_reporting": len(pairs)},
    }
    if fc.strategy == "fedadam":
        kwargs.update({"eta": fc.server_lr, "eta_l": rounds.cfg.training.lr})
    elif fc.strategy == "fedavgm":
        # post-processing of the (SecAgg+-summed, already noised) average: no privacy cost
        kwargs.update({"server_learning_rate": 1.0, "server_momentum": fc.server_momentum})
    return Strategy(**kwargs)


class AlternatingFit:
    """A fit workflow that runs odd rounds through SecAgg+ and even rounds in the clear.

    For measuring what SecAgg+ costs (``fedface bench federated``): the two kinds of round
    alternate in one run, on the same processes and the same machine state, so neither pays
    for a slower moment of a shared machine or for being the first run of a process. Records
    each round's kind in ``rounds.secagg_rounds``. Not for training anything that matters:
    the even rounds' updates reach the server unmasked.
    """

    def __init__(self, rounds: FedFaceRounds, secagg: SecAggPlusWorkflow) -> None:
        self.rounds = rounds
        self.secagg = secagg

    def __call__(self, grid: Any, context: Context) -> None:
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])  # type: ignore[arg-type]
        masked = server_round % 2 == 1
        self.rounds.secagg_rounds[server_round] = masked
        (self.secagg if masked else default_fit_workflow)(grid, context)


def run_rounds(grid: Any, context: Context, rounds: FedFaceRounds, initial: list[np.ndarray], *, alternate_secagg: bool = False) -> None:
    """Run the remaining rounds of ``rounds`` on ``grid`` (SecAgg+ unless disabled; with
    ``alternate_secagg``, SecAgg+ on odd rounds only: :class:`AlternatingFit`)."""
    cfg = rounds.cfg
    strategy = make_strategy(rounds, initial)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds - rounds.first_round + 1), strategy=strategy)
    sampled = max(1, int(cfg.federation.sites * cfg.federation.fraction_fit))
    if alternate_secagg:
        workflow = DefaultWorkflow(fit_workflow=AlternatingFit(rounds, secagg_workflow(cfg, sampled, rounds)))
    elif cfg.federation.secagg:
        workflow = DefaultWorkflow(fit_workflow=secagg_workflow(cfg, sampled, rounds))
    else:
        workflow = DefaultWorkflow()
    # When every site of a round refuses, SecAgg+'s unmasking divides by a total weight of 0;
    # fedface then discards that aggregate (FedFaceRounds keeps the encoder), so numpy's
    # warnings about it are noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        workflow(grid, legacy)


def reason_counts(history: list[dict[str, Any]]) -> dict[str, int]:
    """Each reason sites gave for refusing or failing over the rounds of ``history``, with its
    count of site-rounds."""
    total = Counter[str]()
    for row in history:
        total.update(row.get("reasons", {}))
    return dict(total)


def run_outcome(history: list[dict[str, Any]], planned: int, stopped: AdminAction | None = None) -> tuple[str, str | None]:
    """A finished run's status and error from its rounds: ``stopped`` when the console stopped
    it, else failed unless every planned round was recorded and at least one aggregated an
    update (Flower finishes a run whose every site refused or failed as if it had succeeded)."""
    if stopped is not None:
        return "stopped", f"stopped by {stopped.admin} in the console at {stopped.at}, after {len(history)} of {planned} rounds"
    if len(history) != planned:
        return "failed", f"{len(history)} of {planned} rounds completed: see the log above"
    if all(r["answered"] == 0 for r in history):
        why = "; ".join(f"{reason} ({n} site-rounds)" for reason, n in reason_counts(history).items()) or "no site answered"
        return "failed", f"no round aggregated any site's update: {why}"
    return "completed", None


def make_server_app(rounds: FedFaceRounds, initial: list[np.ndarray], *, alternate_secagg: bool = False) -> ServerApp:
    """A ServerApp running ``rounds.cfg.federation.rounds`` rounds (SecAgg+ unless disabled;
    ``alternate_secagg``: :class:`AlternatingFit`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        if isinstance(grid, InMemoryGrid):  # not a deployment's HttpGrid
            # Simulation: poll for replies every 10 ms rather than Flower's default 100 ms. Each
            # exchange with the sites waits for its replies, and SecAgg+ makes four exchanges
            # a round where plain FedAvg makes one (set-up, key shares, masked updates,
            # unmasking): at 100 ms the polling alone cost SecAgg+ rounds about 0.3 s.
            grid.pull_interval = SIMULATION_PULL_INTERVAL_S
        run_rounds(grid, context, rounds, initial, alternate_secagg=alternate_secagg)

    return app


#: The ServerApp of ``flwr run`` (``[tool.flwr.app.components]`` in pyproject.toml): the run
#: config names the scenario and the run directory (docs/simulation.md).
app = ServerApp()


@app.main()
def _flwr_run_main(grid: Any, context: Context) -> None:
    import uuid

    from fedface.common.federated import federation_data, scenario_from_run_config

    cfg = scenario_from_run_config(context.run_config)
    run_dir = Path(str(context.run_config.get("run-dir") or "runs/flwr-run")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = federation_data(cfg)
    torch.manual_seed(cfg.training.seed)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    run_id = f"flwr-{context.run_id}-{uuid.uuid4().hex[:6]}"
    with RunStore(run_dir / "runs.sqlite") as store:
        store.start_run(run_id, config=cfg.to_toml_dict(), sites=cfg.federation.sites, rounds=cfg.federation.rounds, secagg=cfg.federation.secagg)
        rounds = FedFaceRounds(cfg=cfg, run_id=run_id, run_dir=run_dir, store=store, test_faces=fed.test)
        initial = rounds.initial_weights(encoder)
        status, error = "failed", None
        try:
            run_rounds(grid, context, rounds, initial)
            status, error = run_outcome(rounds.history, cfg.federation.rounds, rounds.stopped)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            store.finish_run(run_id, status=status, error=error)  # type: ignore[arg-type]


__all__ = [
    "AlternatingFit",
    "FedFaceRounds",
    "GuardedSecAggPlus",
    "app",
    "make_server_app",
    "make_strategy",
    "reason_counts",
    "run_outcome",
    "run_rounds",
    "secagg_workflow",
    "too_few_reason",
    "update_problem",
]
