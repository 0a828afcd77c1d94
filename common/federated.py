"""The data side of a federation, derived the same way wherever it is needed.

The server (held-out people for its evaluation), every site (its own people) and the
simulation runner must agree on who is where without exchanging any image: they derive it from
the scenario (data root, seeds, sizes) with :func:`federation_data`, which is deterministic.
In a real deployment each site holds only its own directory and this is used by simulations
alone.
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedface.common.config import TrainConfig
from fedface.common.errors import ConfigError

if TYPE_CHECKING:  # the data side imports torch; the run-config helpers below must stay light
    from fedface.common.data import FaceSet, SitePartition, Split


@dataclass(frozen=True)
class FederationData:
    """All faces of a simulated federation, who is held out, and which site holds what."""

    faces: FaceSet
    split: Split
    train: FaceSet  # the sites' people
    test: FaceSet  # held out for the server's evaluation
    partition: SitePartition  # indices into ``train``

    def site_faces(self, site: int) -> FaceSet:
        """The training faces of site number ``site`` (0-based)."""
        return self.train.subset(self.partition.sites[site])


def site_name(index: int) -> str:
    """The name of simulated site number ``index``: ``site-000``, ``site-001``, ..."""
    return f"site-{index:03d}"


def federation_data(cfg: TrainConfig, faces: FaceSet | None = None) -> FederationData:
    """Split off the people the server evaluates on and partition the rest into sites.

    The held-out people are ``federation.test-identities`` seeded identities, or, when the
    scenario splits by folds (``split.folds``), fold ``split.fold`` of them: FER2013's fixed
    validation part, the same images a centralized run of the expression recipe is measured
    on. An expression scenario keeps the images of the shared expression classes only.
    """
    from fedface.common.data import load_faces, partition_sites, split_open_set, split_open_set_folds
    from fedface.common.data.expressions import expression_classes, expression_labels

    fc = cfg.federation
    if faces is None:
        faces = load_faces(cfg.data.root, layout=cfg.data.layout, size=cfg.data.image_size, on_error=cfg.data.on_error, crop=cfg.data.crop)
    if cfg.training.task == "expression":
        faces, _ = expression_labels(faces, expression_classes(faces))
    if cfg.split.folds:
        split = split_open_set_folds(faces, folds=cfg.split.folds, seed=cfg.split.seed)[cfg.split.fold]
    else:
        split = split_open_set(faces, test_identities=fc.test_identities, seed=cfg.split.seed)
    train, test = faces.subset(split.train), faces.subset(split.test)
    partition = partition_sites(
        train, sites=fc.sites, identities_per_site=fc.identities_per_site, skew=fc.skew, recurring=fc.recurring, seed=fc.seed
    )
    return FederationData(faces=faces, split=split, train=train, test=test, partition=partition)


@functools.lru_cache(maxsize=4)
def cached_federation_data(cfg_json: str) -> FederationData:
    """:func:`federation_data` of a config given as JSON, computed once per process (each site
    of a simulation otherwise reloads and repartitions the faces every round)."""
    return federation_data(TrainConfig.from_mapping(json.loads(cfg_json)))


def scenario_from_run_config(run_config: dict[str, Any]) -> TrainConfig:
    """The scenario of a Flower run (``flwr run``): ``scenario-toml`` (the scenario's text, as
    `fedface server run` sends it: every site parses the same text) or ``scenario`` (a TOML
    path on each machine; empty: the defaults), with ``data``, ``sites``, ``rounds``,
    ``epsilon`` and ``secagg`` overrides."""
    text = str(run_config.get("scenario-toml") or "")
    path = run_config.get("scenario") or ""
    if text:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the run's scenario-toml is not valid TOML: {exc}") from None
        cfg = TrainConfig.from_mapping(raw, source="run config scenario-toml")
    else:
        cfg = TrainConfig.from_toml(Path(str(path))) if path else TrainConfig()
    overrides: dict[str, Any] = {}
    for key, dotted in (("sites", "federation.sites"), ("rounds", "federation.rounds"), ("secagg", "federation.secagg"), ("data", "data.root")):
        if key in run_config and run_config[key] not in ("", 0):  # "" and 0: keep the scenario's
            overrides[dotted] = run_config[key]
    eps = run_config.get("epsilon")
    if eps not in (None, "", 0, 0.0):
        overrides["privacy.epsilon"] = float(eps)
    return cfg.with_overrides(overrides)


__all__ = ["FederationData", "cached_federation_data", "federation_data", "scenario_from_run_config", "site_name"]
