"""The `fedface` command end to end on real faces: train, evaluate, and every user error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedface.simulations.cli import app

pytestmark = pytest.mark.integration

TINY = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 8, "embedding-dim": 8},
    "training": {"epochs": 2, "threads": 1, "eval-every": 1},
    "evaluation": {"occlusion-box": 10, "occlusion-placements": 2},
}

runner = CliRunner()


def _write_config(tmp_path: Path, extra: dict[str, dict[str, object]] | None = None) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _last_json(stdout: str) -> dict[str, object]:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    config = _write_config(tmp)
    out = tmp / "run"
    result = runner.invoke(app, ["train", "-c", str(config), "--data", str(orl_root), "--out", str(out), "--format", "json", "-q"])
    assert result.exit_code == 0, result.stderr
    return out


def test_version_prints_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("fedface ")


def test_train_closed_set_writes_complete_run_dir(trained_run: Path) -> None:
    for name in ("config.toml", "split.json", "metrics.json", "checkpoint.pt"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert metrics["final"]["probe_images"] == 200.0
    assert 0.0 <= metrics["final"]["rank1"] <= 1.0
    assert "occluded_rank1" in metrics["final"]
    split = json.loads((trained_run / "split.json").read_text())
    assert split["kind"] == "closed-set"
    assert len(split["train"]) == len(split["test"]) == 200


def test_evaluate_without_data_reproduces_the_runs_test_metrics(trained_run: Path) -> None:
    final = json.loads((trained_run / "metrics.json").read_text())["final"]

    result = runner.invoke(app, ["evaluate", str(trained_run / "checkpoint.pt"), "--format", "json", "-q"])

    assert result.exit_code == 0, result.stderr
    metrics = _last_json(result.stdout)
    assert metrics["rank1"] == pytest.approx(final["rank1"])
    assert metrics["occluded_rank1"] == pytest.approx(final["occluded_rank1"])


def test_evaluate_on_other_data_treats_all_identities_as_unseen(trained_run: Path, yale_a_root: Path) -> None:
    result = runner.invoke(
        app, ["evaluate", str(trained_run / "checkpoint.pt"), "--data", str(yale_a_root), "--format", "json", "-q"]
    )

    assert result.exit_code == 0, result.stderr
    metrics = _last_json(result.stdout)
    assert metrics["test_identities"] == 15
    for key in ("verif_acc", "verif_auc", "tar_far1e-2", "rank1", "occluded_verif_acc"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key


def test_train_open_set_holds_identities_out(tmp_path: Path, orl_root: Path) -> None:
    config = _write_config(tmp_path, {"split": {"kind": "open-set", "test-identities": 10}})

    result = runner.invoke(
        app, ["train", "-c", str(config), "--data", str(orl_root), "--out", str(tmp_path / "r"), "--format", "json", "-q"]
    )

    assert result.exit_code == 0, result.stderr
    metrics = _last_json(result.stdout)
    assert metrics["test_identities"] == 10 and metrics["test_images"] == 100
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert not set(split["train_identities"]) & set(split["test_identities"])


def test_train_expression_on_yale_a_reports_expression_accuracy(tmp_path: Path, yale_a_root: Path) -> None:
    config = _write_config(tmp_path, {"split": {"test-identities": 5}})

    result = runner.invoke(
        app,
        ["train", "-c", str(config), "--data", str(yale_a_root), "--task", "expression", "--out", str(tmp_path / "r"), "--format", "json", "-q"],
    )

    assert result.exit_code == 0, result.stderr
    metrics = _last_json(result.stdout)
    # 5 held-out subjects x 6 expressions
    assert metrics["test_images"] == 30
    assert 0.0 <= metrics["expression_acc"] <= 1.0


def test_train_missing_data_dir_exits_4_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])

    assert result.exit_code == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"DataNotFoundError: data directory {tmp_path / 'nope'} does not exist")


def test_train_unknown_config_key_exits_3_naming_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhiden-size = 3\n")

    result = runner.invoke(app, ["train", "-c", str(bad)])

    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"ConfigError: model.hiden-size: unknown key (check its spelling; keys are kebab-case) ({bad})"
    )


def test_train_into_existing_run_dir_refuses_and_keeps_it(trained_run: Path, orl_root: Path, tmp_path: Path) -> None:
    before = (trained_run / "metrics.json").read_bytes()

    result = runner.invoke(app, ["train", "-c", str(_write_config(tmp_path)), "--data", str(orl_root), "--out", str(trained_run)])

    assert result.exit_code == 9
    assert result.stderr.strip().startswith("RunDirError: run directory")
    assert (trained_run / "metrics.json").read_bytes() == before


def test_evaluate_corrupt_checkpoint_exits_8(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint" * 10)

    result = runner.invoke(app, ["evaluate", str(bad)])

    assert result.exit_code == 8
    assert result.stderr.strip().startswith(f"CheckpointError: checkpoint {bad} is unreadable")


def test_train_corrupt_image_fails_by_default_naming_the_file(tmp_path: Path, orl_root: Path) -> None:
    data = tmp_path / "faces"
    for ident in ("s1", "s2", "s3"):
        (data / ident).mkdir(parents=True)
        for f in sorted((orl_root / ident).glob("*.pgm")):
            (data / ident / f.name).write_bytes(f.read_bytes())
    broken = data / "s2" / "3.pgm"
    broken.write_bytes(broken.read_bytes()[:40])

    result = runner.invoke(app, ["train", "-c", str(_write_config(tmp_path)), "--data", str(data), "--out", str(tmp_path / "r")])

    assert result.exit_code == 5
    assert result.stderr.strip().startswith(f"CorruptImageError: cannot read image {broken}")


@pytest.mark.parametrize("command", [["train"], ["evaluate", "checkpoint.pt"]])
def test_unknown_output_format_is_a_usage_error(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--format", "yaml"])

    assert result.exit_code == 2
    assert "expected text or json, got 'yaml'" in result.stderr


def test_private_train_is_charged_then_refused_once_the_budget_is_spent(tmp_path: Path, orl_root: Path) -> None:
    # Arrange: a budget of 2.5 for the data set, then private trainings spending up to 2 each
    config = _write_config(tmp_path)
    ledger = tmp_path / "ledger.sqlite"
    budget = runner.invoke(
        app, ["privacy", "budget", "--ledger", str(ledger), "--dataset", str(orl_root.resolve()), "--epsilon", "2.5", "--delta", "1e-5"]
    )
    assert budget.exit_code == 0, budget.stderr

    # Act
    first = runner.invoke(
        app,
        ["train", "-c", str(config), "--data", str(orl_root), "--out", str(tmp_path / "r1"), "--epsilon", "2",
         "--ledger", str(ledger), "--format", "json", "-q"],
    )
    status = runner.invoke(app, ["privacy", "status", "--ledger", str(ledger), "--format", "json"])
    second = runner.invoke(
        app,
        ["train", "-c", str(config), "--data", str(orl_root), "--out", str(tmp_path / "r2"), "--epsilon", "2",
         "--ledger", str(ledger), "-q"],
    )

    # Assert
    assert first.exit_code == 0, first.stderr
    spent = _last_json(first.stdout)["privacy"]
    assert spent["epsilon"] <= 2.0 and spent["sampling"] == "poisson"  # type: ignore[index]
    row = _last_json(status.stdout)["datasets"][0]  # type: ignore[index]
    assert row["epsilon"] == pytest.approx(spent["dataset_epsilon_after"], abs=1e-9)  # type: ignore[index]
    assert row["state"] == "ok"
    assert second.exit_code == 10
    assert "budget exhausted" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r2" / "checkpoint.pt").exists()
