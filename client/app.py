"""The site side as a Flower ``ClientApp``: a thin handler around :class:`fedface.client.site.Site`.

Flower's compatibility API (``NumPyClient`` + ``ClientApp(client_fn, mods)``) is used because
SecAgg+ (``secaggplus_mod``) exists only there in Flower 1.42. The mod masks the site's
weighted encoder update; the reply metrics (status, examples, privacy spend) travel in the
clear, the margin head never travels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from fedface.client.site import Site, encoder_weights
from fedface.common import wire
from fedface.common.models import build_encoder

SiteFactory = Callable[[Context], Site]


class SiteClient(NumPyClient):
    """One site answering Flower's fit requests."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Freshly initialised encoder weights (the server normally sends its own)."""
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


def make_client_app(site_factory: SiteFactory, *, secagg: bool) -> ClientApp:
    """A ClientApp whose node gets its :class:`Site` from ``site_factory(context)``."""

    def client_fn(context: Context) -> Any:
        return SiteClient(site_factory(context)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


__all__ = ["SiteClient", "make_client_app"]
