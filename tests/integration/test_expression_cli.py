"""Expression recognition end to end on the real sets: `fedface train --task expression`,
`fedface evaluate CKPT --data OTHER_DIR`, and `fedface bench expression --quick`."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedface.common.checkpoint import load_checkpoint
from fedface.common.data.expressions import EXPRESSION_CLASSES

pytestmark = pytest.mark.integration

runner = CliRunner()


def _app():  # type: ignore[no-untyped-def]
    from fedface.simulations.cli import app

    return app


def _last_json(output: str) -> dict:  # type: ignore[type-arg]
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckplus_run(tmp_path_factory: pytest.TempPathFactory, ckplus_root: Path) -> Path:
    """`fedface train --task expression` on CK+, no config: the packaged FER2013 recipe, 2 epochs."""
    out = tmp_path_factory.mktemp("expr") / "ck"
    result = runner.invoke(
        _app(), ["train", "--task", "expression", "--data", str(ckplus_root), "--epochs", "2", "--out", str(out), "--format", "json", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    return out


def test_train_expression_without_config_uses_the_packaged_recipe(ckplus_run: Path) -> None:
    ckpt = load_checkpoint(ckplus_run / "checkpoint.pt")

    assert ckpt.task == "expression"
    assert tuple(ckpt.class_names) == EXPRESSION_CLASSES
    assert ckpt.config.model.stem == (32, 64, 128)
    assert ckpt.config.split.folds == 10
    metrics = json.loads((ckplus_run / "metrics.json").read_text())["final"]
    for key in ("expression_acc", "expression_macro_f1", "recall_happy", "occluded_expression_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "recall_neutral" not in metrics  # CK+'s peak frames show no neutral face


def test_expression_run_writes_its_confusion_matrix(ckplus_run: Path) -> None:
    record = json.loads((ckplus_run / "confusion.json").read_text())
    counts = np.asarray(record["counts"])
    metrics = json.loads((ckplus_run / "metrics.json").read_text())["final"]

    assert record["classes"] == list(EXPRESSION_CLASSES)
    assert counts.sum() == metrics["test_images"]
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["expression_acc"])
    assert (ckplus_run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_expression_checkpoint_on_another_expression_folder(ckplus_run: Path, tmp_path: Path, fer_root: Path) -> None:
    # any folder laid out like FER2013's train/ (<emotion>/*.jpg): links to 5 real images per class
    other = tmp_path / "faces"
    for emotion in sorted(os.listdir(fer_root / "train")):
        (other / emotion).mkdir(parents=True)
        for name in sorted(os.listdir(fer_root / "train" / emotion))[:5]:
            (other / emotion / name).symlink_to(fer_root / "train" / emotion / name)

    result = runner.invoke(_app(), ["evaluate", str(ckplus_run), "--data", str(other), "--format", "json", "-q"])

    assert result.exit_code == 0, result.stderr
    metrics = _last_json(result.stdout)
    assert metrics["test_images"] == 35
    assert 0.0 <= metrics["expression_acc"] <= 1.0
    assert 0.0 <= metrics["expression_macro_f1"] <= 1.0
    assert set(k for k in metrics if k.startswith("recall_")) == {f"recall_{c}" for c in EXPRESSION_CLASSES}


def test_evaluate_expression_checkpoint_on_jaffe(ckplus_run: Path, jaffe_root: Path) -> None:
    result = runner.invoke(_app(), ["evaluate", str(ckplus_run), "--data", str(jaffe_root), "--format", "json", "-q"])

    assert result.exit_code == 0, result.stderr
    assert _last_json(result.stdout)["test_images"] == 213


def test_train_expression_on_identity_data_exits_3_with_one_line(tmp_path: Path, orl_root: Path) -> None:
    result = runner.invoke(_app(), ["train", "--task", "expression", "--data", str(orl_root), "--epochs", "1", "--out", str(tmp_path / "r"), "-q"])

    assert result.exit_code == 3
    line = result.stderr.strip()
    assert line.startswith("ConfigError:") and "labelled with expressions" in line and len(line.splitlines()) == 1


# Ray drops its helper processes' Popen objects at shutdown (see tests/integration/test_simulate.py)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bench_expression_quick_prints_every_figure_and_reuses_finished_runs(
    tmp_path: Path, fer_root: Path, ckplus_root: Path, jaffe_root: Path
) -> None:
    args = [
        "bench", "expression", "--quick", "--seeds", "1", "--out", str(tmp_path / "runs"),
        "--fer", str(fer_root / "train"), "--ckplus", str(ckplus_root), "--jaffe", str(jaffe_root),
    ]

    first = runner.invoke(_app(), args)
    gc.collect()  # Ray's dropped objects now, under this test's warning filters
    second = runner.invoke(_app(), args)

    assert first.exit_code == 0, first.stderr
    figures = _last_json(first.stdout)
    for key in ("fer2013_val_acc", "fer2013_val_macro_f1", "ckplus_10fold_acc", "jaffe_loso_acc", "fer2013_train_s"):
        assert key in figures, key
    for key in ("fer2013_val_acc", "ckplus_10fold_acc", "jaffe_loso_acc"):
        assert 0.0 <= figures["eigenfaces"][key] <= 1.0, key
    assert figures["quick"] is True and figures["folds"] == 2
    assert figures["reused"] == []
    # the private figures: federated DP (SecAgg+, DP at each site) and central DP beside the
    # non-private recipe, whose run they are measured against
    for key in ("fed_dp_fer2013_val_acc", "central_dp_fer2013_val_acc", "public_init_fer2013_val_acc"):
        assert 0.0 <= figures[key] <= 1.0, key
    assert figures["central_fer2013_val_acc"] == figures["fer2013_val_acc"]
    assert figures["fed_dp_minus_central"] == pytest.approx(figures["fed_dp_fer2013_val_acc"] - figures["fer2013_val_acc"])
    assert 0.0 < figures["fed_dp_max_site_epsilon"] <= 8.0
    assert 0.0 < figures["central_dp_epsilon_spent"] <= 8.0
    fed_run = tmp_path / "runs" / "fer2013-fed-dp-seed1"
    assert [r["answered"] for r in json.loads((fed_run / "bench-result.json").read_text())["history"]] == [3]
    # the benchmark's sites spend in ledgers of its own, never the user's (the default site
    # ledger folder is this test's own, from conftest)
    assert list((fed_run / "ledgers").rglob("*.sqlite"))
    user_ledgers = Path(os.environ["FEDFACE_LEDGER_DIR"])
    assert not user_ledgers.exists() or not list(user_ledgers.rglob("*.sqlite"))
    # the second run trains nothing: every run directory of the first is reused, same figures
    assert second.exit_code == 0, second.stderr
    again = _last_json(second.stdout)
    # FER2013, 2 + 2 folds, the public pre-training, the federated and the central DP runs
    assert len(again["reused"]) == 1 + 2 + 2 + 3
    assert again["fer2013_val_acc"] == figures["fer2013_val_acc"]
    assert again["ckplus_10fold_acc"] == figures["ckplus_10fold_acc"]
    assert again["fed_dp_fer2013_val_acc"] == figures["fed_dp_fer2013_val_acc"]
    assert "reused" in second.stderr
    # a run that did not finish (here: its confusion counts are gone) is never reused: it is retrained
    fold = next((tmp_path / "runs" / "ckplus-seed1").iterdir())
    (fold / "confusion.json").unlink()
    third = runner.invoke(_app(), args + ["--no-federated"])
    assert third.exit_code == 0, third.stderr
    assert str(fold) not in _last_json(third.stdout)["reused"]
    assert len(_last_json(third.stdout)["reused"]) == 4
    assert "fed_dp_fer2013_val_acc" not in _last_json(third.stdout)
    assert (fold / "confusion.json").is_file() and (fold / "init.json").is_file()


def test_bench_lfw_quick_prints_held_out_verification_beside_eigenfaces(tmp_path: Path, lfw_root: Path, orl_root: Path, yaleb_root: Path) -> None:
    args = ["bench", "lfw", "--quick", "--seeds", "1", "--out", str(tmp_path / "runs"), "--lfw", str(lfw_root),
            "--orl", str(orl_root), "--yaleb", str(yaleb_root)]

    result = runner.invoke(_app(), args)

    assert result.exit_code == 0, result.stderr
    figures = _last_json(result.stdout)
    for key in ("lfw_heldout_verif_acc", "lfw_heldout_auc", "eigenfaces_verif_acc", "eigenfaces_whitened_verif_acc", "train_s"):
        assert key in figures, key
    for key in ("lfw_heldout_verif_acc", "eigenfaces_verif_acc", "eigenfaces_whitened_verif_acc"):
        assert 0.0 <= figures[key] <= 1.0, key
    # the pre-trained encoder as it is on ORL and Extended Yale B, each beside the same Eigenfaces
    for name in ("orl", "extended_yaleb"):
        for key in (f"{name}_verif_acc", f"{name}_auc", f"{name}_eigenfaces_verif_acc", f"{name}_eigenfaces_whitened_verif_acc"):
            assert 0.0 <= figures[key] <= 1.0, key
        assert figures["per_seed"][0][f"{name}_verif_acc"] == figures[f"{name}_verif_acc"]
    # the held-out people are a tenth of the (quick) 300, and they give genuine pairs
    assert figures["heldout_people"] == 30 and figures["genuine_pairs"] > 0
    ckpt = load_checkpoint(tmp_path / "runs" / "lfw-seed1" / "checkpoint.pt")
    assert ckpt.config.data.crop == (0.26, 0.26, 0.74, 0.74)
    assert ckpt.config.model.stem == (32, 64, 128)
    # run again: the finished pre-training is reused (an identity run writes no confusion
    # counts; it was once deleted and retrained by every rerun), the same figures
    again = runner.invoke(_app(), args + ["--no-transfer"])
    assert again.exit_code == 0, again.stderr
    assert _last_json(again.stdout)["reused"] == [str(tmp_path / "runs" / "lfw-seed1")]
    assert _last_json(again.stdout)["lfw_heldout_verif_acc"] == figures["lfw_heldout_verif_acc"]


# Ray drops its helper processes' Popen objects at shutdown (see tests/integration/test_simulate.py)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_simulate_expression_shares_the_head_through_secagg_and_evaluates_expressions(tmp_path: Path, ckplus_root: Path) -> None:
    # a tiny conv-stem model on CK+ (its fixed fold of subjects held out), 3 sites, 2 rounds,
    # DP-SGD at eps 8 at each site, SecAgg+ on
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        f"""
[data]
root = "{ckplus_root}"
image-size = [16, 16]
[split]
kind = "open-set"
folds = 10
[model]
stem = [4]
passes = ["rows"]
hidden-size = 8
embedding-dim = 8
downsample = 1
[training]
task = "expression"
batch-size = 64
[evaluation]
shift-tta = 0
occlusion-box = 4
[privacy]
epsilon = 8.0
[federation]
sites = 3
rounds = 2
""",
        encoding="utf-8",
    )
    out = tmp_path / "run"

    result = runner.invoke(
        _app(), ["simulate", "-c", str(scenario), "--out", str(out), "--ledger-dir", str(tmp_path / "ledgers"), "--format", "json", "-q"]
    )
    gc.collect()  # Ray's dropped objects now, under this test's warning filters

    assert result.exit_code == 0, result.stderr
    summary = _last_json(result.stdout)
    assert [r["answered"] for r in summary["rounds"]] == [3, 3]
    assert all(r["secagg"] for r in summary["rounds"])
    assert 0.0 <= summary["expression_acc"] <= 1.0 and "expression_macro_f1" in summary
    assert summary["rounds"][-1]["max_epsilon"] <= 8.0
    ckpt = load_checkpoint(out / "checkpoints" / "round-0002.pt")
    assert ckpt.task == "expression" and ckpt.head_state and tuple(ckpt.class_names) == EXPRESSION_CLASSES
    # the shared head is part of the global model: no site keeps one of its own
    assert not list((out / "sites").glob("*/head.pt"))
    # and the run's final model evaluates on its own held-out fold
    evaluated = runner.invoke(_app(), ["evaluate", str(out), "--format", "json", "-q"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert _last_json(evaluated.stdout)["expression_acc"] == pytest.approx(summary["expression_acc"])
