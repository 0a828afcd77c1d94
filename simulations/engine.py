"""Flower 1.42's simulation engine, with messages dispatched when the server sends them.

Flower's Simulation Runtime hands the server's messages to the ClientApp workers in
``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``: a loop that sweeps the
in-memory SuperLink state once for every node, then sleeps a fixed 100 ms (no setting changes
it). Every exchange between the server and the sites therefore waits 0-100 ms before any site
starts on it: once a round for plain FedAvg, four times for SecAgg+ (set-up, key shares, masked
updates, unmasking). Measured here (10 sites, 2 cores) that wait was about 0.05 s per exchange,
a quarter of SecAgg+'s extra seconds per round.

:func:`prompt_dispatch` replaces that loop, for the duration of one in-process simulation, by
the same sweep woken as soon as the server's grid pushes messages (and still every 100 ms
without a push, so a message stored any other way is picked up as before). Written here because
Flower offers no hook for it; it replaces one internal function of the pinned Flower
(``flwr>=1.42,<1.43``) and checks that the function still has the shape it expects, otherwise it
leaves Flower's own loop in place (runs are then only slower, not different).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

logger = logging.getLogger(__name__)

#: Without a push, the state is still swept this often (Flower's own interval).
FALLBACK_INTERVAL_S = 0.1

_pushed = threading.Event()
_EXPECTED_PARAMS = ["state", "queue", "nodes_mapping", "f_stop"]


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's sweep of the state for messages to the nodes, woken by :func:`notify_pushed`."""
    while not f_stop.is_set():
        # clear before sweeping: a push during the sweep sets the event again and is swept next
        _pushed.clear()
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        _pushed.wait(FALLBACK_INTERVAL_S)


def notify_pushed() -> None:
    """Wake the dispatch loop: the server has stored messages for the sites."""
    _pushed.set()


@contextmanager
def prompt_dispatch() -> Iterator[bool]:
    """Within the block, in-process simulations dispatch messages as soon as they are pushed.

    Yields whether the replacement is in place (False: Flower's own 100-ms loop runs).
    """
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: leave it alone
        yield False
        return
    original_loop = getattr(vce_api, "add_messages_to_queue", None)
    original_push = getattr(InMemoryGrid, "push_messages", None)
    if (
        original_loop is None
        or original_push is None
        or list(inspect.signature(original_loop).parameters) != _EXPECTED_PARAMS
    ):
        logger.debug("Flower's simulation dispatch loop is not the expected one; using it unchanged")
        yield False
        return

    def push_messages(self: Any, messages: Any) -> Any:
        ids = original_push(self, messages)
        notify_pushed()
        return ids

    vce_api.add_messages_to_queue = add_messages_to_queue
    InMemoryGrid.push_messages = push_messages  # type: ignore[method-assign]
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original_loop
        InMemoryGrid.push_messages = original_push  # type: ignore[method-assign]


__all__ = ["FALLBACK_INTERVAL_S", "add_messages_to_queue", "notify_pushed", "prompt_dispatch"]
