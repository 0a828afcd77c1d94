"""A real deployment on 127.0.0.1 with fedface's commands: `fedface server start` (a SuperLink
with TLS and node authentication), `fedface server register` for three sites, `fedface site join`
for each (a SuperNode on the site's own faces: a directory of 4 ORL people, linked; it trusts
one publisher key), and `fedface server run --publisher-key` (a signed app; SecAgg+, DP-SGD at
every site, 2 rounds); a fourth, unregistered site is refused; apps that are unsigned, signed
by an untrusted key, altered after signing (the FAB) or overridden after signing (the run
config) are refused by every site, which trains and charges nothing for them; every process
started here is stopped by its process group.

The set-up is importable for other deployment tests: :class:`Processes`, :func:`_free_port`,
:func:`_wait_for_port`, :func:`start_federation` (or the module fixture ``federation``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.signing import load_private_key
from fedface.server.deploy import FederationKeys, PublisherKey, create_federation_keys, create_node_key, create_publisher_key
from fedface.server.publisher import App, AppHandover, build_app
from fedface.server.store import RunStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ["site-000", "site-001", "site-002"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of the group do not count: they are gone once reaped
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


class Processes:
    """Processes started in their own sessions, stopped by process group."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> list[int]:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if _alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
        return [proc.pid for proc in self.procs if _alive(proc.pid)]


def _site_data(root: Path, identities: list[str], target: Path) -> Path:
    """A site's own ORL-layout directory: links to its people's folders (no image copied)."""
    target.mkdir(parents=True)
    for name in identities:
        (target / name).symlink_to(root / name, target_is_directory=True)
    return target


SCENARIO: dict[str, Any] = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
    "evaluation": {"shift-tta": 0, "occlusion-box": 8},
    "training": {"batch-size": 16, "device": "cpu"},
    "privacy": {"epsilon": 8.0},
    "federation": {"sites": 3, "rounds": 2, "test-identities": 10, "secagg": True},
}


# Each site's own policy: a lifetime budget of 10 (the signed honest run of 2 rounds at epsilon 8
# spends 7.996 of it; one more run at epsilon 8 would compose to 10.9) and at most 8.5 a run.
SITE_POLICY: dict[str, Any] = {"budget-epsilon": 10.0, "epsilon-per-run": 8.5, "delta": 1e-5, "min-peers": 3}


@dataclass
class Federation:
    """A running deployment on 127.0.0.1: a SuperLink, the registered sites' SuperNodes (each
    trusting ``publisher``), and what a test needs to launch runs and read the sites' logs."""

    work: Path
    env: dict[str, str]
    procs: Processes
    port: int
    app_port: int
    keys: FederationKeys
    publisher: PublisherKey
    scenario: Path  # the scenario TOML of the runs (ORL, 3 sites, 2 rounds, SecAgg+, DP)
    site_configs: dict[str, Path]  # every site's TOML, the unregistered "stranger" included
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.work / "flwr-home"

    @property
    def fedface(self) -> str:
        return str(BIN / "fedface")

    @property
    def connection(self) -> list[str]:
        """``--superlink`` and ``--root-certificates`` for fedface's commands."""
        return ["--superlink", f"127.0.0.1:{self.port}", "--root-certificates", str(self.keys.ca_cert)]

    def server_run(self, run_dir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`fedface server run` of the federation's scenario into ``run_dir``, with ``args``."""
        return subprocess.run(
            [self.fedface, "server", "run", "-c", str(self.scenario), "--run-dir", str(run_dir), *self.connection,
             "--flwr-home", str(self.home), "--app-port", str(self.app_port), "--format", "json", *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def flwr_run(self, app: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Flower's own `flwr run` on the connection `fedface server run` wrote (after one ran)."""
        return subprocess.run([str(BIN / "flwr"), "run", app, "fedface", "--stream", *args], cwd=self.work,
                              env={**self.env, "FLWR_HOME": str(self.home)}, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        """A process's log so far (``site-0``, ``superlink``, ...)."""
        return (self.work / f"{name}.log").read_text(errors="replace")


def start_federation(work: Path, orl_root: Path, procs: Processes, *, sites: Sequence[str] = SITES,
                     site_extra: Mapping[str, Any] | None = None) -> Federation:
    """Keys, a SuperLink, and one registered SuperNode per name in ``sites``, each on 4 of the
    people the server does not hold out, trusting the federation's publisher key;
    ``site_extra`` adds keys to every site's TOML. Also writes (does not start) the TOML of an
    unregistered site, ``stranger``. The processes are ``procs``'s to stop."""
    from fedface.common.config import TrainConfig
    from fedface.common.federated import federation_data

    keys = create_federation_keys(work / "keys", hosts=["127.0.0.1", "localhost"])
    nodes = {name: create_node_key(work / "keys" / "nodes", name) for name in [*sites, "stranger"]}
    publisher = create_publisher_key(work / "keys", "publisher")
    scenario_raw = {**SCENARIO, "data": {**SCENARIO["data"], "root": str(orl_root)}}
    scenario = work / "scenario.toml"
    scenario.write_text(tomli_w.dumps(scenario_raw))
    # each site holds 4 of the people the server does not hold out for its evaluation
    train_people = sorted(set(federation_data(TrainConfig.from_mapping(scenario_raw)).train.identity_names))
    site_configs = {}
    for i, name in enumerate(nodes):
        people = train_people[4 * (i % 3) : 4 * (i % 3) + 4]
        data = _site_data(orl_root, people, work / "data" / name)
        cfg = {"name": name, "data": str(data), "state-dir": str(work / "state" / name),
               "trusted-publishers": [str(publisher.public_key)], "policy": dict(SITE_POLICY), **(site_extra or {})}
        site_configs[name] = work / f"{name}.toml"
        site_configs[name].write_text(tomli_w.dumps(cfg))
    fed = Federation(work, procs.env, procs, _free_port(), _free_port(), keys, publisher, scenario, site_configs)
    procs.start("superlink", fed.fedface, "server", "start", "--keys", str(keys.ca_cert.parent), "--port", str(fed.port),
                "--app-port", str(fed.app_port), "--database", str(work / "superlink.db"))
    _wait_for_port(fed.port)
    for name in sites:
        reg = subprocess.run([fed.fedface, "server", "register", str(nodes[name].public_key), *fed.connection, "--flwr-home", str(fed.home)],
                             cwd=REPO, env=fed.env, capture_output=True, timeout=120)
        assert reg.returncode == 0, reg.stdout.decode() + reg.stderr.decode()
    for i, name in enumerate(sites):
        procs.start(f"site-{i}", fed.fedface, "site", "join", "-c", str(site_configs[name]), *fed.connection,
                    "--key", str(nodes[name].private_key), "--port", str(_free_port()))
    return fed


def deploy_env(work: Path) -> dict[str, str]:
    """The environment of every process a deployment test starts."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(work / "flwr-home"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Iterator[Federation]:
    """A running federation of three sites for this module's tests; every process is stopped
    after them (``federation.procs.stop_all()`` records what is left alive)."""
    work = tmp_path_factory.mktemp("deploy")
    procs = Processes(deploy_env(work), work)
    try:
        yield start_federation(work, orl_root, procs)
    finally:
        procs.stop_all()


def _offsets(fed: Federation) -> dict[str, int]:
    return {f"site-{i}": len(fed.log(f"site-{i}")) for i in range(len(SITES))}


def _since(fed: Federation, offsets: dict[str, int]) -> dict[str, str]:
    return {name: fed.log(name)[start:] for name, start in offsets.items()}


def _refused_run(fed: Federation, name: str, launch: Any) -> dict[str, Any]:
    """Launch a run that every site should refuse (``launch()`` returns the finished process)
    and collect what each site logged meanwhile and what the coordinator's run store says."""
    before = _offsets(fed)
    done = launch()
    time.sleep(2)  # the sites' last log lines
    run_dir = fed.work / "refused" / name
    stores = []
    if (run_dir / "runs.sqlite").is_file():
        with RunStore(run_dir / "runs.sqlite", create=False) as store:
            stores = [[(x.answered, x.failed) for x in store.rounds(r.run_id)] for r in store.runs()]
    return {"rc": done.returncode, "out": done.stdout[-3000:] + done.stderr[-3000:], "logs": _since(fed, before), "runs": stores}


def _variant(fed: Federation, name: str, **sections: dict[str, Any]) -> Path:
    """The federation's scenario with ``sections`` changed, as a TOML file of its own."""
    import tomllib

    raw = tomllib.loads(fed.scenario.read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = fed.work / "scenarios" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    return path


def _policy_run(fed: Federation, run_dir: Path, *args: str) -> dict[str, Any]:
    """A signed one-round run that asks for more than the sites' policy allows: what the
    coordinator's run store recorded of each site, and how `fedface server run` ended."""
    done = fed.server_run(run_dir, "--rounds", "1", "--publisher-key", str(fed.publisher.private_key), *args)
    recorded: list[tuple[str, str, str | None]] = []
    if (run_dir / "runs.sqlite").is_file():
        with RunStore(run_dir / "runs.sqlite", create=False) as store:
            for run in store.runs():
                for record in store.rounds(run.run_id):
                    recorded += [(p.site, p.status, p.reason) for p in record.participation]
                status = run.status
    else:
        status = "no run store"
    return {"rc": done.returncode, "out": done.stdout[-3000:] + done.stderr[-3000:], "recorded": sorted(recorded), "status": status}


def _with_code(app: App, marker: Path) -> App:
    """``app`` altered: its ClientApp is a module inside the FAB that writes ``marker`` when it
    is imported; the verification records are still the original's."""
    import tomllib

    from flwr.cli.build import build_fab_from_files

    with zipfile.ZipFile(io.BytesIO(app.fab)) as fab:
        doc = tomllib.loads(fab.read("pyproject.toml").decode())
    doc["tool"]["flwr"]["app"]["components"]["clientapp"] = "altered_client:app"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nfrom fedface.client.app import app\n"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gitwildmatch.*", category=DeprecationWarning)  # Flower's builder, not ours
        fab_bytes, _ = build_fab_from_files({"pyproject.toml": tomli_w.dumps(doc).encode(), "altered_client.py": code.encode()})
    return dataclasses.replace(app, fab=fab_bytes)


def _hand_over(fed: Federation, app: Any, *flwr_args: str) -> subprocess.CompletedProcess[str]:
    """A coordinator that serves ``app`` itself and starts it with Flower's own `flwr run`."""
    with AppHandover(app, fed.app_port):
        return fed.flwr_run(app.spec, *flwr_args)


@pytest.fixture(scope="module")
def deployment(federation: Federation) -> Iterator[dict[str, object]]:
    fed = federation
    work = fed.work
    result: dict[str, object] = {"work": work}
    try:
        stranger_key = work / "keys" / "nodes" / "stranger.key"
        stranger = fed.procs.start("stranger", fed.fedface, "site", "join", "-c", str(fed.site_configs["stranger"]), *fed.connection,
                                   "--key", str(stranger_key), "--port", str(_free_port()))
        try:
            result["stranger_rc"] = stranger.wait(timeout=120)
        except subprocess.TimeoutExpired:
            result["stranger_rc"] = None
        t0 = time.monotonic()
        run = fed.server_run(work / "run", "--publisher-key", str(fed.publisher.private_key))
        result["run_s"] = time.monotonic() - t0
        result["run_rc"] = run.returncode
        result["run_stdout"] = run.stdout
        result["run_log"] = run.stdout[-4000:] + run.stderr[-4000:]

        # apps every site must refuse (one round each: the refusal comes at the first message)
        refused = work / "refused"
        untrusted = create_publisher_key(work / "keys", "untrusted")
        pyproject = resources.files("fedface.simulations").joinpath("flwr_app", "pyproject.toml").read_text()
        key = load_private_key(fed.publisher.private_key)

        def signed(name: str, **config: Any) -> Any:
            cfg = {"scenario-toml": fed.scenario.read_text(), "run-dir": str(refused / name), "rounds": 1}
            return build_app(pyproject, {**cfg, **config}, key)

        result["refused"] = {
            "unsigned": _refused_run(fed, "unsigned", lambda: fed.server_run(refused / "unsigned", "--rounds", "1")),
            "untrusted": _refused_run(fed, "untrusted", lambda: fed.server_run(
                refused / "untrusted", "--rounds", "1", "--publisher-key", str(untrusted.private_key))),
            # the FAB changed after signing: its own ClientApp code, served with the original's signature
            "altered-fab": _refused_run(fed, "altered-fab", lambda: _hand_over(fed, _with_code(signed("altered-fab"), work / "altered-code-ran"))),
            # the FAB as signed, the run config overridden when the run is started
            "overridden-config": _refused_run(fed, "overridden-config", lambda: _hand_over(
                fed, signed("overridden-config"), "--run-config", "epsilon=50.0")),
        }
        result["refused_s"] = time.monotonic() - t0 - float(result["run_s"])  # type: ignore[arg-type]

        # signed apps whose scenario asks for more privacy loss than the sites' own policy allows
        t1 = time.monotonic()
        policy_dir = work / "policy"
        result["policy"] = {
            case: _policy_run(fed, policy_dir / case, *args)
            for case, args in {
                "eps-inf": ("--epsilon", "inf"),
                "secagg-off": ("-c", str(_variant(fed, "secagg-off", federation={"secagg": False}))),
                "delta-too-large": ("-c", str(_variant(fed, "delta", privacy={"delta": 0.01}))),
                "epsilon-per-run": ("--epsilon", "9.0"),
                # two of the three sites sampled: SecAgg+ ties only two sites' masks together
                "too-few-peers": ("-c", str(_variant(fed, "two-sampled", federation={"fraction-fit": 0.67}))),
                # a new run id (a fresh run of one round) cannot reset the lifetime spend
                "new-run-past-lifetime-budget": ("--epsilon", "8.0"),
            }.items()
        }
        result["policy_s"] = time.monotonic() - t1
    finally:
        result["left_alive"] = fed.procs.stop_all()
    yield result


def test_deployed_run_trains_two_rounds_with_secagg_and_dp(deployment: dict[str, object]) -> None:
    assert deployment["run_rc"] == 0, deployment["run_log"]
    work = Path(str(deployment["work"]))
    run_dir = work / "run"
    summary = json.loads(str(deployment["run_stdout"]).strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["rounds"] == 2
    with RunStore(run_dir / "runs.sqlite", create=False) as store:
        (run,) = store.runs()
        rounds = store.rounds(run.run_id)
        spend = store.site_spend(run.run_id)
    assert run.status == "completed" and run.secagg
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.answered == 3 for r in rounds)
    assert all(0.0 < r.metrics["verif_acc"] <= 1.0 for r in rounds)
    assert sorted(spend) == SITES
    for site in SITES:
        # each site keeps its ledger (all runs) and this run's head in its own state directory
        assert len(list((work / "state" / site / "runs").glob("*/head.pt"))) == 1
        with PrivacyLedger(work / "state" / site / "ledger.sqlite", create=False) as ledger:
            ledger.verify()
            assert [s.round for s in ledger.sessions(site)] == [1, 2]
            assert spend[site].epsilon == pytest.approx(ledger.spend(site).epsilon, abs=1e-9) and spend[site].epsilon <= 8.0


def test_an_unregistered_node_is_refused(deployment: dict[str, object]) -> None:
    log = (Path(str(deployment["work"])) / "stranger.log").read_text(errors="replace")
    assert deployment["stranger_rc"] != 0
    assert "Failed to activate SuperNode" in log


@pytest.mark.parametrize("case", ["unsigned", "untrusted", "altered-fab", "overridden-config"])
def test_an_app_not_signed_as_sent_by_a_trusted_publisher_is_refused_by_every_site(deployment: dict[str, object], case: str) -> None:
    refused: dict[str, Any] = deployment["refused"][case]  # type: ignore[index]
    expected = {
        "unsigned": "The FAB could not be verified",  # Flower's SuperNode: the FAB has no signature at all
        "untrusted": "FAB verification failed",  # Flower's SuperNode: no trusted key signed it
        "altered-fab": "FAB verification failed",
        "overridden-config": "app refused: the run config does not match what publisher",  # fedface's ClientApp
    }[case]
    for site, log in refused["logs"].items():
        assert expected in log, f"{site} did not refuse the {case} app:\n{log[-3000:]}\n{refused['out']}"
        assert "refuses round" not in log, log[-3000:]  # refused before the site even looked at the round
    assert not (Path(str(deployment["work"])) / "altered-code-ran").exists()  # the altered FAB's code never ran
    # the coordinator's ServerApp ran its round and recorded every site as failed, none as answered
    assert refused["runs"] == [[(0, len(SITES))]], refused["out"]


POLICY_REASONS = {
    "eps-inf": "policy: non-private round",
    "secagg-off": "policy: secagg required",
    "delta-too-large": "policy: delta",
    "epsilon-per-run": "policy: epsilon-per-run",
    "too-few-peers": "policy: too few peers",
    "new-run-past-lifetime-budget": "budget exhausted",
}


@pytest.mark.parametrize("case", sorted(POLICY_REASONS))
def test_a_request_outside_a_sites_own_policy_is_refused_with_its_reason_in_the_run_store(
    deployment: dict[str, object], case: str
) -> None:
    got: dict[str, Any] = deployment["policy"][case]  # type: ignore[index]
    reason = POLICY_REASONS[case]
    sampled = 2 if case == "too-few-peers" else len(SITES)
    assert len(got["recorded"]) == sampled, got["out"]
    assert {(status, why) for _, status, why in got["recorded"]} == {("refused", reason)}, got["out"]
    # nothing aggregated: the run is recorded as failed and `fedface server run` says so
    assert got["status"] == "failed" and got["rc"] == 1, got["out"]
    assert reason in got["out"]


def test_refused_apps_and_requests_leave_the_sites_ledgers_and_heads_untouched(deployment: dict[str, object]) -> None:
    work = Path(str(deployment["work"]))
    for site in SITES:
        # the signed run's head and two sessions only: nothing was charged or trained for a refused app or request
        assert len(list((work / "state" / site / "runs").glob("*/head.pt"))) == 1
        with PrivacyLedger(work / "state" / site / "ledger.sqlite", create=False) as ledger:
            assert [s.round for s in ledger.sessions(site)] == [1, 2]


def test_every_process_started_is_stopped(deployment: dict[str, object]) -> None:
    assert deployment["left_alive"] == []
