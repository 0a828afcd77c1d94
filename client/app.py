"""The site side as a Flower ``ClientApp``: a thin handler around :class:`fedface.client.site.Site`.

Imports of torch, Opacus and the models are deferred to the handlers that train: in a
deployment Flower starts a fresh ClientApp process per message, and three of SecAgg+'s four
messages per round (key set-up, share exchange, unmasking) are answered by the mod without
training, so they need neither (about 2 s of imports each on a small CPU).

Flower's compatibility API (``NumPyClient`` + ``ClientApp(client_fn, mods)``) is used because
SecAgg+ (``secaggplus_mod``) exists only there in Flower 1.42. The site's mod
(:func:`site_mod`) runs SecAgg+ for the requests that carry it and tells the site, in keys the
server cannot set (``wire.LOCAL_*``), whether the training request came through SecAgg+ and
how many sites' masks are tied to its update; the site's policy decides from that
(:mod:`fedface.client.policy`). SecAgg+ masks the site's weighted encoder update; the reply
metrics in ``wire.CLEAR_REPLY_KEYS`` travel in the clear, the margin head never travels.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common import ConfigRecord, Context, Message, MessageType

from fedface.client.trust import trusted_app_mod
from fedface.common import wire
from fedface.common.crypto import masks
from fedface.common.federated import scenario_from_run_config
from fedface.common.signing import UntrustedAppError

flower_secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")  # the module: its package exports a same-named object

logger = logging.getLogger(__name__)

# Flower's SecAgg+ mod expands its masks with ChaCha20 keyed by the whole agreed key, not with
# its own 32-bit-seeded Mersenne Twister (fedface.common.crypto.masks; docs/threat-model.md).
masks.install(flower_secaggplus)

if TYPE_CHECKING:
    from fedface.client.site import Site
    from fedface.common.config import TrainConfig


class SiteClient(NumPyClient):
    """One site answering Flower's fit requests."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Freshly initialised shared weights (the server normally sends its own)."""
        from fedface.common.models import build_encoder, shared_weights

        cfg = self.site.cfg
        head = self.site._head() if self.site.task == "expression" else None
        return shared_weights(build_encoder(cfg.model, image_size=cfg.data.image_size), head)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train one round; a refusal answers the weights unchanged with 0 examples.

        Through SecAgg+ the site sends its update, its weights less the round's (zeros when it
        refuses), not the weights themselves: SecAgg+ clips every value it masks to its
        clipping range (+-8) after weighting it by ``examples / max_weight``, which would cut
        the weights of a site with more than 1,000 images (a FER2013 site has 2,591) at +-3.1
        (the packaged models' stay within +-1.3; other models' need not); an update stays far
        inside. The server adds the average update to the
        weights it sent (:mod:`fedface.server.app`).
        """
        secagg = bool(config.get(wire.LOCAL_SECAGG, False))  # set by site_mod from what it saw
        result = self.site.train_round(
            parameters,
            run_id=str(config[wire.CFG_RUN_ID]),
            round_=int(config[wire.CFG_ROUND]),
            rounds=int(config[wire.CFG_ROUNDS]),
            local_epochs=int(config[wire.CFG_LOCAL_EPOCHS]),
            lr=float(config[wire.CFG_LR]),
            proximal_mu=float(config.get(wire.CFG_PROXIMAL_MU, 0.0)),
            # set by site_mod from what it saw, never by the server (it drops such keys first)
            secagg=secagg,
            peers=int(config[wire.LOCAL_PEERS]) if wire.LOCAL_PEERS in config else None,
            pinned_run_id=str(config[wire.LOCAL_RUN_ID]) if wire.LOCAL_RUN_ID in config else None,
        )
        if not all(np.isfinite(w).all() for w in result.weights):
            # never sent: under SecAgg+ one NaN would spoil the whole sum (the server then refuses
            # it), in the clear it would be dropped; failing here leaves the round to the others
            raise DivergedUpdateError(
                "the site's trained weights hold NaN or infinity (training diverged): not sent; lower training.lr"
            )
        if secagg:
            return wire.update_of(result.weights, parameters), result.examples, result.metrics
        return result.weights, result.examples, result.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Not used: the server evaluates on held-out identities; a site evaluates nothing."""
        return 0.0, 0, {}


FIT_CONFIG = "fitins.config"  # where Flower's compatibility layer keeps a FitIns' config
SITE_STATE = "fedface.site"  # this node's own record in the Flower run's Context.state


class DivergedUpdateError(Exception):
    """The site's training ended with NaN or infinite weights: nothing is sent."""


class SecAggRequestError(Exception):
    """A SecAgg+ request this site refuses: a set-up that does not ask for fedface's mask
    scheme, or a masked-vector request whose key-share list does not match this site's key
    agreement."""


def _check_mask_scheme(configs: ConfigRecord) -> None:
    """Take the mask scheme the server names out of SecAgg+'s set-up configs (Flower's mod
    does not know the key); refuse a server that names none or another: its masks would not
    cancel with this site's, and a server that masks with Flower's own generator offers each
    mask only 32 bits of seed."""
    asked = configs.pop(masks.MASK_SCHEME_KEY, None)
    if asked != masks.MASK_SCHEME:
        found = f"asks for {asked!r}" if asked is not None else "names no mask scheme (a plain Flower SecAgg+ server)"
        raise SecAggRequestError(
            f"the server's SecAgg+ set-up {found}; this site masks only with {masks.MASK_SCHEME!r}: "
            "run the coordinator with fedface's ServerApp of the same version"
        )


def _mark_request(msg: Message, ctxt: Context, *, secagg: bool, peers: int | None) -> None:
    """Write what this site saw of a training request into its fit config, after dropping any
    ``wire.LOCAL_*`` key the server may have put there: how it came, with how many peers, and
    the first fedface run id this Flower run used at this site (the site refuses another)."""
    config = msg.content.config_records.get(FIT_CONFIG)
    if config is None:
        return
    for key in [k for k in config if k.startswith(wire.LOCAL_PREFIX)]:
        del config[key]
    config[wire.LOCAL_SECAGG] = secagg
    if peers is not None:
        config[wire.LOCAL_PEERS] = peers
    if wire.CFG_RUN_ID in config:
        if SITE_STATE not in ctxt.state.config_records:
            ctxt.state.config_records[SITE_STATE] = ConfigRecord({"run-id": str(config[wire.CFG_RUN_ID])})
        config[wire.LOCAL_RUN_ID] = str(ctxt.state.config_records[SITE_STATE]["run-id"])


def _secagg_peers(msg: Message, ctxt: Context) -> int:
    """The sites whose pairwise masks SecAgg+ will add to this site's update, itself included.

    Counted from the masked-vector request's key shares, but only after checking them against
    the key agreement this site made at the share-keys stage (kept in Flower's SecAgg+ state):
    each source once, one ciphertext each, every source a neighbour this site shares a key
    with. Flower's mod trains (and so charges) before it decrypts the shares; a request that
    fails here is refused before either (:class:`SecAggRequestError`).
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    sources = [int(x) for x in (configs.get(Key.SOURCE_LIST) or [])]  # type: ignore[union-attr]
    ciphertexts = list(configs.get(Key.CIPHERTEXT_LIST) or [])  # type: ignore[arg-type]
    state = ctxt.state.config_records.get(RECORD_KEY_STATE)
    agreed = {int(x) for x in (state.get("ss2_dict:K") or [])} if state is not None else set()  # type: ignore[union-attr]
    if len(set(sources)) != len(sources) or len(sources) != len(ciphertexts) or not set(sources) <= agreed:
        raise SecAggRequestError(
            f"the masked-vector request lists key shares from {sorted(sources)} ({len(ciphertexts)} ciphertexts), "
            f"but this site agreed keys with {sorted(agreed)} only: refused before training"
        )
    return len(sources) + 1


def site_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """The site's mod: SecAgg+ (Flower's ``secaggplus_mod``) for the training messages that
    carry its protocol, plain training requests passed on as such; either way the site learns
    how the request came (its policy refuses clear requests when it requires SecAgg+, and
    masked ones with fewer peers than ``min-peers``).

    The peers are counted at SecAgg+'s masked-vector stage: the sites whose encrypted key
    shares reached this site (their pairwise masks are added to its update) and itself,
    checked against the keys this site agreed (:func:`_secagg_peers`). At set-up the server
    must name fedface's mask scheme, and the reply names it back (:func:`_check_mask_scheme`).
    Flower's mod checks the stage order against the state it keeps, so a server cannot skip the
    key exchange. A server
    that makes up neighbours of its own (Sybil keys) is not caught here: docs/threat-model.md.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        if stage == Stage.SETUP:
            _check_mask_scheme(configs)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            _mark_request(msg, ctxt, secagg=True, peers=_secagg_peers(msg, ctxt))
        reply = secaggplus_mod(msg, ctxt, call_next)
        if stage == Stage.SETUP and not reply.has_error():
            # tell the server which masks this site will add (it drops a site that does not say)
            reply.content.config_records[RECORD_KEY_CONFIGS][masks.MASK_SCHEME_KEY] = masks.MASK_SCHEME
        return reply
    _mark_request(msg, ctxt, secagg=False, peers=None)
    return call_next(msg, ctxt)


class SiteFailure(Exception):
    """What the server is told when the site's ClientApp fails: the error's kind, not its text."""


#: Errors whose text the server may see (they say nothing about the site's data).
PUBLIC_ERRORS: tuple[type[Exception], ...] = (UntrustedAppError, SecAggRequestError, DivergedUpdateError)


def private_errors_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """The outermost mod: an exception inside the ClientApp reaches the server (Flower sends
    its text in the error reply, in the clear) only as its kind, e.g. ``CorruptImageError``,
    whose message would name an image file (in an ImageFolder layout, a person's name). The
    full error goes to the site's own log."""
    try:
        return call_next(msg, ctxt)
    except PUBLIC_ERRORS:
        raise
    except Exception as exc:
        logger.exception("the site's ClientApp failed on a %s message", msg.metadata.message_type)
        raise SiteFailure(f"the site failed ({type(exc).__name__}); its operator finds the details in the site's log") from None


def _site_for_flwr_run(context: Context) -> Site:
    """The site of a ``flwr run`` node.

    A deployed site names its own configuration (node config ``site-config``: its name, its
    own faces, its state directory and budget; :class:`~fedface.client.siteconfig.SiteConfig`);
    a test federation on shared data names its ``partition-id`` of the scenario's data set.
    """
    import torch

    from fedface.client.site import Site

    torch.set_num_threads(1)
    cfg = scenario_from_run_config(context.run_config)
    site_config = str(context.node_config.get("site-config") or "")
    if site_config:
        from fedface.client.siteconfig import SiteConfig
        from fedface.common.data import load_faces

        sc = SiteConfig.from_toml(site_config)
        # the site's own data set name and policy; the scenario's [site-policy] is the server's
        # word and is ignored here
        cfg = cfg.with_overrides({"privacy.dataset": sc.name})
        faces = load_faces(sc.data, layout=sc.layout, size=cfg.data.image_size, on_error=cfg.data.on_error, crop=cfg.data.crop)
        return Site(sc.name, cfg, faces, sc.state_dir / "runs" / str(context.run_id), sc.ledger, policy=sc.policy)
    run_dir = Path(str(context.run_config.get("run-dir") or "runs/flwr-run")).resolve()
    return partition_site(cfg, json.dumps(cfg.to_toml_dict(), sort_keys=True), int(context.node_config["partition-id"]), run_dir / "sites")


def partition_site(cfg: TrainConfig, cfg_json: str, pid: int, sites_dir: Path, *, ledgers_dir: Path | None = None) -> Site:
    """Site number ``pid`` of a federation on shared data (a simulation, a test federation):
    its faces are its share of the scenario's partition (``cfg_json``, computed once per
    process), its head lives under ``<sites_dir>/<site>/``, its ledger and receipt key under
    ``<ledgers_dir>/<site>/`` (default: beside the head), and its policy is the scenario's
    ``[site-policy]``."""
    from fedface.client.site import Site
    from fedface.common.federated import cached_federation_data, site_name

    name = site_name(pid)
    ledger = (ledgers_dir if ledgers_dir is not None else sites_dir) / name / "ledger.sqlite"
    return Site(name, cfg, cached_federation_data(cfg_json).site_faces(pid), sites_dir / name, ledger)


#: The ClientApp of ``flwr run`` (``[tool.flwr.app.components]`` in pyproject.toml). A deployed
#: site first checks that a publisher it trusts signed the run (:mod:`fedface.client.trust`).
app = ClientApp(
    client_fn=lambda context: SiteClient(_site_for_flwr_run(context)).to_client(), mods=[private_errors_mod, trusted_app_mod, site_mod]
)

__all__ = [
    "FIT_CONFIG",
    "PUBLIC_ERRORS",
    "SITE_STATE",
    "DivergedUpdateError",
    "SecAggRequestError",
    "SiteClient",
    "SiteFailure",
    "app",
    "partition_site",
    "private_errors_mod",
    "site_mod",
]
