"""`fedface bench gallery` end to end through the CLI, with the smallest options (about 20 s).

One gallery of 1,000 templates (ORL and Extended Yale B people from an encoder trained here
for 3 epochs, padded with synthetic ones), 2 timed searches, 10 probes, a 300-query
extraction attack of which 6 go through the encrypted services.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedface.simulations.cli import app

pytestmark = pytest.mark.integration

PER_SIZE = ("enc_search_s", "enc_server_s", "enc_keyholder_s", "enc_site_s", "plain_search_s", "load_s", "blocks", "keyholder_request_bytes")


def test_bench_gallery_smallest_run_prints_sane_figures(orl_root: Path, yaleb_root: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "gallery", "--orl", str(orl_root), "--yaleb", str(yaleb_root), "--sizes", "1000", "--queries", "2",
         "--probes", "10", "--train-epochs", "3", "--extraction-budget", "300", "--extraction-encrypted", "6"],
    )

    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in PER_SIZE:
        assert set(figures[key]) == {"1000"}, key
    assert figures["blocks"]["1000"] == 2  # the ORL site's block and the Yale B site's
    s = figures["enc_search_s"]["1000"]
    assert 0 < figures["enc_server_s"]["1000"] < s and 0 < figures["enc_keyholder_s"]["1000"] < s and 0 < figures["enc_site_s"]["1000"] < s
    assert 0 < figures["plain_search_s"]["1000"] < s
    assert figures["enroll_s_per_template"] > 0
    assert figures["ciphertext_bytes_per_template"] > 4000  # 2 blocks of 128 ciphertexts for 1,000 templates
    assert figures["query_bytes"] > 100_000 and 0 < figures["result_bytes"] < 2000
    assert figures["probes_per_set"] == {"orl": 5, "extended_yaleb": 5}
    assert figures["rank1_agreement"] == 1.0
    assert figures["rank1_agreement_per_set"] == {"orl": 1.0, "extended_yaleb": 1.0}
    assert 0 < figures["max_score_diff"] <= 1e-3
    assert -1 < figures["threshold"] < 1 and figures["threshold_pairs"]["far"] <= 1e-3
    assert figures["extraction_best_cosine"] <= 0.3
    assert figures["extraction_budget"] == 300 and figures["extraction_encrypted_queries"] == 6
    assert figures["extraction_encrypted_agreement"] == 1.0
    assert set(figures["extraction_face_prior"]) >= {"best_cosine", "matched_templates", "first_match_cosine", "own_faces"}
    assert figures["extraction_raw_min_cosine"] > 0.99  # the same attack on raw scores: every template read back
    assert figures["encoder"]["source"] == "trained in this run" and figures["encoder"]["epochs"] == 3
    assert figures["peak_rss_mb"] > 50
