"""The site side as a Flower ``ClientApp``: a thin handler around :class:`fedface.client.site.Site`.

Imports of torch, Opacus and the models are deferred to the handlers that train: in a
deployment Flower starts a fresh ClientApp process per message, and three of SecAgg+'s four
messages per round (key set-up, share exchange, unmasking) are answered by the mod without
training, so they need neither (about 2 s of imports each on a small CPU).

Flower's compatibility API (``NumPyClient`` + ``ClientApp(client_fn, mods)``) is used because
SecAgg+ (``secaggplus_mod``) exists only there in Flower 1.42. The mod masks the site's
weighted encoder update; the reply metrics (status, examples, privacy spend) travel in the
clear, the margin head never travels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common import Context, Message, MessageType

from fedface.client.trust import trusted_app_mod
from fedface.common import wire
from fedface.common.federated import scenario_from_run_config

if TYPE_CHECKING:
    from fedface.client.site import Site
    from fedface.common.config import TrainConfig


class SiteClient(NumPyClient):
    """One site answering Flower's fit requests."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Freshly initialised encoder weights (the server normally sends its own)."""
        from fedface.common.models import build_encoder, encoder_weights

        cfg = self.site.cfg
        return encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train one round; a refusal answers the weights unchanged with 0 examples."""
        result = self.site.train_round(
            parameters,
            run_id=str(config[wire.CFG_RUN_ID]),
            round_=int(config[wire.CFG_ROUND]),
            rounds=int(config[wire.CFG_ROUNDS]),
            local_epochs=int(config[wire.CFG_LOCAL_EPOCHS]),
            lr=float(config[wire.CFG_LR]),
            proximal_mu=float(config.get(wire.CFG_PROXIMAL_MU, 0.0)),
        )
        return result.weights, result.examples, result.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Not used: the server evaluates on held-out identities; a site evaluates nothing."""
        return 0.0, 0, {}


def _route_secagg(msg: Message, ctxt: Context, call_next: Any, required: Callable[[], bool]) -> Message:
    if msg.metadata.message_type == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        if required():
            raise RuntimeError("this run's scenario requires SecAgg+, but the training request came without it")
    return call_next(msg, ctxt)


def secagg_mod(*, required: bool) -> Callable[[Message, Context, Any], Message]:
    """A mod running SecAgg+ for the training messages that carry its protocol; with
    ``required``, a training request without it is refused (the site never sends a clear
    update its scenario promised to mask)."""

    def mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        return _route_secagg(msg, ctxt, call_next, lambda: required)

    return mod


def secagg_policy_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """:func:`secagg_mod` for ``flwr run`` nodes: SecAgg+ is required when the run's scenario
    (its run config) says so."""
    return _route_secagg(msg, ctxt, call_next, lambda: scenario_from_run_config(ctxt.run_config).federation.secagg)


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
        overrides: dict[str, Any] = {"privacy.dataset": sc.name}
        if sc.budget_epsilon is not None:
            overrides.update({"privacy.budget-epsilon": sc.budget_epsilon})
        cfg = cfg.with_overrides(overrides)
        faces = load_faces(sc.data, layout=sc.layout, size=cfg.data.image_size, on_error=cfg.data.on_error)
        return Site(sc.name, cfg, faces, sc.state_dir / "runs" / str(context.run_id), sc.ledger)
    run_dir = Path(str(context.run_config.get("run-dir") or "runs/flwr-run")).resolve()
    return partition_site(cfg, json.dumps(cfg.to_toml_dict(), sort_keys=True), int(context.node_config["partition-id"]), run_dir / "sites")


def partition_site(cfg: TrainConfig, cfg_json: str, pid: int, sites_dir: Path) -> Site:
    """Site number ``pid`` of a federation on shared data (a simulation, a test federation):
    its faces are its share of the scenario's partition (``cfg_json``, computed once per
    process), its head and ledger live under ``<sites_dir>/<site>/``."""
    from fedface.client.site import Site
    from fedface.common.federated import cached_federation_data, site_name

    name = site_name(pid)
    return Site(name, cfg, cached_federation_data(cfg_json).site_faces(pid), sites_dir / name, sites_dir / name / "ledger.sqlite")


#: The ClientApp of ``flwr run`` (``[tool.flwr.app.components]`` in pyproject.toml). A deployed
#: site first checks that a publisher it trusts signed the run (:mod:`fedface.client.trust`).
app = ClientApp(client_fn=lambda context: SiteClient(_site_for_flwr_run(context)).to_client(), mods=[trusted_app_mod, secagg_policy_mod])

__all__ = ["SiteClient", "app", "partition_site", "secagg_mod", "secagg_policy_mod"]
