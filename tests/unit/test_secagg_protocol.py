"""fedface's SecAgg+ end to end, in one process: Flower's real workflow and mod, fedface's masks,
mask-scheme check and sum check, over a loopback grid that hands each message to the node's
ClientApp (no Ray, no network: the protocol is the same messages).

Shown: the unmasked sum is the plain weighted average of the same updates (to the quantisation
step); a plain Flower client or a plain Flower server fails loudly instead of producing a
wrong sum; a site that masks with Flower's own generator, or sends values outside the clipping
range, has its round refused and recorded, and the global model is left as it was.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Error
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ConfigRecord, Context, Message, RecordDict, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_generator
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
import flwr.compat.common.recorddict_compat as compat

from fedface.client.app import SecAggRequestError, site_mod
from fedface.common import wire
from fedface.common.crypto import masks
from fedface.server.secagg import FedFaceSecAggPlus, MaskSchemeError

flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")  # the module: its package exports a same-named object

SHAPES = [(16, 8), (8,), (4, 4, 3)]


@pytest.fixture(autouse=True)
def _flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds a Message for the run of the process it runs in: give this one a run."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
EXAMPLES = [120, 300, 45, 210]


def _updates(node: int) -> list[np.ndarray]:
    rng = np.random.default_rng(node)
    return [rng.uniform(-1.5, 1.5, size=s).astype(np.float32) for s in SHAPES]


Fit = Callable[[int], tuple[list[np.ndarray], int]]


def _fixed(node: int) -> tuple[list[np.ndarray], int]:
    return _updates(node), EXAMPLES[node - 1]


class _FixedClient(NumPyClient):
    def __init__(self, node: int, fit: Fit) -> None:
        self.node = node
        self._fit = fit

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        arrays, examples = self._fit(self.node)
        return arrays, examples, {}


class LoopbackGrid:
    """The server's grid, delivering each message to its node's ClientApp in this process; an
    exception in the ClientApp comes back as an error reply, as from a real SuperNode."""

    def __init__(self, apps: dict[int, ClientApp]) -> None:
        self.apps = apps
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in apps}
        self.errors: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # each node gets its own copy, as off a wire (the set-up's content is shared)
            nid = msg.metadata.dst_node_id
            try:
                replies.append(copy.deepcopy(self.apps[nid](msg, self.contexts[nid])))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


class _Rounds:
    """What fedface's workflow tells the run's bookkeeping when it refuses a round."""

    def __init__(self) -> None:
        self.aborted: list[tuple[int, str]] = []

    def abort(self, server_round: int, results: Any, failures: Any, reason: str) -> None:
        self.aborted.append((server_round, reason))


def _apps(mods: list[Any], fit: Fit = _fixed) -> dict[int, ClientApp]:
    def client_fn(context: Context) -> Any:
        return _FixedClient(int(context.node_id), fit).to_client()

    return {nid: ClientApp(client_fn=client_fn, mods=list(mods)) for nid in range(1, len(EXAMPLES) + 1)}


def _run(workflow: SecAggPlusWorkflow, apps: dict[int, ClientApp]) -> tuple[list[np.ndarray], LoopbackGrid, LegacyContext]:
    """One SecAgg+ round over ``apps``; returns the global parameters after it."""
    grid = LoopbackGrid(apps)
    manager = SimpleClientManager()
    for nid in apps:
        manager.register(GridClientProxy(nid, grid, 1))  # type: ignore[arg-type]
    initial = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    n = len(apps)
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}), ServerConfig(num_rounds=1), strategy, manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(initial), True)
    workflow(grid, context)  # type: ignore[arg-type]
    params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(params), grid, context


def _plain_average(nodes: list[int] | None = None) -> list[np.ndarray]:
    """The weighted average of the nodes' updates (all four by default), in the clear."""
    nodes = nodes or list(range(1, len(EXAMPLES) + 1))
    total = sum(EXAMPLES[n - 1] for n in nodes)
    return [sum(_updates(n)[k] * EXAMPLES[n - 1] for n in nodes) / total for k in range(len(SHAPES))]


class _Workflow(FedFaceSecAggPlus):
    """fedface's workflow (every site a neighbour of every other), keeping the failures its
    stages recorded."""

    def __init__(self, rounds: _Rounds | None = None) -> None:
        super().__init__(rounds, num_shares=1.0, reconstruction_threshold=0.75)  # type: ignore[arg-type]
        self.failures: list[Exception] = []

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        self.failures = list(state.failures)
        return ok

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.failures = list(state.failures)
        return ok


def _workflow(rounds: _Rounds | None = None) -> _Workflow:
    return _Workflow(rounds)


def test_the_unmasked_sum_is_the_plain_weighted_average_of_the_same_updates() -> None:
    result, grid, _ = _run(_workflow(), _apps([site_mod]))

    assert grid.errors == []
    # one quantisation step (2 x 8 / 2^22) per site, over the total weight (examples / 1000)
    tolerance = len(EXAMPLES) * (16 / 2**22) / (sum(EXAMPLES) / 1000)
    for got, expected in zip(result, _plain_average(), strict=True):
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    assert max(float(np.abs(g - e).max()) for g, e in zip(result, _plain_average(), strict=True)) > 0  # quantised, not copied


def test_the_masked_vectors_a_site_sends_are_fedfaces_masks_not_flowers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Record every mask a site expands: all from fedface's generator, none from Flower's.
    used: list[str] = []
    real = flower_mod.pseudo_rand_gen

    def spy(seed: bytes, num_range: int, dims: list[tuple[int, ...]]) -> list[np.ndarray]:
        used.append("fedface" if real is masks.mask_arrays else "flower")
        return real(seed, num_range, dims)

    monkeypatch.setattr(flower_mod, "pseudo_rand_gen", spy)

    _run(_workflow(), _apps([site_mod]))

    # each site: its private mask and one pairwise mask per other site
    assert used == ["fedface"] * (len(EXAMPLES) * len(EXAMPLES))


def test_a_plain_flower_client_is_dropped_at_set_up_with_a_named_failure() -> None:
    workflow = _workflow(_Rounds())

    result, grid, _ = _run(workflow, _apps([secaggplus_mod]))  # no fedface mod: Flower's masks, no echo

    failures = workflow.failures
    assert len(failures) == len(EXAMPLES)
    assert all(isinstance(f, MaskSchemeError) and masks.MASK_SCHEME in str(f) for f in failures)
    assert all(np.count_nonzero(a) == 0 for a in result)  # nothing aggregated: the model is as it was


def test_a_fedface_site_refuses_a_plain_flower_server_at_set_up() -> None:
    plain = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.75)

    result, grid, _ = _run(plain, _apps([site_mod]))

    assert len(grid.errors) == len(EXAMPLES)
    assert all(e.startswith("SecAggRequestError") and "names no mask scheme" in e for e in grid.errors)
    assert all(np.count_nonzero(a) == 0 for a in result)


def _lying_mod(alter: Callable[[Message], None] | None = None, *, flower_masks: bool = False) -> Any:
    """A site that says it masks with fedface's scheme but masks with Flower's generator, or
    alters its masked vector (``alter``) after masking."""

    def mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        saved = flower_mod.pseudo_rand_gen
        if flower_masks:
            flower_mod.pseudo_rand_gen = flower_generator
        try:
            reply = site_mod(msg, ctxt, call_next)
        finally:
            flower_mod.pseudo_rand_gen = saved
        if alter is not None and RECORD_KEY_CONFIGS in msg.content.config_records and not reply.has_error():
            alter(reply)
        return reply

    return mod


def _huge(reply: Message) -> None:
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in configs:
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes

        vec = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
        vec = [vec[0]] + [(v + 2**31) % 2**32 for v in vec[1:]]  # an update far outside the clipping range
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vec]


@pytest.mark.parametrize(
    ("mod", "match"),
    [
        pytest.param(_lying_mod(flower_masks=True), "weight factor is", id="flowers-masks-under-fedfaces-name"),
        pytest.param(_lying_mod(_huge), "unmasked values lie outside", id="values-outside-the-clipping-range"),
    ],
)
def test_a_sum_honest_sites_could_not_produce_is_refused_and_recorded(mod: Any, match: str) -> None:
    rounds = _Rounds()
    apps = _apps([site_mod])
    apps[2] = _apps([mod])[2]  # one site of four misbehaves

    result, grid, _ = _run(_workflow(rounds), apps)

    assert grid.errors == []
    assert len(rounds.aborted) == 1 and rounds.aborted[0][0] == 1
    assert rounds.aborted[0][1].startswith("round refused after unmasking") and match in rounds.aborted[0][1]
    assert all(np.count_nonzero(a) == 0 for a in result)  # the refused sum was not applied


def test_the_set_up_message_names_the_scheme_and_the_site_names_it_back() -> None:
    seen: dict[str, Any] = {}

    def spy_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            seen["asked"] = configs.get(masks.MASK_SCHEME_KEY)
        reply = call_next(msg, ctxt)
        if configs is not None and "asked" in seen and "echo" not in seen:
            seen["echo"] = reply.content.config_records[RECORD_KEY_CONFIGS].get(masks.MASK_SCHEME_KEY)
        return reply

    _run(_workflow(), _apps([spy_mod, site_mod]))

    assert seen == {"asked": masks.MASK_SCHEME, "echo": masks.MASK_SCHEME}


def test_a_set_up_naming_another_scheme_is_refused_before_flowers_mod_runs() -> None:
    msg = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP, masks.MASK_SCHEME_KEY: "flower-mt19937"})}),
        dst_node_id=1,
        message_type="train",
    )
    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(SecAggRequestError, match="asks for 'flower-mt19937'"):
        site_mod(msg, ctxt, lambda m, c: pytest.fail("the request reached the ClientApp"))


def test_secagg_cuts_the_weights_of_a_site_with_many_images_but_not_its_update() -> None:
    # Flower weights each masked value by examples / max_weight (1,000) and clips it to +-8: a
    # FER2013 site's 2,591 images cut its weights at +-8 / 2.591 = +-3.09. fedface's sites send
    # their update instead (client/app.py): a weight of 5.0 reached from 4.9 comes back exact.
    sent = [np.full(s, 4.9, dtype=np.float32) for s in SHAPES]
    weights = [np.full(s, 5.0, dtype=np.float32) for s in SHAPES]

    as_weights, _, _ = _run(_workflow(), _apps([site_mod], lambda node: (weights, 2591)))
    as_update, _, _ = _run(_workflow(), _apps([site_mod], lambda node: (wire.update_of(weights, sent), 2591)))

    assert all(np.allclose(a, 8 / 2.591, atol=1e-3) for a in as_weights)  # what sending weights would give
    for got in wire.apply_update(sent, as_update):
        np.testing.assert_allclose(got, 5.0, rtol=0, atol=1e-4)


def _masked(alter: Callable[[list[np.ndarray]], list[np.ndarray]]) -> Callable[[Message], None]:
    """Change a site's masked vector after SecAgg+ masked it (a malicious site)."""

    def change(reply: Message) -> None:
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes

        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            vec = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
            configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in alter(vec)]

    return change


@pytest.mark.parametrize(
    ("alter", "why"),
    [
        pytest.param(lambda v: v[:-1], "3 arrays where the model has 4", id="an-array-missing"),
        pytest.param(lambda v: [v[0], v[1].reshape(8, 16), *v[2:]], "array 1 of shape (8, 16), not (16, 8)", id="a-wrong-shape"),
        pytest.param(lambda v: [a.astype(np.float64) * np.nan for a in v], "not integers", id="floats-and-nan"),
        pytest.param(lambda v: [v[0], v[1] + 2**33, *v[2:]], "outside [0, 4294967296)", id="outside-the-ring"),
    ],
)
def test_a_malformed_masked_vector_leaves_its_site_out_and_the_round_sums_the_others_exactly(
    alter: Callable[[list[np.ndarray]], list[np.ndarray]], why: str
) -> None:
    # Flower would fail the whole round adding arrays of other shapes; fedface leaves the site
    # out as a dropout (its pairwise masks removed with its neighbours' shares) and records why.
    rounds = _Rounds()
    workflow = _workflow(rounds)
    apps = _apps([site_mod])
    apps[2] = _apps([_lying_mod(_masked(alter))])[2]

    result, grid, _ = _run(workflow, apps)
    failures = workflow.failures

    assert grid.errors == [] and rounds.aborted == []
    assert [type(f).__name__ for f in failures] == ["MaskedVectorError"] and why in str(failures[0]) and "node 2" in str(failures[0])
    survivors = [1, 3, 4]
    tolerance = len(survivors) * (16 / 2**22) / (sum(EXAMPLES[n - 1] for n in survivors) / 1000)
    for got, expected in zip(result, _plain_average(survivors), strict=True):
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # numpy's, as in production
def test_a_nan_in_a_sites_update_is_caught_in_the_unmasked_sum() -> None:
    # Flower's mod quantises NaN to an integer far outside its range (numpy casts it to
    # -2^31, with a warning): the unmasked sum shows it.
    rounds = _Rounds()
    apps = _apps([site_mod])

    def nan_fit(node: int) -> tuple[list[np.ndarray], int]:
        arrays, examples = _fixed(node)
        if node == 3:
            arrays[0][0, 0] = np.nan
        return arrays, examples

    apps[3] = _apps([site_mod], nan_fit)[3]

    result, grid, _ = _run(_workflow(rounds), apps)

    assert grid.errors == []
    assert len(rounds.aborted) == 1 and "unmasked values lie outside" in rounds.aborted[0][1]
    assert all(np.count_nonzero(a) == 0 for a in result)


def _lost_at(stage: str) -> Any:
    """A site that stops answering at ``stage`` (its process killed: the server gets an error reply)."""

    def mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == stage:
            raise ConnectionError(f"site lost at {stage}")
        return site_mod(msg, ctxt, call_next)

    return mod


@pytest.mark.parametrize(
    ("lost", "stage", "in_sum"),
    [
        # Flower 1.42 alone loses the whole round here (the lost site stays a "dead neighbour"
        # whose shares nobody holds): fedface forgets a site lost this early (server/secagg.py)
        pytest.param([2], Stage.SETUP, [1, 3, 4], id="one-lost-at-set-up"),
        pytest.param([2], Stage.SHARE_KEYS, [1, 3, 4], id="one-lost-at-key-sharing"),
        pytest.param([2], Stage.COLLECT_MASKED_VECTORS, [1, 3, 4], id="one-lost-before-its-masked-vector"),
        pytest.param([2], Stage.UNMASK, [1, 2, 3, 4], id="one-lost-after-its-masked-vector"),
    ],
)
def test_with_survivors_at_the_threshold_the_round_is_the_exact_sum_of_what_was_sent(lost: list[int], stage: str, in_sum: list[int]) -> None:
    # Four sites, threshold 3. A site lost before its masked vector leaves is out of the sum
    # (its pairwise masks removed with the others' shares); one lost after it is in the sum
    # (its private mask rebuilt from the others' shares). Either way the unmasked result is the
    # plain average of exactly the updates that entered it.
    apps = _apps([site_mod])
    for node in lost:
        apps[node] = _apps([_lost_at(stage)])[node]
    rounds = _Rounds()

    result, grid, _ = _run(_workflow(rounds), apps)

    assert len(grid.errors) == len(lost) and rounds.aborted == []
    tolerance = len(in_sum) * (16 / 2**22) / (sum(EXAMPLES[n - 1] for n in in_sum) / 1000)
    for got, expected in zip(result, _plain_average(in_sum), strict=True):
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("stage", [Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_below_the_threshold_the_round_stops_cleanly_and_nothing_is_applied(stage: str) -> None:
    # Two of four sites lost (threshold 3): SecAgg+ cannot unmask; the round halts without an
    # exception and the model stays as it was (the run records it as aborted: test_server_app).
    apps = _apps([site_mod])
    for node in (2, 3):
        apps[node] = _apps([_lost_at(stage)])[node]

    result, grid, _ = _run(_workflow(_Rounds()), apps)

    assert len(grid.errors) == 2
    assert all(np.count_nonzero(a) == 0 for a in result)


def test_a_plain_flower_client_among_fedface_sites_is_dropped_and_the_others_summed_exactly() -> None:
    workflow = _workflow(_Rounds())
    apps = _apps([site_mod])
    apps[3] = _apps([secaggplus_mod])[3]  # Flower's mod alone: its masks would not cancel

    result, grid, _ = _run(workflow, apps)

    assert [type(f).__name__ for f in workflow.failures] == ["MaskSchemeError"] and "node 3" in str(workflow.failures[0])
    survivors = [1, 2, 4]
    tolerance = len(survivors) * (16 / 2**22) / (sum(EXAMPLES[n - 1] for n in survivors) / 1000)
    for got, expected in zip(result, _plain_average(survivors), strict=True):
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
