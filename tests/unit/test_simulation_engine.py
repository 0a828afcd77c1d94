"""Unit tests for what fedface changes in the way Flower's simulation engine runs a federation:
messages dispatched as soon as the server pushes them (fedface.simulations.engine), and a
ClientApp that travels to Ray's workers as its recipe rather than by value (with every site's
faces in its closures)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from queue import Queue
from typing import Any

import pytest
import ray.cloudpickle as cloudpickle
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedface.common.config import TrainConfig
from fedface.simulations import engine
from fedface.simulations.simulate import simulated_client_app


class _State:
    """The part of Flower's LinkState the dispatch loop reads: pending messages per node."""

    def __init__(self, nodes: list[int]) -> None:
        self.pending: dict[int, list[str]] = {n: [] for n in nodes}
        self.lock = threading.Lock()

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        with self.lock:
            out = self.pending[node_id][:limit]
            del self.pending[node_id][:limit]
            return out


def test_dispatch_loop_hands_over_a_pushed_message_without_waiting_for_its_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 60-s fallback: only the push's wake-up can deliver the message within the test's 5 s
    monkeypatch.setattr(engine, "FALLBACK_INTERVAL_S", 60.0)
    state, queue, stop = _State([11, 12]), Queue(), threading.Event()  # type: ignore[var-annotated]
    loop = threading.Thread(target=engine.add_messages_to_queue, args=(state, queue, {11: 0, 12: 1}, stop), daemon=True)
    loop.start()
    time.sleep(0.2)  # the first sweep found nothing; the loop now waits
    with state.lock:
        state.pending[12].append("train-12")
    t0 = time.perf_counter()
    engine.notify_pushed()
    assert queue.get(timeout=5) == "train-12"
    assert time.perf_counter() - t0 < 5
    stop.set()
    engine.notify_pushed()
    loop.join(timeout=5)
    assert not loop.is_alive()


def test_prompt_dispatch_replaces_flowers_loop_only_inside_the_block() -> None:
    before = (vce_api.add_messages_to_queue, InMemoryGrid.push_messages)
    with engine.prompt_dispatch() as active:
        assert active
        assert vce_api.add_messages_to_queue is engine.add_messages_to_queue
        engine._pushed.clear()
        # the grid's push wakes the loop (an empty push stores nothing)
        assert list(InMemoryGrid.push_messages(object(), [])) == []  # type: ignore[arg-type]
        assert engine._pushed.is_set()
    assert (vce_api.add_messages_to_queue, InMemoryGrid.push_messages) == before


def test_prompt_dispatch_leaves_a_loop_of_another_shape_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def other_loop(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any, interval: float) -> None:
        raise AssertionError("not to be called")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", other_loop)
    push = InMemoryGrid.push_messages
    with engine.prompt_dispatch() as active:
        assert not active
        assert vce_api.add_messages_to_queue is other_loop
        assert InMemoryGrid.push_messages is push


def test_simulated_client_app_travels_as_its_recipe(tmp_path: Path, orl_root: Path) -> None:
    cfg = TrainConfig.from_mapping({"data": {"root": str(orl_root), "image-size": [32, 32]}, "federation": {"sites": 3}})
    cfg_json = json.dumps(cfg.to_toml_dict(), sort_keys=True)
    app = simulated_client_app(cfg_json, str(tmp_path / "sites"))
    # Flower's Ray backend ships the app inside a closure with every message
    blob = cloudpickle.dumps(lambda: app)
    assert len(blob) < len(cfg_json) + 2_000  # the recipe, not the app's closures or any faces
    assert cloudpickle.loads(blob)() is app  # one app per process, built once
