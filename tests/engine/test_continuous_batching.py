"""Continuous batching through the engine: concurrent turns share steps, and every session's
greedy tokens equal transformers run on that session alone (the oracle)."""

from __future__ import annotations

import pytest
import torch

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest, SamplingParams

from tests.conftest import loaded, requires_smollm2
from tests.engine.test_generate import hf_greedy

LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 48, 64, 100, 127, 128, 200, 256, 300]


def _engine(lm, chunk: int) -> Engine:
    return Engine({"m": lm}, EngineConfig(prefill_chunk_tokens=chunk, memory=MemoryConfig(kv_blocks=512)))


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, min(vocab, 2000), (n,), generator=g).tolist() for n in lengths]


def _run_concurrently(eng: Engine, prompts: list[list[int]], new: int):
    sids = [eng.open_session("m") for _ in prompts]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    futures = [eng.submit_generate(sid, GenerateRequest(list(p), params)) for sid, p in zip(sids, prompts)]
    return sids, [f.result(timeout=300) for f in futures]


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_tiny_llama_batched_turns_equal_transformers_alone(chunk):
    lm = loaded("tiny-llama")
    eng = _engine(lm, chunk)
    try:
        prompts = _prompts(lm.config.vocab_size)
        new = 6
        sids, outs = _run_concurrently(eng, prompts, new)
        for p, out in zip(prompts, outs):
            assert out.token_ids == hf_greedy(lm.model, p, new)
        # a second turn on every session, again all at once: continues from the batched KV
        more = _prompts(lm.config.vocab_size, [3] * len(prompts), seed=4)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        futures = [eng.submit_generate(sid, GenerateRequest(m, params)) for sid, m in zip(sids, more)]
        seconds = [f.result(timeout=300) for f in futures]   # the oracle runs only once the engine is idle:
        for p, first, m, second in zip(prompts, outs, more, seconds):   # batched steps switch the model's attention
            assert second.token_ids == hf_greedy(lm.model, p + first.token_ids + m, 4)
        st = eng.stats()
        sizes = st["batching"]["batch_sizes"]
        assert max(int(k) for k in sizes) > 1, f"no step held more than one sequence: {sizes}"
        # the loop's time accounting: every step counted once, by kind, inside the loop's busy time
        b, loop = st["batching"], st["loop"]
        assert sum(b["steps_by_kind"].values()) == b["steps"] == sum(sizes.values())
        assert 0 < loop["steps_s"] and loop["steps_s"] + loop["calls_s"] <= loop["uptime_s"]
        assert sum(b["step_s_by_kind"].values()) <= loop["steps_s"]
        assert b["stepped_kv_blocks"] >= sum(int(k) * v for k, v in sizes.items())   # >= 1 block per item
    finally:
        eng.shutdown()


@requires_smollm2
def test_smollm2_batched_turns_equal_transformers_alone():
    lm = loaded("smollm2-135m")
    eng = _engine(lm, 16)
    try:
        prompts = _prompts(lm.config.vocab_size, [1, 16, 17, 40, 64, 90])
        _, outs = _run_concurrently(eng, prompts, 5)
        for p, out in zip(prompts, outs):
            assert out.token_ids == hf_greedy(lm.model, p, 5)
    finally:
        eng.shutdown()


def test_a_closed_session_leaves_the_batch_and_others_continue():
    lm = loaded("tiny-llama")
    eng = _engine(lm, 16)
    try:
        prompts = _prompts(lm.config.vocab_size, [20, 30])
        a, b = eng.open_session("m"), eng.open_session("m")
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        fa = eng.submit_generate(a, GenerateRequest(prompts[0], params))
        fb = eng.submit_generate(b, GenerateRequest(prompts[1], params))
        eng.close_session(a)
        with pytest.raises(Exception):
            fa.result(timeout=60)
        out_b = fb.result(timeout=300)
        assert out_b.token_ids == hf_greedy(lm.model, prompts[1], 40)
        assert eng.stats()["batching"]["running"] == 0
    finally:
        eng.shutdown()
