"""`fedface simulate`: many sites on one machine, on Flower's simulation engine (Ray).

:func:`run_federated` prepares a run directory, holds out ``federation.test-identities``
people for the server's evaluation, partitions the others into identity-disjoint sites
(:func:`~fedface.common.data.partition_sites`), and runs fedface's ServerApp and ClientApp on
``flwr.simulation.run_simulation`` with one virtual SuperNode per site. Every site keeps its
head under ``<run>/sites/<site>/`` and its privacy ledger in a **ledger directory that
outlives runs** (:func:`ledger_dir_for`: ``--ledger-dir``, default ``$FEDFACE_LEDGER_DIR`` or
``~/.fedface/ledgers``, one folder per data set and site partition), so a second simulation on
the same faces continues the sites' lifetime spend, and ``--overwrite`` never deletes a
ledger; the server writes the run store ``<run>/runs.sqlite``, a checkpoint per round under
``<run>/checkpoints/`` and ``metrics.json``.

Nothing leaves the machine: Flower's telemetry, update checks and runtime installs and Ray's
usage statistics are switched off for the run, and Flower's home is inside the run directory.
Past one machine, the same App runs on a multi-machine Ray cluster (docs/simulation.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.client import ClientApp
from flwr.common import Context

from fedface.common.checkpoint import load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.federated import federation_data
from fedface.common.errors import ConfigError, RunDirError
from fedface.common.io import atomic_write_json, atomic_write_toml
from fedface.common.models import build_encoder, warn_frozen_at_random
from fedface.simulations.engine import prompt_dispatch

logger = logging.getLogger(__name__)

LEDGER_DIR_ENV = "FEDFACE_LEDGER_DIR"
"""Environment variable naming the simulated sites' ledger directory; default ``~/.fedface/ledgers``."""

#: Environment for every Flower/Ray process of a run: send nothing anywhere, install nothing.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@dataclass
class FederatedResult:
    """What a federated run produced."""

    run_id: str
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    completed: bool = False
    error: str | None = None
    initial: dict[str, float] | None = None  # the server's evaluation of the starting encoder

    def refusals(self) -> dict[str, int]:
        """Each reason sites gave for refusing or failing, with its count of site-rounds."""
        from fedface.server.app import reason_counts

        return reason_counts(self.history)


def default_ledger_dir() -> Path:
    """``$FEDFACE_LEDGER_DIR`` if set, else ``~/.fedface/ledgers`` (read at each call)."""
    env = os.environ.get(LEDGER_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".fedface" / "ledgers"


def ledger_dir_for(root: Path, cfg: TrainConfig, fed: Any) -> Path:
    """The folder of one federation's site ledgers under ``root``: named by the data set and a
    hash of the site partition (which images each site holds), so that every simulation of the
    same sites on the same faces composes into the same ledgers, and another partition of the
    same faces (other sites, other people per site) gets its own."""
    data = Path(cfg.data.root).resolve()

    def rel(source: str) -> str:  # relative to the data root: a moved or copied data set keeps its ledgers
        path = Path(source).resolve()
        return path.relative_to(data).as_posix() if path.is_relative_to(data) else path.as_posix()

    sites = [sorted(rel(fed.train.sources[int(i)]) for i in site) for site in fed.partition.sites]
    digest = hashlib.sha256(json.dumps(sites, separators=(",", ":")).encode()).hexdigest()[:12]
    return root / f"{data.name}-{len(sites)}sites-{digest}"


def _run_ledgers(run_dir: Path, cfg: TrainConfig, fed: Any, ledger_dir: Path | None) -> Path | None:
    """The ledger folder a resumed run started with (``ledgers.json``), unless ``ledger_dir`` is given."""
    if ledger_dir is not None:
        return ledger_dir_for(ledger_dir.expanduser().resolve(), cfg, fed)
    try:
        return Path(json.loads((run_dir / "ledgers.json").read_text())["ledger_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a run from before ledger folders: its ledgers are beside each site's head


def _prepare_run_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"run directory {out_dir} is a file: choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"run directory {out_dir} already holds a run: choose a new --out or pass --overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


class _SimulatedClientApp(ClientApp):
    """A ClientApp that pickles as the recipe it was built from.

    Flower's Ray backend pickles the ClientApp with every message it sends to a site; pickled
    by value (its closures and the run's config) that took 2-3 ms of the server process per
    message, four messages per site a round with SecAgg+. Pickled as ``(cfg_json, sites_dir)``
    it costs microseconds, and each Ray worker builds the app once (:func:`simulated_client_app`).
    """

    recipe: tuple[str, str, str, str] = ("", "", "", "")

    def __reduce__(self) -> tuple[Any, tuple[str, str, str, str]]:
        return simulated_client_app, self.recipe


def simulated_client_app(cfg_json: str, sites_dir: str, ledgers_dir: str = "", wire_log: str = "") -> ClientApp:
    """The ClientApp of a simulated federation, built once per process.

    Site number ``partition-id`` loads its own faces (the run's split and partition, computed
    once per process from the config: :func:`~fedface.common.federated.cached_federation_data`),
    keeps its head under ``<sites_dir>/<site>/`` and its ledger and receipt key under
    ``<ledgers_dir>/<site>/`` (default: beside its head). With ``wire_log``, every message a site sends is recorded there
    (:func:`~fedface.client.wire_log.wire_log_mod`).
    """
    return _simulated_client_app(cfg_json, sites_dir, ledgers_dir, wire_log)  # one cache key however it is called


@functools.lru_cache(maxsize=4)
def _simulated_client_app(cfg_json: str, sites_dir: str, ledgers_dir: str, wire_log: str) -> ClientApp:
    from fedface.client.app import SiteClient, partition_site, private_errors_mod, site_mod

    cfg = TrainConfig.from_mapping(json.loads(cfg_json))
    root = Path(sites_dir)
    ledgers = Path(ledgers_dir) if ledgers_dir else None

    def client_fn(context: Context) -> Any:
        torch.set_num_threads(1)
        site = partition_site(cfg, cfg_json, int(context.node_config["partition-id"]), root, ledgers_dir=ledgers)
        return SiteClient(site).to_client()

    # errors reach the server as their kind only; SecAgg+ for the requests that carry it; the
    # site's policy decides the rest
    mods: list[Any] = [private_errors_mod, site_mod]
    if wire_log:
        from fedface.client.wire_log import wire_log_mod

        mods.insert(0, wire_log_mod(Path(wire_log)))
    app = _SimulatedClientApp(client_fn=client_fn, mods=mods)
    app.recipe = (cfg_json, sites_dir, ledgers_dir, wire_log)
    return app


def check_federated_config(cfg: TrainConfig) -> None:
    """Refuse keys of ``fedface train`` that a federation would silently not apply."""
    if cfg.privacy.budget_epsilon is not None:
        raise ConfigError(
            "privacy.budget-epsilon is not used by federated sites (it is `fedface train`'s): "
            "set the sites' lifetime budget as [site-policy] budget-epsilon in the scenario"
        )
    if cfg.training.ema_decay > 0:
        raise ConfigError(
            "training.ema-decay is not used by a federation (it averages `fedface train`'s weights): set it to 0 "
            "in the scenario; for smoothing across rounds use [federation] strategy = \"fedavgm\""
        )


def run_federated(
    cfg: TrainConfig,
    *,
    out_dir: Path,
    overwrite: bool = False,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    client_cpus: float | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    alternate_secagg: bool = False,
    ledger_dir: Path | None = None,
    wire_log: Path | None = None,
) -> FederatedResult:
    """Run ``cfg.federation.rounds`` federated rounds over ``cfg.federation.sites`` simulated sites.

    With ``resume``, ``out_dir`` is an earlier run's directory (and ``cfg`` its config): the run
    goes on after its last checkpointed round, from that checkpoint, with the sites' heads and
    ledgers as they were (their spend keeps composing; the noise plan is the same).

    With ``ray_address`` (``HOST:PORT`` of a running Ray head, e.g. from ``ray start --head``)
    the sites run on that cluster's machines instead of a private local Ray instance; every
    machine needs fedface installed and the data at the same absolute path (sites load their
    own faces).

    ``alternate_secagg`` is a timing mode (``fedface bench federated``): odd rounds through
    SecAgg+, even rounds in the clear, in one run (:class:`~fedface.server.app.AlternatingFit`);
    each round's row says which it was (``secagg``); the sites' policy is told to take the
    clear rounds too.

    The sites' ledgers live under ``ledger_dir`` (default :func:`default_ledger_dir`), in the
    folder of this data set and partition (:func:`ledger_dir_for`); a resumed run uses the
    folder it started with (``ledgers.json`` in the run directory). ``wire_log``: a JSON-lines
    file recording every message the sites send (:mod:`fedface.client.wire_log`).
    """
    from flwr.simulation import run_simulation

    from fedface.server.app import FedFaceRounds, make_server_app, run_outcome
    from fedface.server.store import RunStore

    t0 = time.perf_counter()
    fc = cfg.federation
    check_federated_config(cfg)
    first_round = 1
    if resume:
        run_dir = out_dir.resolve()
        if not (run_dir / "runs.sqlite").is_file():
            raise RunDirError(f"no run to resume in {out_dir}: pass the directory of an earlier `fedface simulate` run")
        store = RunStore(run_dir / "runs.sqlite", create=False)
        runs = store.runs()
        if not runs:
            raise RunDirError(f"the run store of {out_dir} holds no run to resume")
        run_id = runs[-1].run_id
        last = store.last_checkpoint(run_id)
        done = store.run(run_id).rounds_done
        if done > 0 and (last is None or last[0] != done):
            store.close()
            raise RunDirError(f"run {run_id} has {done} recorded rounds but no checkpoint of round {done}: it cannot be resumed")
        store.start_run(run_id, config=cfg.to_toml_dict(), sites=fc.sites, rounds=fc.rounds, secagg=fc.secagg, resume=True)
        first_round = done + 1
        fed = federation_data(cfg)
        ledgers = _run_ledgers(run_dir, cfg, fed, ledger_dir)
        torch.manual_seed(cfg.training.seed)
        encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
        head_state: dict[str, Any] = {}
        if last is not None:
            resumed = load_checkpoint(last[1])
            encoder.load_state_dict(resumed.encoder_state)
            head_state = resumed.head_state
        logger.info("resuming run %s after round %d of %d", run_id, done, fc.rounds)
    else:
        # the starting encoder first: a bad --init-from is refused before the run directory is made
        torch.manual_seed(cfg.training.seed)
        encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
        head_state = {}
        if cfg.training.init_from is not None:
            from fedface.simulations.centralized import load_encoder_init

            load_encoder_init(encoder, cfg)
            if cfg.training.task == "expression":
                init = load_checkpoint(cfg.training.init_from)
                head_state = init.head_state if init.task == "expression" else {}
        warn_frozen_at_random(cfg.privacy.trainable, encoder, initialised=cfg.training.init_from is not None)
        # the faces next, as an absolute path (the run's config then works from any directory):
        # missing or unreadable data is refused before a run directory is made or replaced
        cfg = cfg.with_overrides({"data.root": str(Path(cfg.data.root).resolve())})
        fed = federation_data(cfg)
        _prepare_run_dir(out_dir, overwrite)
        run_dir = out_dir.resolve()
        atomic_write_toml(run_dir / "config.toml", cfg.to_toml_dict())
        fed.split.save(run_dir / "split.json", fed.faces)
        fed.partition.save(run_dir / "partition.json", fed.train)
        ledgers = ledger_dir_for((ledger_dir or default_ledger_dir()).expanduser().resolve(), cfg, fed)
        atomic_write_json(run_dir / "ledgers.json", {"ledger_dir": str(ledgers)})
        run_id = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        store = RunStore(run_dir / "runs.sqlite")
        store.start_run(run_id, config=cfg.to_toml_dict(), sites=fc.sites, rounds=fc.rounds, secagg=fc.secagg)
    rounds = FedFaceRounds(
        cfg=cfg, run_id=run_id, run_dir=run_dir, store=store, test_faces=fed.test, on_round=on_round, first_round=first_round
    )
    initial = rounds.initial_weights(encoder, _expression_head(cfg, rounds.classes, head_state))
    if first_round > fc.rounds:
        store.finish_run(run_id, status="completed")
        store.close()
        return FederatedResult(run_id=run_id, run_dir=run_dir, wall_s=time.perf_counter() - t0, completed=True)
    server_app = make_server_app(rounds, initial, alternate_secagg=alternate_secagg)
    # the data path made absolute: each site loads its own faces in its own process
    site_over: dict[str, Any] = {"data.root": str(Path(cfg.data.root).resolve())}
    if alternate_secagg:
        site_over["site-policy.require-secagg"] = False  # the sites take the clear rounds too
    site_cfg = cfg.with_overrides(site_over)
    client_app = simulated_client_app(
        json.dumps(site_cfg.to_toml_dict(), sort_keys=True), str(run_dir / "sites"), str(ledgers or ""), str(wire_log or "")
    )
    cpus = os.cpu_count() or 1
    # one CPU per site: as many sites train at once as there are cores (each with one torch
    # thread); measured on 2 cores, 10 sites: 1.7 s a round against 2.6 s one site at a time
    per_site = client_cpus if client_cpus is not None else 1.0
    resources = {"num_cpus": per_site, "num_gpus": 1.0 if torch.cuda.is_available() else 0.0}
    saved_env = {k: os.environ.get(k) for k in (*QUIET_ENV, "FLWR_HOME", "RAY_TMPDIR")}
    ray_tmp = tempfile.mkdtemp(prefix="fedface-ray-")  # short: Ray's socket paths are length-limited
    os.environ.update({**QUIET_ENV, "FLWR_HOME": str(run_dir / ".flwr"), "RAY_TMPDIR": ray_tmp})
    status, error = "failed", None
    flwr_logger = logging.getLogger("flwr")
    saved_log = (flwr_logger.level, flwr_logger.propagate)
    if not logger.isEnabledFor(logging.DEBUG):
        # Flower logs every round and stage, and warns that run_simulation is deprecated (see
        # below); fedface reports rounds and failures itself (-v shows Flower's own log)
        flwr_logger.setLevel(logging.ERROR)
        flwr_logger.propagate = False
    try:
        # messages go to the sites as soon as the server sends them (engine.prompt_dispatch)
        with warnings.catch_warnings(), prompt_dispatch():
            # run_simulation is Flower's in-process simulation API; `flwr run` (also supported,
            # see docs/simulation.md) cannot take an in-memory config and data set.
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=fc.sites,
                backend_config={
                    "client_resources": resources,
                    # an existing cluster brings its own resources; a private one gets this machine's
                    "init_args": {"address": ray_address, "log_to_driver": False}
                    if ray_address
                    else {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
                },
            )
        # failed unless every round ran and one aggregated an update (Flower finishes a run whose
        # every site refused or failed as if it had succeeded: ../shared/docs/STACK.md)
        status, error = run_outcome(rounds.history, fc.rounds - first_round + 1, rounds.stopped)
        if rounds.stopped is None and len(rounds.history) != fc.rounds - first_round + 1:
            error = f"{first_round - 1 + len(rounds.history)} of {fc.rounds} rounds completed: see the log above"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        store.finish_run(run_id, status=status, error=error)  # type: ignore[arg-type]
        store.close()
        flwr_logger.setLevel(saved_log[0])
        flwr_logger.propagate = saved_log[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result = FederatedResult(
        run_id=run_id,
        run_dir=run_dir,
        history=rounds.history,
        final={k: v for k, v in (rounds.history[-1] if rounds.history else {}).items() if isinstance(v, float)},
        wall_s=time.perf_counter() - t0,
        completed=status == "completed",
        error=error,
        initial=rounds.initial,
    )
    atomic_write_json(
        run_dir / "metrics.json",
        {"run_id": run_id, "completed": result.completed, "error": error, "wall_s": result.wall_s, "initial": result.initial, "rounds": rounds.history},
    )
    return result


def _expression_head(cfg: TrainConfig, classes: tuple[str, ...], state: dict[str, Any]) -> Any:
    """The expression head a run starts from: the checkpoint's (``state``, from --init-from or
    the round resumed) when it fits the run's classes, else None (a fresh, seeded one)."""
    if cfg.training.task != "expression" or not state:
        return None
    from fedface.common.models import ExpressionHead

    head = ExpressionHead(cfg.model.embedding_dim, len(classes))
    try:
        head.load_state_dict(state)
    except RuntimeError:
        logger.warning("the starting checkpoint's expression head does not fit this run's %d classes: a fresh head is used", len(classes))
        return None
    return head


__all__ = ["QUIET_ENV", "FederatedResult", "run_federated"]
