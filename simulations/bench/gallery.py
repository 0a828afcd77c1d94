"""`fedface bench gallery`: encrypted 1:N search against the plaintext baseline, on real faces.

In one run, in one process, with the real services (no HTTP): a key holder's fresh template
keys, registered sites with their own Ed25519 keys, a :class:`~fedface.server.gallery.Gallery`
per gallery size and one :class:`~fedface.server.keyholder.KeyHolder`, each in a temporary
directory, every upload and query signed, verified, replay-checked and sealed exactly as the
services do it.

Faces
    The encoder is ``--encoder`` (a checkpoint or run directory), or, without it, one trained
    here first with the project's own :func:`~fedface.simulations.centralized.train_run`
    (packaged ``baseline.toml``, non-private, ``--train-epochs``) on half of the ORL and half of
    the Extended Yale B identities (seeded); only the other half is then enrolled and queried,
    so no enrolled person was seen in training. A given encoder enrolls every identity.
    Each enrolled person's template is the normalised mean embedding of ``--enroll-images``
    images (Extended Yale B: drawn from the well-lit images, light within 20 degrees of the
    axis, since the set holds near-black ones); the person's other images are the probes
    (``--probes`` of them at most, half from each set). Each gallery is padded to its size N
    with synthetic random unit templates (the ORL and Yale B sites' blocks first, then a
    ``synthetic`` site's).

Threshold
    The operating point of the encoder at ``--far`` (default 1e-3): the lowest threshold that
    accepts at most that share of the impostor pairs among the enrolled (held-out) identities'
    images (every genuine pair and as many impostor pairs, per set). The accuracy-maximising
    threshold of the same pairs is reported beside it; it accepts far too many impostors for
    a 1:N search (and, over 100,000 templates, random queries).

Per gallery size N (``--sizes``)
    ``load_s``: :meth:`Gallery.preload` (ciphertexts from SQLite into memory), not part of a
    search. ``enc_search_s``: median over ``--queries`` probes of one whole 1:N search: the
    site encrypts and signs (``enc_site_s``, with opening the sealed decision), the server
    verifies and scores every block and protects the results (``enc_server_s``), the key
    holder verifies, decrypts, floods and decides (``enc_keyholder_s``). ``plain_search_s``:
    median of the plaintext baseline (float32 matrix-vector product, top-1, threshold).

At the largest N
    ``enroll_s_per_template`` (site encryption and signing plus server verification and
    storage), ``ciphertext_bytes_per_template``; then every probe is searched encrypted and in
    the clear: ``rank1_agreement`` (same decision: identity or no match, top-1), per set and
    overall, and ``max_score_diff``: the largest difference between a raw CKKS score and the
    plaintext score, over every slot of every block searched, for the timing queries at every N
    and every probe. The raw scores are the server's computation (``score_block`` on the very
    ciphertexts the sites uploaded and the query ciphertext the site sent) redone by the bench
    before protection and flooding, and decrypted with the key holder's secret key, which the
    bench holds.

Extraction (:mod:`fedface.simulations.bench.extraction`), against the largest gallery
    ``extraction_best_cosine``: the decision-only attack with ``--extraction-budget`` queries
    (default 1,000: the gallery's and the key holder's limit per site and hour), answered by the
    key holder's own decision rule on the protected values in the clear;
    ``--extraction-encrypted`` of those queries are asked again through the encrypted services
    (``extraction_encrypted_agreement``: the same decisions). ``extraction_trace``: the best
    cosine at 256, 500, ... queries. ``extraction_at_best_accuracy_threshold``: the same attack
    at the looser best-accuracy threshold. ``extraction_face_prior`` (encoder trained here only):
    the same attack exploring with the embeddings of faces the attacker holds (the training
    half's images, none of them enrolled) instead of random vectors, as a site with the
    federation's encoder can: such queries match at the false-accept rate, and a match is
    already above the threshold. ``extraction_raw_*``: the same basis queries on raw
    scores (what a naive system returns) read every template back, to show the test can fail.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer

from fedface.client.enroll import Encoder, TemplateClient, person_templates
from fedface.common.crypto.ckks import SLOTS, TemplateEngine
from fedface.common.crypto.envelope import new_signing_key, parse_envelope
from fedface.common.crypto.keyfiles import (
    SiteKeys,
    TemplateContext,
    create_signing_key,
    create_template_keys,
    load_signing_key,
    load_template_context,
)
from fedface.common.data import FaceSet, Split, load_faces
from fedface.common.metrics import best_threshold, verification_pairs
from fedface.server.gallery import Gallery
from fedface.server.keyholder import KeyHolder
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.bench.extraction import (
    NO_MATCH,
    best_cosine,
    decision_attack,
    pipeline_oracle,
    rule_oracle,
    score_attack,
    unit_rows,
)
from fedface.simulations.centralized import train_run
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

#: The data sets enrolled, by site name.
SETS = ("orl", "extended_yaleb")
#: Extended Yale B images at most this far off axis (azimuth and elevation, degrees) may be enrolled.
WELL_LIT_DEGREES = 20


@dataclass
class _People:
    """One data set's enrolled people: templates and the probes of each."""

    site: str
    names: list[str]
    templates: np.ndarray  # (P, d)
    probes: np.ndarray  # (Q, d) probe embeddings
    probe_labels: list[str]  # the probe's person, as SITE/PERSON


@dataclass
class _Block:
    site: str
    labels: list[str]
    templates: np.ndarray


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated gallery sizes, got {text!r}", param_hint="--sizes") from None
    if not sizes or sizes[0] < 1:
        raise typer.BadParameter(f"gallery sizes must be >= 1, got {text!r}", param_hint="--sizes")
    return sizes


def _merge(sets: list[tuple[str, FaceSet]]) -> FaceSet:
    """One FaceSet of several data sets (identities prefixed by their set's name)."""
    labels, names, groups, offset, group_offset = [], [], [], 0, 0
    for tag, faces in sets:
        labels.append(faces.labels + offset)
        names += [f"{tag}/{n}" for n in faces.identity_names]
        groups.append(faces.groups + group_offset)
        offset += faces.num_identities
        group_offset += int(faces.groups.max()) + 1
    return FaceSet(
        images=np.concatenate([f.images for _, f in sets]),
        labels=np.concatenate(labels),
        identity_names=tuple(names),
        sources=tuple(s for _, f in sets for s in f.sources),
        groups=np.concatenate(groups),
        attributes={},
        layout="+".join(tag for tag, _ in sets),
    )


def _train_encoder(faces: dict[str, FaceSet], out: Path, *, epochs: int, seed: int, threads: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on half the identities of every set; (held-out identity labels per set, what was trained)."""
    rng = np.random.default_rng(seed)
    held_out = {name: np.sort(rng.choice(f.num_identities, f.num_identities // 2, replace=False)) for name, f in faces.items()}
    merged = _merge(list(faces.items()))
    offsets = np.cumsum([0] + [f.num_identities for f in faces.values()])[:-1]
    test_ids = np.concatenate([held_out[name] + off for name, off in zip(faces, offsets, strict=True)])
    is_test = np.isin(merged.labels, test_ids)
    split = Split("open-set", seed, {"test_identities": len(test_ids)}, np.flatnonzero(~is_test), np.flatnonzero(is_test))
    cfg = scenario_config("baseline.toml").with_overrides({
        "training.epochs": epochs, "training.seed": seed, "split.seed": seed, "training.threads": threads,
        "training.eval-every": 10_000, "evaluation.shift-tta": 0, "evaluation.occlusion-placements": 1,
    })
    err_console.print(f"training the encoder: {int((~is_test).sum())} images of {merged.num_identities - len(test_ids)} identities "
                      f"(half of each set), {epochs} epochs, not private")
    run = train_run(cfg, out_dir=out, faces=merged, split=split)
    info = {
        "source": "trained in this run",
        "trained_on": {name: int(f.num_identities - len(held_out[name])) for name, f in faces.items()},
        "train_images": int((~is_test).sum()),
        "epochs": epochs,
        "config": "packaged baseline.toml, shift-tta 0, not private",
        "train_s": run.wall_s,
        "heldout_verif_acc": run.metrics.get("verif_acc"),
        "heldout_verif_auc": run.metrics.get("verif_auc"),
    }
    return held_out, info


def _well_lit(faces: FaceSet) -> np.ndarray:
    if "azimuth" not in faces.attributes:
        return np.ones(len(faces), dtype=bool)
    az = np.abs(np.array([int(a) for a in faces.attributes["azimuth"]]))
    el = np.abs(np.array([int(e) for e in faces.attributes["elevation"]]))
    return (az <= WELL_LIT_DEGREES) & (el <= WELL_LIT_DEGREES)


def _people(site: str, faces: FaceSet, emb: np.ndarray, identities: np.ndarray, *, per_person: int, probes: int,
            rng: np.random.Generator) -> _People:
    """Templates of ``identities`` from ``per_person`` images each; up to ``probes`` of their other images as probes."""
    lit = _well_lit(faces)
    enroll, rest = [], []
    for k in identities:
        own = np.flatnonzero(faces.labels == k)
        candidates = own[lit[own]] if lit[own].sum() >= per_person else own
        chosen = rng.choice(candidates, per_person, replace=False)
        enroll += chosen.tolist()
        rest += np.setdiff1d(own, chosen).tolist()
    names, templates = person_templates(emb[enroll], faces.labels[enroll], faces.identity_names)
    picked = np.sort(rng.choice(rest, min(probes, len(rest)), replace=False))
    return _People(site, names, templates, emb[picked], [f"{site}/{faces.identity_names[faces.labels[i]]}" for i in picked])


def _threshold(people: list[tuple[np.ndarray, np.ndarray]], far: float) -> tuple[float, dict[str, float]]:
    """The lowest threshold that accepts at most ``far`` of the impostor pairs of the enrolled (held-out)
    identities' images (every genuine pair and as many impostor pairs, per set: no cross-set pairs)."""
    scores, same = [], []
    for emb, labels in people:
        i, j, s = verification_pairs(labels, seed=0)
        scores.append(np.sum(emb[i] * emb[j], axis=1))
        same.append(s)
    sc, sm = np.concatenate(scores), np.concatenate(same)
    impostors = np.sort(sc[~sm])[::-1]
    allowed = int(np.floor(far * impostors.size))  # impostor pairs that may score above the threshold
    thr = float(np.nextafter(impostors[allowed], np.inf))  # a pair matches when its score is above the threshold
    best, best_acc = best_threshold(sc, sm)
    return thr, {
        "pairs": int(sc.size),
        "impostor_pairs": int(impostors.size),
        "far": float(np.mean(sc[~sm] > thr)),
        "tar": float(np.mean(sc[sm] > thr)),
        "best_accuracy_threshold": best,
        "best_accuracy": best_acc,
    }


def _layout(n: int, real: list[_People], dim: int, rng: np.random.Generator) -> list[_Block]:
    """Blocks of an N-template gallery: each real site's people padded to a full block, then synthetic blocks."""
    blocks, left = [], n - sum(len(p.names) for p in real)
    if left < 0:
        raise typer.BadParameter(f"gallery size {n} is below the {n - left} enrolled people", param_hint="--sizes")

    def pad(count: int, start: int) -> tuple[list[str], np.ndarray]:
        t = rng.standard_normal((count, dim))
        return [f"synthetic-{start + i:06d}" for i in range(count)], t / np.linalg.norm(t, axis=1, keepdims=True)

    made = 0
    for p in real:
        extra = min(left, SLOTS - len(p.names))
        labels, t = pad(extra, made)
        blocks.append(_Block(p.site, p.names + labels, np.concatenate([p.templates, t])))
        left, made = left - extra, made + extra
    while left > 0:
        count = min(SLOTS, left)
        labels, t = pad(count, made)
        blocks.append(_Block("synthetic", labels, t))
        left, made = left - count, made + count
    return blocks


def _plain_decision(templates: np.ndarray, q: np.ndarray, threshold: float) -> int:
    s = templates @ q
    j = int(np.argmax(s))
    return j if s[j] > threshold else NO_MATCH


class _Services:
    """The key holder's keys, the registered sites, the key holder, and a gallery per size."""

    def __init__(self, root: Path, dim: int, sites: list[str], threshold: float) -> None:
        self.root = root
        create_template_keys(root / "keyholder-keys", dim)
        self.public: TemplateContext = load_template_context(root / "keyholder-keys")
        self.secret: TemplateContext = load_template_context(root / "keyholder-keys", root / "keyholder-keys")
        registry = root / "registered-sites"
        registry.mkdir()
        self.clients: dict[str, TemplateClient] = {}
        for site in sites:
            key_dir = root / "site-keys" / site
            key_dir.mkdir(parents=True)
            pair = create_signing_key(key_dir, site)
            SiteKeys(registry).register(site, pair.public_key)
            self.clients[site] = TemplateClient(site, load_signing_key(pair.private_key), self.public)
        self.registry = registry
        self.threshold = threshold
        self.server_key = new_signing_key()  # the gallery server's key for its requests to the key holder
        self.keyholder = KeyHolder(root / "keyholder", self.secret, SiteKeys(registry), self.server_key.public_key())
        self.raw_engine: TemplateEngine = self.secret.engine()  # the bench's own key: raw scores before protection

    def gallery(self, n: int) -> Gallery:
        return Gallery(self.root / f"gallery-{n}", self.public, SiteKeys(self.registry), keyholder=self.keyholder,
                       signing_key=self.server_key, threshold=self.threshold)


def _enroll(services: _Services, gallery: Gallery, blocks: list[_Block], encoder: str) -> dict[str, Any]:
    """Enroll every block (site: encrypt and sign; server: verify and store); timings and sizes."""
    site_s = server_s = 0.0
    ct_bytes, raw = 0, []
    for b in blocks:
        t0 = time.perf_counter()
        (envelope,) = services.clients[b.site].enroll_envelopes(b.labels, b.templates, encoder)
        t1 = time.perf_counter()
        gallery.enroll(envelope)
        server_s += time.perf_counter() - t1
        site_s += t1 - t0
        parts = parse_envelope(envelope)[2]
        ct_bytes += sum(len(p) for p in parts)
        raw.append([services.raw_engine.load(p, "gallery") for p in parts])
    return {"site_s": site_s, "server_s": server_s, "ciphertext_bytes": ct_bytes, "raw_blocks": raw}


def _raw_score_diff(engine: TemplateEngine, envelope: bytes, raw_blocks: list[Any], blocks: list[_Block], q: np.ndarray) -> float:
    """Largest |decrypted raw CKKS score - plaintext score| over every slot of every block, for the query sent."""
    rotations = engine.rotations(engine.load(parse_envelope(envelope)[2][0], "query"))
    worst = 0.0
    for cts, b in zip(raw_blocks, blocks, strict=True):
        got = engine.decrypt(engine.score_block(rotations, cts))[: len(b.labels)]
        worst = max(worst, float(np.max(np.abs(got - b.templates @ q))))
    return worst


def _search(services: _Services, gallery: Gallery, site: str, q: np.ndarray, encoder: str) -> dict[str, Any]:
    """One whole encrypted 1:N search, timed by party."""
    client = services.clients[site]
    t0 = time.perf_counter()
    pending = client.query(q, encoder)
    t1 = time.perf_counter()
    result = gallery.search(pending.envelope)  # the server scores, the key holder decides
    t3 = time.perf_counter()
    decision = client.read_decision(pending, result.sealed_decision, result.sealed_label_key)
    t4 = time.perf_counter()
    return {
        "decision": decision.identities[0] if decision.identities else None,
        "envelope": pending.envelope,
        "site_s": (t1 - t0) + (t4 - t3),
        "server_s": (t3 - t1) - result.keyholder_s,
        "keyholder_s": result.keyholder_s,
        "search_s": t4 - t0,
        "query_bytes": len(pending.envelope),
        "result_bytes": len(result.sealed_decision) + len(result.sealed_label_key),
        "request_bytes": result.request_bytes,
    }


def _time_size(services: _Services, gallery: Gallery, blocks: list[_Block], enrolled: dict[str, Any], queries: np.ndarray,
               threshold: float, encoder: str) -> tuple[dict[str, Any], float]:
    """Load, then the timed encrypted searches and the plaintext baseline of one gallery size; the largest raw score error."""
    t0 = time.perf_counter()
    loaded = gallery.preload(encoder)
    load_s = time.perf_counter() - t0
    templates = np.concatenate([b.templates for b in blocks])
    plain32 = np.ascontiguousarray(templates, dtype=np.float32)
    runs, plain_s, max_diff = [], [], 0.0
    for q in queries:
        runs.append(_search(services, gallery, "querier", q, encoder))
        max_diff = max(max_diff, _raw_score_diff(services.raw_engine, runs[-1]["envelope"], enrolled["raw_blocks"], blocks, q))
        q32 = q.astype(np.float32)
        for _ in range(3):
            t0 = time.perf_counter()
            s = plain32 @ q32
            j = int(np.argmax(s))
            _ = s[j] > threshold
            plain_s.append(time.perf_counter() - t0)
    row = {
        "blocks": len(blocks),
        "templates": loaded,
        "load_s": load_s,
        "enc_search_s": statistics.median(r["search_s"] for r in runs),
        "enc_server_s": statistics.median(r["server_s"] for r in runs),
        "enc_keyholder_s": statistics.median(r["keyholder_s"] for r in runs),
        "enc_site_s": statistics.median(r["site_s"] for r in runs),
        "enc_search_s_all": [r["search_s"] for r in runs],
        "plain_search_s": statistics.median(plain_s),
        "keyholder_request_bytes": runs[0]["request_bytes"],
        "query_bytes": runs[0]["query_bytes"],
        "result_bytes": runs[0]["result_bytes"],
        "enroll_site_s": enrolled["site_s"],
        "enroll_server_s": enrolled["server_s"],
        "ciphertext_bytes": enrolled["ciphertext_bytes"],
        "gallery_file_bytes": gallery.path.stat().st_size + sum(p.stat().st_size for p in gallery.dir.glob(gallery.path.name + "-*")),
    }
    return row, max_diff


def _probes(services: _Services, gallery: Gallery, people: list[_People], blocks: list[_Block], raw_blocks: list[Any],
            threshold: float, encoder: str) -> tuple[dict[str, Any], float]:
    """Every probe searched encrypted and in the clear: agreement, accuracy, margins; and the largest raw score error."""
    templates = np.concatenate([b.templates for b in blocks])
    labels = [f"{b.site}/{x}" for b in blocks for x in b.labels]
    agree: dict[str, list[bool]] = {}
    correct: dict[str, list[bool]] = {}
    matched: dict[str, list[bool]] = {}  # the plaintext decision is a match
    disagreements: list[dict[str, Any]] = []
    margins: list[float] = []  # how far each probe's plaintext decision is from changing
    max_diff = 0.0
    for p in people:
        for q, truth in zip(p.probes, p.probe_labels, strict=True):
            run = _search(services, gallery, "querier", q, encoder)
            max_diff = max(max_diff, _raw_score_diff(services.raw_engine, run["envelope"], raw_blocks, blocks, q))
            plain = _plain_decision(templates, q, threshold)
            plain_label = labels[plain] if plain != NO_MATCH else None
            second, top = np.sort(templates @ q)[-2:]
            margins.append(min(abs(top - threshold), top - second if top > threshold else np.inf))
            agree.setdefault(p.site, []).append(run["decision"] == plain_label)
            correct.setdefault(p.site, []).append(plain_label == truth)
            matched.setdefault(p.site, []).append(plain_label is not None)
            if run["decision"] != plain_label:
                disagreements.append({"set": p.site, "encrypted": run["decision"], "plaintext": plain_label,
                                      "top_minus_threshold": float(top - threshold), "top_minus_second": float(top - second)})
    figures = {
        "rank1_agreement": float(np.mean([x for v in agree.values() for x in v])),
        "rank1_agreement_per_set": {k: float(np.mean(v)) for k, v in agree.items()},
        "rank1_disagreements": disagreements,
        "probe_min_margin": float(min(margins)),
        "probe_matches_per_set": {k: int(sum(v)) for k, v in matched.items()},
        "probes_per_set": {k: len(v) for k, v in agree.items()},
        "plain_rank1_accuracy_per_set": {k: float(np.mean(v)) for k, v in correct.items()},
    }
    return figures, max_diff


def _extraction(services: _Services, gallery: Gallery, blocks: list[_Block], encoder: str, *, threshold: float,
                loose_threshold: float, budget: int, encrypted: int, seed: int, own_faces: np.ndarray | None) -> dict[str, Any]:
    """The extraction test against this gallery: decisions only (rule oracle, a sample re-asked through the
    encrypted services), the same at the looser best-accuracy threshold, the same starting from the
    attacker's own faces (``own_faces``, embeddings of people not enrolled), and raw scores."""
    templates = np.concatenate([b.templates for b in blocks])
    counts = [len(b.labels) for b in blocks]
    labels = [f"{b.site}/{x}" for b in blocks for x in b.labels]
    real = {i for i, x in enumerate(labels) if not x.partition("/")[2].startswith("synthetic-")}  # enrolled faces, not padding
    dim = templates.shape[1]
    attack = decision_attack(rule_oracle(templates, counts, threshold, rng=np.random.default_rng(seed + 1)), dim,
                             budget=budget, rng=np.random.default_rng(seed + 2),
                             checkpoints=[c for c in (2 * dim, 500, 1000, 2000, 5000) if c < budget])
    # the queries re-asked through the encrypted services: matching ones first (up to half), the rest evenly spread
    hit_rows = np.flatnonzero(attack.answers != NO_MATCH)
    others = np.setdiff1d(np.arange(len(attack.answers)), hit_rows)
    n_hits = min(len(hit_rows), encrypted // 2)
    spread = others[np.linspace(0, len(others) - 1, encrypted - n_hits).astype(int)] if encrypted > n_hits else others[:0]
    checked = np.sort(np.concatenate([hit_rows[:n_hits], spread]))
    index = {x: i for i, x in enumerate(labels)}
    via_services = pipeline_oracle(services.clients["attacker"], gallery, encoder, index)(attack.queries[checked])
    loose = decision_attack(rule_oracle(templates, counts, loose_threshold, rng=np.random.default_rng(seed + 3)), dim,
                            budget=budget, rng=np.random.default_rng(seed + 4))
    raw_cos = np.sum(score_attack(lambda qs: qs @ templates.T, dim) * templates, axis=1)
    face_prior: dict[str, Any] | None = None
    if own_faces is not None:
        starts = own_faces[np.random.default_rng(seed + 5).permutation(len(own_faces))]
        faced = decision_attack(rule_oracle(templates, counts, threshold, rng=np.random.default_rng(seed + 6)), dim,
                                budget=budget, rng=np.random.default_rng(seed + 7), starts=starts)
        hits = np.flatnonzero(faced.answers != NO_MATCH)
        first = int(faced.answers[hits[0]]) if len(hits) else None
        face_prior = {
            "own_faces": len(own_faces),
            "best_cosine": best_cosine(faced.reconstructions, templates),
            "matched_templates": len(faced.matched),
            "matched_real_templates": len(set(faced.matched) & real),
            "matching_queries": int(len(hits)),
            "first_match_query": int(hits[0]) if len(hits) else None,
            "first_match_cosine": float(unit_rows(faced.queries[hits[0]]) @ templates[first]) if first is not None else None,
        }

    def real_only(recon: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {j: r for j, r in recon.items() if j in real}

    out = {
        "extraction_best_cosine": best_cosine(attack.reconstructions, templates),
        "extraction_best_cosine_real": best_cosine(real_only(attack.reconstructions), templates),
        "extraction_budget": budget,
        "extraction_matched_templates": len(attack.matched),
        "extraction_matching_queries": int(len(hit_rows)),
        "extraction_trace": [{"queries": used, "matched_templates": len(r), "best_cosine": best_cosine(r, templates)} for used, r in attack.trace],
        "extraction_encrypted_queries": int(len(checked)),
        "extraction_encrypted_agreement": float(np.mean(via_services == attack.answers[checked])) if len(checked) else float("nan"),
        "extraction_at_best_accuracy_threshold": {
            "threshold": loose_threshold,
            "best_cosine": best_cosine(loose.reconstructions, templates),
            "best_cosine_real": best_cosine(real_only(loose.reconstructions), templates),
            "matched_templates": len(loose.matched),
            "matched_real_templates": len(set(loose.matched) & real),
        },
        "extraction_face_prior": face_prior,
        "extraction_raw_best_cosine": float(raw_cos.max()),
        "extraction_raw_min_cosine": float(raw_cos.min()),
        "extraction_raw_queries": dim,
    }
    err_console.print(
        f"extraction, decisions only, {budget} queries: best cosine {out['extraction_best_cosine']:.3f} ({len(attack.matched)} templates "
        f"matched; {len(checked)} of the queries re-asked through the encrypted services: agreement {out['extraction_encrypted_agreement']:.3f}); "
        f"at the best-accuracy threshold {loose_threshold:.3f}: best cosine {out['extraction_at_best_accuracy_threshold']['best_cosine']:.3f} "
        f"({len(loose.matched)} matched); raw scores, {dim} queries: cosine {out['extraction_raw_min_cosine']:.6f} or more for all "
        f"{len(templates):,} templates"
    )
    if face_prior is not None:
        first_cos = "-" if face_prior["first_match_cosine"] is None else f"{face_prior['first_match_cosine']:.3f}"
        err_console.print(
            f"extraction starting from {face_prior['own_faces']} faces of the attacker's own (not enrolled), {budget} queries: best "
            f"cosine {face_prior['best_cosine']:.3f} ({face_prior['matched_templates']} templates matched; first match at cosine {first_cos})"
        )
    return out


def _default_data(name: str) -> Path:
    return Path("..") / "shared" / "data" / name


def gallery(
    sizes: Annotated[str, typer.Option(help="Comma-separated gallery sizes N.")] = "1000,10000,100000",
    queries: Annotated[int, typer.Option(help="Timed encrypted searches per gallery size (probes; the median is reported).")] = 5,
    probes: Annotated[int, typer.Option(help="Probes searched encrypted and in the clear at the largest size, half from each set.")] = 60,
    encoder_path: Annotated[Optional[Path], typer.Option("--encoder", help="Encoder checkpoint or run directory (default: train one here on half the identities).")] = None,
    orl: Annotated[Path, typer.Option(help="ORL faces.")] = _default_data("orl"),
    yaleb: Annotated[Path, typer.Option(help="Extended Yale B faces (cropped).")] = _default_data("extended_yaleb"),
    enroll_images: Annotated[int, typer.Option(help="Images averaged into each person's template.")] = 3,
    train_epochs: Annotated[int, typer.Option(help="Epochs of the encoder trained here (without --encoder).")] = 60,
    far: Annotated[float, typer.Option(help="The threshold's false-accept rate on held-out impostor pairs (the operating point).")] = 1e-3,
    extraction_budget: Annotated[int, typer.Option(help="Queries of the decision-only extraction attack (rate limit: 1,000 an hour).")] = 1000,
    extraction_encrypted: Annotated[int, typer.Option(help="Of those, how many also go through the encrypted services (checked to decide alike).")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the split, training, templates, padding and attack.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads for training and embedding (0: torch's default; 1 is steadier on a shared 2-core machine).")] = 1,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Encrypted vs plaintext 1:N search at each gallery size, on ORL and Extended Yale B templates; extraction test."""
    setup_logging(verbose, quiet=not verbose)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    size_list = _parse_sizes(sizes)
    if queries < 1 or probes < 2 or enroll_images < 1 or extraction_encrypted < 0 or not 0 < far < 1:
        raise typer.BadParameter("--queries >= 1, --probes >= 2, --enroll-images >= 1, --extraction-encrypted >= 0 and 0 < --far < 1 are required")
    if threads > 0:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    with user_errors(), tempfile.TemporaryDirectory(prefix="fedface-bench-gallery-") as tmp:
        root = Path(tmp)
        raw_faces = {"orl": orl, "extended_yaleb": yaleb}
        if encoder_path is None:
            faces = {name: load_faces(path, size=(64, 64)) for name, path in raw_faces.items()}
            held_out, encoder_info = _train_encoder(faces, root / "encoder", epochs=train_epochs, seed=seed, threads=threads)
            encoder = Encoder.from_checkpoint(root / "encoder", device="cpu")
        else:
            encoder = Encoder.from_checkpoint(encoder_path, device="cpu")
            faces = {name: load_faces(path, size=encoder.image_size) for name, path in raw_faces.items()}
            held_out = {name: np.arange(f.num_identities) for name, f in faces.items()}
            encoder_info = {"source": str(encoder_path), "trained_on": "given (every identity is enrolled)"}
        t0 = time.perf_counter()
        emb = {name: encoder.embed(f.images) for name, f in faces.items()}
        embed_s = time.perf_counter() - t0
        dim = next(iter(emb.values())).shape[1]
        people = [_people(name, faces[name], emb[name], held_out[name], per_person=enroll_images,
                          probes=probes // 2 + (probes % 2 if name == SETS[0] else 0), rng=rng) for name in SETS]
        pair_sets = []
        for name in SETS:
            keep = np.isin(faces[name].labels, held_out[name])
            pair_sets.append((emb[name][keep], faces[name].labels[keep]))
        threshold, thr_info = _threshold(pair_sets, far)
        # the attacker's own faces: the training half's images (people never enrolled); none with a given encoder
        own_faces = (np.concatenate([emb[name][~np.isin(faces[name].labels, held_out[name])] for name in SETS])
                     if encoder_path is None else None)
        err_console.print(
            f"encoder {encoder.id}: {', '.join(f'{len(p.names)} {p.site} people' for p in people)} enrolled "
            f"({enroll_images} images each), {sum(len(p.probe_labels) for p in people)} probes; threshold {threshold:.4f} "
            f"(FAR {thr_info['far']:.4f}, TAR {thr_info['tar']:.3f} on {thr_info['pairs']} held-out pairs)"
        )
        services = _Services(root, dim, [*SETS, "synthetic", "querier", "attacker"], threshold)
        timing_probes = np.concatenate([p.probes for p in people])[:queries]
        per_n: dict[str, dict[str, Any]] = {}
        max_diff = 0.0
        largest = size_list[-1]
        for n in size_list:
            blocks = _layout(n, people, dim, rng)
            g = services.gallery(n)
            rate_limit = g.max_queries_per_hour
            enrolled = _enroll(services, g, blocks, encoder.id)
            row, diff = _time_size(services, g, blocks, enrolled, timing_probes, threshold, encoder.id)
            per_n[str(n)] = row
            max_diff = max(max_diff, diff)
            err_console.print(
                f"N={n:,} ({len(blocks)} blocks): encrypted {row['enc_search_s']:.3f} s (site {row['enc_site_s']:.3f}, server "
                f"{row['enc_server_s']:.3f}, key holder {row['enc_keyholder_s']:.3f}), plain {row['plain_search_s'] * 1e3:.3f} ms; "
                f"load {row['load_s']:.2f} s; enrolled in {enrolled['site_s'] + enrolled['server_s']:.1f} s"
            )
            if n != largest:
                g.close()
                del enrolled
                continue
            probe_figures, probe_diff = _probes(services, g, people, blocks, enrolled["raw_blocks"], threshold, encoder.id)
            max_diff = max(max_diff, probe_diff)
            err_console.print(f"{sum(probe_figures['probes_per_set'].values())} probes at N={n:,}: rank-1 agreement "
                              f"{probe_figures['rank1_agreement']:.3f}; max score difference {max_diff:.2e}")
            extraction = _extraction(services, g, blocks, encoder.id, threshold=threshold, loose_threshold=thr_info["best_accuracy_threshold"],
                                     budget=extraction_budget, encrypted=extraction_encrypted, seed=seed, own_faces=own_faces)
            g.close()
        services.keyholder.close()
    big = per_n[str(largest)]
    result: dict[str, Any] = {
        "bench": "gallery",
        "sizes": size_list,
        "enc_search_s": {k: v["enc_search_s"] for k, v in per_n.items()},
        "enc_server_s": {k: v["enc_server_s"] for k, v in per_n.items()},
        "enc_keyholder_s": {k: v["enc_keyholder_s"] for k, v in per_n.items()},
        "enc_site_s": {k: v["enc_site_s"] for k, v in per_n.items()},
        "plain_search_s": {k: v["plain_search_s"] for k, v in per_n.items()},
        "enc_search_s_all": {k: v["enc_search_s_all"] for k, v in per_n.items()},
        "load_s": {k: v["load_s"] for k, v in per_n.items()},
        "blocks": {k: v["blocks"] for k, v in per_n.items()},
        "keyholder_request_bytes": {k: v["keyholder_request_bytes"] for k, v in per_n.items()},
        "enroll_s_per_template": (big["enroll_site_s"] + big["enroll_server_s"]) / largest,
        "enroll_site_s_per_template": big["enroll_site_s"] / largest,
        "enroll_server_s_per_template": big["enroll_server_s"] / largest,
        "ciphertext_bytes_per_template": big["ciphertext_bytes"] / largest,
        "gallery_file_bytes_per_template": big["gallery_file_bytes"] / largest,
        "query_bytes": big["query_bytes"],
        "result_bytes": big["result_bytes"],
        **probe_figures,
        "max_score_diff": max_diff,
        "threshold": threshold,
        "threshold_rule": f"FAR {far:g} on all genuine pairs and as many impostor pairs of the enrolled identities' images (per set)",
        "threshold_pairs": thr_info,
        "enrolled_per_set": {p.site: len(p.names) for p in people},
        "enroll_images": enroll_images,
        "encoder": {"id": encoder.id, **encoder_info, "embed_s": embed_s},
        **extraction,
        "rate_limit_per_hour": rate_limit,
        "seed": seed,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
    }
    print_json(result)


__all__ = ["gallery"]
