"""Paging meets white-box execution: a session paused at a breakpoint is ordinary idle memory
(parked under pressure, restored into other blocks before it resumes), and a dropped session's
prefix is rebuilt without the request's interventions. Oracles: transformers' own forward with
its own cache and hooks written in the tests (tests/engine/test_whitebox.py), CPU float32, so
"equal" is bitwise."""

from __future__ import annotations

import pytest
import torch

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest
from djinn.errors import CapacityError

from tests.conftest import loaded
from tests.engine.test_whitebox import LayerEdit, greedy, hf_logits, logits_of, prompt


def engine(lm, policy: str, blocks: int, host: int) -> Engine:
    return Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks, host_blocks=host, policy=policy)))


def test_a_paused_session_is_parked_under_pressure_and_resumes_exactly():
    lm = loaded("tiny-llama")
    eng = engine(lm, "semantic", blocks=9, host=64)          # 8 usable blocks = 128 tokens
    try:
        a, b = eng.open_session("m"), eng.open_session("m")
        history = prompt(lm, 40, 1)
        first = eng.generate(a, GenerateRequest(history, greedy(1))).token_ids
        ids = prompt(lm, 10, 2)
        p = eng.forward(a, ids, breakpoint=1)["paused"]        # layers 0..1 of 11 tokens written, 4 blocks
        epoch = eng.sessions[a].kv_epoch
        eng.generate(b, GenerateRequest(prompt(lm, 80, 3), greedy(4)))   # needs A's blocks: A is parked
        eng.residency.wait_idle()
        assert eng.session_info(a)["kv_location"] == "host" and eng.session_info(a)["phase"] == "PAUSED"
        out = logits_of(eng, eng.resume(p["paused_id"]))      # B is parked in turn, A comes back
        assert eng.sessions[a].kv_epoch > epoch                # its blocks moved while it was paused
        assert torch.equal(out, hf_logits(lm.model, first + ids, past=history))
        assert eng.stats()["swaps"]["in"] >= 1
    finally:
        eng.shutdown()


def test_a_paused_session_is_never_dropped():
    """Its in-flight forward's KV is not in the token history: with no host room it stays, and a
    request that would need its blocks is refused instead."""
    lm = loaded("tiny-llama")
    eng = engine(lm, "recompute", blocks=9, host=0)
    try:
        a, b = eng.open_session("m"), eng.open_session("m")
        p = eng.forward(a, prompt(lm, 60, 4), breakpoint=0)["paused"]
        with pytest.raises(CapacityError):
            eng.generate(b, GenerateRequest(prompt(lm, 80, 5), greedy(4)))
        assert eng.session_info(a)["kv_location"] == "device"
        eng.resume(p["paused_id"])
    finally:
        eng.shutdown()


def test_a_dropped_prefix_is_rebuilt_without_the_requests_interventions():
    lm = loaded("tiny-llama")
    eng = engine(lm, "recompute", blocks=64, host=0)
    try:
        a = eng.open_session("m")
        history = prompt(lm, 30, 6)
        gen = eng.generate(a, GenerateRequest(history, greedy(3))).token_ids
        eng.signal_phase(a, "IO_WAIT")
        assert eng.session_info(a)["kv_location"] == "dropped"
        ids = prompt(lm, 6, 7)
        reply = eng.forward(a, ids, interventions=[{"kind": "scale", "layer": 1, "factor": -2.0}])
        # transformers: the past computed plainly, then the hook only on the forward's own tokens
        past = history + gen[:-1]
        with torch.inference_mode():
            from transformers import DynamicCache
            cache = DynamicCache(config=lm.model.config)
            lm.model(torch.tensor([past]), past_key_values=cache, use_cache=True)
            edit = LayerEdit(lm.model, 1, lambda h: h * -2.0)
            try:
                ref = lm.model(torch.tensor([gen[-1:] + ids]), past_key_values=cache, use_cache=True).logits[0]
            finally:
                edit.remove()
        assert torch.equal(logits_of(eng, reply), ref)
        assert eng.stats()["swaps"]["recomputed"] == 1
    finally:
        eng.shutdown()


@pytest.mark.parametrize("policy", ["semantic", "semantic-park"])
def test_signals_park_and_bring_back_a_paused_session(policy):
    lm = loaded("tiny-llama")
    eng = engine(lm, policy, blocks=64, host=64)
    try:
        a = eng.open_session("m")
        history = prompt(lm, 40, 1)
        first = eng.generate(a, GenerateRequest(history, greedy(1))).token_ids
        ids = prompt(lm, 10, 2)
        p = eng.forward(a, ids, breakpoint=1)["paused"]
        eng.signal_phase(a, "IO_WAIT")                           # the researcher goes to think
        eng.residency.wait_idle()
        info = eng.session_info(a)
        assert info["phase"] == "PAUSED" and info["kv_location"] == "host"
        assert eng.runtimes["m"].pool.used_count == 0
        eng.signal_phase(a, "ACTIVE")                            # back: prefetch before resume
        eng.residency.wait_idle()
        assert eng.session_info(a)["kv_location"] == "device" and eng.session_info(a)["phase"] == "PAUSED"
        out = logits_of(eng, eng.resume(p["paused_id"]))
        assert torch.equal(out, hf_logits(lm.model, first + ids, past=history))
    finally:
        eng.shutdown()


def test_lru_ignores_signals_on_a_paused_session():
    lm = loaded("tiny-llama")
    eng = engine(lm, "lru", blocks=64, host=64)
    try:
        a = eng.open_session("m")
        eng.generate(a, GenerateRequest(prompt(lm, 40, 1), greedy(1)))
        p = eng.forward(a, prompt(lm, 10, 2), breakpoint=1)["paused"]
        eng.signal_phase(a, "IO_WAIT")
        eng.residency.wait_idle()
        assert eng.session_info(a)["kv_location"] == "device" and eng.session_info(a)["phase"] == "PAUSED"
        eng.resume(p["paused_id"])
    finally:
        eng.shutdown()
