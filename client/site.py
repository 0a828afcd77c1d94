"""A site: its faces, its private state (the margin head, the privacy ledger) and one round of
local training.

A round at a site (:meth:`Site.train_round`):

0. check the request against the site's own policy (:mod:`fedface.client.policy`: SecAgg+
   required, enough peers, private, delta, epsilon per run); a request asking for more
   privacy loss than the policy allows is refused with a named reason, and nothing is trained
   or charged;
1. with privacy on, plan the site's DP-SGD for the *whole planned run* (Poisson sample rate
   ``q = batch / n``, local steps per round, noise calibrated so that all planned rounds
   together spend ``privacy.epsilon``; recomputed each round from the run's rounds already in
   the ledger, which gives the same noise unless the plan changed), then **charge this round to
   the ledger before training**; a round that would pass the data set's lifetime budget (the
   policy's ``budget-epsilon``; every run's spend counts against it) is refused ("budget
   exhausted") with the remaining budget, and nothing is trained or sent;
2. load the global encoder weights and the site's own margin head (kept on disk in the
   site's state directory, so it survives rounds and restarts; it never leaves the site); an
   expression run (``training.task = "expression"``) instead shares its 7-class expression
   head with the encoder (it names expressions, not people) and loads both from the global
   weights;
3. train encoder and head for the configured local epochs (DP-SGD or plain), with FedProx's
   proximal term when asked (added after the noise: it does not depend on the data);
4. save the head atomically and return the encoder weights only (an expression run: the
   encoder and the expression head), with the round's signed ledger receipt (:mod:`fedface.common.privacy.receipts`; the key lives beside the ledger).
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedface.common import wire
from fedface.client.policy import PolicyRefusal, RoundRequest, check_request, check_run_epsilon
from fedface.common.config import SitePolicyConfig, TrainConfig
from fedface.common.data import FaceSet, to_tensor
from fedface.common.data.transforms import AugmentConfig
from fedface.common.errors import BudgetExhaustedError
from fedface.common.io import atomic_torch_save
from fedface.common.data.expressions import expression_classes, expression_labels
from fedface.common.models import (
    ExpressionHead,
    build_encoder,
    build_margin_head,
    freeze_for,
    load_shared_weights,
    shared_weights,
)
from fedface.common.privacy.accounting import Mechanism, calibrate_noise, compute_epsilon
from fedface.common.privacy.dpsgd import make_dp_optimizer, poisson_batches, secure_seed, train_epoch_dp
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.privacy.per_sample import to_per_sample
from fedface.common.privacy.receipts import ReceiptKey, issue_receipt, receipt_key
from fedface.common.training import select_device, shuffled_batches, train_epoch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What a site answers for one round."""

    weights: list[np.ndarray]
    examples: int  # weight of this update in the average (0 when refused)
    metrics: dict[str, Any]


class Site:
    """One site of a federation.

    Parameters
    ----------
    name
        The site's name (its data set's name in the ledger unless ``privacy.dataset`` is set).
    cfg
        The run's config (model, head, training, privacy, federation).
    faces
        The site's own training faces (labels are relabelled to 0..k-1 here).
    state_dir
        Where the site keeps its head (``head.pt``) across rounds and restarts.
    ledger_path
        The site's privacy ledger (privacy on).
    policy
        The site's own privacy policy (default: the scenario's ``[site-policy]``, for
        simulated sites; a deployed site passes the ``[policy]`` of its own ``site.toml``).
    """

    def __init__(
        self, name: str, cfg: TrainConfig, faces: FaceSet, state_dir: Path, ledger_path: Path, policy: SitePolicyConfig | None = None
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.policy = policy if policy is not None else cfg.site_policy
        self._key: ReceiptKey | None = None
        self.task = cfg.training.task
        self.classes: tuple[str, ...] = ()
        if self.task == "expression":
            # the classes of the shared vocabulary (or Yale A's own); other images are left out
            self.classes = expression_classes(faces)
            faces, labels = expression_labels(faces, self.classes)
            self.labels = labels
        self.faces = faces.relabel()
        if self.task != "expression":
            self.labels = self.faces.labels
        self.state_dir = Path(state_dir)
        self.ledger_path = Path(ledger_path)
        self.device = select_device(cfg.training.device)
        self.dataset = cfg.privacy.dataset or name

    @property
    def examples(self) -> int:
        """Training images at this site."""
        return len(self.faces)

    # --- privacy plan --------------------------------------------------------------------------

    def mechanism(self, *, rounds: int, local_epochs: int, prior: Sequence[tuple[float, float, int]] = ()) -> Mechanism:
        """This site's per-round DP-SGD mechanism, its noise calibrated so that ``prior`` (the
        run's rounds already charged) and ``rounds`` more rounds spend ``privacy.epsilon``.

        With nothing changed since the first round this is the first round's noise again; if
        the plan grew (a resumed run with more rounds), the remaining rounds get more noise,
        so the run still ends within its epsilon.
        """
        pc = self.cfg.privacy
        accountant = self.policy.accountant  # the site's own, whatever the scenario names
        n = self.examples
        expected = min(self.cfg.training.batch_size, n)
        q = expected / n
        steps = local_epochs * max(1, round(1 / q))
        if pc.noise_multiplier is not None:
            sigma = pc.noise_multiplier
        elif prior and compute_epsilon(
            [*prior, (prior[-1][0], q, rounds * steps)], delta=pc.delta, accountant=accountant
        ) <= pc.epsilon:  # type: ignore[operator]
            sigma = prior[-1][0]  # the plan of the run's latest round still fits: keep its noise
        else:
            assert pc.epsilon is not None
            sigma = calibrate_noise(
                target_epsilon=pc.epsilon,
                delta=pc.delta,
                sample_rate=q,
                steps=rounds * steps,
                accountant=accountant,
                prior=prior,
            )
        return Mechanism(
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            max_grad_norm=pc.max_grad_norm,
            delta=pc.delta,
            accountant=accountant,
            secure_mode=pc.secure_mode,
        )

    # --- the head ------------------------------------------------------------------------------

    def _head(self) -> nn.Module:
        if self.task == "expression":  # shared: its weights come with the encoder's
            return ExpressionHead(self.cfg.model.embedding_dim, len(self.classes)).to(self.device)
        classes = self.faces.num_identities
        head = build_margin_head(self.cfg.head, embedding_dim=self.cfg.model.embedding_dim, num_classes=classes)
        path = self.state_dir / "head.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            head.load_state_dict(state)
        return head.to(self.device)

    def _save_head(self, head: nn.Module) -> None:
        atomic_torch_save(self.state_dir / "head.pt", {k: v.detach().cpu() for k, v in head.state_dict().items()})

    # --- one round -----------------------------------------------------------------------------

    def train_round(
        self,
        weights: list[np.ndarray],
        *,
        run_id: str,
        round_: int,
        rounds: int,
        local_epochs: int,
        lr: float,
        proximal_mu: float = 0.0,
        secagg: bool = False,
        peers: int | None = None,
        pinned_run_id: str | None = None,
    ) -> RoundResult:
        """Train one round from the global ``weights``; see the module docstring.

        ``secagg``, ``peers`` and ``pinned_run_id`` are what the site's own mod saw of the
        request (:class:`~fedface.client.policy.RoundRequest`; ``pinned_run_id``: the first run
        id of this Flower run at this site, which a request may not change: the per-run cap
        counts the sessions of one run id). The request is checked against the site's policy
        first, and refused with a named reason before anything is trained or charged when it
        asks for more privacy loss than the policy allows.
        """
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {wire.M_SITE: self.name, wire.M_EXAMPLES: self.examples, wire.M_POLICY: self.policy_json()}
        if pinned_run_id is not None and run_id != pinned_run_id:
            detail = f"this Flower run started as run {pinned_run_id!r} at this site and now asks for run {run_id!r}"
            return self._refuse(weights, metrics, wire.REASON_RUN_ID, f"{wire.REASON_RUN_ID}: {detail}", round_)
        if local_epochs < 1 or rounds < 1 or round_ < 1 or not run_id:
            detail = f"run id {run_id!r}, round {round_} of {rounds}, {local_epochs} local epochs: each must be at least 1"
            return self._refuse(weights, metrics, wire.REASON_BAD_REQUEST, f"{wire.REASON_BAD_REQUEST}: {detail}", round_)
        pc = self.cfg.privacy
        request = RoundRequest(
            private=pc.enabled,
            epsilon=pc.epsilon if pc.enabled and pc.noise_multiplier is None else None,
            delta=pc.delta,
            secagg=secagg,
            peers=peers,
        )
        try:
            check_request(self.policy, request)
        except PolicyRefusal as exc:
            return self._refuse(weights, metrics, exc.reason, str(exc), round_)
        mech: Mechanism | None = None
        if pc.enabled:
            # one plan-and-charge at a time per ledger: the run's prior sessions, the per-run
            # check and the charge must see the same ledger (the lifetime check is also inside
            # the ledger's own write transaction)
            with _ledger_lock(self.ledger_path), PrivacyLedger(self.ledger_path) as ledger:
                ledger.verify()
                self._apply_budget(ledger)
                prior = [x.mechanism.history_entry() for x in ledger.sessions(self.dataset) if x.run_id == run_id]
                try:
                    left = rounds - round_ + 1
                    if left < 1:
                        raise BudgetExhaustedError(f"budget exhausted: round {round_} is past the run's {rounds} planned rounds")
                    try:
                        mech = self.mechanism(rounds=left, local_epochs=local_epochs, prior=prior)
                    except ValueError as exc:  # the run's own epsilon is spent (e.g. rounds repeated)
                        raise BudgetExhaustedError(f"budget exhausted for this run: {exc}") from None
                    # the whole run as planned now (its rounds so far and the ones left at this noise)
                    planned = compute_epsilon(
                        [*prior, (mech.noise_multiplier, mech.sample_rate, left * mech.steps)],
                        delta=mech.delta, accountant=mech.accountant,
                    )
                    check_run_epsilon(self.policy, planned)
                    session = ledger.charge(self.dataset, mech, run_id=run_id, round=round_, examples=self.examples)
                except PolicyRefusal as exc:
                    return self._refuse(weights, metrics, exc.reason, str(exc), round_)
                except BudgetExhaustedError as exc:
                    spend = ledger.spend(self.dataset)
                    metrics.update(self._spend_metrics(spend.epsilon, spend.delta, spend.accountant, spend.budget, spend.remaining))
                    return self._refuse(weights, metrics, wire.REASON_BUDGET, str(exc), round_)
                budget = ledger.budget(self.dataset)
                # the signed receipt of this charge travels with the reply; the server keeps it,
                # so a ledger later rolled back behind it is caught (fedface privacy verify)
                receipt = issue_receipt(ledger, session, self._receipt_key())
            run_epsilon = compute_epsilon([*prior, mech.history_entry()], delta=mech.delta, accountant=mech.accountant)
            # the charge already composed the whole history: no second composition for the reply
            remaining = max(0.0, budget.epsilon - session.epsilon_after) if budget is not None else None
            metrics.update(
                self._spend_metrics(session.epsilon_after, session.epsilon_delta, session.epsilon_accountant, budget, remaining)
            )
            metrics.update(
                {
                    wire.M_RUN_EPSILON: run_epsilon,
                    wire.M_RECEIPT: receipt.to_json(),
                    wire.M_NOISE: mech.noise_multiplier,
                    wire.M_SAMPLE_RATE: mech.sample_rate,
                    wire.M_STEPS: mech.steps,
                    wire.M_CLIP: mech.max_grad_norm,
                }
            )
        else:
            logger.warning("site %s trains round %d without DP-SGD: its policy allows non-private rounds", self.name, round_)

        torch.manual_seed(self.cfg.training.seed + round_)
        encoder = build_encoder(self.cfg.model, image_size=self.cfg.data.image_size)
        head = self._head()
        shared_head = head if self.task == "expression" else None
        load_shared_weights(encoder, shared_head, weights)
        head = head.to(self.device)
        encoder = encoder.to(self.device)
        global_params = [p.detach().clone() for p in encoder.parameters()]
        if shared_head is not None:
            global_params += [p.detach().clone() for p in head.parameters()]
        trained: nn.Module = (
            to_per_sample(encoder, frozen_stem_precision=self.cfg.training.precision) if mech is not None else encoder
        )
        freeze_for(self.cfg.privacy.trainable, trained)  # fine-tuning: the parts kept fixed get no update
        base = torch.optim.AdamW(
            [p for p in list(trained.parameters()) + list(head.parameters()) if p.requires_grad],
            lr=lr,
            weight_decay=self.cfg.training.weight_decay,
        )
        if proximal_mu > 0:
            # the shared expression head is averaged like the encoder: it is held near the global one too
            shared = list(trained.parameters()) + (list(head.parameters()) if shared_head is not None else [])
            pairs = [(p, g) for p, g in zip(shared, global_params, strict=True) if p.requires_grad]

            def proximal(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
                # FedProx: mu * (w - w_global), added after any DP noise (it uses no data)
                with torch.no_grad():
                    for p, g in pairs:
                        if p.grad is not None:
                            p.grad.add_(p - g, alpha=proximal_mu)

            base.register_step_pre_hook(proximal)
        images = to_tensor(self.faces.images).to(self.device)
        labels = torch.from_numpy(self.labels).to(self.device)
        aug = AugmentConfig(**dict(self.cfg.augment))
        generator = torch.Generator().manual_seed(secure_seed() if mech is not None else self.cfg.training.seed + round_)
        losses = []
        if mech is not None:
            noise_gen = torch.Generator(device=self.device).manual_seed(secure_seed())
            dp_opt = make_dp_optimizer(
                base,
                noise_multiplier=mech.noise_multiplier,
                max_grad_norm=mech.max_grad_norm,
                expected_batch_size=min(self.cfg.training.batch_size, self.examples),
                secure_mode=mech.secure_mode,
                generator=noise_gen,
            )
            per_epoch = mech.steps // local_epochs
            for epoch in range(local_epochs):
                stats = train_epoch_dp(
                    encoder=trained, head=head, images=images, labels=labels, optimizer=dp_opt,
                    batches=poisson_batches(len(images), mech.sample_rate, per_epoch, generator=generator, secure=mech.secure_mode),
                    augment_cfg=aug, generator=generator, epoch=epoch + 1,
                    label_smoothing=self.cfg.training.label_smoothing,
                    augment_multiplicity=self.cfg.privacy.augment_multiplicity,
                )
                losses.append(stats.loss)
            encoder.load_state_dict(trained.state_dict())
        else:
            for epoch in range(local_epochs):
                stats = train_epoch(
                    encoder=encoder, head=head, images=images, labels=labels, optimizer=base,
                    batches=shuffled_batches(len(images), self.cfg.training.batch_size, generator),
                    augment_cfg=aug, generator=generator, device=self.device, epoch=epoch + 1,
                    label_smoothing=self.cfg.training.label_smoothing, precision=self.cfg.training.precision,
                )
                losses.append(stats.loss)
        if self.task != "expression":
            self._save_head(head)
        # the loss stays here: it is computed from the private images without noise (common/wire.py)
        logger.info("site %s round %d: mean training loss %.4f", self.name, round_, float(np.mean(losses)))
        metrics.update({wire.M_STATUS: wire.ANSWERED, wire.M_TRAIN_S: time.perf_counter() - t0})
        return RoundResult(weights=shared_weights(encoder, shared_head), examples=self.examples, metrics=metrics)

    def policy_json(self) -> str:
        """The site's policy as it enforces it (:data:`~fedface.common.wire.POLICY_FIELDS`), sent
        with every reply so that the server's console shows what each site accepts."""
        values = self.policy.model_dump(by_alias=True)
        return json.dumps({key: values[key] for key in wire.POLICY_FIELDS}, sort_keys=True)

    def _refuse(self, weights: list[np.ndarray], metrics: dict[str, Any], reason: str, detail: str, round_: int) -> RoundResult:
        """A refusal: nothing trained or charged; the weights go back unchanged with weight 0."""
        logger.warning("site %s refuses round %d: %s", self.name, round_, detail)
        metrics.update({wire.M_STATUS: wire.REFUSED, wire.M_REASON: reason, wire.M_TRAIN_S: 0.0})
        return RoundResult(weights=weights, examples=0, metrics=metrics)

    def _receipt_key(self) -> ReceiptKey:
        """The site's receipt key, beside its ledger (created with the first receipt)."""
        if self._key is None:
            self._key = receipt_key(self.ledger_path.parent)
        return self._key

    def _apply_budget(self, ledger: PrivacyLedger) -> None:
        """Record the policy's lifetime budget in the ledger when the ledger has none or a
        larger one (the site enforces the smaller of the two; a budget set in the ledger by
        `fedface privacy budget` stays when it is the smaller)."""
        cap = self.policy.budget_epsilon
        if cap is None:
            return
        current = ledger.budget(self.dataset)
        if current is None or current.epsilon > cap or current.delta > self.policy.delta:
            # never raise a smaller budget: the same epsilon at a smaller delta is at least as strict
            epsilon = cap if current is None else min(cap, current.epsilon)
            ledger.set_budget(self.dataset, epsilon=epsilon, delta=self.policy.delta, accountant=self.policy.accountant)

    @staticmethod
    def _spend_metrics(epsilon: float, delta: float | None, accountant: str, budget: Any, remaining: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {wire.M_EPSILON: float(epsilon), wire.M_ACCOUNTANT: accountant}
        if delta is not None:
            out[wire.M_DELTA] = float(delta)
        if budget is not None:
            out[wire.M_BUDGET] = float(budget.epsilon)
        if remaining is not None:
            out[wire.M_REMAINING] = float(remaining)
        return out


@contextmanager
def _ledger_lock(ledger_path: Path) -> Iterator[None]:
    """An exclusive lock on ``<ledger>.lock`` (``fcntl.flock``) while a round is planned and
    charged, so that two requests to one site cannot both plan from the same prior sessions."""
    lock = ledger_path.with_name(ledger_path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["RoundResult", "Site"]
