"""`fedface bench baseline` end to end on real faces, shortened (1 epoch, 2 folds)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedface.simulations.cli import app

runner = CliRunner()

pytestmark = pytest.mark.integration

REQUIRED = (
    "closed_rank1",
    "open_verif_acc",
    "open_verif_auc",
    "open_tar_far1e-2",
    "occluded_rank1",
    "expression_acc",
    "wall_s",
    "peak_rss_mb",
)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_bench_baseline_prints_every_figure_as_json_last_line(orl_root: Path, yale_a_root: Path, jobs: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench", "baseline", "--orl", str(orl_root), "--yale", str(yale_a_root),
            "--epochs", "1", "--folds", "2", "--expression-folds", "2", "--jobs", jobs,
        ],
    )

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert key in figures, key
    for key in ("closed_rank1", "open_verif_acc", "open_tar_far1e-2", "occluded_rank1", "expression_acc"):
        assert key in figures["eigenfaces"], key
        assert 0.0 <= figures["eigenfaces"][key] <= 1.0
    # Eigenfaces on ORL is a well-known figure: far above chance even on 2 folds
    assert figures["eigenfaces"]["closed_rank1"] > 0.85
    assert [row["fold"] for row in figures["open_folds"]] == [0, 1]
    assert all(row["test_identities"] == 20 for row in figures["open_folds"])
    assert figures["workers"] == int(jobs)
    assert figures["peak_rss_mb"] > 50


def test_bench_baseline_missing_orl_exits_4(tmp_path: Path, yale_a_root: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "baseline", "--orl", str(tmp_path / "none"), "--yale", str(yale_a_root)])

    assert result.exit_code == 4
    assert result.stderr.strip().startswith("DataNotFoundError:")


# --- fedface bench dp ---------------------------------------------------------------------------

TINY_MODEL = "[model]\npasses = [\"rows\", \"columns\"]\nhidden-size = 16\nembedding-dim = 16\ndownsample = 4\n"


def test_bench_dp_times_all_three_steps_in_one_run(orl_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_MODEL)

    result = CliRunner().invoke(
        app,
        ["bench", "dp", "--orl", str(orl_root), "--config", str(config), "--batch-size", "8",
         "--steps", "1", "--repeats", "2", "--warmup", "1", "--no-memory"],
    )

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("nonprivate_step_s", "fedface_dp_step_s", "opacus_dpgru_step_s"):
        assert figures[key] > 0, key
        assert len(figures["step_s_all"][key.removesuffix("_step_s")]) == 2
    assert figures["dp_over_nonprivate"] == pytest.approx(figures["fedface_dp_step_s"] / figures["nonprivate_step_s"])
    assert figures["opacus_over_fedface"] == pytest.approx(figures["opacus_dpgru_step_s"] / figures["fedface_dp_step_s"])
    assert figures["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


@pytest.mark.parametrize("trainable", ["gru", "neck"])
def test_bench_dp_variants_train_the_same_parameters(trainable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from fedface.common.config import TrainConfig

    dp = importlib.import_module("fedface.simulations.bench.dp")  # the package exports the command under the same name

    cfg = TrainConfig().with_overrides(
        {"data.image-size": [16, 16], "model.stem": [4], "model.hidden-size": 4, "model.embedding-dim": 8, "model.downsample": 1,
         "evaluation.occlusion-box": 8, "training.precision": "bf16", "privacy.trainable": trainable}
    )
    trained: dict[str, int] = {}
    real = torch.optim.AdamW
    current: list[str] = []

    def spy(params, **kw):  # type: ignore[no-untyped-def]
        params = list(params)
        trained[current[0]] = sum(p.numel() for p in params if p.requires_grad)
        return real(params, **kw)

    monkeypatch.setattr(dp.torch.optim, "AdamW", spy)
    with warnings.catch_warnings():
        dp._quiet_opacus_hooks()  # as the bench does: Opacus' DPGRU warns on every step
        _run_variants(dp, cfg, current)
    assert len(set(trained.values())) == 1, trained  # every variant updates exactly the same parameters


def _run_variants(dp: Any, cfg: Any, current: list[str]) -> None:
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    names = dp.variants(cfg)
    assert "fedface_dp_fp32_stem" in names  # a frozen stem in bf16: its fp32 baseline is timed too
    for name in names:
        current[:] = [name]
        dp._make_step(name, cfg, x, y, 3)()


def test_bench_dp_refuses_an_unknown_device_in_one_line(orl_root: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "dp", "--orl", str(orl_root), "--device", "gpu", "--no-memory"])

    assert result.exit_code == 3
    assert result.stderr.strip() == "ConfigError: unknown device 'gpu': expected auto, cpu, cuda or cuda:N"


# --- fedface bench privacy ----------------------------------------------------------------------


def test_bench_privacy_reports_rows_per_epsilon_and_start(orl_root: Path, yaleb_root: Path, tmp_path: Path) -> None:
    # Arrange: the packaged recipes' shapes, one epoch each, a small encoder
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_MODEL + "[training]\nepochs = 1\nbatch-size = 64\nlr = 1e-2\n[privacy]\ndelta = 1e-5\n")
    pretrain = tmp_path / "pre.toml"
    pretrain.write_text(TINY_MODEL + "[split]\nkind = \"closed-set\"\ntrain-per-identity = 54\n[training]\nepochs = 1\n")

    # Act
    result = CliRunner().invoke(
        app,
        ["bench", "privacy", "--orl", str(orl_root), "--public", str(yaleb_root), "--epsilons", "2,inf",
         "--recipe", str(recipe), "--pretrain-config", str(pretrain), "--jobs", "1"],
    )

    # Assert
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["eps"], r["init"]) for r in figures["rows"]] == [(2.0, "scratch"), ("inf", "scratch"), (2.0, "pretrained"), ("inf", "pretrained")]
    for row in figures["rows"]:
        assert 0.0 <= row["open_verif_acc"] <= 1.0 and 0.0 <= row["closed_rank1"] <= 1.0
        if row["eps"] == "inf":
            assert row["open_epsilon_spent"] is None
        else:
            assert 1.9 < row["open_epsilon_spent"] <= 2.0 and 1.9 < row["closed_epsilon_spent"] <= 2.0
    assert set(figures["pretrained_only"]) >= {"open_verif_acc", "closed_rank1"}


def test_bench_privacy_rejects_a_bad_epsilon_list() -> None:
    result = CliRunner().invoke(app, ["bench", "privacy", "--epsilons", "8,zero"])

    assert result.exit_code == 2
    assert "--epsilons" in result.stderr


# --- fedface bench federated: the privacy figure it reports ---------------------------------------


def test_bench_federated_site_epsilon_is_never_reported_as_zero_for_a_spending_run() -> None:
    import math

    from fedface.simulations.bench.common import scenario_config
    from fedface.simulations.bench.federated import _max_site_epsilon

    private = scenario_config("federated.toml")  # epsilon 8 at each site
    public = private.with_overrides({"privacy.epsilon": math.inf})

    assert _max_site_epsilon(private, [{"max_epsilon": 3.5}, {"max_epsilon": None}, {"max_epsilon": 7.9}]) == 7.9
    assert _max_site_epsilon(private, [{"max_epsilon": None}]) is None  # nothing reported: unknown, not 0
    assert _max_site_epsilon(public, [{"max_epsilon": None}]) == math.inf  # not private: unbounded


def test_bench_federated_pairs_each_kind_of_round_and_leaves_out_the_first() -> None:
    from fedface.simulations.bench.federated import _paired_seconds

    # round 1 (SecAgg+) starts Ray's actors: never counted
    history = [{"secagg": i % 2 == 1, "seconds": s} for i, s in enumerate([9.0, 1.5, 2.0, 1.4, 1.9, 1.6, 2.1], start=1)]

    assert _paired_seconds(history, secagg=True) == 2.0  # rounds 3, 5, 7
    assert _paired_seconds(history, secagg=False) == 1.5  # rounds 2, 4, 6


# Ray drops its helper processes' Popen objects at shutdown (see tests/integration/test_simulate.py)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bench_federated_no_timing_measures_accuracy_from_a_starting_checkpoint(orl_root: Path, tmp_path: Path) -> None:
    import gc

    # a tiny encoder, trained one epoch centrally: the starting checkpoint of every variant
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_MODEL + "[training]\nepochs = 1\nbatch-size = 64\n[privacy]\nepsilon = 8.0\n"
                      "[federation]\nsites = 3\nrounds = 2\nlocal-epochs = 1\n")
    start = tmp_path / "start"
    trained = CliRunner().invoke(app, ["train", "-c", str(config), "--data", str(orl_root), "--out", str(start), "--epsilon", "inf", "-q"])
    assert trained.exit_code == 0, trained.stderr

    result = CliRunner().invoke(app, ["bench", "federated", "--orl", str(orl_root), "--scenario", str(config),
                                      "--init-from", str(start / "checkpoint.pt"), "--no-timing"])
    gc.collect()  # Ray's dropped objects now, under this test's warning filters

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(figures["federated_dp_per_round"]) == 2 and figures["completed"] is True
    # the pre-trained start is evaluated, and what federated DP added to it is reported
    assert figures["init_from"] == str(start / "checkpoint.pt") and 0.0 <= figures["initial_open_verif_acc"] <= 1.0
    assert figures["federated_dp_minus_initial"] == pytest.approx(figures["federated_dp_open_verif_acc"] - figures["initial_open_verif_acc"])
    assert 0.0 < figures["federated_dp_max_site_epsilon"] <= 8.0 and 0.0 < figures["central_dp_epsilon_spent"] <= 8.0
    # no SecAgg+ timing runs: their figures are absent, not made up
    assert figures["plain_dp_open_verif_acc"] is None and figures["secagg_over_plain"] is None
    assert figures["secagg_round_s"] is None and "seconds per round" not in result.stderr


# --- fedface bench policy -----------------------------------------------------------------------


def test_bench_policy_times_the_checks_inside_real_rounds(orl_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_MODEL + "[privacy]\nepsilon = 8.0\n[federation]\nlocal-epochs = 1\n")

    result = CliRunner().invoke(app, ["bench", "policy", "--orl", str(orl_root), "--scenario", str(config), "--rounds", "3"])

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(figures["policy_s_all"]) == len(figures["receipt_s_all"]) == len(figures["round_s_all"]) == 3
    # every round did the policy's work and signed a receipt, inside a round that took longer
    assert all(0 < p < r for p, r in zip(figures["policy_s_all"], figures["round_s_all"], strict=True))
    assert all(0 < p < r for p, r in zip(figures["receipt_s_all"], figures["round_s_all"], strict=True))
    assert figures["policy_over_round"] == pytest.approx(figures["policy_s"] / figures["round_s"])


def test_bench_console_times_every_page_and_report_on_a_copy_of_the_store(tmp_path: Path) -> None:
    from fedface.server.store import Participation, RunStore

    run = tmp_path / "run"
    with RunStore(run / "runs.sqlite") as store:
        store.start_run("r", config={"data": {"root": "/faces/orl"}, "privacy": {"epsilon": 8.0}}, sites=3, rounds=2, secagg=True)
        for n in (1, 2):
            store.record_round(
                "r", n, started_at=f"2026-12-01T10:0{n}:00+00:00", seconds=2.0, sampled=["a", "b", "c"],
                participation=[Participation(s, "answered", examples=30, epsilon=2.0 * n, delta=1e-5, accountant="rdp") for s in "abc"],
                metrics={"verif_acc": 0.7 + 0.05 * n, "verif_auc": 0.8},
            )
        store.finish_run("r", status="completed")
        before = store.cursor()

    result = runner.invoke(app, ["bench", "console", "--store", str(run), "--repeat", "1"])

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["run_id"], figures["sites"], figures["rounds"]) == ("r", 3, 2)
    for page in ("runs", "run", "sites", "privacy", "audit"):
        assert figures[f"page_{page}_ms"] > 0 and figures[f"page_{page}_over_reads"] > 0
    assert all(figures[f"report_render_{fmt}_s"] > 0 for fmt in ("json", "md", "csv", "html"))
    with RunStore(run / "runs.sqlite", create=False) as store:
        assert store.cursor() == before and store.actions() == []  # the bench logged in on a copy


def test_bench_console_without_a_run_store_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "console", "--store", str(tmp_path)])
    assert result.exit_code == 9
    assert result.stderr.strip().startswith("RunDirError: no run store at")


def test_bench_secagg_times_both_generators_on_each_federated_model() -> None:
    result = CliRunner().invoke(app, ["bench", "secagg", "--repeats", "1"])

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("federated", "fer2013_federated"):
        row = figures[key]
        assert row["masked_values"] > 100_000 and row["neighbours"] == row["sites"] - 1
        assert row["flower_mask_s"] > 0 and row["fedface_mask_s"] > 0
        assert row["site_round_masks_s"]["fedface"] == pytest.approx(row["fedface_mask_s"] * (row["neighbours"] + 1))
