"""Engine generation against transformers' own ``generate`` on the same weights (the oracle)."""

from __future__ import annotations

import pytest
import torch

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.errors import InvalidRequest, SessionNotFound

from tests.conftest import loaded, requires_smollm2


def hf_greedy(model, history: list[int], n: int) -> list[int]:
    """transformers run directly: Djinn's code is no part of this."""
    ids = torch.tensor([history], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


def make_engine(lm, blocks: int = 256) -> Engine:
    return Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


MODELS = ["tiny-llama", "tiny-gpt2", pytest.param("smollm2-135m", marks=requires_smollm2)]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_transformers_across_three_turns(name):
    lm = loaded(name)
    eng = make_engine(lm)
    try:
        sid = eng.open_session("m")
        gen = torch.Generator().manual_seed(1)
        history: list[int] = []
        for turn, (plen, n) in enumerate([(7, 12), (16, 10), (33, 9)]):  # 16 = a whole block
            prompt = torch.randint(5, min(lm.config.vocab_size, 1000), (plen,), generator=gen).tolist()
            out = eng.generate(sid, GenerateRequest(prompt, greedy(n)))
            history += prompt
            assert out.token_ids == hf_greedy(lm.model, history, n), f"turn {turn}"
            history += out.token_ids
    finally:
        eng.shutdown()


def test_second_turn_computes_only_new_tokens(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        first = eng.generate(sid, GenerateRequest(list(range(10, 40)), greedy(8)))
        assert first.computed_tokens == 30 + 7       # the prompt, then one token per decode step
        second = eng.generate(sid, GenerateRequest(list(range(50, 55)), greedy(4)))
        # the last sampled token of turn 1 was never computed; then the 5 new ones; then 3 decode steps
        assert second.cached_tokens == 37
        assert second.computed_tokens == 1 + 5 + 3
    finally:
        eng.shutdown()


def test_sessions_share_one_copy_of_the_weights(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sids = [eng.open_session("m") for _ in range(8)]
        for sid in sids:
            eng.generate(sid, GenerateRequest([5, 6, 7], greedy(2)))
        stats = eng.stats()
        assert stats["memory"]["weights"] == tiny_llama.weight_bytes()
        assert len(eng.runtimes) == 1 and eng.runtimes["m"].loaded.model is tiny_llama.model
        assert stats["sessions"] == 8
    finally:
        eng.shutdown()


def test_text_generation_and_sampling_is_seeded(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
        a = eng.generate(eng.open_session("m"), GenerateRequest("hello there", params))
        b = eng.generate(eng.open_session("m"), GenerateRequest("hello there", params))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 12
        assert isinstance(a.text, str)
    finally:
        eng.shutdown()


def test_stop_token_ids_and_strings(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        ref = eng.generate(sid, GenerateRequest([9, 8, 7], greedy(10)))
        stop_id = ref.token_ids[3]
        sid2 = eng.open_session("m")
        out = eng.generate(sid2, GenerateRequest([9, 8, 7], SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                                            stop_token_ids=[stop_id])))
        assert out.finish_reason == "stop"
        assert out.token_ids == ref.token_ids[: ref.token_ids.index(stop_id) + 1]
        if len(ref.text) > 2:
            stop = ref.text[1:3]
            out = eng.generate(eng.open_session("m"), GenerateRequest([9, 8, 7], SamplingParams(
                max_new_tokens=10, ignore_eos=True, stop=[stop])))
            assert out.finish_reason == "stop" and stop not in out.text and ref.text.startswith(out.text)
    finally:
        eng.shutdown()


def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        good = eng.open_session("m")
        ref = eng.generate(good, GenerateRequest([1, 2, 3], greedy(5))).token_ids
        bad = eng.open_session("m")
        free_before = eng.runtimes["m"].pool.free_count
        ctx = eng.runtimes["m"].max_context
        with pytest.raises(InvalidRequest, match="empty prompt"):
            eng.generate(bad, GenerateRequest("", greedy(3)))
        with pytest.raises(InvalidRequest, match="non-empty"):
            eng.generate(bad, GenerateRequest([], greedy(3)))
        with pytest.raises(InvalidRequest, match="too long"):
            eng.generate(bad, GenerateRequest([1] * (ctx + 5), greedy(3)))
        for n in (0, -1):
            with pytest.raises(InvalidRequest, match="max_new_tokens"):
                eng.generate(bad, GenerateRequest([1, 2], SamplingParams(max_new_tokens=n)))
        with pytest.raises(InvalidRequest, match="token ids"):
            eng.generate(bad, GenerateRequest([10**9], greedy(3)))
        for seed in (2**64, -(2**63) - 1):   # a sampler that failed to build left the session busy
            with pytest.raises(InvalidRequest, match="seed"):
                eng.generate(bad, GenerateRequest([1, 2], SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)))
        assert len(eng.generate(bad, GenerateRequest([1, 2], greedy(2))).token_ids) == 2
        with pytest.raises(SessionNotFound):
            eng.generate("no-such-session", GenerateRequest([1], greedy(3)))
        eng.close_session(bad)
        with pytest.raises(SessionNotFound):
            eng.generate(bad, GenerateRequest([1], greedy(3)))
        assert eng.runtimes["m"].pool.free_count == free_before + 0  # bad turns took nothing
        # the good session continues exactly as if nothing happened
        again = eng.generate(good, GenerateRequest([4], greedy(3))).token_ids
        assert again == hf_greedy(tiny_llama.model, [1, 2, 3] + ref + [4], 3)
    finally:
        eng.shutdown()


def test_close_returns_every_block(tiny_llama):
    eng = make_engine(tiny_llama, blocks=64)
    try:
        pool = eng.runtimes["m"].pool
        free = pool.free_count
        sids = [eng.open_session("m") for _ in range(4)]
        for sid in sids:
            eng.generate(sid, GenerateRequest(list(range(3, 40)), greedy(5)))
        assert pool.free_count < free
        for sid in sids:
            eng.close_session(sid)
        assert pool.free_count == free and eng.stats()["sessions"] == 0
    finally:
        eng.shutdown()
