"""The extraction test: can a querying site reconstruct a gallery template from what a search returns?

A site may send many queries. What it learns from each depends on what the system hands back:

- a **score oracle** (:data:`ScoreOracle`, what a naive encrypted search that decrypts its result
  for the querier returns): the score vector. The ``d`` basis queries ``e_k`` read every
  coordinate of every template back (:func:`score_attack`): cosine 1 up to the CKKS error;
- a **decision oracle** (:data:`DecisionOracle`, what fedface returns): per query the top-1
  template above the threshold, or no match. :func:`decision_attack` sends the basis queries
  ``+-e_k``, then random unit vectors (or, given ``starts``, queries of its own first: the
  embeddings of faces the attacker holds), and, once a query matched, an adaptive step on the
  first template matched: it samples perturbations of its current estimate of that template
  (tangent steps, their size kept so that about half still match) and moves the estimate
  towards the mean of the matching ones and away from the failing ones (hill climbing on the
  decision).

A template's first estimate is the normalised mean of the queries that matched it; a template
no query matched has none (the decisions never named it). :func:`best_cosine` scores the
estimates against the true templates. A matching query already has cosine above the threshold
with its template, so against the decision oracle the result turns on whether the attack finds
a match at all in its budget (random unit vectors in 128 dimensions almost never reach a face
threshold; faces do, at the encoder's false-accept rate), and on how far the climb gets.

:func:`rule_oracle` applies the key holder's own decision rule
(:func:`fedface.server.keyholder.decide`, flooding included) to the protected values
``mask * (score - threshold)`` computed in the clear, with a fresh mask per query as the
server draws it: the decisions the encrypted pipeline gives, at a cost that allows budgets of
thousands of queries. :func:`pipeline_oracle` sends queries through the real services
(the site's :class:`~fedface.client.enroll.TemplateClient`, the
:class:`~fedface.server.gallery.Gallery` and the :class:`~fedface.server.keyholder.KeyHolder`,
in process), for checking that both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedface.client.enroll import TemplateClient
from fedface.common.crypto.ckks import MAX_MASK, SLOTS
from fedface.server.gallery import Gallery
from fedface.server.keyholder import decide

#: What a decision oracle answers for a query that matched nobody.
NO_MATCH = -1
#: How far the adaptive step moves its estimate, in units of the perturbation size (decaying with 1/sqrt(rounds)).
GAIN = 2.0

#: Unit queries (m, d) -> the matched template's index per query, or NO_MATCH.
DecisionOracle = Callable[[np.ndarray], np.ndarray]
#: Unit queries (m, d) -> the score of every template per query (m, N).
ScoreOracle = Callable[[np.ndarray], np.ndarray]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (an all-zero row stays zero)."""
    a = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def basis_queries(dim: int) -> np.ndarray:
    """The ``2 d`` queries ``+e_k`` and ``-e_k``."""
    eye = np.eye(dim)
    return np.concatenate([eye, -eye])


def random_queries(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors drawn uniformly from the sphere."""
    return unit_rows(rng.standard_normal((n, dim)))


def score_attack(oracle: ScoreOracle, dim: int) -> np.ndarray:
    """Every template (N, d) read back from the raw scores of the ``d`` basis queries ``e_k``.

    The score of template ``j`` at ``e_k`` is its coordinate ``k``: ``d`` queries suffice.
    """
    scores = np.asarray(oracle(np.eye(dim)), dtype=np.float64)  # (d, N)
    return unit_rows(scores.T)


def best_cosine(reconstructions: Mapping[int, np.ndarray], templates: np.ndarray) -> float:
    """The largest cosine of a reconstruction with the template it reconstructs (0.0 if there is none)."""
    if not reconstructions:
        return 0.0
    idx = np.fromiter(reconstructions, dtype=np.int64)
    recon = unit_rows(np.stack([reconstructions[int(j)] for j in idx]))
    return float(np.max(np.sum(recon * unit_rows(templates[idx]), axis=1)))


@dataclass
class DecisionAttack:
    """What :func:`decision_attack` asked, learnt and reconstructed."""

    queries: np.ndarray  # (m, d): every query sent, in order
    answers: np.ndarray  # (m,): the oracle's answer to each
    reconstructions: dict[int, np.ndarray]  # template index -> unit estimate
    trace: list[tuple[int, dict[int, np.ndarray]]] = field(default_factory=list)  # (queries so far, reconstructions then)

    @property
    def matched(self) -> list[int]:
        """Templates some query matched."""
        return sorted(self.reconstructions)


def decision_attack(
    oracle: DecisionOracle,
    dim: int,
    *,
    budget: int,
    rng: np.random.Generator,
    batch: int = 64,
    spread: float = 0.5,
    checkpoints: Sequence[int] = (),
    starts: np.ndarray | None = None,
) -> DecisionAttack:
    """Reconstruct gallery templates from decisions only, in at most ``budget`` queries.

    Parameters
    ----------
    oracle
        The decision oracle attacked.
    dim
        Template dimension.
    budget
        Queries the attacker may send in all (the basis queries count; ``2 dim`` at the least).
    rng
        Randomness of the random and adaptive queries.
    batch
        Queries per oracle call.
    spread
        Starting size of the adaptive perturbations (tangent norm; adapted to keep about a
        third of them matching).
    checkpoints
        Query counts at which the reconstructions so far are kept in :attr:`DecisionAttack.trace`.
    starts
        Exploration queries to send, in order, before random ones: e.g. embeddings of faces the
        attacker holds (every site has the federation's encoder). A face query matches a gallery
        template at the encoder's false-accept rate, far more often than a random unit vector.

    Returns
    -------
    DecisionAttack
        The queries, the answers, and a unit reconstruction of every template matched.
    """
    if budget < 2 * dim:
        raise ValueError(f"the budget {budget} is below the {2 * dim} basis queries")
    asked: list[np.ndarray] = []
    answers: list[np.ndarray] = []
    centres: dict[int, np.ndarray] = {}  # per matched template: the current estimate
    spreads: dict[int, float] = {}
    rounds: dict[int, int] = {}
    marks = sorted({c for c in checkpoints if 0 < c <= budget} | {budget})
    trace: list[tuple[int, dict[int, np.ndarray]]] = []
    used = 0

    def ask(q: np.ndarray) -> np.ndarray:
        nonlocal used
        out = np.asarray(oracle(q), dtype=np.int64)
        asked.append(q)
        answers.append(out)
        for j in set(out.tolist()) - {NO_MATCH} - set(centres):
            centres[j] = unit_rows(np.mean(q[out == j], axis=0))  # first estimate: the mean of its matching queries
        used += len(q)
        while marks and used >= marks[0]:
            trace.append((marks.pop(0), dict(centres)))
        return out

    def room() -> int:
        return min(batch, budget - used, (marks[0] - used) if marks else batch)

    basis = basis_queries(dim)
    for start in range(0, len(basis), batch):
        ask(basis[start : start + min(batch, room())])
    turn = explored = 0
    while used < budget:
        n = room()
        if centres and turn % 2 == 1:
            j = next(iter(centres))  # climb the first template matched: one good reconstruction is the goal
            centre, rho = centres[j], spreads.setdefault(j, spread)
            step = rng.standard_normal((n, dim))
            step = unit_rows(step - np.outer(step @ centre, centre))  # directions tangent to the sphere at the centre
            kept = ask(unit_rows(centre + rho * step)) == j
            rate = float(kept.mean())
            if 0 < rate < 1:  # matching minus failing directions: an estimate of the way towards the template
                towards = step[kept].mean(axis=0) * rate - step[~kept].mean(axis=0) * (1 - rate)
                rounds[j] = rounds.get(j, 0) + 1
                centres[j] = unit_rows(centre + GAIN * rho * towards / np.sqrt(rounds[j]))
            spreads[j] = rho * (1.3 if rate > 0.6 else 0.7 if rate < 0.4 else 1.0)  # keep about half of them matching
        elif starts is not None and explored < len(starts):
            ask(unit_rows(starts[explored : explored + n]))
            explored += n
        else:
            ask(random_queries(n, dim, rng))
        turn += 1
    return DecisionAttack(np.concatenate(asked), np.concatenate(answers), dict(centres), trace)


def block_counts(n: int, block: int = SLOTS) -> list[int]:
    """Templates per block when ``n`` templates are packed into full blocks in order."""
    return [min(block, n - start) for start in range(0, n, block)]


def rule_oracle(
    templates: np.ndarray,
    counts: Sequence[int],
    threshold: float,
    *,
    rng: np.random.Generator,
    chunk: int = 64,
) -> DecisionOracle:
    """The key holder's decision rule on protected values computed in the clear.

    ``templates`` (N, d) in the gallery's slot order, ``counts`` the templates per block (as the
    server groups them). Per query: a fresh mask in [2, 16] (as :meth:`Gallery.search` draws
    it), the protected values ``mask * (score - threshold)`` per block, then
    :func:`fedface.server.keyholder.decide` with its flooding, top-1.
    """
    t = np.ascontiguousarray(templates, dtype=np.float64)
    if sum(counts) != len(t):
        raise ValueError(f"block counts add up to {sum(counts)}, not the {len(t)} templates")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def oracle(queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float64)
        out = np.full(len(q), NO_MATCH, dtype=np.int64)
        for start in range(0, len(q), chunk):
            scores = q[start : start + chunk] @ t.T
            for i, s in enumerate(scores):
                mask = int(rng.integers(2, MAX_MASK + 1))
                protected = mask * (s - threshold)
                values = [protected[offsets[b] : offsets[b + 1]] for b in range(len(counts))]
                decision = decide(values, top_k=1, candidates=None, rng=rng)
                if decision["slots"]:
                    b, slot = decision["slots"][0]
                    out[start + i] = offsets[b] + slot
        return out

    return oracle


def pipeline_oracle(
    client: TemplateClient,
    gallery: Gallery,
    encoder: str,
    index: Mapping[str, int],
) -> DecisionOracle:
    """Queries through the real services: encrypted and signed at the site, scored by the
    gallery, decided by its key holder, opened by the site. ``index`` maps a gallery label
    (``SITE/PERSON``) to the template's index."""

    def oracle(queries: np.ndarray) -> np.ndarray:
        out = []
        for q in np.asarray(queries, dtype=np.float64):
            pending = client.query(q, encoder)
            result = gallery.search(pending.envelope)
            decision = client.read_decision(pending, result.sealed_decision, result.sealed_label_key)
            out.append(index[decision.identities[0]] if decision.identities else NO_MATCH)
        return np.asarray(out, dtype=np.int64)

    return oracle


__all__ = [
    "GAIN",
    "NO_MATCH",
    "DecisionAttack",
    "DecisionOracle",
    "ScoreOracle",
    "basis_queries",
    "best_cosine",
    "block_counts",
    "decision_attack",
    "pipeline_oracle",
    "random_queries",
    "rule_oracle",
    "score_attack",
    "unit_rows",
]
