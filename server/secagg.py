"""fedface's SecAgg+ workflow: Flower's, with ChaCha20 masks and checks of its own.

Flower 1.42's ``SecAggPlusWorkflow`` runs the protocol (Bell et al. 2020): key set-up, key
shares, masked vectors, unmasking. fedface changes four things around it:

1. **Masks from a cryptographic stream.** The workflow expands masks with
   :func:`fedface.common.crypto.masks.mask_arrays` (ChaCha20 keyed by the whole agreed key)
   instead of Flower's 32-bit-seeded Mersenne Twister. The set-up message names the scheme
   (``masks.MASK_SCHEME_KEY``) and a site that does not name it back (a plain Flower ClientApp,
   whose masks would not cancel) is dropped from the round as a failure, before any key is
   shared with it.
2. **Each masked vector is checked as it arrives** (:func:`check_masked_vector`): one integer
   array per shared array, of its shape, every value in the ring. A site that sends anything
   else (wrong shapes, floats, NaN) is left out of the sum as if it had dropped out, with the
   reason recorded, instead of failing Flower's summation and with it the round.
3. **The unmasked sum is checked before it is used** (:class:`UnmaskedSumError`). Every honest
   site quantises each clipped value to an integer in ``[0, quantization_range]`` and adds its
   weight factor ``round(examples / max_weight * quantization_range)`` in front; so the sum of
   ``k`` masked vectors, once unmasked, has a factor equal to the sum of the factors of the
   examples the sites reported in the clear, and every other entry in ``[0, k *
   quantization_range]``. A sum outside that could not come from honest sites: masks that did
   not cancel (another generator, a lost share) or a site that bypassed the quantisation (a
   value of enormous norm wraps the ring). Such a round is refused and recorded, and the
   global model is left as it was. What a site can still do unseen: any update whose values
   stay in range (docs/threat-model.md).
4. **Too few updates are never unmasked**: fewer than ``federation.min-sites-per-aggregate``
   updates in the masked sum stop the round before the unmasking (:class:`GuardedSecAggPlus`).

The check of 3. runs inside Flower's unmasking, on the integers, between removing the masks and
dequantising: the workflow module's ``factor_extract`` (the call that splits the weight factor
from the vector) is wrapped while a fedface workflow unmasks (:func:`_checked_factor_extract`).
"""

from __future__ import annotations

import contextvars
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedface.common.config import TrainConfig
from fedface.common.crypto import masks

flower_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")  # the module: its package exports a same-named object

if TYPE_CHECKING:
    from fedface.server.app import FedFaceRounds

logger = logging.getLogger(__name__)

masks.install(flower_workflow)


def too_few_reason(updates: int, needed: int) -> str:
    """Why a round with too few updates to sum was aborted (recorded for each site that trained)."""
    return (
        f"round aborted before aggregation: only {updates} site update(s) would enter the sum, "
        f"fewer than min-sites-per-aggregate {needed}"
    )


class MaskSchemeError(Exception):
    """A site answered SecAgg+'s set-up without naming fedface's mask scheme."""


class UnmaskedSumError(Exception):
    """The unmasked sum is one that honest sites could not have produced."""


@dataclass(frozen=True)
class _SumBounds:
    vectors: int  # masked vectors in the sum
    factor: int  # the sum of their weight factors, from the examples they reported
    quantization_range: int
    mod_range: int


_BOUNDS: contextvars.ContextVar[_SumBounds | None] = contextvars.ContextVar("fedface_secagg_bounds", default=None)
_flower_factor_extract = flower_workflow.factor_extract


def check_unmasked_sum(bounds: _SumBounds, factor: int, vector: list[np.ndarray]) -> None:
    """Raise :class:`UnmaskedSumError` unless ``factor`` and ``vector`` (Flower's unmasked,
    mod-reduced sum, split) are what ``bounds.vectors`` honest sites can produce."""
    expected = bounds.factor % bounds.mod_range
    if int(factor) != expected:
        raise UnmaskedSumError(
            f"the unmasked weight factor is {int(factor)}, not the {expected} of the examples the sites reported: "
            "masks that did not cancel (a site masking with another generator) or a site lying about its weight"
        )
    top = bounds.vectors * bounds.quantization_range
    worst = max((int(a.max()) for a in vector if a.size), default=0)
    low = min((int(a.min()) for a in vector if a.size), default=0)
    if worst > top or low < 0:
        outside = sum(int(np.count_nonzero((a < 0) | (a > top))) for a in vector)
        total = sum(int(a.size) for a in vector)
        raise UnmaskedSumError(
            f"{outside} of {total} unmasked values lie outside [0, {top}], the range the sum of {bounds.vectors} honestly "
            "quantised updates can take: masks that did not cancel, or a site that sent values outside SecAgg+'s clipping range"
        )


def _checked_factor_extract(parameters: list[np.ndarray]) -> tuple[int, list[np.ndarray]]:
    """Flower's ``factor_extract``, checking the unmasked sum first while a fedface workflow
    unmasks (:data:`_BOUNDS` set); as Flower's otherwise."""
    factor, vector = _flower_factor_extract(parameters)
    bounds = _BOUNDS.get()
    if bounds is not None:
        check_unmasked_sum(bounds, factor, vector)
    return factor, vector


flower_workflow.factor_extract = _checked_factor_extract


class MaskedVectorError(Exception):
    """A site's masked vector is not one an honest site can send (count, shapes, type, range)."""


def check_masked_vector(vector: list[np.ndarray], shapes: list[tuple[int, ...]], mod_range: int) -> str | None:
    """Why ``vector`` (a site's masked vector, as its arrays) is not one an honest site sends:
    the weight factor and then one integer array of each shared array's shape, every value in
    ``[0, mod_range)``; None when it is."""
    if len(vector) != len(shapes):
        return f"{len(vector)} arrays where the model has {len(shapes)} (with the weight factor)"
    for i, (arr, shape) in enumerate(zip(vector, shapes, strict=True)):
        if tuple(arr.shape) != tuple(shape):
            return f"array {i} of shape {tuple(arr.shape)}, not {tuple(shape)}"
        if not np.issubdtype(arr.dtype, np.integer):
            return f"array {i} of type {arr.dtype}, not integers"
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
            return f"array {i} with values outside [0, {mod_range})"
    return None


class _FedFaceGrid:
    """The grid as fedface's SecAgg+ stages see it.

    At set-up, each message names fedface's mask scheme, and a reply that does not name it back
    is kept from the workflow (the site is then out of the round, as if it had not answered).
    At the masked-vector stage, a reply whose masked vector is not one an honest site can send
    (:func:`check_masked_vector`: wrong count or shapes, not integers, outside the ring) is
    kept from the sum likewise: Flower would fail the whole round on it (numpy cannot add
    arrays of other shapes), and SecAgg+ then removes that site's pairwise masks with its
    neighbours' shares, as for a site that dropped out. Each is listed in ``dropped`` with why.
    """

    def __init__(self, grid: Any, dropped: list[Exception], mod_range: int) -> None:
        self._grid = grid
        self.dropped = dropped
        self.mod_range = mod_range

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        messages = list(messages)
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) if messages else None
        shapes: list[tuple[int, ...]] = []
        if stage == Stage.SETUP:
            for msg in messages:
                msg.content.config_records[RECORD_KEY_CONFIGS][masks.MASK_SCHEME_KEY] = masks.MASK_SCHEME
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            # the weight factor, then the arrays the round sends (the same to every site)
            fitins = compat.recorddict_to_fitins(messages[0].content, keep_input=True)
            shapes = [(1,), *(a.shape for a in parameters_to_ndarrays(fitins.parameters))]
        kept = []
        for reply in self._grid.send_and_receive(messages, *args, **kwargs):
            why = None if reply.has_error() else self._refusal(stage, reply, shapes)
            if why is not None:
                nid = reply.metadata.src_node_id
                logger.warning("node %d: %s", nid, why)
                self.dropped.append((MaskSchemeError if stage == Stage.SETUP else MaskedVectorError)(f"node {nid} {why}"))
                continue
            kept.append(reply)
        return kept

    def _refusal(self, stage: Any, reply: Any, shapes: list[tuple[int, ...]]) -> str | None:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if stage == Stage.SETUP:
            if configs.get(masks.MASK_SCHEME_KEY) == masks.MASK_SCHEME:
                return None
            return (
                f"answered SecAgg+ set-up without naming the mask scheme {masks.MASK_SCHEME!r} "
                "(a plain Flower ClientApp masks with a 32-bit-seeded generator whose masks would not cancel): "
                "dropped from the round; the site must run fedface's ClientApp"
            )
        if stage == Stage.COLLECT_MASKED_VECTORS:
            try:
                vector = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            except Exception as exc:  # whatever a site sent: the reason is recorded, the round goes on
                return f"sent a masked vector that does not parse ({type(exc).__name__}): left out of the sum"
            why = check_masked_vector(vector, shapes, self.mod_range)
            return None if why is None else f"sent a masked vector with {why}: left out of the sum"
        return None


def _forget_lost(state: Any) -> None:
    """Take the sites lost at set-up or key sharing out of the round's protocol state.

    Flower 1.42 fixes the sampled sites and their neighbours before set-up and never updates
    them: a site lost at set-up or key sharing stays "sampled" and is unmasked as a dead
    neighbour, whose key shares nobody holds (it never sent any), so every other site fails
    the unmasking (a ``KeyError`` in Flower's mod) and the round is lost after all of them
    trained. No site has agreed a mask or holds a share with a site lost this early (key
    sharing forwards only to sites still active; masks are added only for sites whose shares
    arrived), so it can be forgotten, which is what the protocol intends.
    """
    lost = set(state.sampled_node_ids) - set(state.active_node_ids)
    if not lost:
        return
    state.sampled_node_ids = set(state.active_node_ids)
    for nid in lost:
        state.nid_to_neighbours.pop(nid, None)
    for neighbours in state.nid_to_neighbours.values():
        neighbours -= lost
    logger.info("SecAgg+: %d site(s) lost before sending their masked vectors are out of this round", len(lost))


class FedFaceSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with fedface's masks, the mask-scheme check at set-up and the
    check of the unmasked sum (module docstring). ``rounds``, when given, records a refused
    sum as an aborted round."""

    def __init__(self, rounds: FedFaceRounds | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fedface_rounds = rounds

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        dropped: list[Exception] = []
        ok = super().setup_stage(_FedFaceGrid(grid, dropped, self.modulus_range), context, state)
        state.failures.extend(dropped)
        _forget_lost(state)
        return bool(ok)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        _forget_lost(state)
        return bool(ok)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        dropped: list[Exception] = []
        ok = super().collect_masked_vectors_stage(_FedFaceGrid(grid, dropped, self.modulus_range), context, state)
        state.failures.extend(dropped)
        return bool(ok)

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        max_weight = float(state.max_weight)
        qr = int(state.quantization_range)
        # each site's factor, as Flower's mod computes it from the examples it reports
        factor = sum(round(int(res.num_examples) / max_weight * qr) for _, res in state.legacy_results)
        if factor >= int(state.mod_range):
            # the factor would wrap the ring and the unmasked average be scaled by a wrong total
            server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            reason = (
                f"round refused before unmasking: the sites' weights sum to {factor} quantised units, past SecAgg+'s ring "
                f"({int(state.mod_range)}): too many examples in one round for max_weight {max_weight:g}"
            )
            logger.error("round %d: %s", server_round, reason)
            if self.fedface_rounds is not None:
                self.fedface_rounds.abort(server_round, state.legacy_results, state.failures, reason)
            del state.aggregate_ndarrays
            return False
        bounds = _SumBounds(vectors=len(state.active_node_ids), factor=factor, quantization_range=qr, mod_range=int(state.mod_range))
        token = _BOUNDS.set(bounds)
        try:
            return bool(super().unmask_stage(grid, context, state))
        except UnmaskedSumError as exc:
            server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            reason = f"round refused after unmasking: {exc}"
            logger.error("round %d: %s", server_round, reason)
            if self.fedface_rounds is not None:
                self.fedface_rounds.abort(server_round, state.legacy_results, state.failures, reason)
            return False
        finally:
            _BOUNDS.reset(token)


class GuardedSecAggPlus(FedFaceSecAggPlus):
    """fedface's SecAgg+ workflow that also stops before unmasking when fewer than
    ``federation.min-sites-per-aggregate`` of the masked vectors carry an update (sites that
    refused send zeros with weight 0): the unmasked sum of one or two updates shows too much of
    each. The round is recorded as aborted (:meth:`FedFaceRounds.abort`)."""

    def __init__(self, rounds: FedFaceRounds, **kwargs: Any) -> None:
        super().__init__(rounds, **kwargs)
        self.guarded_rounds = rounds

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        rounds = self.guarded_rounds
        needed = rounds.cfg.federation.min_sites_per_aggregate
        updates = sum(1 for _, res in state.legacy_results if res.num_examples > 0)
        if 0 < updates < needed:
            server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            rounds.abort(server_round, state.legacy_results, state.failures, too_few_reason(updates, needed))
            del state.aggregate_ndarrays  # never unmasked
            return False
        return True


def secagg_workflow(cfg: TrainConfig, sampled: int, rounds: FedFaceRounds | None = None) -> FedFaceSecAggPlus:
    """fedface's SecAgg+ for about ``sampled`` sites per round.

    Defaults are fractions, so they follow the sites actually asked in each round (fewer when
    sites have refused for an exhausted budget): every site's masks are shared with all other
    sampled sites up to 10 (SecAgg+ masks with a k-regular graph of neighbours; k need not grow
    with the sites, Bell et al. 2020 use O(log n)), and two thirds of a site's shares unmask it.
    Fixed ``num-shares`` (odd, > 2) and ``reconstruction-threshold`` (< num-shares) are used as given.
    """
    fc = cfg.federation
    # (the config has checked fixed values: odd num-shares above 2, threshold below it)
    shares: int | float = fc.num_shares if fc.num_shares else min(1.0, 10 / max(1, sampled))
    threshold: int | float = fc.reconstruction_threshold if fc.reconstruction_threshold else 2 / 3
    if rounds is None:
        return FedFaceSecAggPlus(num_shares=shares, reconstruction_threshold=threshold)
    return GuardedSecAggPlus(rounds, num_shares=shares, reconstruction_threshold=threshold)


__all__ = [
    "FedFaceSecAggPlus",
    "GuardedSecAggPlus",
    "MaskSchemeError",
    "MaskedVectorError",
    "UnmaskedSumError",
    "check_masked_vector",
    "check_unmasked_sum",
    "secagg_workflow",
    "too_few_reason",
]
