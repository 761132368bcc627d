"""Sessions whose KV is parked, restored, dropped and rebuilt produce exactly the tokens of a
session whose KV never moved (CPU float32; the oracle is transformers' own generate on the full
history), under every policy, with far more KV than the device holds."""

from __future__ import annotations

import random
import time

import pytest
import torch

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest
from djinn.errors import CapacityError

from tests.conftest import loaded
from tests.engine.test_generate import greedy, hf_greedy


def engine(lm, policy: str = "semantic", blocks: int = 256, host: int | None = 256) -> Engine:
    return Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks, host_blocks=host, policy=policy)))


def prompts(seed: int, n: int, lo: int = 3, hi: int = 9) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(5, 250) for _ in range(g.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_twenty_parks_and_restores_change_no_token(name):
    lm = loaded(name)
    eng = engine(lm, policy="semantic-park")      # every IO_WAIT parks, however short (semantic would keep these)
    try:
        sid = eng.open_session("m")
        history: list[int] = []
        for turn, prompt in enumerate(prompts(1, 21)):
            out = eng.generate(sid, GenerateRequest(prompt, greedy(6)))
            history += prompt
            assert out.token_ids == hf_greedy(lm.model, history, 6), f"turn {turn}"
            history += out.token_ids
            if turn > 0:
                assert out.cached_tokens == len(history) - len(prompt) - 6 - 1   # nothing recomputed
                if turn % 2:   # no ACTIVE signal: the request itself restores
                    assert out.timings["restore_ms"] > 0
            if turn < 20:
                eng.signal_phase(sid, "IO_WAIT")
                eng.residency.wait_idle()
                assert eng.session_info(sid)["kv_location"] == "host"
                if turn % 2 == 0:
                    eng.signal_phase(sid, "ACTIVE")     # prefetch ahead of the next request
        stats = eng.stats()
        assert stats["swaps"]["out"] == 20 and stats["swaps"]["in"] == 20 and stats["swaps"]["dropped"] == 0
        assert stats["bytes_moved"]["out"] > 0 and stats["bytes_moved"]["in"] > 0
        assert stats["bandwidth_gbps"]["out"] > 0
    finally:
        eng.shutdown()


def test_dropped_kv_is_rebuilt_by_recompute_to_the_same_tokens(tiny_llama):
    eng = engine(tiny_llama, policy="recompute")
    try:
        sid = eng.open_session("m")
        history: list[int] = []
        for turn, prompt in enumerate(prompts(2, 5)):
            out = eng.generate(sid, GenerateRequest(prompt, greedy(7)))
            if turn > 0:
                assert out.cached_tokens == 0 and out.computed_tokens == len(history) + len(prompt) + 6
                assert out.timings["recompute_ms"] > 0          # (in the turn's own batched prefill)
            history += prompt
            assert out.token_ids == hf_greedy(tiny_llama.model, history, 7), f"turn {turn}"
            history += out.token_ids
            eng.signal_phase(sid, "IO_WAIT")
            assert eng.session_info(sid)["kv_location"] == "dropped"
            assert eng.runtimes["m"].pool.used_count == 0
        assert eng.stats()["swaps"]["recomputed"] == 4
    finally:
        eng.shutdown()


def test_reactive_eviction_without_signals_and_without_host_room(tiny_llama):
    """No signal at all, no host memory: the idle session is dropped to make room and rebuilt."""
    eng = engine(tiny_llama, policy="semantic", blocks=9, host=0)      # 8 usable blocks = 128 tokens
    try:
        a, b = eng.open_session("m"), eng.open_session("m")
        pa, pb = prompts(3, 2, 60, 70)
        out_a = eng.generate(a, GenerateRequest(pa, greedy(4)))
        eng.generate(b, GenerateRequest(pb, greedy(4)))                # needs a's blocks
        assert eng.session_info(a)["kv_location"] == "dropped"
        again = eng.generate(a, GenerateRequest([7, 8, 9], greedy(5)))
        assert again.cached_tokens == 0
        assert again.token_ids == hf_greedy(tiny_llama.model, pa + out_a.token_ids + [7, 8, 9], 5)
    finally:
        eng.shutdown()


_REFERENCE: dict = {}


def _agents(eng: Engine, seed: int) -> tuple[dict, dict]:
    """40 agents, 3 turns each in a shuffled interleaving, IO_WAIT / ACTIVE between turns."""
    rng = random.Random(seed)
    sids = [eng.open_session("m") for _ in range(40)]
    script = [(i, t) for t in range(3) for i in range(40)]
    # interleave turns across agents while keeping each agent's turns in order
    order: list[tuple[int, int]] = []
    pending = {i: 0 for i in range(40)}
    while len(order) < len(script):
        i = rng.choice([k for k, t in pending.items() if t < 3])
        order.append((i, pending[i]))
        pending[i] += 1
    outs: dict = {}
    for i, t in order:
        g = random.Random(seed * 1000 + i * 10 + t)
        prompt = [g.randrange(5, 250) for _ in range(20 if t == 0 else 12)]
        outs[(i, t)] = eng.generate(sids[i], GenerateRequest(prompt, greedy(8))).token_ids
        if rng.random() < 0.6:
            eng.signal_phase(sids[i], "IO_WAIT")
        if rng.random() < 0.3:
            eng.signal_phase(sids[rng.randrange(40)], "ACTIVE")
    return outs, dict(enumerate(sids))


@pytest.mark.parametrize("policy", ["semantic", "lru", "recompute"])
def test_forty_agents_with_eight_times_the_device_kv(tiny_llama, policy):
    if "ref" not in _REFERENCE:
        ref = engine(tiny_llama, policy="resident", blocks=512, host=0)
        try:
            _REFERENCE["ref"] = _agents(ref, seed=11)[0]
        finally:
            ref.shutdown()
    # each agent ends with 20+8+12+8+12+8 = 68 tokens = 5 blocks: 200 blocks of KV in all, 25 on the device
    eng = engine(tiny_llama, policy=policy, blocks=26, host=100)
    try:
        pool = eng.runtimes["m"].pool
        free0 = pool.free_count
        outs, sids = _agents(eng, seed=11)
        assert outs == _REFERENCE["ref"]                 # every turn completed with the same tokens
        demand = sum(pool.shape.blocks_for(eng.session_info(s)["tokens"] - 1) for s in sids.values())
        assert demand >= 8 * pool.capacity                # the KV of all agents: 8x what the device holds
        assert pool.high_water <= pool.capacity          # the pool's own accounting
        stats = eng.stats()
        assert stats["memory"]["kv_device_high_water"] <= stats["memory"]["kv_device_capacity"]
        if policy == "recompute":
            assert stats["swaps"]["out"] == 0 and stats["swaps"]["recomputed"] > 0
        else:
            assert stats["swaps"]["out"] > 0 and stats["swaps"]["in"] > 0
        for s in sids.values():
            eng.close_session(s)
        eng.residency.wait_idle()
        assert pool.free_count == free0 and eng.stats()["memory"]["kv_parked"] == 0
    finally:
        eng.shutdown()


def test_resident_refuses_a_session_that_does_not_fit_and_the_others_keep_working(tiny_llama):
    eng = engine(tiny_llama, policy="resident", blocks=9)
    try:
        a = eng.open_session("m")
        pa = list(range(10, 90))
        first = eng.generate(a, GenerateRequest(pa, greedy(4)))
        used = eng.runtimes["m"].pool.used_count
        b = eng.open_session("m")
        with pytest.raises(CapacityError, match="resident"):
            eng.generate(b, GenerateRequest(list(range(5, 70)), greedy(4)))
        assert eng.runtimes["m"].pool.used_count == used and eng.session_info(b)["tokens"] == 0
        eng.signal_phase(a, "IO_WAIT")
        assert eng.session_info(a)["kv_location"] == "device"          # resident ignores the signal
        more = eng.generate(a, GenerateRequest([3], greedy(3)))
        assert more.token_ids == hf_greedy(tiny_llama.model, pa + first.token_ids + [3], 3)
    finally:
        eng.shutdown()


def test_decode_steps_continue_while_a_large_kv_is_parked(tiny_llama):
    """The copy runs on the pager's thread: another session's decode steps run meanwhile."""
    n = 12_000                                            # 12k blocks of 12 KiB: ~140 MiB to park
    eng = engine(tiny_llama, blocks=n + 64, host=n + 64)
    steps: list[float] = []
    handle = tiny_llama.model.lm_head.register_forward_hook(lambda *a: steps.append(time.perf_counter()))
    try:
        big, small = eng.open_session("m"), eng.open_session("m")
        eng.generate(small, GenerateRequest([5, 6, 7], greedy(2)))
        sb = eng.sessions[big]
        pool = eng.runtimes["m"].pool

        def fill():    # the big session's KV is written directly: no 190k-token prefill on a CPU
            eng.residency.begin_turn(sb, n * 16)
            sb.tokens, sb.num_cached = [1] * (n * 16), n * 16
            pool.kv[sb.block_table[0]:sb.block_table[-1] + 1].fill_(1.5)
            eng.residency.end_turn(sb)

        eng.loop.call(fill)
        assert sb.block_table == list(range(sb.block_table[0], sb.block_table[0] + n))
        steps.clear()
        eng.signal_phase(big, "IO_WAIT")
        tr = eng.residency.pager.recent[-1]
        assert tr.nbytes == n * pool.shape.block_bytes and tr.ncopies == 1   # one coalesced copy
        eng.generate(small, GenerateRequest([8, 9], greedy(60)))
        tr.wait()
        during = [t for t in steps if tr.t_enqueued < t < tr.t_done]
        assert len(during) >= 2, (len(during), len(steps), tr.t_done - tr.t_enqueued)
        print(f"{len(during)} decode steps ran during the {(tr.t_done - tr.t_enqueued) * 1e3:.0f} ms park")
        eng.residency.wait_idle()
        assert eng.session_info(big)["kv_location"] == "host"
        eng.loop.call(lambda: (eng.residency.begin_turn(sb, n * 16), eng.residency.end_turn(sb)))
        assert bool((pool.kv[sb.block_table[0]] == 1.5).all()) and bool((pool.kv[sb.block_table[-1]] == 1.5).all())
    finally:
        handle.remove()
        eng.shutdown()


def test_timings_split_and_stats_show_where_kv_lives(tiny_llama):
    eng = engine(tiny_llama, policy="semantic-park")
    try:
        sid = eng.open_session("m")
        assert eng.session_info(sid)["kv_location"] == "none"
        eng.generate(sid, GenerateRequest(list(range(5, 45)), greedy(3)))
        info = eng.session_info(sid)
        assert info["kv_location"] == "device" and info["kv_blocks"] == 3
        eng.signal_phase(sid, "IO_WAIT")
        eng.residency.wait_idle()
        stats = eng.stats()
        assert stats["memory"]["kv_parked"] == 3 * eng.runtimes["m"].kv.block_bytes
        assert stats["memory"]["kv_device"] == 0 and stats["sessions_by_kv_location"] == {"host": 1}
        assert stats["sessions_by_phase"] == {"IO_WAIT": 1} and stats["policy"] == "semantic-park"
        out = eng.generate(sid, GenerateRequest([3], greedy(2)))
        for key in ("queue_ms", "restore_ms", "make_room_ms", "compute_ms", "total_ms"):
            assert out.timings[key] >= 0
        assert out.timings["restore_ms"] > 0
        assert out.timings["total_ms"] >= out.timings["restore_ms"] + out.timings["compute_ms"]
        assert eng.session_info(sid)["phase"] == "ACTIVE"           # a request brings it back
    finally:
        eng.shutdown()
