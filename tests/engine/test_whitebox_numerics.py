"""One set of numerics: white-box operations compute what the plain path computes, bit for bit.

On the CPU the plain batched path (engine/batch.py with the reference attention) computes
exactly what transformers computes, so comparing either with transformers cannot tell which
path a white-box operation took. Here the batched path's attention is swapped for
``MathAttention`` (float64 softmax attention, rounded back), so its logits differ from
transformers' by rounding, as the GPU's paged kernel and fused norms do. The oracles are
then the plain path itself, run without any white-box part: a plain ``generate`` (the logits
of each token recorded by a ``logits_processor`` that changes nothing; a white-box turn's are
recorded at its sampler) and a plain batched forward through engine/batch.py.
A paused and resumed generation or forward must equal them token for token and logit for
logit (``torch.equal``). Interventions are checked against transformers with forward hooks
(its own model, not Djinn code) on the unmodified reference attention.
"""

from __future__ import annotations


import pytest
import torch

from djinn.attention.reference import ReferenceBackend, gather_context
from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest
from djinn.engine.batch import BatchItem, forward_batch
from djinn.engine.sampling import Sampler
from djinn.engine.whitebox_step import BatchedStep, SerialStep

from tests.conftest import loaded, run_interpreted
from tests.engine.batching import make
from tests.engine.test_whitebox import LayerEdit, greedy, hf_greedy, hf_logits, logits_of, prompt

CHUNK = 16        # prefill_chunk_tokens: a 40-token prompt is computed in chunks of 16, 16, 8


class MathAttention(ReferenceBackend):
    """Causal attention as explicit float64 math per sequence, cast back to the query's dtype."""

    name = "math"

    def attend(self, q, k_cache, v_cache, meta, scale):
        out = torch.empty_like(q)
        row = 0
        for span in meta.spans:
            n = span.new
            k = gather_context(k_cache, span, meta.block_size).double()
            v = gather_context(v_cache, span, meta.block_size).double()
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = torch.einsum("nhd,thd->hnt", q[row:row + n].double(), k) * scale
            seen = torch.arange(span.total)[None, :] <= (span.start + torch.arange(n))[:, None]
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
            out[row:row + n] = torch.einsum("hnt,thd->nhd", probs, v).to(q.dtype)
            row += n
        return out


@pytest.fixture
def math_attention(monkeypatch):
    monkeypatch.setattr("djinn.engine.batch.backend_for", lambda device, name=None: MathAttention())


@pytest.fixture
def sampled(monkeypatch):
    """Every logits row a white-box turn samples from, in order (its ``Sampler`` is given them)."""
    rows: list[torch.Tensor] = []
    call = Sampler.__call__

    def spy(self, logits):
        rows.append(logits.detach().clone())
        return call(self, logits)

    monkeypatch.setattr(Sampler, "__call__", spy)
    return rows


def make_engine(lm, **config) -> Engine:
    return Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=128), prefill_chunk_tokens=CHUNK, **config))


def turn(eng, sid, ids, n, sampled, **wb):
    """One generate (resumed unchanged if it pauses): its tokens and the logits it sampled from."""
    if not wb:        # a plain turn: what its logits processor sees (the batcher may sample without a Sampler)
        seen: list[torch.Tensor] = []
        out = eng.generate(sid, GenerateRequest(ids, greedy(n), logits_processor=lambda _, x: seen.append(x.clone())
                                                or x))
        return out.token_ids, seen
    sampled.clear()
    out = eng.generate(sid, GenerateRequest(ids, greedy(n), **wb))
    if out.paused is not None:
        out = eng.resume(out.paused["paused_id"])["generation"]
    return out.token_ids, list(sampled)


def assert_same(got, want, what):
    (gt, gl), (wt, wl) = got, want
    assert gt == wt, what
    assert len(gl) == len(wl) and all(torch.equal(a, b) for a, b in zip(gl, wl)), what


@pytest.mark.parametrize("prompt_len,steps", [(12, (0, 1, 4)), (40, (1, 4))])
def test_a_paused_generation_is_bitwise_the_plain_generation(math_attention, sampled, prompt_len, steps):
    """Paused at every layer of a step and resumed unchanged, a generation samples from the very
    logits a plain one does, and leaves the very KV: the next plain turn is equal too. A step
    that pauses runs whole, so a prompt longer than a prefill chunk pauses at decode steps here."""
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    first, ids, more = prompt(lm, 9, 1), prompt(lm, prompt_len, 2), prompt(lm, 5, 3)
    try:
        plain = eng.open_session("m")
        head = turn(eng, plain, first, 3, sampled)
        # the comparison has teeth: the plain path's numerics are not transformers' here
        with torch.inference_mode():
            hf = lm.model(torch.tensor([first]), logits_to_keep=1).logits[0]
        assert not torch.equal(head[1][0], hf)
        want = turn(eng, plain, ids, 6, sampled)
        want_next = turn(eng, plain, more, 4, sampled)
        for step in steps:
            for layer in range(lm.config.num_hidden_layers):
                sid = eng.open_session("m")
                turn(eng, sid, first, 3, sampled)
                assert_same(turn(eng, sid, ids, 6, sampled, breakpoint=(layer, step)), want, (layer, step))
                assert_same(turn(eng, sid, more, 4, sampled), want_next, (layer, step, "next turn"))
                eng.close_session(sid)
    finally:
        eng.shutdown()


def test_a_resume_with_the_fetched_activation_and_captures_leave_the_generation_bitwise_plain(
        math_attention, sampled):
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    ids = prompt(lm, 40, 4)
    try:
        want = turn(eng, eng.open_session("m"), ids, 6, sampled)
        sid = eng.open_session("m")
        sampled.clear()
        p = eng.generate(sid, GenerateRequest(ids, greedy(6), breakpoint=(1, 2), capture=[0, 2])).paused
        out = eng.resume(p["paused_id"], eng.fetch(p["activation"]["id"]))["generation"]   # the round trip
        assert_same((out.token_ids, list(sampled)), want, "round trip with captures")
        assert eng.fetch(out.captured[2]["id"]).shape == (40 + 5, lm.config.hidden_size)
    finally:
        eng.shutdown()


def oracle_forwards(lm, chunks: list[list[int]]) -> list[torch.Tensor]:
    """The plain batched path's logits of every token of each forward in turn, on its own pool."""
    ex, pool = make(lm, blocks=16)
    table, start, out = pool.allocate(8), 0, []
    with torch.inference_mode():
        for ids in chunks:
            out.append(forward_batch(ex, pool, [BatchItem(table, start, ids, all_logits=True)])[0])
            start += len(ids)
    pool.release(table)
    return out


def test_a_paused_forward_and_its_forks_are_bitwise_the_plain_batched_forward(math_attention):
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    a, b = prompt(lm, 21, 5), prompt(lm, 7, 6)
    want_a, want_b = oracle_forwards(lm, [a, b])
    assert not torch.equal(want_a, hf_logits(lm.model, a))     # not transformers' numerics
    try:
        for layer in range(lm.config.num_hidden_layers):
            sid = eng.open_session("m")
            assert torch.equal(logits_of(eng, eng.forward(sid, a)), want_a)
            p = eng.forward(sid, b, breakpoint=layer)["paused"]
            assert isinstance(eng.whitebox.paused[p["paused_id"]].state, BatchedStep)
            kid = eng.fork(sid)
            assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), want_b), layer
            assert torch.equal(logits_of(eng, eng.resume(kid["paused"]["paused_id"])), want_b), (layer, "fork")
            eng.close_session(sid)
            eng.close_session(kid["session_id"])
    finally:
        eng.shutdown()


def test_without_batching_white_box_runs_the_serial_path_as_plain_turns_do(math_attention, sampled):
    """With batching off a plain turn runs the single-session executor (transformers' attention,
    which MathAttention does not touch): white-box steps follow it there."""
    lm = loaded("tiny-llama")
    eng = make_engine(lm, batching=False)
    ids = prompt(lm, 40, 7)
    try:
        want = turn(eng, eng.open_session("m"), ids, 5, sampled)
        assert want[0] == hf_greedy(lm.model, ids, 5)
        for step in (0, 2):
            assert_same(turn(eng, eng.open_session("m"), ids, 5, sampled, breakpoint=(1, step)), want, step)
        p = eng.forward(eng.open_session("m"), ids, breakpoint=1)["paused"]
        assert isinstance(eng.whitebox.paused[p["paused_id"]].state, SerialStep)
        assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), hf_logits(lm.model, ids))
    finally:
        eng.shutdown()


def test_interventions_over_a_chunked_prompt_equal_transformers_with_forward_hooks():
    """A prompt longer than a prefill chunk is steered and captured as one forward: ``-1`` is
    the last prompt token (not the last of each chunk), captures cover every token in order."""
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    ids = prompt(lm, 40, 8)
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(2))
    edits = [LayerEdit(lm.model, 0, lambda h: h * 1.25, positions=[3, 20, 37]),
             LayerEdit(lm.model, 1, lambda h: h + v, positions=[-1], record=True)]
    try:
        steered = hf_greedy(lm.model, ids, 6)
        recorded = torch.cat(edits[1].outputs)
    finally:
        for e in edits:
            e.remove()
    try:
        out = eng.generate(eng.open_session("m"), GenerateRequest(ids, greedy(6), capture=[1], interventions=[
            {"kind": "scale", "layer": 0, "factor": 1.25, "positions": [3, 20, 37]},
            {"kind": "add", "layer": 1, "vector": v, "positions": [-1]}]))
        assert out.token_ids == steered != hf_greedy(lm.model, ids, 6)
        captured = eng.fetch(out.captured[1]["id"])
        assert captured.shape == recorded.shape == (40 + 5, lm.config.hidden_size)
        assert torch.equal(captured, recorded)
    finally:
        eng.shutdown()


def interpreted_run() -> None:
    """Run inside a process started with TRITON_INTERPRET=1: the batched path with the GPU's
    kernels (Triton paged attention, fused RMSNorm and rotary) through Triton's interpreter."""
    from djinn.attention.triton_paged import TritonPagedBackend
    from djinn.engine import batch, fused

    batch.backend_for = lambda device, name=None: TritonPagedBackend()
    fused.available = lambda device: True
    rows: list[torch.Tensor] = []
    call = Sampler.__call__

    def spy(self, logits):   # (the process ends after this run: nothing to restore)
        rows.append(logits.clone())
        return call(self, logits)

    Sampler.__call__ = spy
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    try:
        for n, step in ((12, 0), (40, 2)):          # a whole prefill paused; a chunked one, then a decode
            ids = prompt(lm, n, n)
            want = turn(eng, eng.open_session("m"), ids, 4, rows)
            with torch.inference_mode():
                hf = lm.model(torch.tensor([ids]), logits_to_keep=1).logits[0]
            assert not torch.equal(want[1][0], hf)    # the kernels are not transformers' numerics
            assert_same(turn(eng, eng.open_session("m"), ids, 4, rows, breakpoint=(1, step)), want, (n, step))
    finally:
        eng.shutdown()
    print("interpreted white-box numerics passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_whitebox_cuda.py runs the compiled kernels")
def test_a_paused_generation_on_the_gpu_kernels_interpreted_is_bitwise_the_plain_one():
    run_interpreted("tests.engine.test_whitebox_numerics:interpreted_run", timeout=280)
