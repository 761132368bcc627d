"""``djinn serve --device cuda``: a remote client gets what transformers gets on the GPU, and
activations and logits cross from device memory to the client and back."""

from __future__ import annotations

import pytest
import torch

import djinn
from djinn.server.launch import ServerProcess
from tests.conftest import TEST_CHILD_ENV, loaded, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]
MODEL = "tiny-llama"


def hf_greedy(model, history: list[int], n: int) -> list[int]:
    ids = torch.tensor([history], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


@pytest.fixture(scope="module")
def cuda_server():
    server = ServerProcess("--dtype", "float16", "--kv-blocks", "64", device="cuda", env=TEST_CHILD_ENV).start()
    yield server
    assert server.stop() == 0, server.output


def test_remote_generation_on_cuda_equals_transformers(cuda_server):
    lm = loaded(MODEL, device="cuda", dtype=torch.float16)
    client = djinn.connect(cuda_server.address)
    try:
        assert client.stats()["device"].startswith("cuda")
        with client.model(MODEL).session() as s:
            history: list[int] = []
            for prompt in ([5, 9, 33, 41, 7], list(range(20, 60)), [3]):
                out = s.generate(prompt, max_new_tokens=12, ignore_eos=True)
                history += prompt
                assert out.token_ids == hf_greedy(lm.model, history, 12)
                history += out.token_ids
    finally:
        client.close()


def test_remote_activations_leave_and_reenter_device_memory(cuda_server):
    client = djinn.connect(cuda_server.address)
    try:
        m = client.model(MODEL)
        base = client.stats()
        ids = list(range(40, 57))
        with m.session() as s:
            plain = s.forward(ids).logits.fetch()
        with m.session() as s:
            p = s.forward(ids, breakpoint=1)
            h = p.activation.fetch()
            assert h.device.type == "cpu" and h.dtype == torch.float16 and h.shape == (len(ids), 64)
            assert torch.equal(p.resume(h).logits.fetch(), plain)          # sent back unchanged: identical
        with m.session() as s1, m.session() as s2:
            p1, p2 = s1.forward(ids, breakpoint=1), s2.forward(ids, breakpoint=1)
            lazy = p1.resume(p1.activation * 0.5).logits.fetch()            # computed on the GPU
            eager = p2.resume(p2.activation.fetch() * 0.5).logits.fetch()   # computed here, sent
            torch.testing.assert_close(lazy, eager, rtol=1e-3, atol=1e-3)
        after = client.stats()
        assert after["sessions"] == base["sessions"] and after["memory"]["tensors"] == base["memory"]["tensors"]
        assert after["kv_blocks"] == base["kv_blocks"]
    finally:
        client.close()
