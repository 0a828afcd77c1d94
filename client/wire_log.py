"""A site's wire log: every message the site sends, as it leaves the ClientApp, in JSON lines.

Template traffic (enrollments, revocations and queries to the encrypted gallery) goes to the same
log through :func:`log_envelope`, one line per envelope: its header fields and part sizes.

For auditing what a site really sends (``tests/integration/test_wire_audit.py`` checks it
against :data:`fedface.common.wire.CLEAR_REPLY_KEYS`; an operator can switch it on to see it
for themselves). It is the outermost mod, so it records the reply after SecAgg+ has masked it:
what the server receives.

One line per message: the message type, the SecAgg+ stage it answers (if any) and, for every record of
the content, its kind and keys: scalar values in full (metrics, statuses, counts), byte strings
and lists by size only (public keys, ciphertexts, masked vectors), arrays by name, dtype and
shape only. Lines are appended under an exclusive lock (``fcntl.flock``), so the sites of a
simulation, in several processes, can share one file.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key


def _describe(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, (list, tuple)):
        return {"list": len(value), "of": sorted({type(v).__name__ for v in value})}
    return {"type": type(value).__name__}


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a request asks for (``None`` outside SecAgg+)."""
    if msg.has_error() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    return str(stage) if stage is not None else None


def describe_message(msg: Message, stage: str | None = None) -> dict[str, Any]:
    """What a reply carries, as :mod:`fedface.client.wire_log` records it (``stage``: the
    SecAgg+ stage of the request it answers)."""
    content = msg.content
    records: dict[str, Any] = {}
    for name, config in content.config_records.items():
        records[name] = {"kind": "config", "items": {k: _describe(v) for k, v in config.items()}}
    for name, metrics in content.metric_records.items():
        records[name] = {"kind": "metrics", "items": {k: _describe(v) for k, v in metrics.items()}}
    for name, arrays in content.array_records.items():
        records[name] = {
            "kind": "arrays",
            "items": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()},
        }
    return {"message_type": msg.metadata.message_type, "stage": stage, "records": records}


def _append(path: Path, entry: dict[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(line)
        fh.flush()


def describe_envelope(data: bytes) -> dict[str, Any]:
    """What a template envelope (enrollment, revocation, query) carries, as the wire log records
    it: every header field (scalars in full, lists by size and element type) and each part's size."""
    from fedface.common.crypto.envelope import parse_envelope

    header_bytes, _, parts = parse_envelope(data)
    header = json.loads(header_bytes)
    return {
        "message_type": f"gallery.{header.get('kind')}",
        "stage": None,
        "header": {k: _describe(v) for k, v in header.items()},
        "parts": [len(p) for p in parts],
        "bytes": len(data),
    }


def log_envelope(path: Path, site: str, data: bytes) -> None:
    """Append one template envelope a site sends to its wire log (same file and format as the mod)."""
    _append(Path(path), {"node": site, **describe_envelope(data)})


def wire_log_mod(path: Path) -> Callable[[Message, Context, Any], Message]:
    """A mod appending every reply of this ClientApp to ``path`` (see the module docstring)."""
    path = Path(path)

    def mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        stage = secagg_stage(msg)  # before the mods below consume the request's SecAgg+ config
        try:
            reply = call_next(msg, ctxt)
        except Exception as exc:
            # Flower turns the exception into an error reply carrying its text: record that text
            _append(path, {"node": ctxt.node_id, "message_type": msg.metadata.message_type, "stage": stage,
                           "error": {"exception": type(exc).__name__, "reason": str(exc)}})
            raise
        if reply.has_error():
            entry = {"message_type": msg.metadata.message_type, "stage": stage, "error": {"code": reply.error.code, "reason": reply.error.reason}}
        else:
            entry = describe_message(reply, stage)
        _append(path, {"node": ctxt.node_id, **entry})
        return reply

    return mod


__all__ = ["describe_envelope", "describe_message", "log_envelope", "secagg_stage", "wire_log_mod"]
