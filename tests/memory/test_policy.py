"""The policies, driven with fake sessions: no model, no tensors."""

from __future__ import annotations

import pytest

from djinn.errors import InvalidRequest
from djinn.memory.policy import (Action, Candidate, CopyRates, KVState, Room, WaitEstimate, WaitHistory,
                                 make_policy)


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
    # away first, expected back last first (far overdue: nothing says it is coming back)
    assert ids(p.victims(cands, need=16, host_free=100)) == ["overdue-tool", "long-tool", "human", "short-tool"]


def test_semantic_evicts_the_session_expected_back_last_not_the_least_recently_used():
    p = make_policy("semantic")
    est = WaitEstimate(15.0, 2.0, "session")
    back_soon = cand("waited-12s", "IO_WAIT", idle_since=1.0, back=3.0)      # 12 s into a ~15 s wait
    just_left = cand("waited-1s", "IO_WAIT", idle_since=12.0, back=14.0)
    a_bit_late = cand("waited-16s", "IO_WAIT", idle_since=0.0, back=-1.0)   # within its spread: back soon
    way_late = cand("waited-40s", "IO_WAIT", idle_since=5.0, back=-25.0)    # far past it: unknown
    for c, waited in ((back_soon, 12.0), (just_left, 1.0), (a_bit_late, 16.0), (way_late, 40.0)):
        c.wait, c.waited_s = est, waited
    order = ids(p.victims([back_soon, just_left, a_bit_late, way_late], need=16, host_free=100))
    assert order == ["waited-40s", "waited-1s", "waited-12s", "waited-16s"]
    assert ids(make_policy("lru").victims([back_soon, just_left, a_bit_late, way_late], need=16,
                                          host_free=100))[0] == "waited-16s"   # LRU: the one about to return


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


# ---- semantic: weighing each IO_WAIT by its expected length (plan_wait) ------------------

from djinn.engine.timers import Timers  # noqa: E402

GB = 10 ** 9
RATES = CopyRates(out_gbps=10.0, in_gbps=10.0, overhead_s=0.0)   # 1 GB moves in 0.1 s each way
CALM = Room(free_blocks=100)


def waiting(mean: float | None, dev: float = 0.0, nbytes: int = GB, waited: float = 0.0,
            state: KVState = KVState.DEVICE, source: str = "session") -> Candidate:
    est = None if mean is None else WaitEstimate(mean, dev, source)
    blocks = 4 if state is KVState.DEVICE and nbytes else 0
    return Candidate(id="a", phase="IO_WAIT", state=state, blocks=blocks, reclaimable=blocks,
                     idle_since=0.0, expected_back_s=None if mean is None else mean - waited, kv_bytes=nbytes,
                     waited_s=waited, wait=est)


def test_a_wait_shorter_than_park_plus_restore_keeps_the_kv_and_a_longer_one_stands_by():
    p = make_policy("semantic")
    # 1 GB: park 0.1 s + restore 0.1 s + margin 0.05 s = 0.25 s break-even
    short = p.plan_wait(waiting(0.2), CALM, RATES)
    assert short.action is Action.KEEP and short.reason == "short" and short.expected_s == 0.2
    assert short.prefetch_at_s is None and short.recheck_at_s == pytest.approx(0.2 + 0.25)   # overrun: park then
    long = p.plan_wait(waiting(10.0, dev=1.0), CALM, RATES)
    assert long.action is Action.STANDBY and long.reason == "long" and long.outcome == "standby"
    assert long.recheck_at_s is None
    # if it is parked for the reserve meanwhile, the restore starts one deviation, the restore time
    # and the margin before the expected return
    # the restore starts one deviation, the restore time and the margin before the expected return
    assert long.prefetch_at_s == pytest.approx(10.0 - 1.0 - 0.1 - 0.05)


def test_the_break_even_grows_with_the_bytes_and_shrinks_with_the_bandwidth():
    p = make_policy("semantic")
    assert p.plan_wait(waiting(0.5, nbytes=GB), CALM, RATES).action is Action.STANDBY       # 0.25 s to break even
    assert p.plan_wait(waiting(0.5, nbytes=4 * GB), CALM, RATES).action is Action.KEEP      # 1 s to break even
    fast = CopyRates(out_gbps=50.0, in_gbps=50.0, overhead_s=0.0)
    assert p.plan_wait(waiting(0.5, nbytes=4 * GB), CALM, fast).action is Action.STANDBY    # 0.37 s
    # a tiny session: the fixed cost of a move and the margin still make a very short wait a keep
    assert p.plan_wait(waiting(0.01, nbytes=1024), CALM, CopyRates(10.0, 10.0)).action is Action.KEEP


def test_memory_pressure_wins_over_a_keep_and_a_standby():
    p = make_policy("semantic")
    low = Room(free_blocks=3, reserve_blocks=10)               # below the reserve, nobody else to park
    plan = p.plan_wait(waiting(0.2), low, RATES)
    assert (plan.action, plan.reason) == (Action.PARK, "memory_needed")
    assert plan.prefetch_at_s == pytest.approx(0.1)           # not before the park ends
    assert p.plan_wait(waiting(10.0), low, RATES).action is Action.PARK
    assert p.plan_wait(waiting(None), low, RATES).action is Action.PARK
    wanted = Room(free_blocks=50, wanted_blocks=3)            # a prefetch waits for room
    assert p.plan_wait(waiting(0.2), wanted, RATES).reason == "memory_needed"
    # below the reserve, but parking others that are away for long makes it up: those go instead
    covered = Room(free_blocks=3, reserve_blocks=10, standby_blocks=8)
    assert p.plan_wait(waiting(0.2), covered, RATES).action is Action.KEEP
    assert p.plan_wait(waiting(10.0), covered, RATES).action is Action.STANDBY


def test_nothing_known_about_the_wait_stands_by_without_timers():
    plan = make_policy("semantic").plan_wait(waiting(None), CALM, RATES)
    assert (plan.action, plan.reason, plan.expected_s, plan.prefetch_at_s, plan.recheck_at_s) == \
        (Action.STANDBY, "no_estimate", None, None, None)


def test_kv_already_off_the_device_is_only_prefetched():
    p = make_policy("semantic")
    parked = p.plan_wait(waiting(10.0, state=KVState.PARKED), CALM, RATES)
    assert parked.action is Action.NONE and parked.outcome == "off"
    assert parked.prefetch_at_s == pytest.approx(10.0 - 0.1 - 0.05)
    dropped = p.plan_wait(waiting(10.0, state=KVState.DROPPED), CALM, RATES)
    assert dropped.outcome == "off" and dropped.prefetch_at_s is None     # nothing to restore
    empty = p.plan_wait(waiting(10.0, nbytes=0), CALM, RATES)
    assert empty.outcome == "none" and empty.reason == "no_kv"


def test_an_overdue_wait_planned_again_parks():
    plan = make_policy("semantic").plan_wait(waiting(0.2, waited=0.3), CALM, RATES)
    assert plan.action is Action.PARK and plan.reason == "overdue"


@pytest.mark.parametrize("name", ["lru", "resident", "recompute"])
def test_other_policies_plan_waits_from_their_signal_rule(name):
    plan = make_policy(name).plan_wait(waiting(0.2), CALM, RATES)
    assert plan.outcome == ("drop" if name == "recompute" else "none")
    assert make_policy(name).on_wait_timer(waiting(0.2), "recheck", CALM) is Action.NONE


def test_wait_timers_prefetch_parked_kv_and_park_kv_that_overstayed():
    p = make_policy("semantic")
    for state in (KVState.PARKED, KVState.PARKING):
        assert p.on_wait_timer(waiting(10.0, state=state), "prefetch", CALM) is Action.PREFETCH
        # a prediction never takes room a request may be waiting for
        assert p.on_wait_timer(waiting(10.0, state=state), "prefetch", Room(100, wanted_blocks=4)) is Action.NONE
    parked = waiting(10.0, state=KVState.PARKED)
    parked.host_blocks = 6
    assert p.on_wait_timer(parked, "prefetch", Room(free_blocks=5)) is Action.NONE     # only into free room
    assert p.on_wait_timer(parked, "prefetch", Room(free_blocks=6)) is Action.PREFETCH
    assert p.on_wait_timer(waiting(10.0), "prefetch", CALM) is Action.NONE             # already on the device
    assert p.on_wait_timer(waiting(0.2), "recheck", CALM) is Action.PARK
    assert p.on_wait_timer(waiting(0.2), "recheck", Room(0, reserve_blocks=5)) is Action.PARK
    assert p.on_wait_timer(waiting(0.2, state=KVState.RESTORING), "recheck", CALM) is Action.PARK
    assert p.on_wait_timer(waiting(0.2, state=KVState.PARKED), "recheck", CALM) is Action.NONE
    back = cand("a", "ACTIVE")
    assert p.on_wait_timer(back, "prefetch", CALM) is Action.NONE
    assert p.on_wait_timer(back, "recheck", CALM) is Action.NONE


def test_kept_sessions_are_the_last_victims_but_still_victims():
    # (a kept wait far past its estimate is no longer expected back soon: it goes first)
    p = make_policy("semantic")
    kept = cand("kept", "IO_WAIT", idle_since=1.0, back=5.0)
    kept.kept = True                                                  # kept by choice, though not due within 1 s
    overdue = cand("kept-overdue", "IO_WAIT", idle_since=2.0, back=-0.1)
    overdue.kept = True
    cands = [kept, overdue, cand("idle", "ACTIVE", idle_since=3.0), cand("tool", "IO_WAIT", idle_since=4.0, back=9.0)]
    assert ids(p.victims(cands, need=16, host_free=100)) == ["kept-overdue", "tool", "idle", "kept"]
    # a keep never blocks an admission: with nothing else to evict, the kept session goes
    assert ids(p.victims([kept], need=4, host_free=100)) == ["kept"]


def test_wait_history_own_mean_then_server_median_then_nothing():
    h = WaitHistory(gain=0.5, dev_gain=0.25, window=8, min_samples=3)
    assert h.estimate(None, None) is None
    mean, dev = h.update(None, None, 2.0)
    assert (mean, dev) == (2.0, 1.0)
    mean, dev = h.update(mean, dev, 4.0)
    assert mean == pytest.approx(3.0) and dev == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)
    assert h.estimate(mean, dev) == WaitEstimate(3.0, dev, "session")
    assert h.estimate(None, None) is None                           # two waits server-wide: too few
    h.update(None, None, 100.0)
    assert h.estimate(None, None) == WaitEstimate(4.0, 2.0, "server")   # median of 2, 4, 100 and its deviation
    for _ in range(8):
        h.update(None, None, 0.5)                                      # the window forgets old waits
    assert h.server().mean_s == 0.5


def test_an_agent_loop_on_a_fake_clock_keeps_short_tools_and_prefetches_long_ones():
    """Drive the policy the way engine.residency does, on a fake clock with Timers run by hand:
    an agent with 0.1 s tools keeps its KV after its first wait; one with 10 s tools leaves it on
    a device with room to spare (standby), and on a full one parks it and starts its restore
    before it comes back."""
    now = [0.0]
    timers = Timers(clock=lambda: now[0], thread=False)
    p, history = make_policy("semantic"), WaitHistory()
    full = Room(free_blocks=0, reserve_blocks=10)
    for tool, room, expect in ((0.1, CALM, Action.KEEP), (10.0, CALM, Action.STANDBY), (10.0, full, Action.PARK)):
        mean = dev = None
        for turn in range(4):
            start = now[0]
            state = {"kv": KVState.DEVICE, "restored_at": None}
            est = history.estimate(mean, dev)
            c = waiting(None if est is None else est.mean_s, 0.0 if est is None else est.dev_s)
            plan = p.plan_wait(c, room, RATES)
            if plan.action is Action.PARK:
                state["kv"] = KVState.PARKED

            def fire(kind, plan=plan, state=state, start=start):
                c = waiting(10.0, state=state["kv"], waited=now[0] - start)
                if p.on_wait_timer(c, kind, CALM) is Action.PREFETCH:
                    state["kv"], state["restored_at"] = KVState.DEVICE, now[0] + plan.restore_s

            handles = [timers.at(start + at, lambda k=k: fire(k)) for k, at in
                       (("prefetch", plan.prefetch_at_s), ("recheck", plan.recheck_at_s)) if at is not None]
            for step in range(1, 101):                                     # the tool runs; time passes
                now[0] = start + tool * step / 100
                timers.run_due()                                           # at step 100 the agent is back
            for h in handles:
                h.cancel()
            mean, dev = history.update(mean, dev, tool)
            if turn == 0:
                assert plan.reason == "no_estimate"
                assert plan.action is (Action.STANDBY if room is CALM else Action.PARK)
                continue
            assert plan.action is expect, (tool, turn, plan)
            if expect is Action.PARK:
                assert state["kv"] is KVState.DEVICE and state["restored_at"] <= now[0], "prefetch came too late"
            else:
                assert state["kv"] is KVState.DEVICE
        history = WaitHistory()                                             # the next agent class, alone
    assert timers.pending() == 0


def test_semantic_park_parks_every_io_wait_however_short():
    p = make_policy("semantic-park")
    plan = p.plan_wait(waiting(0.001), CALM, RATES)
    assert plan.action is Action.PARK and plan.prefetch_at_s is None and plan.recheck_at_s is None
    assert p.on_signal(cand("a", "ACTIVE", state=KVState.PARKED)) is Action.PREFETCH
    assert p.on_wait_timer(waiting(0.2), "recheck", CALM) is Action.NONE
    assert p.name == "semantic-park" and p.moves_kv
