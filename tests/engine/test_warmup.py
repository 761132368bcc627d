"""The eager warm-up (``ModelRunner.warm_eager``) runs each eager step shape once on scratch blocks
and gives them back: the pool is as it was, and later turns still give transformers' tokens."""

from __future__ import annotations

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest

from tests.engine.test_generate import greedy, hf_greedy


def _engine(lm, kv_blocks: int) -> Engine:
    # chunks of 64 keep the shapes inside tiny-llama's 512-token window
    return Engine({"m": lm}, EngineConfig(prefill_chunk_tokens=64, memory=MemoryConfig(kv_blocks=kv_blocks)))


def test_warm_eager_returns_its_blocks_and_changes_no_output(tiny_llama):
    prompt = list(range(5, 45))
    want = hf_greedy(tiny_llama.model, prompt, 12)
    eng = _engine(tiny_llama, 40)
    try:
        rt = eng.runtime("m")
        free = rt.pool.free_count
        assert eng.loop.call(eng.batcher.runner.warm_eager, rt) is True
        assert rt.pool.free_count == free and rt.pool.used_count == 0
        sid = eng.open_session("m")
        assert eng.generate(sid, GenerateRequest(prompt, greedy(12))).token_ids == want
    finally:
        eng.shutdown()


def test_warm_eager_skips_a_pool_too_small_for_its_shapes(tiny_llama):
    eng = _engine(tiny_llama, 8)
    try:
        rt = eng.runtime("m")
        assert eng.loop.call(eng.batcher.runner.warm_eager, rt) is False
        assert rt.pool.used_count == 0
    finally:
        eng.shutdown()
