"""The policies, driven with fake sessions: no model, no tensors."""

from __future__ import annotations

import pytest

from djinn.errors import InvalidRequest
from djinn.memory.policy import Action, Candidate, KVState, make_policy


def cand(id: str, phase: str = "ACTIVE", blocks: int = 4, idle_since: float = 0.0, state: KVState = KVState.DEVICE,
         reclaimable: int | None = None, back: float | None = None) -> Candidate:
    return Candidate(id=id, phase=phase, state=state, blocks=blocks,
                     reclaimable=blocks if reclaimable is None else reclaimable, idle_since=idle_since,
                     expected_back_s=back)


def ids(plan):
    return [sid for sid, _ in plan]


def test_semantic_signals_park_on_io_wait_and_prefetch_on_active():
    p = make_policy("semantic")
    assert p.on_signal(cand("a", "IO_WAIT")) is Action.PARK
    assert p.on_signal(cand("a", "IO_WAIT", state=KVState.RESTORING)) is Action.PARK   # turn back around
    assert p.on_signal(cand("a", "IO_WAIT", state=KVState.PARKED)) is Action.NONE
    assert p.on_signal(cand("a", "ACTIVE", state=KVState.PARKED)) is Action.PREFETCH
    assert p.on_signal(cand("a", "ACTIVE", state=KVState.PARKING)) is Action.PREFETCH
    assert p.on_signal(cand("a", "ACTIVE")) is Action.NONE
    assert p.on_signal(cand("a", "ACTIVE", state=KVState.DROPPED)) is Action.NONE


@pytest.mark.parametrize("name", ["lru", "resident"])
def test_lru_and_resident_ignore_signals(name):
    p = make_policy(name)
    for phase in ("IO_WAIT", "ACTIVE"):
        for state in KVState:
            assert p.on_signal(cand("a", phase, state=state)) is Action.NONE


def test_recompute_drops_on_io_wait_and_never_parks():
    p = make_policy("recompute")
    assert p.on_signal(cand("a", "IO_WAIT")) is Action.DROP
    assert p.on_signal(cand("a", "IO_WAIT", blocks=0)) is Action.NONE
    assert p.on_signal(cand("a", "ACTIVE")) is Action.NONE
    plan = p.victims([cand("a"), cand("b")], need=8, host_free=1000)
    assert plan == [("a", Action.DROP), ("b", Action.DROP)]


def test_semantic_evicts_io_wait_first_then_lru_whole_sessions():
    p = make_policy("semantic")
    cands = [cand("old-active", idle_since=1.0), cand("new-active", idle_since=5.0),
             cand("tool-recent", "IO_WAIT", idle_since=4.0), cand("tool-old", "IO_WAIT", idle_since=2.0),
             cand("paused", "PAUSED", idle_since=3.0)]
    plan = p.victims(cands, need=100, host_free=1000) or []
    assert plan == []  # 20 blocks cannot give 100: nothing is evicted
    plan = p.victims(cands, need=20, host_free=1000)
    assert ids(plan) == ["tool-old", "paused", "tool-recent", "old-active", "new-active"]
    assert all(a is Action.PARK for _, a in plan)
    # only as many whole sessions as needed: 5 blocks -> two sessions of 4
    assert ids(p.victims(cands, need=5, host_free=1000)) == ["tool-old", "paused"]


def test_semantic_a_person_waiting_is_a_better_victim_than_a_short_tool_call():
    p = make_policy("semantic")
    cands = [cand("short-tool", "IO_WAIT", idle_since=1.0, back=0.2),   # its tools take ~0.2 s more
             cand("human", "ACTIVE", idle_since=2.0),                  # finished turn, nobody signalled
             cand("long-tool", "IO_WAIT", idle_since=3.0, back=30.0),
             cand("overdue-tool", "IO_WAIT", idle_since=4.0, back=-5.0)]
    assert ids(p.victims(cands, need=16, host_free=100)) == ["long-tool", "overdue-tool", "human", "short-tool"]


def test_lru_orders_by_last_use_only():
    p = make_policy("lru")
    cands = [cand("b", "IO_WAIT", idle_since=2.0), cand("a", idle_since=1.0), cand("c", idle_since=3.0)]
    assert ids(p.victims(cands, need=12, host_free=100)) == ["a", "b", "c"]


def test_park_falls_back_to_drop_when_the_host_is_full():
    p = make_policy("semantic")
    cands = [cand("a", "IO_WAIT", blocks=6, idle_since=1), cand("b", blocks=3, idle_since=2),
             cand("c", blocks=2, idle_since=3)]
    plan = p.victims(cands, need=11, host_free=4)
    assert plan == [("a", Action.DROP), ("b", Action.PARK), ("c", Action.DROP)]


def test_shared_blocks_count_only_what_eviction_frees():
    p = make_policy("lru")
    cands = [cand("fork", blocks=8, reclaimable=1, idle_since=1), cand("b", blocks=4, idle_since=2)]
    assert ids(p.victims(cands, need=5, host_free=100)) == ["fork", "b"]
    assert p.victims(cands, need=6, host_free=100) is None


def test_resident_never_evicts():
    p = make_policy("resident")
    assert p.victims([cand("a"), cand("b")], need=1, host_free=100) is None
    assert p.victims([cand("a")], need=0, host_free=100) == []


def test_order_is_deterministic_on_ties():
    p = make_policy("semantic")
    cands = [cand(x, idle_since=1.0) for x in "dbca"]
    assert ids(p.victims(cands, need=16, host_free=100)) == ["a", "b", "c", "d"]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="unknown policy"):
        make_policy("fifo")


def test_a_paused_session_is_parked_but_never_dropped():
    cands = [cand("paused", "PAUSED", blocks=4, idle_since=1), cand("idle", blocks=4, idle_since=2)]
    assert make_policy("semantic").victims(cands, need=4, host_free=4) == [("paused", Action.PARK)]
    assert make_policy("semantic").victims(cands, need=4, host_free=0) == [("idle", Action.DROP)]
    assert make_policy("recompute").victims(cands, need=4, host_free=100) == [("idle", Action.DROP)]
    assert make_policy("recompute").victims(cands, need=8, host_free=100) is None
