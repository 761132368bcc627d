"""engine.residency carrying out the semantic policy's IO_WAIT plans (keep / park / prefetch /
late park), with fake sessions, no model, and a fake clock whose timers the test runs by hand.
The rules themselves are tested on their own in tests/memory/test_policy.py."""

from __future__ import annotations

import time

import pytest

from djinn.engine.session import Phase
from djinn.engine.timers import Timers
from djinn.memory.policy import KVState

from tests.engine.test_residency import Rig

# the rig's sessions are tiny: a park or a restore costs the fixed 1 ms, so the break-even of a
# wait is ~0.05 s (the prefetch margin): 0.02 s waits are kept, 1 s waits are standby (on the
# device as the first to go), parked when the free blocks fall below the reserve (10% of the pool)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rig(**kw) -> tuple[Rig, Clock]:
    r = Rig("semantic", **kw)
    clock = Clock()
    r.res.clock = clock
    r.res._timers.close()                          # the real timer thread: replaced by a hand-run one
    r.res._timers = Timers(clock=clock, thread=False)
    return r, clock


def advance(r: Rig, clock: Clock, dt: float) -> None:
    clock.t += dt
    r.res._timers.run_due()
    r.res.wait_idle()


def with_history(r: Rig, tokens: int, wait_s: float):
    s = r.open()
    r.turn(s, tokens)
    s.wait_ema, s.wait_dev = wait_s, 0.0           # what its earlier tool calls took
    return s


def test_with_room_to_spare_short_waits_keep_the_kv_and_long_ones_stay_as_the_first_to_go():
    r, clock = rig()
    short, long = with_history(r, 8, 0.02), with_history(r, 8, 1.0)
    r.res.signal(short, Phase.IO_WAIT)
    r.res.signal(long, Phase.IO_WAIT)
    r.res.wait_idle()
    assert r.res.location(short) == "device" and r.res.location(long) == "device"
    d = r.res.stats()["decisions"]
    assert (d["io_wait"], d["keep"], d["standby"], d["park"], d["reasons"]) == (2, 1, 1, 0, {"short": 1, "long": 1})
    assert d["expected_wait_s"] == {"keep": 0.02, "standby": 1.0, "park": 0.0} and d["sources"]["session"] == 2
    for s, dt in ((short, 0.02), (long, 0.98)):
        advance(r, clock, dt)
        r.res.signal(s, Phase.ACTIVE)
        assert r.turn(s, 12)["kv_from"] == "device"
    d = r.res.stats()
    assert d["swaps"]["out"] == 0 and d["decisions"]["reclaimed"] == 0   # nothing needed the memory: nothing moved
    r.invariants([short, long])

def test_below_the_reserve_standby_sessions_park_expected_back_last_first_and_come_back_early():
    r, clock = rig(device_blocks=20)                   # reserve: 2 blocks
    soon, late = with_history(r, 8, 1.0), with_history(r, 8, 3.0)      # 2 blocks each
    r.res.signal(late, Phase.IO_WAIT)
    r.res.signal(soon, Phase.IO_WAIT)
    filler = r.open()
    r.turn(filler, 60)                                 # 15 blocks: 1 left free, below the reserve
    r.res.wait_idle()
    # only as much as the reserve needs, and the one expected back last (not the least recently used)
    assert r.res.location(late) == "host" and r.res.location(soon) == "device"
    assert r.res.stats()["decisions"]["reclaimed"] == 1
    advance(r, clock, 1.0)
    r.res.signal(soon, Phase.ACTIVE)
    assert r.turn(soon, 8)["kv_from"] == "device"
    advance(r, clock, 1.9)
    assert r.res.location(late) == "host"              # its restore starts ~0.05 s before 3 s
    advance(r, clock, 0.06)
    assert r.res.location(late) == "device" and late.phase is Phase.IO_WAIT
    advance(r, clock, 0.04)
    r.res.signal(late, Phase.ACTIVE)
    assert r.turn(late, 8)["kv_from"] == "device"
    r.invariants([soon, late, filler])


def test_a_keep_never_blocks_an_admission_and_a_short_wait_parks_when_the_memory_is_needed():
    r, clock = rig(device_blocks=10)                   # reserve: 1 block
    kept = with_history(r, 16, 0.02)                   # 4 blocks
    r.res.signal(kept, Phase.IO_WAIT)
    assert r.res.location(kept) == "device"
    other = r.open()
    r.turn(other, 32)                                  # 8 blocks: the kept session must go
    r.res.wait_idle()
    assert r.res.location(kept) == "host" and r.res.location(other) == "device"
    assert r.res.stats()["decisions"]["kept_evicted"] == 1
    later = with_history(r, 8, 0.02)                   # the last 2 blocks: none left for the reserve
    r.res.signal(later, Phase.IO_WAIT)
    assert r.res.stats()["decisions"]["reasons"].get("memory_needed") == 1
    r.res.wait_idle()
    assert r.res.location(later) == "host"
    r.res.release(other)                               # room again: short waits keep again
    r.res.signal(later, Phase.ACTIVE)
    r.turn(later, 8)
    later.wait_ema, later.wait_dev = 0.02, 0.0
    r.res.signal(later, Phase.IO_WAIT)
    assert r.res.location(later) == "device"
    r.invariants([kept, later])

def test_a_kept_wait_that_overruns_its_estimate_is_parked_late():
    r, clock = rig()
    s = with_history(r, 8, 0.02)
    r.res.signal(s, Phase.IO_WAIT)
    advance(r, clock, 0.05)
    assert r.res.location(s) == "device"
    advance(r, clock, 0.05)                            # 0.1 s: past mean + 4 dev + break-even
    assert r.res.location(s) == "host" and r.res.stats()["decisions"]["late_park"] == 1
    r.res.signal(s, Phase.ACTIVE)                      # back: a normal prefetch, and the wait is learnt
    assert r.turn(s, 8)["kv_from"] in ("device", "host")
    assert s.wait_ema > 0.02


def test_a_session_with_no_history_uses_the_server_wide_estimate_else_stands_by():
    r, clock = rig()
    first = r.open()
    r.turn(first, 8)
    r.res.signal(first, Phase.IO_WAIT)
    assert r.res.location(first) == "device"             # nothing known, room to spare: the first to go
    assert r.res.stats()["decisions"]["standby"] == 1
    for s in [first] + [with_history(r, 4, 0.5) for _ in range(2)]:
        if s is not first:
            r.res.signal(s, Phase.IO_WAIT)
        advance(r, clock, 0.01)
        r.res.signal(s, Phase.ACTIVE)
    new = r.open()
    r.turn(new, 8)
    r.res.signal(new, Phase.IO_WAIT)                   # three waits of 10 ms seen server-wide
    d = r.res.stats()["decisions"]
    assert d["sources"] == {"session": 2, "server": 1, "none": 1} and d["reasons"]["no_estimate"] == 1
    assert d["keep_sources"] == {"session": 0, "server": 1}
    assert r.res.location(new) == "device" and r.res.stats()["wait_estimate_s"]["mean"] == pytest.approx(0.01)


def test_a_prefetch_timer_never_evicts_anyone():
    r, clock = rig(device_blocks=8)
    s = with_history(r, 16, 1.0)
    r.res.signal(s, Phase.IO_WAIT)
    r.res.wait_idle()
    filler = r.open()
    r.turn(filler, 32)                                 # takes the whole pool while s is away
    advance(r, clock, 0.99)
    assert r.res.location(s) == "host" and r.res.location(filler) == "device"
    assert r.res.stats()["decisions"]["prefetch_no_room"] == 1
    r.res.signal(s, Phase.ACTIVE)                      # the agent's own return still evicts as a request does
    assert r.turn(s, 16)["kv_from"] == "host"
    r.invariants([s, filler])


def test_timers_of_a_closed_or_returned_session_do_nothing():
    r, clock = rig()
    a, b = with_history(r, 8, 1.0), with_history(r, 8, 1.0)
    r.res.signal(a, Phase.IO_WAIT)
    r.res.signal(b, Phase.IO_WAIT)
    r.res.wait_idle()
    r.res.release(a)
    r.res.signal(b, Phase.ACTIVE)                      # the normal prefetch brings b back
    r.res.wait_idle()
    r.turn(b, 8)
    advance(r, clock, 10.0)
    d = r.res.stats()["decisions"]
    assert d["prefetch"] == 0 and d["late_park"] == 0
    assert r.arena.used_count == 0 and r.res.location(b) == "device"


def test_the_timer_thread_prefetches_before_the_agent_returns():
    """The real clock and timer thread: a 0.3 s tool's KV is parked (the memory is needed),
    then back on the device before the client signals ACTIVE."""
    r = Rig("semantic", device_blocks=10)
    s = with_history(r, 8, 0.3)
    filler = r.open()
    r.turn(filler, 32)                                 # the pool is full
    r.res.signal(s, Phase.IO_WAIT)
    r.res.wait_idle()
    assert r.res.location(s) == "host"
    r.res.release(filler)                              # room again, for the prefetch
    deadline = time.monotonic() + 5.0
    while r.res.location(s) != "device" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.res.location(s) == "device" and s.phase is Phase.IO_WAIT
    assert s.kv_state is KVState.DEVICE
    r.res.signal(s, Phase.ACTIVE)
    assert r.turn(s, 8)["kv_from"] == "device"
    r.res.close()
