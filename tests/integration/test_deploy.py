"""A real deployment on 127.0.0.1 with fedface's commands: `fedface server start` (a SuperLink
with TLS and node authentication), `fedface server register` for three sites, `fedface site`
for each (a SuperNode on the site's own faces: a directory of 4 ORL people, linked), and
`fedface server run` (SecAgg+, DP-SGD at every site, 2 rounds); a fourth, unregistered site is
refused; every process started here is stopped by its process group.
"""

from __future__ import annotations

import json
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


def _site_data(root: Path, identities: list[str], target: Path) -> Path:
    """A site's own ORL-layout directory: links to its people's folders (no image copied)."""
    target.mkdir(parents=True)
    for name in identities:
        (target / name).symlink_to(root / name, target_is_directory=True)
    return target


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Iterator[dict[str, object]]:
    from fedface.common.config import TrainConfig
    from fedface.common.federated import federation_data

    work = tmp_path_factory.mktemp("deploy")
    keys = create_federation_keys(work / "keys", hosts=["127.0.0.1", "localhost"])
    nodes = [create_node_key(work / "keys" / "nodes", name) for name in [*SITES, "stranger"]]
    port = _free_port()
    home = work / "flwr-home"
    scenario_raw = {
        "data": {"root": str(orl_root), "image-size": [32, 32]},
        "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
        "evaluation": {"shift-tta": 0, "occlusion-box": 8},
        "training": {"batch-size": 16, "device": "cpu"},
        "privacy": {"epsilon": 8.0},
        "federation": {"sites": 3, "rounds": 2, "test-identities": 10, "secagg": True},
    }
    scenario = work / "scenario.toml"
    scenario.write_text(tomli_w.dumps(scenario_raw))
    # each site holds 4 of the people the server does not hold out for its evaluation
    train_people = sorted(set(federation_data(TrainConfig.from_mapping(scenario_raw)).train.identity_names))
    site_configs = []
    for i, name in enumerate([*SITES, "stranger"]):
        people = train_people[4 * (i % 3) : 4 * (i % 3) + 4]
        data = _site_data(orl_root, people, work / "data" / name)
        cfg_path = work / f"{name}.toml"
        cfg_path.write_text(tomli_w.dumps({"name": name, "data": str(data), "state-dir": str(work / "state" / name)}))
        site_configs.append(cfg_path)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
    }
    fedface = str(BIN / "fedface")
    tls = ["--root-certificates", str(keys.ca_cert)]
    link = ["--superlink", f"127.0.0.1:{port}"]
    procs = Processes(env, work)
    result: dict[str, object] = {"work": work}
    try:
        procs.start("superlink", fedface, "server", "start", "--keys", str(keys.ca_cert.parent), "--port", str(port),
                    "--database", str(work / "superlink.db"))
        _wait_for_port(port)
        for node in nodes[:3]:
            reg = subprocess.run([fedface, "server", "register", str(node.public_key), *link, *tls, "--flwr-home", str(home)],
                                 cwd=REPO, env=env, capture_output=True, timeout=120)
            assert reg.returncode == 0, reg.stdout.decode() + reg.stderr.decode()
        for i, node in enumerate(nodes[:3]):
            procs.start(f"site-{i}", fedface, "site", "-c", str(site_configs[i]), *link, *tls,
                        "--key", str(node.private_key), "--port", str(_free_port()))
        stranger = procs.start("stranger", fedface, "site", "-c", str(site_configs[3]), *link, *tls,
                               "--key", str(nodes[3].private_key), "--port", str(_free_port()))
        try:
            result["stranger_rc"] = stranger.wait(timeout=120)
        except subprocess.TimeoutExpired:
            result["stranger_rc"] = None
        run = subprocess.run(
            [fedface, "server", "run", "-c", str(scenario), "--run-dir", str(work / "run"), *link, *tls,
             "--flwr-home", str(home), "--format", "json"],
            cwd=REPO, env=env, capture_output=True, timeout=900,
        )
        result["run_rc"] = run.returncode
        result["run_stdout"] = run.stdout.decode(errors="replace")
        result["run_log"] = run.stdout.decode(errors="replace")[-4000:] + run.stderr.decode(errors="replace")[-4000:]
    finally:
        result["left_alive"] = procs.stop_all()
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


def test_every_process_started_is_stopped(deployment: dict[str, object]) -> None:
    assert deployment["left_alive"] == []
