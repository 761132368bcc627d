"""fork(): shared KV blocks, copy-on-write, counterfactuals from one breakpoint.

Oracles are transformers' own generate / forward on the same weights (with forward hooks
written here for edits); the memory claims are checked on the pool's and the host arena's own
accounting (blocks held, reference counts), never on Djinn's reports alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.errors import CapacityError, InvalidRequest, SessionNotFound

from tests.conftest import loaded, requires_smollm2
from tests.engine.test_whitebox import LayerEdit, hf_greedy, logits_of, prompt


def make_engine(lm, blocks: int = 512, sharing: bool = True, **memory) -> Engine:
    return Engine({"m": lm}, EngineConfig(prefix_sharing=sharing, memory=MemoryConfig(kv_blocks=blocks, **memory)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


# ---------------------------------------------------------------- oracles (transformers only)

def hf_prefix(model, ids: list[int]) -> DynamicCache:
    """transformers' own cache of ``ids``."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True)
    return cache


def hf_greedy_after(model, cache: DynamicCache, n_cached: int, history: list[int], n: int) -> list[int]:
    """transformers' greedy generate of ``history`` whose first ``n_cached`` tokens are in ``cache``
    (a copy is used: the same prefix serves many continuations)."""
    ids = torch.tensor([history], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(cache),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


def hf_edited(model, past: list[int], ids: list[int], layer: int, fn, then: list[int], n: int):
    """Logits of ``ids`` after ``past`` with ``fn`` applied to decoder ``layer``'s output on those
    tokens, and the greedy continuation of ``then`` (n tokens, no edit) over that edited KV."""
    cache = hf_prefix(model, past)
    edit = LayerEdit(model, layer, fn)
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True).logits[0]
    finally:
        edit.remove()
    out, nxt = [], then
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(torch.tensor([nxt], device=model.device), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            out.append(t)
            nxt = [t]
    return logits.cpu(), out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- many forks of one prefix

def _forks_share_one_prefix(lm, prefix_len: int, forks: int, n: int):
    # fork accounting alone: with prefix sharing, forks whose tails happen to match share more
    eng = make_engine(lm, blocks=1024, sharing=False)
    pool = eng.runtimes["m"].pool
    bs = pool.shape.block_size
    try:
        parent = eng.open_session("m")
        eng.generate(parent, GenerateRequest(prompt(lm, prefix_len, 1), greedy(1)))
        history = list(eng.sessions[parent].tokens)
        cached = eng.sessions[parent].num_cached
        assert cached % bs, "the test wants a partly filled last block (the one copy-on-write copies)"
        held = pool.used_count
        tails = prompt(lm, forks, 2)
        children = [eng.fork(parent)["session_id"] for _ in tails]
        assert pool.used_count == held                       # forking copied nothing
        outs = [eng.generate(c, GenerateRequest([t], greedy(n))).token_ids for c, t in zip(children, tails)]
        # device KV: one copy of the prefix's full blocks, the parent's own last block, each fork's tail
        tail_blocks = sum(pool.shape.blocks_for(eng.sessions[c].num_cached) - cached // bs for c in children)
        assert pool.used_count == pool.shape.blocks_for(cached) + tail_blocks
        for b in eng.sessions[parent].block_table[:cached // bs]:
            assert pool.refcount(b) == forks + 1
        sharing = eng.stats()["sharing"]
        assert sharing["shared_blocks"] == cached // bs
        assert sharing["kv_shared"] == cached // bs * pool.shape.block_bytes
        # the parent is unchanged: same history, same KV (its continuation is transformers')
        assert eng.sessions[parent].tokens == history and eng.sessions[parent].num_cached == cached
        cache = hf_prefix(lm.model, history[:cached])
        for t, out in zip(tails, outs):
            assert out == hf_greedy_after(lm.model, cache, cached, history + [t], n)
        x = prompt(lm, 1, 3)
        assert eng.generate(parent, GenerateRequest(x, greedy(4))).token_ids == \
            hf_greedy_after(lm.model, cache, cached, history + x, 4)
        for sid in [parent, *children]:
            eng.close_session(sid)
        assert pool.used_count == 0 and eng.stats()["sharing"]["shared_blocks"] == 0
    finally:
        eng.shutdown()


def test_32_forks_generate_like_independent_sessions_and_hold_one_copy_of_the_prefix():
    """tiny-llama's context is 512 tokens: the longest prefix leaving room for a 64-token tail."""
    _forks_share_one_prefix(loaded("tiny-llama"), prefix_len=421, forks=32, n=64)


@pytest.mark.slow
@pytest.mark.timeout(900)
@requires_smollm2
def test_32_forks_of_a_2000_token_smollm2_session():
    """The 2,000-token prefix on a real model. On two CPU cores 8 tokens per fork took 295 s, so
    4 here (64 per fork: tests/engine/test_fork_cuda.py and ``djinn bench fork``)."""
    _forks_share_one_prefix(loaded("smollm2-135m"), prefix_len=1999, forks=32, n=4)


# ---------------------------------------------------------------- copy-on-write

def test_forks_decoding_in_one_batch_each_write_their_own_copy_of_the_shared_last_block():
    """The batched path (engine.batch) writes K/V through BatchCache: the scheduler's
    ``residency.grow`` before each step is what makes the shared last block private."""
    from djinn.engine.batch import BatchItem

    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    rt = eng.runtimes["m"]
    try:
        parent = eng.open_session("m")
        eng.generate(parent, GenerateRequest(prompt(lm, 40, 24), greedy(1)))   # 40 cached: block 2 half full
        history = list(eng.sessions[parent].tokens)
        tails = prompt(lm, 3, 25)
        kids = [eng.sessions[eng.fork(parent)["session_id"]] for _ in tails]
        for s, t in zip(kids, tails):
            s.tokens.append(t)
        n = 5

        def run_steps():
            for _ in range(n):
                items = []
                for s in kids:
                    eng.residency.grow(s, len(s.tokens))
                    items.append(BatchItem(list(s.block_table), s.num_cached, s.tokens[s.num_cached:]))
                logits = rt.executor.forward_batch(rt.pool, items)
                for s, it, lg in zip(kids, items, logits):
                    s.num_cached += len(it.tokens)
                    s.tokens.append(int(lg[-1].argmax()))

        eng.loop.call(run_steps)
        for s, t in zip(kids, tails):
            assert s.tokens[len(history) + 1:] == hf_greedy(lm.model, history + [t], n)
        assert eng.stats()["sharing"]["cow_copies"] == len(kids)
        y = prompt(lm, 1, 26)
        assert eng.generate(parent, GenerateRequest(y, greedy(4))).token_ids == hf_greedy(lm.model, history + y, 4)
    finally:
        eng.shutdown()


def test_a_truncated_fork_copies_the_block_it_cuts_and_leaves_the_parent_alone():
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    pool = eng.runtimes["m"].pool
    try:
        parent = eng.open_session("m")
        eng.generate(parent, GenerateRequest(prompt(lm, 40, 4), greedy(1)))
        history = list(eng.sessions[parent].tokens)
        child = eng.fork(parent)["session_id"]
        eng.truncate(child, 20)                           # cuts through the parent's block 1
        held = pool.used_count
        x, y = prompt(lm, 1, 5), prompt(lm, 1, 6)
        assert eng.generate(child, GenerateRequest(x, greedy(5))).token_ids == hf_greedy(lm.model, history[:20] + x, 5)
        assert pool.used_count == held + 1                # the cut block was copied, nothing else
        assert eng.stats()["sharing"]["cow_copies"] == 1
        assert eng.generate(parent, GenerateRequest(y, greedy(5))).token_ids == hf_greedy(lm.model, history + y, 5)
        eng.close_session(parent)
        ref = hf_greedy(lm.model, eng.sessions[child].tokens + y, 3)
        assert eng.generate(child, GenerateRequest(y, greedy(3))).token_ids == ref
        eng.close_session(child)
        assert pool.used_count == 0
    finally:
        eng.shutdown()


def test_closing_the_parent_first_keeps_the_forks_kv():
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    pool = eng.runtimes["m"].pool
    try:
        parent = eng.open_session("m")
        eng.generate(parent, GenerateRequest(prompt(lm, 50, 7), greedy(2)))
        history = list(eng.sessions[parent].tokens)
        a = eng.fork(parent)["session_id"]
        eng.close_session(parent)
        b = eng.fork(a)["session_id"]                     # a fork of a fork, after its root closed
        x = prompt(lm, 2, 8)
        ref = hf_greedy(lm.model, history + x, 6)
        assert eng.generate(b, GenerateRequest(x, greedy(6))).token_ids == ref
        eng.close_session(b)
        assert eng.generate(a, GenerateRequest(x, greedy(6))).token_ids == ref
        eng.close_session(a)
        assert pool.used_count == 0
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- counterfactuals from a breakpoint

def test_two_counterfactuals_from_one_paused_forward_equal_hooked_transformers():
    _two_counterfactuals(loaded("tiny-llama"))


def _two_counterfactuals(lm):
    eng = make_engine(lm)
    pool = eng.runtimes["m"].pool
    layer = 1
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(9)).to(lm.model.device)
    try:
        parent = eng.open_session("m")
        history = prompt(lm, 30, 10)
        first = eng.generate(parent, GenerateRequest(history, greedy(1))).token_ids
        ids = prompt(lm, 7, 11)                  # with the pending first token: 8 tokens, 30..37
        p1 = eng.forward(parent, ids, breakpoint=layer)["paused"]
        held = pool.used_count
        fork = eng.fork(parent)
        child, p2 = fork["session_id"], fork["paused"]
        assert p2["layer"] == layer and p2["step"] == 0 and p2["paused_id"] != p1["paused_id"]
        assert eng.session_info(child)["phase"] == "PAUSED"
        # the blocks the in-flight forward writes (positions 30..37: blocks 1 and 2) are copied
        assert pool.used_count == held + 2
        a2 = eng.fetch(p2["activation"]["id"])
        assert torch.equal(a2, eng.fetch(p1["activation"]["id"]))
        then = prompt(lm, 1, 12)
        ref1, cont1 = hf_edited(lm.model, history, first + ids, layer, lambda h: h * 0.9, then, 4)
        ref2, cont2 = hf_edited(lm.model, history, first + ids, layer, lambda h: h + v, then, 4)
        assert not torch.equal(ref1, ref2)
        out1 = eng.resume(p1["paused_id"], {"op": "mul", "args": [{"ref": p1["activation"]["id"]}, {"scalar": 0.9}]})
        out2 = eng.resume(p2["paused_id"], a2 + v.cpu())
        same = torch.equal if lm.device.type == "cpu" else _close   # CUDA: other kernels, other rounding
        assert same(logits_of(eng, out1), ref1)
        assert same(logits_of(eng, out2), ref2)
        # each session's KV holds its own edit: their continuations are transformers' over that KV
        assert eng.generate(parent, GenerateRequest(then, greedy(4))).token_ids == cont1
        assert eng.generate(child, GenerateRequest(then, greedy(4))).token_ids == cont2
        eng.close_session(parent)
        eng.close_session(child)
        assert pool.used_count == 0
    finally:
        eng.shutdown()


def test_a_paused_generation_forks_into_two_steered_generations():
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    ids, n, step, layer = prompt(lm, 12, 13), 6, 2, 1
    position = len(ids) + step - 1               # the token decode step 2 computes
    refs = {}
    for name, fn in (("scaled", lambda h: -h * 0.5), ("plain", None)):
        edit = LayerEdit(lm.model, layer, fn, positions=[position])
        try:
            refs[name] = hf_greedy(lm.model, ids, n)
        finally:
            edit.remove()
    assert refs["scaled"] != refs["plain"]
    try:
        parent = eng.open_session("m")
        g = eng.generate(parent, GenerateRequest(ids, greedy(n), breakpoint=(layer, step), capture=[layer]))
        fork = eng.fork(parent)
        child, p2 = fork["session_id"], fork["paused"]
        assert p2["step"] == step
        act = g.paused["activation"]["id"]
        out1 = eng.resume(g.paused["paused_id"], {"op": "mul", "args": [{"op": "neg", "args": [{"ref": act}]},
                                                                          {"scalar": 0.5}]})["generation"]
        out2 = eng.resume(p2["paused_id"])["generation"]
        assert out1.token_ids == refs["scaled"] and out2.token_ids == refs["plain"]
        # captures are per session: the child's hold the unedited activation at the breakpoint
        c1, c2 = eng.fetch(out1.captured[layer]["id"]), eng.fetch(out2.captured[layer]["id"])
        assert c1.shape == c2.shape and not torch.equal(c1, c2)
        assert eng.sessions[parent].tokens == ids + refs["scaled"]
        assert eng.sessions[child].tokens == ids + refs["plain"]
    finally:
        eng.shutdown()


def test_a_fork_of_a_paused_sampled_generation_continues_the_same_random_stream():
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    ids = prompt(lm, 10, 14)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    try:
        plain = eng.generate(eng.open_session("m"), GenerateRequest(ids, params)).token_ids
        parent = eng.open_session("m")
        g = eng.generate(parent, GenerateRequest(ids, params, breakpoint=(0, 3)))
        p2 = eng.fork(parent)["paused"]
        assert eng.resume(g.paused["paused_id"])["generation"].token_ids == plain
        assert eng.resume(p2["paused_id"])["generation"].token_ids == plain
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- parked sessions

def test_a_fork_of_a_parked_session_is_parked_and_shares_the_host_blocks():
    _parked_fork(loaded("tiny-llama"))


def _parked_fork(lm):
    eng = make_engine(lm, blocks=64, host_blocks=64, policy="semantic-park")   # IO_WAIT parks
    pool, arena = eng.runtimes["m"].pool, eng.residency.tiers["m"].arena
    try:
        parent = eng.open_session("m")
        eng.generate(parent, GenerateRequest(prompt(lm, 70, 15), greedy(2)))
        history = list(eng.sessions[parent].tokens)
        eng.signal_phase(parent, "IO_WAIT")
        eng.residency.wait_idle()
        assert eng.session_info(parent)["kv_location"] == "host"
        parked = arena.used_count
        child = eng.fork(parent)["session_id"]
        assert eng.session_info(child)["kv_location"] == "host"
        assert arena.used_count == parked and pool.used_count == 0       # shared, not copied
        x, y = prompt(lm, 1, 16), prompt(lm, 1, 17)
        assert eng.generate(child, GenerateRequest(x, greedy(5))).token_ids == hf_greedy(lm.model, history + x, 5)
        assert arena.used_count == parked                                # still the parent's
        assert eng.generate(parent, GenerateRequest(y, greedy(5))).token_ids == hf_greedy(lm.model, history + y, 5)
        eng.residency.wait_idle()
        assert arena.used_count == 0
        eng.close_session(parent)
        eng.close_session(child)
        assert pool.used_count == 0 and arena.used_count == 0
    finally:
        eng.shutdown()


def test_a_fork_of_a_paused_session_parked_under_pressure_resumes_on_its_own():
    lm = loaded("tiny-llama")
    eng = make_engine(lm, blocks=9, host_blocks=64, policy="semantic")   # 8 usable blocks = 128 tokens
    pool, arena = eng.runtimes["m"].pool, eng.residency.tiers["m"].arena
    try:
        a, b = eng.open_session("m"), eng.open_session("m")
        history = prompt(lm, 40, 18)
        first = eng.generate(a, GenerateRequest(history, greedy(1))).token_ids
        ids = prompt(lm, 10, 19)
        p1 = eng.forward(a, ids, breakpoint=1)["paused"]
        eng.generate(b, GenerateRequest(prompt(lm, 80, 20), greedy(4)))     # needs A's blocks: A is parked
        eng.residency.wait_idle()
        assert eng.session_info(a)["kv_location"] == "host"
        fork = eng.fork(a)
        assert eng.session_info(fork["session_id"])["kv_location"] == "host"
        eng.close_session(b)
        ref1, _ = hf_edited(lm.model, history, first + ids, 1, lambda h: h * 0.5, [1], 0)
        ref2, _ = hf_edited(lm.model, history, first + ids, 1, lambda h: h, [1], 0)
        p2 = fork["paused"]
        out2 = eng.resume(p2["paused_id"])
        assert torch.equal(logits_of(eng, out2), ref2)
        eng.close_session(fork["session_id"])
        out1 = eng.resume(p1["paused_id"], eng.fetch(p1["activation"]["id"]) * 0.5)
        assert torch.equal(logits_of(eng, out1), ref1)
        eng.close_session(a)
        eng.residency.wait_idle()
        assert pool.used_count == 0 and arena.used_count == 0
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- bad input changes nothing

def test_fork_errors_are_typed_and_change_nothing():
    lm = loaded("tiny-llama")
    eng = Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=6), max_sessions=3))   # 5 usable
    pool = eng.runtimes["m"].pool
    try:
        with pytest.raises(SessionNotFound):
            eng.fork("nope")
        mine = eng.open_session("m", owner="alice")
        eng.generate(mine, GenerateRequest(prompt(lm, 30, 21), greedy(1), ), owner="alice")
        with pytest.raises(SessionNotFound):
            eng.fork(mine, owner="bob")
        with pytest.raises(InvalidRequest):
            eng.fork(123, owner="alice")
        # a paused forward over 4 blocks (the last 3 written in flight) needs 3 copies: only 3 free
        other = eng.open_session("m", owner="alice")
        eng.generate(other, GenerateRequest(prompt(lm, 16, 22), greedy(1)), owner="alice")   # 1 block
        p = eng.forward(mine, prompt(lm, 33, 23), breakpoint=0, owner="alice")["paused"]
        before = (pool.used_count, len(eng.sessions), eng.stats()["sharing"]["shared_blocks"])
        with pytest.raises(CapacityError):
            eng.fork(mine, owner="alice")
        assert (pool.used_count, len(eng.sessions), eng.stats()["sharing"]["shared_blocks"]) == before
        eng.resume(p["paused_id"], owner="alice")
        eng.fork(other, owner="alice")                                           # the third session
        with pytest.raises(CapacityError):
            eng.fork(other, owner="alice")                                       # max_sessions
        assert len(eng.sessions) == 3
    finally:
        eng.shutdown()
