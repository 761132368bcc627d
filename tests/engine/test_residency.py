"""engine.residency with fake sessions and no model: the state machine, the accounting, and
that parked KV comes back byte for byte. Each "turn" here writes a known pattern into the
session's blocks instead of running a model."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from djinn.config import MemoryConfig
from djinn.engine.residency import Residency
from djinn.engine.session import Phase, Session
from djinn.errors import CapacityError, SessionNotFound
from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.pager import OUT, Transfer
from djinn.memory.policy import KVState

SHAPE = KVShape(num_layers=2, kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)


class Rig:
    def __init__(self, policy: str = "semantic-park", device_blocks: int = 12, host_blocks: int = 24):
        # the rig writes made-up KV that is no function of the tokens: prefix sharing would be wrong here
        self.res = Residency(MemoryConfig(policy=policy), torch.device("cpu"), prefix_sharing=False)
        self.pool = BlockPool(SHAPE, device_blocks + 1, torch.device("cpu"))
        self.arena = self.res.add_model("m", self.pool, host_blocks)
        self.tag: dict[str, int] = {}

    def open(self) -> Session:
        s = Session(model="m")
        self.res.register(s)
        return s

    def turn(self, s: Session, tokens: int) -> dict:
        """A turn that ends with ``tokens`` cached: checks the KV it finds, then writes new KV."""
        t = self.res.begin_turn(s, tokens)
        try:
            assert s.kv_state is KVState.DEVICE
            self.check(s)
            s.tokens = list(range(tokens))
            s.num_cached = tokens
            tag = self.tag[s.id] = self.tag.get(s.id, 0) + 1
            for i, b in enumerate(s.block_table):
                self.pool.kv[b] = self.value(s, tag, i)
        finally:
            self.res.end_turn(s)
        return t

    def value(self, s: Session, tag: int, i: int) -> float:
        return float(hash(s.id) % 1000 * 10000 + tag * 100 + i)

    def check(self, s: Session) -> None:
        """The session's cached KV is exactly what its last turn wrote (unless it was dropped)."""
        if s.num_cached == 0:
            return
        tag = self.tag[s.id]
        for i in range(SHAPE.blocks_for(s.num_cached)):
            assert torch.all(self.pool.kv[s.block_table[i]] == self.value(s, tag, i)), f"block {i} of {s.id[:6]}"

    def invariants(self, sessions: list[Session]) -> None:
        with self.res.lock:
            dev, host = [], []
            for s in sessions:
                dev += s.block_table
                host += s.host_table
            for m in self.res.moves:
                # a copy in flight holds its destination; its source is the session's (if still open)
                if m.kind == OUT:
                    host += m.host_blocks
                else:
                    dev += m.device_blocks
            assert len(dev) == len(set(dev)), "a device block has two owners"
            assert len(host) == len(set(host)), "a host block has two owners"
            assert self.pool.used_count == len(dev), (self.pool.used_count, len(dev))
            assert self.arena.used_count == len(host), (self.arena.used_count, len(host))
            assert self.pool.used_count <= self.pool.capacity


class Gate:
    """Stands in for a destination tensor: holds the copy thread until opened."""

    def __init__(self):
        self.event = threading.Event()

    def copy_(self, src):
        self.event.wait(30)


def hold_copies(res: Residency, direction: str) -> Gate:
    """Queue a copy that blocks the ``direction`` copy thread until the gate opens."""
    gate = Gate()
    res.pager._queues[direction].put((Transfer(direction, 0, 0, 1, 0.0), [(gate, None)]))
    return gate


def test_park_then_restore_brings_back_the_same_bytes_in_the_same_list():
    r = Rig()
    s = r.open()
    r.turn(s, 10)                                   # 3 blocks
    table = s.block_table
    r.res.signal(s, Phase.IO_WAIT)
    r.res.wait_idle()
    assert r.res.location(s) == "host" and s.block_table == [] and len(s.host_table) == 3
    assert r.pool.used_count == 0 and r.arena.used_count == 3
    epoch = s.kv_epoch
    t = r.turn(s, 14)                               # restored, checked, then one more block
    assert t["kv_from"] == "host" and t["restore_ms"] >= 0
    assert s.block_table is table and s.kv_epoch > epoch
    assert r.arena.used_count == 0 and r.pool.used_count == 4
    assert r.res.stats()["swaps"]["out"] == 1 and r.res.stats()["swaps"]["in"] == 1


def test_device_blocks_are_freed_only_after_the_park_copy_completed():
    r = Rig()
    s = r.open()
    r.turn(s, 8)
    gate = hold_copies(r.res, OUT)
    r.res.signal(s, Phase.IO_WAIT)
    assert s.kv_state is KVState.PARKING and r.res.location(s) == "moving"
    r.res.stats()
    assert r.pool.used_count == 2 and r.arena.used_count == 2     # both held while the copy is in flight
    gate.event.set()
    r.res.wait_idle()
    assert s.kv_state is KVState.PARKED and r.pool.used_count == 0


def test_active_while_parking_keeps_the_device_copy_and_frees_the_host_one_later():
    r = Rig()
    s = r.open()
    r.turn(s, 8)
    gate = hold_copies(r.res, OUT)
    r.res.signal(s, Phase.IO_WAIT)
    r.res.signal(s, Phase.ACTIVE)                   # changed its mind: no copy back needed
    assert s.kv_state is KVState.DEVICE and r.res.location(s) == "device"
    assert r.arena.used_count == 2                  # the in-flight copy still writes there
    t = r.turn(s, 8)
    assert t["kv_from"] == "device"
    gate.event.set()
    r.res.wait_idle()
    assert r.arena.used_count == 0 and r.pool.used_count == 2
    r.invariants([s])


def test_io_wait_while_restoring_keeps_the_host_copy():
    r = Rig()
    s = r.open()
    r.turn(s, 8)
    r.res.signal(s, Phase.IO_WAIT)
    r.res.wait_idle()
    gate = hold_copies(r.res, "in")
    r.res.signal(s, Phase.ACTIVE)                   # prefetch starts, held at the gate
    assert s.kv_state is KVState.RESTORING and r.pool.used_count == 2
    s.wait_ema, s.wait_dev = 60.0, 0.0              # its tools take a minute: semantic parks, not keeps
    r.res.signal(s, Phase.IO_WAIT)
    assert s.kv_state is KVState.PARKED and len(s.host_table) == 2
    gate.event.set()
    r.res.wait_idle()
    assert r.pool.used_count == 0 and r.arena.used_count == 2
    r.turn(s, 8)                                    # the data is still right
    r.invariants([s])


def test_semantic_prefetch_on_active_needs_no_request():
    r = Rig()
    s = r.open()
    r.turn(s, 12)
    r.res.signal(s, Phase.IO_WAIT)
    r.res.wait_idle()
    r.res.signal(s, Phase.ACTIVE)
    r.res.wait_idle()
    assert r.res.location(s) == "device" and r.res.stats()["swaps"]["in"] == 1
    t = r.turn(s, 12)
    assert t["kv_from"] == "device"


def test_a_signal_during_a_turn_takes_effect_when_the_turn_ends():
    r = Rig()
    s = r.open()
    r.turn(s, 4)
    r.res.begin_turn(s, 8)
    r.res.signal(s, Phase.IO_WAIT)
    assert s.kv_state is KVState.DEVICE and s.phase is Phase.IO_WAIT
    s.num_cached = 8
    r.res.end_turn(s)
    assert s.kv_state in (KVState.PARKING, KVState.PARKED)


def test_pressure_evicts_lru_idle_sessions_whole_and_protects_the_requester():
    r = Rig("lru", device_blocks=12)
    a, b, c, d = (r.open() for _ in range(4))
    for s in (a, b, c):
        r.turn(s, 16)                               # 4 blocks each: the pool is full
    r.turn(a, 16)                                   # a is now the most recently used
    t = r.turn(d, 16)
    assert t["kv_from"] == "device"
    r.res.wait_idle()
    assert [r.res.location(s) for s in (a, b, c, d)] == ["device", "host", "device", "device"]
    r.turn(b, 20)                                   # b comes back: c is now the LRU, 5 blocks needed
    r.res.wait_idle()
    assert r.res.location(b) == "device" and r.res.location(c) == "host"
    assert r.pool.high_water <= r.pool.capacity
    r.invariants([a, b, c, d])


def test_no_room_on_the_host_either_drops_and_the_next_turn_recomputes():
    r = Rig("semantic", device_blocks=6, host_blocks=3)
    a, b = r.open(), r.open()
    r.turn(a, 16)
    r.turn(b, 16)
    assert r.res.location(a) == "dropped"           # 4 blocks do not fit in 3 host blocks
    assert a.num_cached == 0 and a.tokens          # the history is kept
    t = r.turn(a, 16)
    assert t["kv_from"] == "recompute" and r.res.stats()["swaps"]["recomputed"] == 1
    r.res.signal(b, Phase.IO_WAIT)                  # no host room: it simply stays on the device
    r.res.wait_idle()
    assert r.res.location(b) in ("device", "dropped")


def test_a_request_that_cannot_fit_is_refused_and_nothing_moves():
    r = Rig("semantic", device_blocks=8)
    a, b = r.open(), r.open()
    r.turn(a, 16)
    with pytest.raises(CapacityError, match="holds 8 in all"):
        r.turn(b, 40)
    assert r.res.location(a) == "device" and not b.busy and b.block_table == []
    r.invariants([a, b])


def test_resident_never_moves_and_refuses_what_does_not_fit():
    r = Rig("resident", device_blocks=8)
    a, b = r.open(), r.open()
    r.turn(a, 24)
    r.res.signal(a, Phase.IO_WAIT)
    r.res.wait_idle()
    assert r.res.location(a) == "device"
    with pytest.raises(CapacityError, match="resident"):
        r.turn(b, 12)
    assert r.pool.used_count == 6 and r.res.location(a) == "device" and not b.busy
    r.turn(b, 8)                                    # what fits still runs


def test_recompute_policy_drops_on_io_wait():
    r = Rig("recompute")
    s = r.open()
    r.turn(s, 12)
    r.res.signal(s, Phase.IO_WAIT)
    assert r.res.location(s) == "dropped" and r.pool.used_count == 0 and r.arena.used_count == 0
    assert r.turn(s, 12)["kv_from"] == "recompute"


def test_signals_on_closed_sessions_are_clear_errors_and_a_paused_one_stays_paused():
    r = Rig()
    s = r.open()
    s.phase = Phase.PAUSED
    r.res.signal(s, Phase.IO_WAIT)          # moves its KV at most (test_swap_whitebox.py)
    assert s.phase is Phase.PAUSED
    s.phase = Phase.ACTIVE
    r.res.release(s)
    with pytest.raises(SessionNotFound):
        r.res.signal(s, Phase.IO_WAIT)


@pytest.mark.parametrize("policy", ["semantic", "lru", "recompute"])
def test_random_churn_keeps_every_invariant_and_every_byte(policy):
    """Random turns, signals, closes and opens; after each step every block has one owner and
    every session's KV holds what its last turn wrote. Then memory returns to the baseline."""
    rng = random.Random(7)
    r = Rig(policy, device_blocks=20, host_blocks=30)
    free0, host0 = r.pool.free_count, r.arena.free_count
    sessions = [r.open() for _ in range(6)]
    for step in range(300):
        s = rng.choice(sessions)
        op = rng.random()
        if op < 0.45:
            r.turn(s, rng.randint(1, 40))
        elif op < 0.65:
            r.res.signal(s, Phase.IO_WAIT)
        elif op < 0.85:
            r.res.signal(s, Phase.ACTIVE)
        elif op < 0.92:
            r.res.wait_idle()
        else:
            r.res.release(s)
            sessions.remove(s)
            sessions.append(r.open())
        r.invariants(sessions)
    for s in sessions:
        r.res.release(s)
    r.res.wait_idle()
    assert r.pool.free_count == free0 and r.arena.free_count == host0
    st = r.res.stats()
    assert st["kv_device"] == 0 and st["kv_parked"] == 0 and st["kv_moving"] == 0
    if policy != "recompute":
        assert st["swaps"]["out"] > 0 and st["swaps"]["in"] > 0
    r.res.close()


def test_signals_from_other_threads_while_turns_run():
    """Clients signal from their own threads (signal_phase does not go through the loop) while
    turns run: every turn still finds its own bytes, and nothing leaks."""
    rng = random.Random(3)
    r = Rig("semantic", device_blocks=16, host_blocks=40)
    free0 = r.pool.free_count
    sessions = [r.open() for _ in range(5)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def signaller(seed: int) -> None:
        local = random.Random(seed)
        try:
            while not stop.is_set():
                r.res.signal(local.choice(sessions), local.choice([Phase.IO_WAIT, Phase.ACTIVE]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=signaller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            r.turn(rng.choice(sessions), rng.randint(1, 30))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    r.res.wait_idle()
    r.invariants(sessions)
    for s in sessions:
        r.res.release(s)
    r.res.wait_idle()
    assert r.pool.free_count == free0 and r.arena.used_count == 0


def test_a_prefetch_that_needs_room_starts_when_the_room_lands():
    r = Rig("semantic", device_blocks=8, host_blocks=24)
    x, a, b = r.open(), r.open(), r.open()
    r.turn(x, 16)
    r.res.signal(x, Phase.IO_WAIT)
    r.res.wait_idle()
    r.turn(a, 16)
    r.turn(b, 16)                                   # the device is full of idle sessions
    gate = hold_copies(r.res, OUT)
    r.res.signal(x, Phase.ACTIVE)                   # room is being made: a (the LRU) is parking
    assert x.kv_state is KVState.PARKED and x.prefetch_wanted and a.kv_state is KVState.PARKING
    gate.event.set()
    r.res.wait_idle()
    assert [r.res.location(s) for s in (x, a, b)] == ["device", "host", "device"]
    assert r.turn(x, 16)["kv_from"] == "device"     # already back, and its bytes are right
    r.invariants([x, a, b])
