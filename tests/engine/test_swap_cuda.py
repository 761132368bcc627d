"""Parking and restoring on CUDA (pinned host arena, copy streams, events): the tokens of a
session that was moved 20 times, or dropped and rebuilt, equal transformers' generate."""

from __future__ import annotations

import pytest
import torch

from djinn.engine import GenerateRequest

from tests.conftest import loaded, requires_cuda
from tests.engine.test_cuda import assert_greedy_within_rounding
from tests.engine.test_generate import greedy, hf_greedy
from tests.engine.test_swap import _agents, engine, prompts

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_twenty_parks_and_restores_change_no_token(dtype):
    """The tokens of a session moved 20 times equal those of the same turns on a session that
    never moved (the same kernels: bit for bit), and transformers' generate (float32: exactly;
    float16: within rounding, ``assert_greedy_within_rounding``, since its kernels round
    differently and a near-tie may break the other way)."""
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    still = engine(lm, policy="resident")
    try:
        sid = still.open_session("m")
        unmoved = [still.generate(sid, GenerateRequest(p, greedy(6))).token_ids for p in prompts(1, 21)]
    finally:
        still.shutdown()
    eng = engine(lm, policy="semantic-park")      # every IO_WAIT parks, however short (semantic would keep these)
    try:
        assert eng.residency.tiers["m"].arena.run_view(0, 1).is_pinned()
        sid = eng.open_session("m")
        history: list[int] = []
        for turn, prompt in enumerate(prompts(1, 21)):
            out = eng.generate(sid, GenerateRequest(prompt, greedy(6)))
            history += prompt
            assert out.token_ids == unmoved[turn], f"turn {turn}"
            if dtype == torch.float32:
                assert out.token_ids == hf_greedy(lm.model, history, 6), f"turn {turn}"
            else:
                assert_greedy_within_rounding(lm.model, history, out.token_ids, dtype)
            history += out.token_ids
            if turn < 20:
                eng.signal_phase(sid, "IO_WAIT")
                if turn % 3 == 0:      # a request right behind the signal: the park is cancelled or undone
                    continue
                eng.residency.wait_idle()
                assert eng.session_info(sid)["kv_location"] == "host"
                if turn % 2 == 0:
                    eng.signal_phase(sid, "ACTIVE")
        stats = eng.stats()
        assert stats["swaps"]["out"] >= 13 and stats["swaps"]["in"] >= 13
        assert stats["bandwidth_gbps"]["out"] > 0 and stats["bandwidth_gbps"]["in"] > 0
    finally:
        eng.shutdown()


def test_cuda_recompute_rebuilds_the_same_tokens():
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    eng = engine(lm, policy="recompute")
    try:
        sid = eng.open_session("m")
        history: list[int] = []
        for turn, prompt in enumerate(prompts(2, 5)):
            out = eng.generate(sid, GenerateRequest(prompt, greedy(7)))
            history += prompt
            assert out.token_ids == hf_greedy(lm.model, history, 7), f"turn {turn}"
            history += out.token_ids
            eng.signal_phase(sid, "IO_WAIT")
            assert eng.session_info(sid)["kv_location"] == "dropped"
    finally:
        eng.shutdown()


def test_cuda_forty_agents_with_eight_times_the_device_kv():
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    ref = engine(lm, policy="resident", blocks=512, host=0)
    try:
        expected = _agents(ref, seed=5)[0]
    finally:
        ref.shutdown()
    eng = engine(lm, policy="semantic", blocks=26, host=100)
    try:
        outs, _ = _agents(eng, seed=5)
        assert outs == expected
        pool = eng.runtimes["m"].pool
        assert pool.high_water <= pool.capacity and eng.stats()["swaps"]["in"] > 0
    finally:
        eng.shutdown()


def test_cuda_semantic_keeps_short_waits_and_prefetches_long_ones_on_its_timer():
    """semantic on CUDA: a session whose tools take ~1 ms keeps its KV on the device; one whose
    tools take ~0.4 s, on a device whose memory is needed (the reserve set to the whole pool), is
    parked on IO_WAIT and its restore is started by the wait timer (its own thread, its own copy
    stream) before the client comes back. Tokens equal transformers'. (Which waits keep, stand
    by or park is tested on the CPU: tests/memory/test_policy.py, tests/engine/test_wait_plans.py.)"""
    import time

    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    eng = engine(lm, policy="semantic")
    try:
        for tool_s, kept in ((0.001, True), (0.4, False)):
            if not kept:
                eng.residency.policy.reserve = 1.0     # the memory is needed: long waits park at once
            sid = eng.open_session("m")
            history: list[int] = []
            for turn, prompt in enumerate(prompts(3 + int(tool_s * 10), 6)):
                out = eng.generate(sid, GenerateRequest(prompt, greedy(5)))
                history += prompt
                assert out.token_ids == hf_greedy(lm.model, history, 5), f"tool {tool_s} turn {turn}"
                history += out.token_ids
                eng.signal_phase(sid, "IO_WAIT")
                if turn >= 2:    # the session's own history now says how long its tools take
                    eng.residency.wait_idle()
                    assert eng.session_info(sid)["kv_location"] == ("device" if kept else "host")
                time.sleep(tool_s)
                if turn >= 2 and not kept:
                    eng.residency.wait_idle()
                    assert eng.session_info(sid)["kv_location"] == "device"     # prefetched before ACTIVE
                eng.signal_phase(sid, "ACTIVE")
            eng.close_session(sid)
        d = eng.stats()["decisions"]
        assert d["keep"] >= 3 and d["prefetch"] >= 3 and d["reasons"]["memory_needed"] >= 3
    finally:
        eng.shutdown()
