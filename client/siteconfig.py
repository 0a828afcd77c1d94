"""A deployed site's own configuration (`fedface site join --config site.toml`, and the template commands).

It names the site, its own face directory and its state directory, and holds the site's
**privacy policy** (``[policy]``, :class:`~fedface.common.config.SitePolicyConfig`), which the
site enforces before it trains or charges anything: the server may ask for less privacy loss,
never more (:mod:`fedface.client.policy`). The state directory keeps the privacy ledger across
every run the site joins, and each run's margin head under ``runs/<run-id>/``. Everything else
(the model, the training recipe, how much privacy the run asks for) comes from the run's
scenario, which the server sends. The file stays at the site.

```toml
name = "hospital-a"
data = "/data/faces"                 # ImageFolder, ORL, Yale or Extended Yale B layout
state-dir = "/var/lib/fedface"       # ledger.sqlite and runs/<run-id>/head.pt
trusted-publishers = ["publisher.pub"]  # run only apps these publisher keys signed (docs/deployment.md)

[policy]
budget-epsilon = 10.0                # required: the lifetime budget over every run (at delta)
delta = 1e-5                         # the largest delta the site accepts
epsilon-per-run = 8.0                # optional: the most one run may spend
require-secagg = true                # default: updates leave only through SecAgg+
min-peers = 3                        # default: fewest sites (this one included) in a masked sum
allow-non-private = false            # default: never train without DP-SGD

[templates]                          # optional: the encrypted gallery (`fedface site enroll` ...)
gallery = "https://gallery.example.org:8443"  # `fedface gallery serve`
root-certificates = "ca.pem"         # the CA of the gallery's TLS certificate
signing-key = "keys/hospital-a.key"  # `fedface keys site --name hospital-a` (register its .pub)
public-keys = "templates.pub"        # the key holder's public keys (`fedface site fetch-keys`)
encoder = "runs/fed"                 # the federation's encoder: a checkpoint or run directory
wire-log = "wire.jsonl"              # optional: every envelope sent, by header and sizes
```

Paths are relative to the config file. The config holds key *paths*, never key material.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedface.common.config import SitePolicyConfig, format_validation_error
from fedface.common.errors import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class TemplatesConfig(BaseModel):
    """The ``[templates]`` table: where a site's encrypted templates go, and with which keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=_kebab, populate_by_name=True)

    gallery: str = Field(pattern=r"^https?://[^\s/]+", description="the gallery server's URL (https://HOST:PORT)")
    root_certificates: Path | None = Field(default=None, description="the CA of the gallery's TLS certificate (required for https)")
    signing_key: Path = Field(description="the site's Ed25519 template signing key (`fedface keys site`)")
    public_keys: Path = Field(description="templates.pub: the key holder's public template keys")
    encoder: Path = Field(description="the federation's encoder: a checkpoint or run directory")
    wire_log: Path | None = Field(default=None, description="append every envelope sent to this JSON-lines file")

    def resolved(self, base: Path) -> TemplatesConfig:
        """Relative paths made relative to ``base`` (the config file's directory)."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        return self.model_copy(update={name: fix(getattr(self, name)) for name in
                                       ("root_certificates", "signing_key", "public_keys", "encoder", "wire_log")})


class SiteConfig(BaseModel):
    """A site's name, data and state, and its privacy policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=_kebab, populate_by_name=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="the site's name (its data set in the ledger)")
    data: Path = Field(description="the site's own face directory")
    layout: str = "auto"
    state_dir: Path = Field(description="ledger and heads; keep it, and back it up")
    policy: SitePolicyConfig = Field(description="the site's privacy policy; budget-epsilon is required")
    trusted_publishers: tuple[Path, ...] = Field(default=(), description="publisher public keys (.pub): the site runs only apps they signed")
    templates: TemplatesConfig | None = Field(default=None, description="the encrypted gallery: URL, CA, keys, encoder")

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger (all runs)."""
        return self.state_dir / "ledger.sqlite"

    @classmethod
    def from_toml(cls, path: str | Path) -> SiteConfig:
        """Read a site config; ConfigError naming the file and every problem."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"site config {p} not found: pass the path of the site's TOML file")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"site config {p} is not valid TOML: {exc}") from None
        if "budget-epsilon" in raw:
            raise ConfigError(f"site config {p}: budget-epsilon now lives in the [policy] table; move it there")
        if not isinstance(raw.get("policy"), dict) or raw["policy"].get("budget-epsilon") is None:
            raise ConfigError(
                f"site config {p} sets no lifetime privacy budget: a deployed site must set budget-epsilon in its "
                "[policy] table (e.g. budget-epsilon = 10.0)"
            )
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(p))) from None
        base = p.resolve().parent  # relative paths are relative to the config file
        return cfg.model_copy(
            update={
                "data": cfg.data if cfg.data.is_absolute() else base / cfg.data,
                "state_dir": cfg.state_dir if cfg.state_dir.is_absolute() else base / cfg.state_dir,
                "trusted_publishers": tuple(k if k.is_absolute() else base / k for k in cfg.trusted_publishers),
                "templates": cfg.templates.resolved(base) if cfg.templates is not None else None,
            }
        )

    def require_templates(self, source: str | Path) -> TemplatesConfig:
        """The ``[templates]`` table; ConfigError naming what to add if the config (``source``) has none."""
        if self.templates is None:
            raise ConfigError(
                f"site config {source} has no [templates] table: add one with gallery, root-certificates, signing-key, "
                "public-keys and encoder (paths relative to the config file; see `fedface site enroll --help`)"
            )
        return self.templates


__all__ = ["SiteConfig", "TemplatesConfig"]
