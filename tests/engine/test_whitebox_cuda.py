"""White-box execution on CUDA (fp16 and bf16).

Pausing and resuming runs the very same kernels on the very same tensors as a plain forward,
so those logits must be bitwise equal; a paused generation runs the plain path's kernels
(Djinn's paged attention, the fused norm/rotary, the decode graph for unhooked steps), so it
samples from the very logits a plain generation does. Against transformers (whose attention may pick another
SDPA kernel for differently laid-out K/V) the comparison is greedy tokens, as in
test_cuda.py, and logits within half-precision tolerance, with the steering effect itself
many times larger than that tolerance.
"""

from __future__ import annotations

import pytest
import torch

from djinn.engine import GenerateRequest

from tests.conftest import loaded, requires_cuda
from tests.engine.test_whitebox import LayerEdit, greedy, hf_greedy, make_engine, prompt
from tests.engine.test_whitebox_numerics import assert_same, sampled, turn  # noqa: F401 - sampled: a fixture

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pause_resume_is_bitwise_a_plain_forward_and_steering_matches_transformers(dtype):
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    eng = make_engine(lm)
    ids = prompt(lm, 37, 1)
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    tol = {"atol": 2e-2, "rtol": 0.0}   # logits are ~0.5 in size; bf16 keeps ~3 significant digits
    try:
        plain = eng.fetch(eng.forward(eng.open_session("m"), ids)["logits"]["id"])
        for layer in range(lm.config.num_hidden_layers):
            sid = eng.open_session("m")
            p = eng.forward(sid, ids, breakpoint=layer)["paused"]
            assert torch.equal(eng.fetch(eng.resume(p["paused_id"])["logits"]["id"]), plain), layer
            assert eng.generate(sid, GenerateRequest([4, 5], greedy(6))).token_ids == hf_greedy(lm.model, ids + [4, 5], 6)

            edit = LayerEdit(lm.model, layer, lambda h: h + v.to(h.device))
            try:
                with torch.inference_mode():
                    ref = lm.model(torch.tensor([ids], device="cuda")).logits[0].float()
            finally:
                edit.remove()
            p = eng.forward(eng.open_session("m"), ids, breakpoint=layer)["paused"]
            tree = {"op": "add", "args": [{"ref": p["activation"]["id"]}, {"tensor": 0}]}   # p.activation + v
            got = eng.fetch(eng.resume(p["paused_id"], tree, [v])["logits"]["id"])
            assert torch.allclose(got, ref.cpu(), **tol), layer
            assert (got - plain).abs().max() > 10 * tol["atol"]          # the steering is far above the tolerance
    finally:
        eng.shutdown()


def test_cuda_interventions_over_a_generation_match_transformers_generate_with_hooks():
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float16)
    eng = make_engine(lm)
    ids = prompt(lm, 20, 2)
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)
    edits = [LayerEdit(lm.model, 0, lambda h: h * 1.5), LayerEdit(lm.model, 2, lambda h: h + v, positions=[-1])]
    try:
        ref = hf_greedy(lm.model, ids, 10)
    finally:
        for e in edits:
            e.remove()
    try:
        out = eng.generate(eng.open_session("m"), GenerateRequest(ids, greedy(10), interventions=[
            {"kind": "scale", "layer": 0, "factor": 1.5, "positions": None},
            {"kind": "add", "layer": 2, "vector": v.cpu(), "positions": [-1]}]))
        assert out.token_ids == ref
        paused = eng.generate(eng.open_session("m"), GenerateRequest(ids, greedy(10), breakpoint=(1, 4)))
        h = eng.fetch(paused.paused["activation"]["id"])
        assert h.device.type == "cpu" and h.dtype == torch.float16
        done = eng.resume(paused.paused["paused_id"], h)["generation"]   # sent back from the client
        assert done.token_ids == hf_greedy(lm.model, ids, 10)
    finally:
        eng.shutdown()


def test_cuda_a_paused_session_leaves_the_device_while_another_runs():
    """Issue 5's "pause frees the GPU" on CUDA: A paused at a breakpoint is parked when B needs
    its blocks (device KV bytes held by A drop to zero while B runs), then resumes with the
    logits of a session that was never moved (the same kernels on the same values: fp32, so
    within fp32 rounding of transformers' own forward too)."""
    from djinn.config import EngineConfig, MemoryConfig
    from djinn.engine import Engine

    from tests.engine.test_whitebox import hf_logits, logits_of

    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    eng = Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=9, host_blocks=64, policy="semantic")))
    try:
        a, b = eng.open_session("m"), eng.open_session("m")
        history = prompt(lm, 40, 1)
        first = eng.generate(a, GenerateRequest(history, greedy(1))).token_ids
        ids = prompt(lm, 10, 2)
        p = eng.forward(a, ids, breakpoint=1)["paused"]
        held = len(eng.sessions[a].block_table)
        assert held > 0 and eng.stats()["memory"]["kv_device"] > 0
        eng.generate(b, GenerateRequest(prompt(lm, 80, 3), greedy(4)))     # needs A's blocks
        eng.residency.wait_idle()
        info = eng.session_info(a)
        assert info["phase"] == "PAUSED" and info["kv_location"] == "host"
        assert len(eng.sessions[a].block_table) == 0                          # A holds no device KV
        out = logits_of(eng, eng.resume(p["paused_id"])).cpu()
        ref = hf_logits(lm.model, first + ids, past=history).cpu()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_a_paused_generation_samples_from_the_plain_generations_logits(dtype, sampled):  # noqa: F811
    """Issue 25's "one set of numerics": paused at any layer of the prefill or of a decode step
    and resumed unchanged, a generation equals a plain one token for token and logit for logit.
    The plain one replays step graphs; a paused step runs the same kernels eagerly over its own
    tokens, so its token count fills a bucket here: 48 at step 0 (the first turn's last token +
    47), 1 at a decode step."""
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    eng = make_engine(lm)
    first, ids = prompt(lm, 30, 4), prompt(lm, 47, 5)
    try:
        plain = eng.open_session("m")
        turn(eng, plain, first, 3, sampled)
        want = turn(eng, plain, ids, 8, sampled)
        for step in (0, 1, 5):
            for layer in range(lm.config.num_hidden_layers):
                sid = eng.open_session("m")
                turn(eng, sid, first, 3, sampled)
                assert_same(turn(eng, sid, ids, 8, sampled, breakpoint=(layer, step)), want, (layer, step))
                eng.close_session(sid)
    finally:
        eng.shutdown()
