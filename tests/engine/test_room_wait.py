"""A turn that finds the device KV pool full of running turns' blocks waits for one of them to
end (``RoomHeld``, retried after batch steps) instead of failing: every turn completes with
transformers' own greedy tokens, and the wait is bounded by ``EngineConfig.room_wait_s``."""

from __future__ import annotations

import random

import pytest

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest
from djinn.errors import CapacityError

from tests.engine.test_generate import greedy, hf_greedy


def engine(lm, policy: str, room_wait_s: float = 30.0) -> Engine:
    # 13 blocks of 16 tokens; each turn below needs 4 (40 prompt + 20 new tokens): 3 fit at once
    return Engine({"m": lm}, EngineConfig(room_wait_s=room_wait_s,
                                          memory=MemoryConfig(kv_blocks=13, host_blocks=64, policy=policy)))


def prompts(n: int) -> list[list[int]]:
    g = random.Random(7)
    return [[g.randrange(5, 250) for _ in range(40)] for _ in range(n)]


@pytest.mark.parametrize("policy", ["lru", "semantic", "recompute"])
def test_turns_wait_for_running_turns_instead_of_failing(tiny_llama, policy):
    want = [hf_greedy(tiny_llama.model, p, 20) for p in prompts(7)]   # before the engine shares the model
    eng = engine(tiny_llama, policy)
    try:
        sids = [eng.open_session("m") for _ in range(7)]
        futures = [eng.submit_generate(sid, GenerateRequest(p, greedy(20))) for sid, p in zip(sids, prompts(7))]
        assert [f.result(timeout=120).token_ids for f in futures] == want
        assert all(eng.session_info(sid)["turns"] == 1 for sid in sids)
    finally:
        eng.shutdown()


def test_the_wait_is_bounded_and_a_refused_turn_changes_nothing(tiny_llama):
    want = [hf_greedy(tiny_llama.model, p, 20) for p in prompts(7)]
    eng = engine(tiny_llama, "lru", room_wait_s=0.0)      # no waiting: the old refusal
    try:
        sids = [eng.open_session("m") for _ in range(7)]
        futures = [eng.submit_generate(sid, GenerateRequest(p, greedy(20))) for sid, p in zip(sids, prompts(7))]
        refused = 0
        for sid, w, f in zip(sids, want, futures):
            try:
                assert f.result(timeout=120).token_ids == w
            except CapacityError as exc:
                refused += 1
                assert "running turns hold" in str(exc)
                assert eng.session_info(sid)["tokens"] == 0     # the refused turn left nothing behind
        assert refused > 0
        # ... and once the others ended, the same requests run
        for sid, p, w in zip(sids, prompts(7), want):
            if eng.session_info(sid)["tokens"] == 0:
                assert eng.generate(sid, GenerateRequest(p, greedy(20))).token_ids == w
    finally:
        eng.shutdown()


@pytest.mark.parametrize("policy", ["lru", "semantic"])
def test_waiting_turns_take_the_room_in_turn_and_restore_each_session_about_once(tiny_llama, policy):
    """Eight parked sessions come back at once to a pool that holds one or two of their turns:
    the turns queue for room first come first served, so each session's KV is restored about
    once (retrying them all after every step had each evict the KV the one before had just
    restored: 548 restores for these 8 turns), and every token is transformers' own."""
    g = random.Random(3)
    first = [[g.randrange(5, 250) for _ in range(40)] for _ in range(8)]
    second = [[g.randrange(5, 250) for _ in range(30)] for _ in range(8)]
    want1 = [hf_greedy(tiny_llama.model, p, 20) for p in first]
    want2 = [hf_greedy(tiny_llama.model, p + w + q, 20) for p, w, q in zip(first, want1, second)]
    eng = Engine({"m": tiny_llama}, EngineConfig(memory=MemoryConfig(kv_blocks=13, host_blocks=256, policy=policy)))
    try:
        sids = [eng.open_session("m") for _ in range(8)]
        outs = [eng.submit_generate(sid, GenerateRequest(p, greedy(20))) for sid, p in zip(sids, first)]
        assert [f.result(timeout=120).token_ids for f in outs] == want1
        for sid in sids:
            eng.signal_phase(sid, "IO_WAIT")
        eng.residency.wait_idle()
        restored = eng.stats()["swaps"]["in"]
        for sid in sids:
            eng.signal_phase(sid, "ACTIVE")
        outs = [eng.submit_generate(sid, GenerateRequest(q, greedy(20))) for sid, q in zip(sids, second)]
        assert [f.result(timeout=120).token_ids for f in outs] == want2
        assert eng.stats()["swaps"]["in"] - restored <= 2 * 8
    finally:
        eng.shutdown()


def test_a_turn_waiting_for_its_restore_does_not_hold_the_loop(tiny_llama):
    """A's KV is parked and its restore cannot finish (the host-to-device copy thread is held
    by a gate): A's next turn waits aside (``CopyPending``) while B's turn, submitted after it,
    runs to the end; once the copy goes through, A gets transformers' own tokens and its
    restore time includes the wait. (Before, the loop waited for A's copy and B waited too.)"""
    import threading
    import time

    from djinn.memory.pager import IN, Transfer

    g = random.Random(5)
    p1, p2, pb = ([g.randrange(5, 250) for _ in range(n)] for n in (40, 12, 30))
    want1 = hf_greedy(tiny_llama.model, p1, 10)
    want2 = hf_greedy(tiny_llama.model, p1 + want1 + p2, 10)
    want_b = hf_greedy(tiny_llama.model, pb, 10)
    eng = Engine({"m": tiny_llama}, EngineConfig(memory=MemoryConfig(kv_blocks=40, host_blocks=64,
                                                                     policy="semantic-park")))

    class Gate:                       # a "copy" that returns when the test says so
        released = threading.Event()

        def copy_(self, src):
            self.released.wait(60)

    try:
        a = eng.open_session("m")
        assert eng.generate(a, GenerateRequest(p1, greedy(10))).token_ids == want1
        eng.signal_phase(a, "IO_WAIT")
        eng.residency.wait_idle()
        assert eng.session_info(a)["kv_location"] == "host"
        eng.residency.pager._queues[IN].put((Transfer(direction=IN, nbytes=0, nblocks=0, ncopies=1, t_submitted=0.0), [(Gate(), None)]))
        held = time.perf_counter()
        fa = eng.submit_generate(a, GenerateRequest(p2, greedy(10)))
        b = eng.open_session("m")
        assert eng.submit_generate(b, GenerateRequest(pb, greedy(10))).result(timeout=60).token_ids == want_b
        assert not fa.done()
        time.sleep(0.2)
        Gate.released.set()
        ra = fa.result(timeout=60)
        assert ra.token_ids == want2
        assert ra.timings["restore_ms"] >= 150 and ra.timings["restore_ms"] <= (time.perf_counter() - held) * 1e3
    finally:
        Gate.released.set()
        eng.shutdown()
