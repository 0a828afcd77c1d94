"""A real deployment on 127.0.0.1: a SuperLink with TLS and node authentication, three
registered SuperNodes running fedface's ClientApp, `flwr run` of fedface's ServerApp with
SecAgg+ and DP-SGD at every site for 2 rounds; an unregistered node refused; every process
started here stopped by its process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedface.common.privacy.ledger import PrivacyLedger
from fedface.server.deploy import create_federation_keys, create_node_key
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


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("deploy")
    keys = create_federation_keys(work / "keys", hosts=["127.0.0.1", "localhost"])
    nodes = [create_node_key(work / "keys" / "nodes", name) for name in [*SITES, "stranger"]]
    port = _free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "fed", "fed": {"address": f"127.0.0.1:{port}", "root-certificates": str(keys.ca_cert)}}})
    )
    scenario = work / "scenario.toml"
    scenario.write_text(
        tomli_w.dumps(
            {
                "data": {"root": str(orl_root), "image-size": [32, 32]},
                "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
                "evaluation": {"shift-tta": 0, "occlusion-box": 8},
                "training": {"batch-size": 16, "device": "cpu"},
                "privacy": {"epsilon": 8.0},
                "federation": {"sites": 3, "rounds": 2, "identities-per-site": 4, "test-identities": 10, "secagg": True},
            }
        )
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    procs = Processes(env, work)
    result: dict[str, object] = {"work": work}
    try:
        procs.start(
            "superlink", str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.server_cert), "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth", "--database", str(work / "superlink.db"), "--port", str(port),
            "--disable-runtime-dependency-installation",
        )
        _wait_for_port(port)
        for node in nodes[:3]:
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(node.public_key), "fed"], cwd=REPO, env=env,
                                 capture_output=True, timeout=60)
            assert reg.returncode == 0, reg.stdout.decode() + reg.stderr.decode()
        for i, node in enumerate(nodes[:3]):
            procs.start(
                f"supernode-{i}", str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(keys.ca_cert), "--auth-supernode-private-key", str(node.private_key),
                "--node-config", f"partition-id={i} num-partitions=3", "--port", str(_free_port()),
            )
        stranger = procs.start(
            "stranger", str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(keys.ca_cert), "--auth-supernode-private-key", str(nodes[3].private_key),
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()), "--max-retries", "1",
        )
        result["stranger_rc"] = stranger.wait(timeout=120)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "fed", "--stream", "--run-config",
             f"scenario='{scenario}' run-dir='{work / 'run'}' sites=3 rounds=2"],
            cwd=REPO, env=env, capture_output=True, timeout=900,
        )
        result["run_rc"] = run.returncode
        result["run_log"] = run.stdout.decode(errors="replace")[-4000:] + run.stderr.decode(errors="replace")[-4000:]
    finally:
        result["left_alive"] = procs.stop_all()
    yield result


def test_deployed_run_trains_two_rounds_with_secagg_and_dp(deployment: dict[str, object]) -> None:
    assert deployment["run_rc"] == 0, deployment["run_log"]
    run_dir = Path(str(deployment["work"])) / "run"
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
        with PrivacyLedger(run_dir / "sites" / site / "ledger.sqlite", create=False) as ledger:
            ledger.verify()
            assert [s.round for s in ledger.sessions(site)] == [1, 2]
            assert spend[site].epsilon == pytest.approx(ledger.spend(site).epsilon, abs=1e-9) and spend[site].epsilon <= 8.0


def test_an_unregistered_node_is_refused(deployment: dict[str, object]) -> None:
    log = (Path(str(deployment["work"])) / "stranger.log").read_text(errors="replace")
    assert deployment["stranger_rc"] != 0
    assert "Failed to activate SuperNode" in log


def test_every_process_started_is_stopped(deployment: dict[str, object]) -> None:
    assert deployment["left_alive"] == []
