"""Weight streaming on CUDA: a copy stream and events instead of the CPU worker, same results."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from djinn.config import EngineConfig, MemoryConfig, default_home
from djinn.engine import Engine, GenerateRequest
from djinn.memory.streaming import WeightStreamer
from djinn.models import LoadedModel, build_random, byte_tokenizer, load_model
from djinn.models.loading import _seeded
from djinn.models.offload import build_random_offloaded

from tests.conftest import loaded, requires_cuda
from tests.engine.test_generate import greedy, hf_greedy
from tests.memory.test_streaming import Runner, prompt, with_streamer

pytestmark = [pytest.mark.gpu, requires_cuda]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_offloaded_build_is_the_resident_build(dtype):
    res = loaded("tiny-llama", device="cuda", dtype=dtype)
    st = load_model("tiny-llama", device=CUDA, dtype=dtype, home=default_home(), progress=False, offload=True)
    assert st.arena.pinned and st.arena.buffer.is_pinned()
    for (k, a), (_, b) in zip(res.model.named_parameters(), st.model.named_parameters()):
        assert torch.equal(a, b.to(a.device)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_cuda_streamed_tiny_llama_equals_resident(dtype, slots):
    res = loaded("tiny-llama", device="cuda", dtype=dtype)
    st = load_model("tiny-llama", device=CUDA, dtype=dtype, home=default_home(), progress=False, offload=True)
    ids = prompt(33, seed=slots)
    with torch.inference_mode():
        hf = res.model(torch.tensor([ids], device=CUDA)).logits[0].float()
    want = Runner(res).forward("x", ids)            # the same forward code, every weight resident
    run, streamer = with_streamer(st, slots)
    got = run.forward("x", ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, hf, rtol=1e-2, atol=1e-2)   # and transformers agrees (kernels may differ)
    streamer.synchronize()
    eng = Engine({"m": st}, EngineConfig(memory=MemoryConfig(kv_blocks=64, stream_slots=slots)))
    try:
        history = prompt(11, seed=5)
        out = eng.generate(eng.open_session("m"), GenerateRequest(history, greedy(10)))
        assert out.token_ids == hf_greedy(res.model, history, 10)
    finally:
        eng.shutdown()


def test_cuda_streaming_with_copies_slower_than_compute_equals_resident():
    """Layers big enough that each copy takes far longer than its compute, 1 MiB chunks: any
    missing wait or early overwrite would show in the logits."""
    tok = byte_tokenizer()
    cfg = lambda: LlamaConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                              intermediate_size=4096, vocab_size=tok.vocab_size, max_position_embeddings=512,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    resident = build_random(cfg(), device=CUDA, dtype=torch.float16, seed=11).eval()
    model, arena = build_random_offloaded(cfg(), device=CUDA, dtype=torch.float16, seed=11, seeded=_seeded)
    lm = LoadedModel(name="big", model=model.eval(), tokenizer=tok, config=model.config, device=CUDA,
                     dtype=torch.float16, is_chat=False, source="preset", arena=arena)
    twin = LoadedModel(name="big-resident", model=resident, tokenizer=tok, config=resident.config, device=CUDA,
                       dtype=torch.float16, is_chat=False, source="preset")
    ids = prompt(64)
    ref = Runner(twin)
    first, step = ref.forward("a", ids), ref.forward("a", [9])
    for slots in (1, 2, 3):
        streamer = WeightStreamer(arena, CUDA, slots, chunk_bytes=1 << 20)
        run = Runner(lm, streamer)
        for _ in range(2):  # the second round starts with the ring wrapped around from the first
            run.tables.clear(), run.cached.clear()
            assert torch.equal(run.forward("a", ids), first)
            assert torch.equal(run.forward("a", [9]), step)
        streamer.synchronize()
        assert streamer.device_bytes == min(slots, 8) * arena.max_layer_bytes
