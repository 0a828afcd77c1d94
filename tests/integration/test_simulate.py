"""`fedface simulate` end to end on Flower's simulation engine (Ray): 3 sites of real ORL faces,
2 rounds, SecAgg+ and DP-SGD at every site; the run directory, the run store, the sites'
ledgers (in a ledger directory that outlives runs), refusals on an exhausted budget and by the
sites' policy, user errors, and no Ray process left behind.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
import torch
from typer.testing import CliRunner

from fedface.client.site import Site
from fedface.common.checkpoint import load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.data import load_faces
from fedface.common.privacy.accounting import compute_epsilon
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.server.store import RunStore
from fedface.simulations.cli import app

pytestmark = [
    pytest.mark.integration,
    # Ray drops its helper processes' Popen objects and /dev/null handles at shutdown; under the
    # suite's filterwarnings=error those third-party ResourceWarnings would fail the test. Leftover
    # processes are checked for directly instead (test_simulate_leaves_no_ray_process_behind).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

runner = CliRunner()

SITES = ["site-000", "site-001", "site-002"]
IMAGES_PER_SITE = 40  # 4 identities x 10 ORL images


def _scenario(tmp_path: Path, orl_root: Path, **extra: dict[str, Any]) -> Path:
    raw: dict[str, dict[str, Any]] = {
        "data": {"root": str(orl_root), "image-size": [32, 32]},
        "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
        "evaluation": {"shift-tta": 0, "occlusion-box": 8},
        "training": {"batch-size": 16, "device": "cpu"},
        "federation": {"sites": 3, "rounds": 2, "identities-per-site": 4, "test-identities": 10, "secagg": True},
        # scenarios here are non-private unless a test asks for an epsilon
        "site-policy": {"allow-non-private": True},
    }
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "scenario.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _ledger(out: Path, site: str) -> Path:
    """A simulated site's ledger: in the run's ledger folder (``ledgers.json``)."""
    return Path(json.loads((out / "ledgers.json").read_text())["ledger_dir"]) / site / "ledger.sqlite"


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# --- processes ---------------------------------------------------------------------------------


def _ray_pids() -> set[int]:
    """PIDs of processes whose command line mentions ray (raylet, gcs_server, ray::workers)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").lower()
        except OSError:
            continue
        if "ray" in cmdline:
            pids.add(int(entry.name))
    return pids


def _belongs_to(pid: int, marker: str) -> bool:
    """Whether ``pid`` was started for this run: its environment names the run directory
    (FLWR_HOME is ``<run>/.flwr`` for every process of a run). Other sessions' Ray clusters on
    the same machine are not ours."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return marker.encode() in environ


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "<gone>"


def _assert_no_ray_process_left(before: set[int], run_dir: Path, *, wait_s: float = 30.0) -> None:
    """No process of this run's Ray cluster is alive (Ray actors may linger 15-30 s)."""
    marker = str(run_dir.resolve())
    deadline = time.monotonic() + wait_s
    while True:
        left = sorted(pid for pid in _ray_pids() - before if _belongs_to(pid, marker))
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Ray processes left {wait_s:.0f} s after the run: " + "; ".join(f"{p}: {_cmdline(p)}" for p in left))
        time.sleep(1.0)


# --- the runs (each run costs Ray's start-up: run each once per module) ----------------------


def _simulate(scenario: Path, out: Path, *args: str) -> Any:
    if "--ledger-dir" not in args:  # each run's own ledgers (module-scoped runs share an environment)
        args = (*args, "--ledger-dir", str(out.parent / f"{out.name}-ledgers"))
    result = runner.invoke(app, ["simulate", "-c", str(scenario), "--out", str(out), "--format", "json", "-q", *args])
    gc.collect()  # collect Ray's dropped Popen objects now, under this module's warning filters
    return result


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> tuple[Any, Path, set[int]]:
    tmp = tmp_path_factory.mktemp("sim")
    scenario = _scenario(tmp, orl_root)
    out = tmp / "run"
    before = _ray_pids()
    result = _simulate(scenario, out, "--epsilon", "8")
    return result, out, before


def _planned_spend(orl_root: Path, scenario: Path) -> tuple[float, float]:
    """A site's epsilon after round 1 and after round 2 of the plan (2 rounds at epsilon 8)."""
    cfg = TrainConfig.from_toml(scenario).with_overrides({"privacy.epsilon": 8.0})
    faces = load_faces(orl_root, size=(32, 32))
    probe = Site("probe", cfg, faces.subset(np.arange(IMAGES_PER_SITE)), scenario.parent / "probe", scenario.parent / "probe.sqlite")
    mech = probe.mechanism(rounds=2, local_epochs=1)
    entry = mech.history_entry()
    return (
        compute_epsilon([entry], delta=mech.delta, accountant=mech.accountant),
        compute_epsilon([entry, entry], delta=mech.delta, accountant=mech.accountant),
    )


@pytest.fixture(scope="module")
def refusing_run(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> tuple[Any, Path, float, float, set[int]]:
    """Each site's budget lies between its planned spend after round 1 and after round 2."""
    tmp = tmp_path_factory.mktemp("refuse")
    after_1, after_2 = _planned_spend(orl_root, _scenario(tmp, orl_root))
    budget = (after_1 + after_2) / 2
    scenario = _scenario(tmp, orl_root, **{"site-policy": {"budget-epsilon": budget}})
    out = tmp / "run"
    before = _ray_pids()
    result = _simulate(scenario, out, "--epsilon", "8")
    return result, out, budget, after_1, before


# --- a private run with SecAgg+ ------------------------------------------------------------------


def test_simulate_private_secagg_run_completes_every_round(private_run: tuple[Any, Path, set[int]]) -> None:
    result, out, _ = private_run

    assert result.exit_code == 0, result.stderr
    summary = _last_json(result.stdout)
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        assert row["answered"] == 3, row
        assert row["refused"] == 0 and row["failed"] == 0 and row["sampled"] == 3
        assert 0.0 < row["max_epsilon"] <= 8.0
        assert 0.0 <= row["verif_acc"] <= 1.0
    assert summary["rounds"][1]["max_epsilon"] == pytest.approx(8.0, rel=1e-2)
    assert summary["run_dir"] == str(out)


def test_simulate_writes_the_run_directory(private_run: tuple[Any, Path, set[int]]) -> None:
    result, out, _ = private_run
    assert result.exit_code == 0, result.stderr

    for name in (
        "config.toml",
        "split.json",
        "partition.json",
        "runs.sqlite",
        "checkpoints/round-0001.pt",
        "checkpoints/round-0002.pt",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    for site in SITES:
        assert (out / "sites" / site / "head.pt").is_file(), site
        assert (_ledger(out, site)).is_file(), site
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completed"] is True and metrics["error"] is None
    assert [row["round"] for row in metrics["rounds"]] == [1, 2]
    partition = json.loads((out / "partition.json").read_text())
    assert partition["params"]["sites"] == 3
    one, two = load_checkpoint(out / "checkpoints/round-0001.pt"), load_checkpoint(out / "checkpoints/round-0002.pt")
    assert (one.epoch, two.epoch) == (1, 2)
    assert any(not torch.equal(a, b) for a, b in zip(one.encoder_state.values(), two.encoder_state.values(), strict=True))


def test_simulate_run_store_and_ledgers_agree(private_run: tuple[Any, Path, set[int]]) -> None:
    result, out, _ = private_run
    assert result.exit_code == 0, result.stderr
    run_id = _last_json(result.stdout)["run_id"]

    with RunStore(out / "runs.sqlite", create=False) as store:
        summary = store.run(run_id)
        rounds = store.rounds(run_id)
        spend = store.site_spend(run_id)
        refusals = store.refusals(run_id)

    assert summary.status == "completed" and summary.error is None
    assert summary.rounds_done == summary.rounds_planned == 2
    assert summary.sites == 3 and summary.secagg is True
    for record in rounds:
        assert sorted(record.sampled) == SITES
        assert sorted(p.site for p in record.participation) == SITES
        assert {p.status for p in record.participation} == {"answered"}
        assert all(p.examples == IMAGES_PER_SITE for p in record.participation)
        assert record.checkpoint is not None and Path(record.checkpoint).is_file()
    assert refusals == []
    assert sorted(spend) == SITES
    for site in SITES:
        with PrivacyLedger(_ledger(out, site), create=False) as ledger:
            ledger.verify()
            own = ledger.spend(site)
            sessions = ledger.sessions(site)
        assert len(sessions) == 2 and [s.round for s in sessions] == [1, 2]
        assert {s.run_id for s in sessions} == {run_id}
        assert spend[site].round == 2 and spend[site].status == "answered"
        assert spend[site].epsilon <= 8.0
        assert spend[site].epsilon == pytest.approx(own.epsilon, abs=1e-9)


def test_simulate_leaves_no_ray_process_behind(private_run: tuple[Any, Path, set[int]]) -> None:
    result, out, before = private_run
    assert result.exit_code == 0, result.stderr

    _assert_no_ray_process_left(before, out)


# --- refusals on an exhausted budget ------------------------------------------------------------


# With every site refused, SecAgg+ unmasks a sum of zero total weight: Flower's unmasking divides
# by it (RuntimeWarnings in flwr's secaggplus_workflow; fedface then discards the result and keeps
# the global encoder). Under filterwarnings=error those warnings would abort the run.
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_simulate_sites_past_their_budget_refuse_and_the_run_completes(
    refusing_run: tuple[Any, Path, float, float, set[int]],
) -> None:
    result, out, budget, after_1, before = refusing_run

    assert result.exit_code == 0, result.stderr
    summary = _last_json(result.stdout)
    first, second = summary["rounds"]
    assert first["answered"] == 3 and first["refused"] == 0
    assert second["answered"] == 0 and second["refused"] == 3 and second["failed"] == 0
    run_id = summary["run_id"]
    with RunStore(out / "runs.sqlite", create=False) as store:
        assert store.run(run_id).status == "completed"
        refusals = store.refusals(run_id)
        spend = store.site_spend(run_id)
    assert sorted(p.site for _, p in refusals) == SITES
    for rnd, p in refusals:
        assert rnd == 2 and p.reason == "budget exhausted" and p.examples == 0
        assert p.budget_epsilon == pytest.approx(budget)
        assert p.remaining == pytest.approx(budget - after_1, rel=1e-6)
    for site in SITES:
        assert spend[site].epsilon == pytest.approx(after_1, rel=1e-9)
        with PrivacyLedger(_ledger(out, site), create=False) as ledger:
            assert len(ledger.sessions(site)) == 1
    one, two = load_checkpoint(out / "checkpoints/round-0001.pt"), load_checkpoint(out / "checkpoints/round-0002.pt")
    for key, a in one.encoder_state.items():
        assert torch.equal(a, two.encoder_state[key]), key
    _assert_no_ray_process_left(before, out)


# --- user errors ---------------------------------------------------------------------------------


def test_simulate_bad_scenario_key_exits_3_with_one_line(tmp_path: Path, orl_root: Path) -> None:
    scenario = _scenario(tmp_path, orl_root, federation={"sitez": 3})

    result = _simulate(scenario, tmp_path / "run")

    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ConfigError:") and "federation.sitez" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("section", "key", "value", "fix"),
    [("training", "ema-decay", 0.99, "fedavgm"), ("privacy", "budget-epsilon", 20.0, "[site-policy] budget-epsilon")],
)
def test_simulate_refuses_a_train_key_it_would_not_apply_in_one_line(
    tmp_path: Path, orl_root: Path, section: str, key: str, value: float, fix: str
) -> None:
    scenario = _scenario(tmp_path, orl_root, **{section: {key: value}})

    result = _simulate(scenario, tmp_path / "run")

    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError:"), result.stderr
    assert f"{section}.{key}" in lines[0] and fix in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_simulate_on_missing_faces_exits_4_and_leaves_no_run_directory_and_keeps_an_old_one(tmp_path: Path, orl_root: Path) -> None:
    scenario = _scenario(tmp_path, tmp_path / "no-such-faces")
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text("{}")

    fresh = _simulate(scenario, tmp_path / "new")
    over = _simulate(scenario, old, "--overwrite")

    assert fresh.exit_code == over.exit_code == 4
    assert "DataNotFoundError" in fresh.stderr
    assert not (tmp_path / "new").exists()  # a retry is not refused as "already holds a run"
    assert (old / "metrics.json").read_text() == "{}"  # nothing lost


def test_simulate_into_an_existing_run_dir_without_overwrite_exits_9(tmp_path: Path, orl_root: Path) -> None:
    scenario = _scenario(tmp_path, orl_root)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")

    result = _simulate(scenario, out)

    assert result.exit_code == 9
    assert "RunDirError" in result.stderr and "--overwrite" in result.stderr
    assert (out / "metrics.json").read_text() == "{}"


def test_simulate_two_sites_are_refused_for_too_few_peers_unless_the_policy_allows_two(tmp_path: Path, orl_root: Path) -> None:
    # the sum of two sites' updates shows each to the other: refused by default
    scenario = _scenario(tmp_path, orl_root, federation={"sites": 2, "rounds": 1, "secagg": True})
    refused = _simulate(scenario, tmp_path / "refused")
    assert refused.exit_code == 1
    said = " ".join(refused.stderr.split())
    assert "policy: too few peers (2 site-rounds)" in said
    assert "min-peers" in said  # the summary says what to change

    # SecAgg+ needs its share counts derived per round: two sites is the smallest federation
    allowed = _scenario(
        tmp_path, orl_root,
        federation={"sites": 2, "rounds": 1, "secagg": True, "min-sites-per-aggregate": 2},
        **{"site-policy": {"allow-non-private": True, "min-peers": 2}},
    )
    result = _simulate(allowed, tmp_path / "run")

    assert result.exit_code == 0, result.stderr
    rounds = _last_json(result.stdout)["rounds"]
    assert [r["answered"] for r in rounds] == [2]


def test_simulate_non_private_run_is_refused_by_every_site_unless_allowed(tmp_path: Path, orl_root: Path) -> None:
    scenario = _scenario(tmp_path, orl_root, federation={"rounds": 1}, **{"site-policy": {"allow-non-private": False}})

    refused = _simulate(scenario, tmp_path / "refused", "--epsilon", "inf")
    allowed = _simulate(scenario, tmp_path / "allowed", "--epsilon", "inf", "--allow-non-private")

    assert refused.exit_code == 1
    said = " ".join(refused.stderr.split())
    assert "policy: non-private round (3 site-rounds)" in said
    assert "--allow-non-private" in said
    assert allowed.exit_code == 0, allowed.stderr
    assert [r["answered"] for r in _last_json(allowed.stdout)["rounds"]] == [3]


def test_simulate_ledgers_outlive_runs_and_overwrite(tmp_path: Path, orl_root: Path) -> None:
    # Arrange: two private runs of the same sites on the same faces, the second over the first's directory
    scenario = _scenario(tmp_path, orl_root, privacy={"epsilon": 4.0})
    ledgers = tmp_path / "ledgers"
    out = tmp_path / "run"

    first = _simulate(scenario, out, "--ledger-dir", str(ledgers))
    assert first.exit_code == 0, first.stderr
    first_rounds = _last_json(first.stdout)["rounds"]
    second = _simulate(scenario, out, "--ledger-dir", str(ledgers), "--overwrite")

    # Assert: the second run's lifetime spend continues from where the first ended; its own does not
    assert second.exit_code == 0, second.stderr
    second_rounds = _last_json(second.stdout)["rounds"]
    assert second_rounds[0]["max_lifetime_epsilon"] > first_rounds[-1]["max_lifetime_epsilon"]
    assert second_rounds[0]["max_epsilon"] == pytest.approx(first_rounds[0]["max_epsilon"], rel=1e-9)
    assert all(r["max_epsilon"] <= 4.0 for r in first_rounds + second_rounds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["max_lifetime_epsilon"] for r in metrics["rounds"]] == [r["max_lifetime_epsilon"] for r in second_rounds]
    assert "max lifetime epsilon" in second.stderr
    (folder,) = ledgers.iterdir()  # one folder for this data set and partition, kept by --overwrite
    for site in SITES:
        assert _ledger(out, site).parent.parent == folder
        with PrivacyLedger(folder / site / "ledger.sqlite", create=False) as ledger:
            ledger.verify()
            assert len({s.run_id for s in ledger.sessions(site)}) == 2
            assert len(ledger.sessions(site)) == 4


def test_simulate_resume_goes_on_after_the_last_round_with_the_sites_state(tmp_path: Path, orl_root: Path) -> None:
    # Arrange: a private run of 2 rounds
    scenario = _scenario(tmp_path, orl_root, privacy={"epsilon": 8.0})
    out = tmp_path / "run"
    first = _simulate(scenario, out)
    assert first.exit_code == 0, first.stderr

    # Act: resume it with the plan raised to 3 rounds
    result = runner.invoke(app, ["simulate", "--resume", str(out), "--rounds", "3", "--format", "json", "-q"])

    # Assert: one more round, numbered 3, from the same run; every site's spend still within 8
    assert result.exit_code == 0, result.stderr
    assert [r["round"] for r in _last_json(result.stdout)["rounds"]] == [3]
    with RunStore(out / "runs.sqlite") as store:
        (run,) = store.runs()
        assert run.status == "completed" and run.rounds_done == 3
        assert store.last_checkpoint(run.run_id) == (3, str((out / "checkpoints" / "round-0003.pt").resolve()))
    for site in SITES:
        with PrivacyLedger(_ledger(out, site)) as ledger:
            sessions = ledger.sessions(site)
            assert [s.round for s in sessions] == [1, 2, 3]
            assert ledger.spend(site).epsilon <= 8.0


def test_simulate_resume_of_a_directory_without_a_run_exits_9(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text("")

    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path / "empty")])

    assert result.exit_code == 9
    assert "no run to resume" in result.stderr


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path: Path, orl_root: Path) -> None:
    # A Ray head started apart from fedface (as on a cluster's head machine), in its own session
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = Path("/tmp") / f"ffray-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        scenario = _scenario(tmp_path, orl_root, federation={"rounds": 1}, privacy={"epsilon": 8.0})
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:  # the head takes a few seconds to accept drivers
            result = _simulate(scenario, tmp_path / "run", "--ray-address", f"127.0.0.1:{port}", "--overwrite")
            if result.exit_code == 0:
                break
            time.sleep(2)
        assert result is not None and result.exit_code == 0, result.stderr if result else "no run"
        assert [r["answered"] for r in _last_json(result.stdout)["rounds"]] == [3]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        gc.collect()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_simulate_init_from_starts_from_a_checkpoint_and_refuses_one_of_another_shape(tmp_path: Path, orl_root: Path) -> None:
    # Arrange: a checkpoint of the same encoder shape (a first, short run), and a scenario whose
    # encoder has another shape
    scenario = _scenario(tmp_path, orl_root, federation={"rounds": 1})
    first = _simulate(scenario, tmp_path / "first")
    assert first.exit_code == 0, first.stderr
    ckpt = tmp_path / "first" / "checkpoints" / "round-0001.pt"
    other = tmp_path / "other"
    other.mkdir()
    wider = _scenario(other, orl_root, model={"hidden-size": 12}, federation={"rounds": 1})

    # Act
    same = _simulate(scenario, tmp_path / "second", "--init-from", str(ckpt))
    refused = _simulate(wider, tmp_path / "third", "--init-from", str(ckpt))

    # Assert: the run records where it started; a mismatched encoder is a one-line config error
    assert same.exit_code == 0, same.stderr
    assert TrainConfig.from_toml(tmp_path / "second" / "config.toml").training.init_from == ckpt
    assert refused.exit_code == 3
    assert "holds an encoder of another shape" in refused.stderr
    assert not (tmp_path / "third").exists()  # refused before anything was written


def test_alternating_timing_run_masks_odd_rounds_and_every_site_answers_both_kinds(tmp_path: Path, orl_root: Path) -> None:
    # bench federated's paired timing: SecAgg+ and clear rounds alternate in one run
    from fedface.common.config import TrainConfig
    from fedface.simulations.simulate import run_federated

    cfg = TrainConfig.from_toml(_scenario(tmp_path, orl_root, federation={"rounds": 3}, privacy={"epsilon": 8.0}))
    result = run_federated(cfg, out_dir=tmp_path / "paired", alternate_secagg=True)

    assert result.completed, result.error
    assert [r["secagg"] for r in result.history] == [True, False, True]
    assert [r["answered"] for r in result.history] == [3, 3, 3]
    # every round trained: each site charged its ledger once per round, whichever the kind
    for site in SITES:
        with PrivacyLedger(_ledger(tmp_path / "paired", site)) as ledger:
            assert [s.round for s in ledger.sessions(site)] == [1, 2, 3]


def test_simulated_sites_refuse_a_clear_round_when_their_scenario_requires_secagg(
    tmp_path: Path, orl_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sites whose scenario requires SecAgg+ never send a clear update, even when the server asks
    from fedface.common.config import TrainConfig
    from fedface.server import app as server_app
    from fedface.simulations.simulate import run_federated

    cfg = TrainConfig.from_toml(_scenario(tmp_path, orl_root, federation={"rounds": 2}))
    original = server_app.make_server_app
    # a server that runs clear rounds although the scenario (and so the sites) require SecAgg+
    monkeypatch.setattr(server_app, "make_server_app", lambda rounds, initial, **_: original(rounds, initial, alternate_secagg=True))
    result = run_federated(cfg, out_dir=tmp_path / "run")

    assert [r["secagg"] for r in result.history] == [True, False]
    assert [(r["answered"], r["refused"]) for r in result.history] == [(3, 0), (0, 3)]
    assert result.history[1]["reasons"] == {"policy: secagg required": 3}


# --- receipts: the server keeps them; a rolled-back ledger is caught --------------------------


def test_receipts_kept_by_the_server_catch_a_truncated_site_ledger(tmp_path: Path, orl_root: Path) -> None:
    import sqlite3

    # Arrange: a private run; the server keeps each site's signed receipt of each round
    scenario = _scenario(tmp_path, orl_root, privacy={"epsilon": 8.0})
    out = tmp_path / "run"
    first = _simulate(scenario, out)
    assert first.exit_code == 0, first.stderr
    with RunStore(out / "runs.sqlite", create=False) as store:
        kept = store.receipts(site="site-000")
    assert [(r.round, r.problem) for r in kept] == [(1, None), (2, None)]
    exported = tmp_path / "site-000.receipts"
    assert runner.invoke(app, ["privacy", "receipts", "--run-store", str(out / "runs.sqlite"), "--site", "site-000", "--out", str(exported)]).exit_code == 0
    # the run directory itself is taken as its run store too
    from_dir = tmp_path / "site-000-from-dir.receipts"
    assert runner.invoke(app, ["privacy", "receipts", "--run-store", str(out), "--site", "site-000", "--out", str(from_dir)]).exit_code == 0
    assert from_dir.read_text() == exported.read_text()
    ledger = _ledger(out, "site-000")
    ok = runner.invoke(app, ["privacy", "verify", "--ledger", str(ledger), "--receipts", str(exported)])
    assert ok.exit_code == 0, ok.stderr

    # Act: the last session deleted behind the triggers' back, the counter put back
    with sqlite3.connect(ledger) as conn:
        conn.executescript(
            "DROP TRIGGER sessions_no_delete;"
            "DELETE FROM sessions WHERE id = (SELECT max(id) FROM sessions);"
            "UPDATE sqlite_sequence SET seq = seq - 1 WHERE name = 'sessions';"
            "CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'fedface ledger is append-only'); END;"
        )
    with PrivacyLedger(ledger) as book:
        book.verify()  # the ledger's own check cannot see it
    caught = runner.invoke(app, ["privacy", "verify", "--ledger", str(ledger), "--receipts", str(exported)])
    # the run goes on (resumed into the same run store) with the truncated ledger
    again = runner.invoke(app, ["simulate", "--resume", str(out), "--rounds", "3", "--format", "json", "-q"])

    # Assert: the site's own check fails in one line; the server sees the next receipt not follow
    assert caught.exit_code == 11
    assert len(caught.stderr.strip().splitlines()) == 1 and "behind its receipts" in caught.stderr
    assert again.exit_code == 0, again.stderr
    with RunStore(out / "runs.sqlite", create=False) as store:
        later = store.receipts(site="site-000")
        others = store.receipts(site="site-001")
    assert [r.round for r in later] == [1, 2, 3]
    assert later[2].problem_kind == "not-following" and "site-000" in (later[2].problem or "")
    assert [r.problem for r in others] == [None, None, None]


def test_a_secagg_round_gives_the_same_global_model_as_a_clear_round_of_the_same_training(tmp_path: Path, orl_root: Path) -> None:
    # The same non-private round twice (sites' training is seeded): once through SecAgg+, where
    # the sites send updates and the server adds their unmasked average to the weights it sent,
    # once in the clear, where it averages their weights. The two global models agree to
    # SecAgg+'s quantisation (a step of 16 / 2^22 per site over a total weight of 0.12); a
    # server that used the bare update, or sites that sent weights cut by SecAgg+'s clipping,
    # would not.
    from fedface.common.checkpoint import load_checkpoint
    from fedface.common.config import TrainConfig
    from fedface.simulations.simulate import run_federated

    states = {}
    for secagg in (True, False):
        cfg = TrainConfig.from_toml(
            _scenario(tmp_path, orl_root, federation={"rounds": 1, "secagg": secagg}, **{"site-policy": {"require-secagg": False}})
        )
        out = tmp_path / f"secagg-{secagg}"
        result = run_federated(cfg, out_dir=out, ledger_dir=tmp_path / f"ledgers-{secagg}")
        assert result.completed, result.error
        states[secagg] = load_checkpoint(out / "checkpoints" / "round-0001.pt").encoder_state

    moved = 0.0
    for name, masked in states[True].items():
        clear = states[False][name]
        np.testing.assert_allclose(masked.numpy(), clear.numpy(), rtol=0, atol=5e-4, err_msg=name)
        moved = max(moved, float(clear.abs().max()))
    assert moved > 0.01  # the weights are real weights, not a near-zero update
