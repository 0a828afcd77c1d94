"""The extraction test (fedface.simulations.bench.extraction) on real ORL templates.

Templates: a randomly initialised encoder (``build_encoder`` with the packaged baseline model,
``torch.manual_seed(0)``; no checkpoint fixture exists and training one takes minutes), flip
test-time augmentation, each of the 40 ORL people's template the normalised mean embedding of
their first 3 images; the threshold is the accuracy-maximising one on all ORL pairs. Such
templates are real faces through a real (untrained) GRU: they cluster as face embeddings do.

What is shown:
- raw scores (what a naive encrypted search that decrypts for the querier returns) give every
  template back from the 128 basis queries: cosine > 0.99 (the test can fail);
- decisions only (what fedface returns), 1,000 queries (the gallery's hourly limit per site):
  no reconstruction reaches cosine 0.3;
- the attack is no straw man: against random templates at a low threshold, where its queries
  do match, its adaptive step climbs to cosine > 0.8;
- the rule-based oracle (the key holder's ``decide`` on protected values in the clear) and the
  real encrypted services decide alike: 12 attack queries and 12 genuine probes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedface.client.enroll import TemplateClient, person_templates
from fedface.common.crypto.envelope import new_signing_key
from fedface.common.crypto.keyfiles import SiteKeys, create_signing_key, create_template_keys, load_signing_key, load_template_context
from fedface.common.data import load_faces, to_tensor
from fedface.common.metrics import best_threshold, verification_pairs
from fedface.common.models import build_encoder
from fedface.common.training import embed
from fedface.server.gallery import Gallery
from fedface.server.keyholder import KeyHolder
from fedface.simulations.bench.common import scenario_config
from fedface.simulations.bench.extraction import (
    NO_MATCH,
    basis_queries,
    best_cosine,
    decision_attack,
    pipeline_oracle,
    random_queries,
    rule_oracle,
    score_attack,
    unit_rows,
)

ENCODER = "random-init-seed-0"


class _Faces:
    def __init__(self, templates: np.ndarray, names: list[str], probes: np.ndarray, threshold: float) -> None:
        self.templates, self.names, self.probes, self.threshold = templates, names, probes, threshold


@pytest.fixture(scope="module")
def orl_templates(orl_root: Path) -> _Faces:
    faces = load_faces(orl_root, size=(64, 64))
    torch.manual_seed(0)
    encoder = build_encoder(scenario_config("baseline.toml").model, image_size=(64, 64))
    emb = embed(encoder, to_tensor(faces.images), device=torch.device("cpu"), flip_tta=True).astype(np.float64)
    i, j, same = verification_pairs(faces.labels, seed=0)
    threshold, _ = best_threshold(np.sum(emb[i] * emb[j], axis=1), same)
    first = np.concatenate([np.flatnonzero(faces.labels == k)[:3] for k in range(faces.num_identities)])
    names, templates = person_templates(emb[first], faces.labels[first], faces.identity_names)
    probes = emb[np.setdiff1d(np.arange(len(faces)), first)]
    return _Faces(templates, names, probes, threshold)


def test_score_attack_on_raw_scores_reconstructs_every_template(orl_templates: _Faces) -> None:
    t = orl_templates.templates

    recon = score_attack(lambda q: q @ t.T, t.shape[1])

    assert np.min(np.sum(recon * t, axis=1)) > 0.99


def test_decision_attack_on_decisions_only_stays_below_cosine_0_3(orl_templates: _Faces) -> None:
    t = orl_templates.templates
    oracle = rule_oracle(t, [len(t)], orl_templates.threshold, rng=np.random.default_rng(1))

    attack = decision_attack(oracle, t.shape[1], budget=1000, rng=np.random.default_rng(2))

    assert len(attack.queries) == 1000
    assert best_cosine(attack.reconstructions, t) <= 0.3
    # why: no basis or random query lands within the threshold of a face template, so the
    # adaptive step never starts (the next test shows it climbs once queries do match)
    assert attack.matched == []


def test_decision_attack_climbs_where_its_queries_match() -> None:
    rng = np.random.default_rng(0)
    t = unit_rows(rng.standard_normal((40, 128)))
    oracle = rule_oracle(t, [40], 0.3, rng=np.random.default_rng(1))

    attack = decision_attack(oracle, 128, budget=3000, rng=np.random.default_rng(2), checkpoints=[1000])

    first_matches = {j: unit_rows(attack.queries[attack.answers == j].mean(axis=0)) for j in attack.matched}
    assert attack.matched
    assert best_cosine(attack.reconstructions, t) > 0.8
    assert best_cosine(attack.reconstructions, t) > best_cosine(first_matches, t)


def test_decision_attack_explores_with_the_given_starts_before_random_queries() -> None:
    rng = np.random.default_rng(0)
    t = unit_rows(rng.standard_normal((8, 16)))
    starts = t[:3] * 2.0  # the attacker's own guesses (not unit length): they match their templates

    attack = decision_attack(rule_oracle(t, [8], 0.9, rng=rng), 16, budget=96, rng=rng, batch=3, starts=starts)

    np.testing.assert_allclose(attack.queries[32:35], t[:3])
    assert attack.answers[32:35].tolist() == [0, 1, 2]
    assert set(attack.matched) >= {0, 1, 2}


@pytest.mark.integration  # about 10 s: keys, one encrypted block, 24 encrypted searches
def test_rule_oracle_decides_as_the_encrypted_services(orl_templates: _Faces, tmp_path: Path) -> None:
    t, thr = orl_templates.templates, orl_templates.threshold
    create_template_keys(tmp_path / "kh", t.shape[1])
    public = load_template_context(tmp_path / "kh")
    registry = tmp_path / "sites"
    registry.mkdir()
    clients = {}
    for site in ("orl", "attacker"):
        pair = create_signing_key(tmp_path, site)
        SiteKeys(registry).register(site, pair.public_key)
        clients[site] = TemplateClient(site, load_signing_key(pair.private_key), public)
    server_key = new_signing_key()
    keyholder = KeyHolder(tmp_path / "keyholder", load_template_context(tmp_path / "kh", tmp_path / "kh"), SiteKeys(registry), server_key.public_key())
    gallery = Gallery(tmp_path / "gallery", public, SiteKeys(registry), keyholder=keyholder, signing_key=server_key, threshold=thr)
    (envelope,) = clients["orl"].enroll_envelopes(orl_templates.names, t, ENCODER)
    gallery.enroll(envelope)
    rng = np.random.default_rng(3)
    # genuine probes whose plaintext decision is clear of the CKKS error and the flooding (1e-3 in score units)
    scores = np.sort(orl_templates.probes @ t.T, axis=1)
    clear = np.flatnonzero((np.abs(scores[:, -1] - thr) > 1e-3) & (scores[:, -1] - scores[:, -2] > 1e-3))
    queries = np.concatenate([basis_queries(t.shape[1])[rng.choice(256, 6, replace=False)], random_queries(6, t.shape[1], rng),
                              orl_templates.probes[rng.choice(clear, 12, replace=False)]])
    index = {f"orl/{n}": k for k, n in enumerate(orl_templates.names)}

    encrypted = pipeline_oracle(clients["attacker"], gallery, ENCODER, index)(queries)
    by_rule = rule_oracle(t, [len(t)], thr, rng=np.random.default_rng(4))(queries)

    np.testing.assert_array_equal(encrypted, by_rule)
    assert np.sum(by_rule != NO_MATCH) >= 6  # the probes match: the agreement is not only on "no match"
    gallery.close()
    keyholder.close()
