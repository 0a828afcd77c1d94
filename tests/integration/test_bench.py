"""`fedface bench baseline` end to end on real faces, shortened (1 epoch, 2 folds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedface.simulations.cli import app

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
