"""The per-session tensor store, driven directly (no model)."""

from __future__ import annotations

import pytest
import torch

from djinn.engine.tensors import TensorStore
from djinn.errors import CapacityError, InvalidRequest


def t(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)   # 4 n bytes


def test_handles_describe_the_tensor_and_ids_are_never_reused():
    store = TensorStore()
    a = store.put("s1", torch.ones(2, 3, dtype=torch.float16))
    assert a == {"id": a["id"], "shape": [2, 3], "dtype": "float16", "session_id": "s1"}
    store.release(a["id"])
    b = store.put("s1", t(1))
    assert b["id"] != a["id"]
    with pytest.raises(InvalidRequest, match="released"):
        store.get(a["id"], "s1")


def test_count_bound_evicts_the_oldest_unpinned_of_that_session_only():
    store = TensorStore(max_count=3)
    other = store.put("s2", t(1))
    pinned = store.put("s1", t(1), pinned=True)
    ids = [store.put("s1", t(1))["id"] for _ in range(4)]
    assert len(store) == 4                                     # s1: pinned + 2 newest; s2: 1
    for gone in ids[:2]:
        with pytest.raises(InvalidRequest, match="evicted"):
            store.get(gone, "s1")
    assert store.get(pinned["id"], "s1") is not None and store.get(other["id"], "s2") is not None
    store.unpin(pinned["id"])
    store.put("s1", t(1))
    with pytest.raises(InvalidRequest, match="evicted"):
        store.get(pinned["id"], "s1")


def test_byte_bound_and_what_can_never_fit():
    store = TensorStore(max_count=10, max_bytes=100)
    a = store.put("s", t(10))
    store.put("s", t(10), pinned=True)
    store.put("s", t(10))                      # 120 bytes > 100: a goes
    with pytest.raises(InvalidRequest, match="evicted"):
        store.get(a["id"], "s")
    assert store.session_bytes("s") == 80
    with pytest.raises(CapacityError, match="pinned"):
        store.put("s", t(16))                  # 40 pinned + 64 > 100 even with every unpinned one evicted
    assert store.session_bytes("s") == 80      # and nothing was evicted for it
    with pytest.raises(CapacityError):
        store.check_room("s", 101)
    store.check_room("s", 60)


def test_sessions_are_isolated_and_freed_with_the_session():
    store = TensorStore()
    a = store.put("s1", t(4))
    b = store.put("s2", t(4))
    with pytest.raises(InvalidRequest, match="another session"):
        store.get(a["id"], "s2")
    with pytest.raises(InvalidRequest, match="unknown"):
        store.get("t999", "s1")
    with pytest.raises(InvalidRequest, match="paused forward"):
        store.release(store.put("s1", t(1), pinned=True)["id"])
    store.drop_session("s1")
    with pytest.raises(InvalidRequest, match="closed"):
        store.get(a["id"], "s1")
    assert store.total_bytes == 16 and store.get(b["id"], "s2").shape == (4,)
