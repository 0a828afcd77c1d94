"""A deployed site runs only what a publisher it trusts signed: the ClientApp's half of the check.

The SuperNode of `fedface site join` verifies the app's FAB itself before it installs or loads any
of it (``flower-supernode --trusted-entities``, made from the site's ``trusted-publishers``).
What the FAB's signature does not cover is the run config: a SuperLink may override any
config value when it starts a run (the scenario's text included). :func:`trusted_app_mod` runs
before everything else in the ClientApp, on every message (training, SecAgg+'s stages), and
refuses the message unless the run config is exactly what a trusted publisher signed
(:func:`fedface.common.signing.verify_run_config`): nothing is loaded, charged or trained.

A node without a site config (a test federation on shared data) and a site that trusts no
publisher (`fedface site join --insecure`, a local demo) are not checked.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.common import Context, Message

logger = logging.getLogger(__name__)


def trusted_app_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Pass ``msg`` on only if its run config carries a valid signature by one of the site's
    trusted publishers; otherwise raise :class:`~fedface.common.signing.UntrustedAppError`
    (Flower answers the server with the error)."""
    site_config = str(ctxt.node_config.get("site-config") or "")
    if site_config:
        from fedface.client.siteconfig import SiteConfig
        from fedface.common.signing import UntrustedAppError, load_public_key, verify_run_config

        sc = SiteConfig.from_toml(site_config)
        if sc.trusted_publishers:
            try:
                verify_run_config(ctxt.run_config, [load_public_key(p) for p in sc.trusted_publishers])
            except UntrustedAppError as exc:
                logger.warning("site %s refuses run %s: %s", sc.name, ctxt.run_id, exc)
                raise
    return call_next(msg, ctxt)


__all__ = ["trusted_app_mod"]
