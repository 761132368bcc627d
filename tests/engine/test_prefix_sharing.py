"""Automatic prefix sharing across sessions (memory/prefix.py, engine/sharing.py).

Oracles: the same workload on an engine with prefix sharing off (every session computes and
stores its own KV), transformers' own generate, and forward hooks written here for steering.
Memory claims are checked on the pool's and the host arena's own accounting.
"""

from __future__ import annotations

import torch

from djinn.cli import _config, build_parser
from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.errors import CapacityError

import pytest

from tests.conftest import loaded
from tests.engine.test_whitebox import LayerEdit, hf_greedy

SESSIONS = 200
WAVE = 6                  # turns submitted at once (batched together)
SYSTEM = 56               # system prompt tokens: 3 full blocks of 16, and 8 more
N = 4                     # tokens generated per turn


def system_prompt(lm) -> list[int]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(5, lm.config.vocab_size, (SYSTEM,), generator=g).tolist()


def suffix(lm, i: int, turn: int) -> list[int]:
    """Distinct per session: its first token is unique, so only the system prompt is common."""
    g = torch.Generator().manual_seed(10_000 * turn + i)
    return [5 + i] + torch.randint(5, lm.config.vocab_size, (2 + i % 4,), generator=g).tolist()


def greedy(n: int = N) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def make_engine(lm, sharing: bool = True, blocks: int = 48, host: int = 1200, policy: str = "semantic-park") -> Engine:
    return Engine({"m": lm}, EngineConfig(prefix_sharing=sharing,
                                          memory=MemoryConfig(kv_blocks=blocks, host_blocks=host, policy=policy)))


def run_agents(eng: Engine, lm, turns: int = 2, park: bool = True, check=None) -> tuple[dict, list[str]]:
    """Every session: the system prompt and its own suffix, then (turn 2) another suffix; between
    turns it signals IO_WAIT (its KV is parked: semantic-park). Turns run in waves of WAVE concurrent ones."""
    sys_ids = system_prompt(lm)
    sids = [eng.open_session("m") for _ in range(SESSIONS)]
    out: dict[tuple[int, int], list[int]] = {}
    for turn in range(turns):
        for w in range(0, SESSIONS, WAVE):
            futs = {}
            for i in range(w, min(SESSIONS, w + WAVE)):
                ids = (sys_ids if turn == 0 else []) + suffix(lm, i, turn)
                futs[i] = eng.submit_generate(sids[i], GenerateRequest(ids, greedy()))
            for i, f in futs.items():
                out[(i, turn)] = f.result(timeout=120).token_ids
                if park:
                    eng.signal_phase(sids[i], "IO_WAIT")
            if check is not None:
                check()
    return out, sids


def unshared_run(lm):
    """The workload with prefix sharing off: every session's own KV, parked under the budget."""
    eng = make_engine(lm, sharing=False)
    pool = eng.runtimes["m"].pool
    shared_seen = []
    try:
        out, _ = run_agents(eng, lm, check=lambda: shared_seen.append(pool.shared_count))
        stats = eng.stats()
    finally:
        eng.shutdown()
    return out, stats, shared_seen


@pytest.fixture(scope="module")
def oracle():
    return unshared_run(loaded("tiny-llama"))


def test_200_sessions_sharing_a_system_prompt_under_parking_equal_unshared_runs(oracle):
    shared_run_equals(loaded("tiny-llama"), oracle[0])


def shared_run_equals(lm, ref) -> None:
    """The workload with prefix sharing on gives ``ref``'s tokens; no block is freed under a
    running session; memory returns to zero."""
    eng = make_engine(lm)
    rt = eng.runtimes["m"]
    pool, tier = rt.pool, eng.residency.tiers["m"]
    violations = []
    forget = pool.on_free

    def guard(b):   # called under the residency lock whenever a device block is freed
        for s in tier.sessions.values():
            if s.busy and b in s.block_table:
                violations.append((s.id, b))
        forget(b)

    pool.on_free = guard
    try:
        base = (pool.used_count, tier.arena.used_bytes)
        out, sids = run_agents(eng, lm)
        stats = eng.stats()
        assert out == ref                                   # every token of every turn
        assert not violations                               # no block freed under a running session
        assert stats["swaps"]["out"] >= SESSIONS and stats["swaps"]["in"] >= SESSIONS - WAVE   # parking was forced
        assert stats["sharing"]["prefix_hits"] > SESSIONS   # first turns and restores re-shared the prefix
        for sid in sids:
            eng.close_session(sid)
        eng.residency.wait_idle(timeout=30)
        assert (pool.used_count, tier.arena.used_bytes) == base == (0, 0)
        assert pool.logical_count == 0 and len(tier.prefix) == 0
    finally:
        eng.shutdown()


def test_all_resident_the_prefix_is_stored_once(oracle):
    all_resident_stores_the_prefix_once(loaded("tiny-llama"), oracle[0])


def all_resident_stores_the_prefix_once(lm, ref) -> None:
    eng = make_engine(lm, blocks=2048)
    pool = eng.runtimes["m"].pool
    bs = pool.shape.block_size
    P = SYSTEM // bs
    try:
        out, sids = run_agents(eng, lm, turns=1, park=False)
        assert all(out[(i, 0)] == ref[(i, 0)] for i in range(SESSIONS))
        tables = [eng.sessions[sid].block_table for sid in sids]
        prefix = tables[0][:P]
        assert all(t[:P] == prefix for t in tables)          # one copy, in every session's table
        assert all(pool.refcount(b) == SESSIONS for b in prefix)
        assert pool.used_count == P + sum(len(t) - P for t in tables)   # the rest is private
        sharing = eng.stats()["sharing"]
        assert sharing["kv_shared"] == P * pool.shape.block_bytes
        assert sharing["sharing_ratio"] == pytest.approx(sum(len(t) for t in tables) / pool.used_count)
        # spot checks against transformers' own generate
        sys_ids = system_prompt(lm)
        for i in (0, 101, SESSIONS - 1):
            assert out[(i, 0)] == hf_greedy(lm.model, sys_ids + suffix(lm, i, 0), N)
        for sid in sids:
            eng.close_session(sid)
        assert pool.used_count == 0 and pool.logical_count == 0
    finally:
        eng.shutdown()


def test_no_prefix_sharing_shares_nothing(oracle):
    _, stats, shared_seen = oracle
    assert stats["sharing"]["prefix_sharing"] is False and stats["sharing"]["prefix_hits"] == 0
    assert set(shared_seen) == {0} and stats["sharing"]["sharing_ratio"] == 1.0
    parse = build_parser().parse_args
    assert _config(parse(["serve", "--model", "tiny-llama", "--no-prefix-sharing"])).engine.prefix_sharing is False
    assert _config(parse(["serve", "--model", "tiny-llama"])).engine.prefix_sharing is True


def test_different_owners_never_share(tiny_llama):
    eng = make_engine(tiny_llama, blocks=256)
    pool = eng.runtimes["m"].pool
    ids = system_prompt(tiny_llama) + [7, 8, 9]
    try:
        runs = {}
        for name, owner in (("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("n", None)):
            sid = eng.open_session("m", owner=owner)
            r = eng.generate(sid, GenerateRequest(ids, greedy()), owner=owner)
            runs[name] = (r, eng.sessions[sid].block_table)
        assert runs["a2"][0].cached_tokens == 48 and runs["a2"][1][:3] == runs["a1"][1][:3]
        for name in ("b1", "n"):
            assert runs[name][0].cached_tokens == 0 and runs[name][0].computed_tokens == len(ids) + N - 1
            assert set(runs[name][1]).isdisjoint(runs["a1"][1])
        assert len({tuple(r.token_ids) for r, _ in runs.values()}) == 1
        assert pool.shared_count == 3
    finally:
        eng.shutdown()


def test_steered_sessions_do_not_share_with_unsteered_ones(tiny_llama):
    steered_sessions_do_not_share(tiny_llama)


def steered_sessions_do_not_share(lm) -> None:
    eng = make_engine(lm, blocks=256)
    pool, index = eng.runtimes["m"].pool, eng.residency.tiers["m"].prefix
    ids = system_prompt(lm) + [11, 12]
    edit = [{"kind": "scale", "layer": 0, "factor": 1.5, "positions": None}]
    try:
        hook = LayerEdit(lm.model, 0, lambda h: h * 1.5)
        try:
            steered_ref = hf_greedy(lm.model, ids, N)
        finally:
            hook.remove()
        plain_ref = hf_greedy(lm.model, ids, N)
        assert steered_ref != plain_ref
        st = eng.open_session("m")
        r = eng.generate(st, GenerateRequest(ids, greedy(), interventions=edit))
        assert r.token_ids == steered_ref and r.computed_tokens == len(ids) + N - 1
        steered_blocks = list(eng.sessions[st].block_table)
        assert all(index.key_of(b) is None for b in steered_blocks)   # never offered to others
        a = eng.open_session("m")
        r = eng.generate(a, GenerateRequest(ids, greedy()))
        assert r.token_ids == plain_ref and r.cached_tokens == 0      # computed, not the steered KV
        assert set(eng.sessions[a].block_table).isdisjoint(steered_blocks)
        b = eng.open_session("m")
        r = eng.generate(b, GenerateRequest(ids, greedy()))
        assert r.token_ids == plain_ref and r.cached_tokens == 48
        assert eng.sessions[b].block_table[:3] == eng.sessions[a].block_table[:3]
        # a steered turn on a session whose prompt matches shares nothing either
        st2 = eng.open_session("m")
        r = eng.generate(st2, GenerateRequest(ids, greedy(), interventions=edit))
        assert r.token_ids == steered_ref and r.cached_tokens == 0
        # later plain turns of a steered session keep its KV out of the index
        eng.generate(st, GenerateRequest(list(range(5, 40)), greedy()))
        assert all(index.key_of(blk) is None for blk in eng.sessions[st].block_table)
        # an intervention on the last layer changes no K/V: such a session may share
        last = lm.config.num_hidden_layers - 1
        c = eng.open_session("m")
        r = eng.generate(c, GenerateRequest(ids + [13], greedy(),
                                            interventions=[{"kind": "scale", "layer": last, "factor": 1.0}]))
        assert r.cached_tokens == 0                                   # a white-box turn computes every token
        assert eng.sessions[c].block_table[:3] == eng.sessions[a].block_table[:3]   # ... then joins the copy
        assert pool.refcount(eng.sessions[a].block_table[0]) == 3
    finally:
        eng.shutdown()


def test_a_restore_reshares_blocks_live_on_the_device_and_a_rebuild_skips_them(tiny_llama):
    restore_and_rebuild_reshare(tiny_llama)


def restore_and_rebuild_reshare(lm) -> None:
    ids = system_prompt(lm) + [21, 22, 23]
    for policy in ("semantic-park", "recompute"):
        eng = make_engine(lm, blocks=256, policy=policy)
        pool = eng.runtimes["m"].pool
        try:
            a, b, c = eng.open_session("m"), eng.open_session("m"), eng.open_session("m")
            ra = eng.generate(a, GenerateRequest(ids, greedy()))
            eng.generate(b, GenerateRequest(ids, greedy()))
            eng.generate(c, GenerateRequest(ids + [24], greedy()))
            out = eng.stats()["bytes_moved"]["out"]
            eng.signal_phase(b, "IO_WAIT")              # semantic-park: parked; recompute: dropped
            eng.residency.wait_idle(timeout=30)
            if policy == "semantic-park":
                assert eng.stats()["bytes_moved"]["out"] - out == 4 * pool.shape.block_bytes
                eng.signal_phase(c, "IO_WAIT")           # its copy of the prefix is already on the host
                eng.residency.wait_idle(timeout=30)
                assert eng.stats()["bytes_moved"]["out"] - out == 5 * pool.shape.block_bytes
                arena = eng.residency.tiers["m"].arena
                assert arena.used_bytes == 5 * arena.shape.block_bytes
            assert eng.session_info(b)["kv_location"] == ("host" if policy == "semantic-park" else "dropped")
            moved = eng.stats()["bytes_moved"]["in"]
            if policy == "semantic-park":   # its restore asks room only for what it must copy
                with eng.residency.lock:
                    assert eng.residency._restore_need(eng.sessions[b]) == 1
            r = eng.generate(b, GenerateRequest([30, 31], greedy()))
            oracle = hf_greedy(lm.model, ids + ra.token_ids + [30, 31], N)
            assert r.token_ids == oracle
            assert eng.sessions[b].block_table[:3] == eng.sessions[a].block_table[:3]
            if policy == "semantic-park":   # only the private block came back from the host
                assert eng.stats()["bytes_moved"]["in"] - moved == pool.shape.block_bytes
            else:                      # the rebuild computed only the private tail
                cached_before = len(ids) + N - 1
                assert r.computed_tokens == (cached_before - 48) + 3 + (N - 1)   # tail, prompt, decode steps
                assert r.cached_tokens == 48
        finally:
            eng.shutdown()


def test_a_turn_needs_device_room_only_for_what_it_does_not_share(tiny_llama):
    lm = tiny_llama
    ids = system_prompt(lm) + [41, 42, 43]               # 59 tokens: 3 full blocks, then a partial one
    for sharing in (True, False):
        eng = make_engine(lm, sharing=sharing, blocks=7, policy="resident")   # 6 usable blocks
        try:
            a, b = eng.open_session("m"), eng.open_session("m")
            eng.generate(a, GenerateRequest(ids, greedy()))   # holds 4 blocks; "resident" never moves it
            if sharing:
                r = eng.generate(b, GenerateRequest(ids[:-1] + [44], greedy()))
                assert r.cached_tokens == 48 and r.token_ids == hf_greedy(lm.model, ids[:-1] + [44], N)
                assert eng.runtimes["m"].pool.used_count == 5
            else:
                with pytest.raises(CapacityError):
                    eng.generate(b, GenerateRequest(ids[:-1] + [44], greedy()))
                assert eng.sessions[b].tokens == [] and eng.runtimes["m"].pool.used_count == 4
        finally:
            eng.shutdown()
