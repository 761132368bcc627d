"""The engine on CUDA: greedy equality with transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from djinn.engine import GenerateRequest

from tests.conftest import loaded, requires_cuda
from tests.engine.test_generate import greedy, hf_greedy, make_engine

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_greedy_equals_transformers(dtype):
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    eng = make_engine(lm)
    try:
        sid = eng.open_session("m")
        history: list[int] = []
        for prompt in ([5, 9, 33, 41, 7], list(range(20, 60)), [3]):
            out = eng.generate(sid, GenerateRequest(prompt, greedy(12)))
            history += prompt
            assert out.token_ids == hf_greedy(lm.model, history, 12)
            history += out.token_ids
    finally:
        eng.shutdown()
