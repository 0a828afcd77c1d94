"""The console's live feed: server-sent events from the run store's append-only rows.

``GET /events`` streams one event per new row (:meth:`RunStore.changes`): the event name is the
row's kind (``event``: a run started, resumed or finished; ``round``: a round recorded;
``action``: an admin action; ``receipt``: a ledger receipt), its data ``{"kind", "run_id"}``
(for an action, ``run_id`` is its target: a run or a site), and its id the store cursor just
after that row, written ``E-R-A-C`` (the last ids of events, rounds, actions and receipts).

Resuming: a browser that reconnects sends the last id it saw as ``Last-Event-ID``; the stream
goes on just after it, so nothing is missed and nothing is replayed. A stream without one starts
at the store's current cursor (only what happens from now). A malformed id, or one from another
store (ahead of this store's cursor), also starts from now: never from the beginning.
The store is polled every ``poll_s`` seconds (its cursor: four indexed ``MAX`` lookups).

The stream ends as soon as the session it was opened for ends (logout, expiry, a replaced
administrator): it asks before each poll; the browser's reconnection is then refused (401).
While the store file cannot be read it waits, as while there is none.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from fedface.common.errors import FedFaceError
from fedface.server.console.sources import StoreSource
from fedface.server.store_console import CHANGE_KINDS, Cursor

_CURSOR = re.compile(r"^(\d{1,18})-(\d{1,18})-(\d{1,18})-(\d{1,18})$")
ZERO: Cursor = (0, 0, 0, 0)

logger = logging.getLogger(__name__)


def encode_cursor(cursor: Cursor) -> str:
    """``E-R-A-C``: a cursor as an event id."""
    return "-".join(str(int(part)) for part in cursor)


def parse_cursor(text: str | None) -> Cursor | None:
    """The cursor an event id encodes, or None if it is missing or malformed."""
    match = _CURSOR.match((text or "").strip())
    if match is None:
        return None
    e, r, a, c = (int(g) for g in match.groups())
    return (e, r, a, c)


def _advance(cursor: Cursor, kind: str, row_id: int) -> Cursor:
    parts = list(cursor)
    index = CHANGE_KINDS.index(kind)
    parts[index] = max(parts[index], row_id)
    return (parts[0], parts[1], parts[2], parts[3])


def start_cursor(current: Cursor, last_event_id: str | None) -> Cursor:
    """Where a stream starts: just after ``Last-Event-ID`` if it is a cursor of this store (none of
    its parts ahead of ``current``), else ``current`` (from now)."""
    given = parse_cursor(last_event_id)
    if given is None or any(g > c for g, c in zip(given, current, strict=True)):
        return current
    return given


async def change_events(
    source: StoreSource, last_event_id: str | None = None, *, poll_s: float = 0.5, alive: Callable[[], bool] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The feed (module docstring) as sse-starlette event dicts: ``{"event", "id", "data"}``.

    Runs until cancelled (the client went away) or until ``alive()`` is false (asked before
    each poll: the session is over). While there is no store file, it waits for one and then
    starts from its first row; a store file replaced by another starts again from the new
    one's first row. While the store file cannot be read it waits (logged once), where it was.
    """
    cursor: Cursor | None = None
    generation = None
    unreadable = False
    while alive is None or alive():
        try:
            store = await anyio.to_thread.run_sync(source.get)
        except FedFaceError as exc:
            if not unreadable:
                logger.error("console feed waits for a readable run store: %s: %s", type(exc).__name__, exc)
            unreadable = True
            await anyio.sleep(poll_s)
            continue
        unreadable = False
        if store is None:
            cursor, generation = ZERO, None
            await anyio.sleep(poll_s)
            continue
        if source.generation() != generation:
            current = await anyio.to_thread.run_sync(store.cursor)
            if cursor is None:  # the stream's start: the browser's Last-Event-ID, or now
                cursor = start_cursor(current, last_event_id)
            else:  # the store appeared, or was replaced, while streaming: all of the new one
                cursor = ZERO
            generation = source.generation()
        now = await anyio.to_thread.run_sync(store.cursor)
        if now != cursor:
            for kind, run_id, row_id in await anyio.to_thread.run_sync(store.changes, cursor):
                cursor = _advance(cursor, kind, row_id)
                yield {"event": kind, "id": encode_cursor(cursor), "data": json.dumps({"kind": kind, "run_id": run_id})}
        await anyio.sleep(poll_s)


__all__ = ["ZERO", "change_events", "encode_cursor", "parse_cursor", "start_cursor"]
