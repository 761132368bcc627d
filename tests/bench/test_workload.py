"""The agents benchmark's plan, metrics and runner, without a model (fake client where needed)."""

from __future__ import annotations

import pytest

from djinn.bench.agent_runner import RunOptions, run_agents
from djinn.bench.metrics import TurnRecord, crossings, downsample, live_agents, stat, summarize
from djinn.bench.workload import ToolTime, WorkloadSpec, build
from djinn.errors import CapacityError, InvalidRequest


def spec(**kw) -> WorkloadSpec:
    base = dict(n=5, rate=2.0, turns=3, prompt_tokens=10, context_tokens=4, new_tokens=2,
                tool=ToolTime.parse("uniform:1,2"), vocab_size=300, seed=7, special_ids=(256, 257, 258))
    base.update(kw)
    return WorkloadSpec(**base)


def test_plan_is_deterministic_and_agent_i_does_not_depend_on_n():
    a, b = build(spec()), build(spec())
    assert [(p.arrival_s, p.prompts, p.tool_s) for p in a] == [(p.arrival_s, p.prompts, p.tool_s) for p in b]
    big = build(spec(n=9))
    for small, large in zip(a, big):
        assert small.prompts == large.prompts and small.tool_s == large.tool_s
        assert small.arrival_s == pytest.approx(large.arrival_s)
    other = build(spec(seed=8))
    assert other[0].prompts != a[0].prompts


def test_plan_shapes_specials_and_scaling():
    plans = build(spec(n=50, time_scale=0.5))
    arrivals = [p.arrival_s for p in plans]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    for p in plans:
        assert [len(x) for x in p.prompts] == [10, 4, 4]
        assert len(p.tool_s) == 2 and all(0.5 <= t <= 1.0 for t in p.tool_s)   # uniform 1-2 s, halved
        ids = [t for x in p.prompts for t in x]
        assert all(0 <= t < 300 and t not in (256, 257, 258) for t in ids)
    # fresh tokens per agent and per turn: nothing shared that a prefix cache could reuse
    assert len({tuple(p.prompts[0]) for p in plans}) == len(plans)
    assert all(p.arrival_s == 0.0 for p in build(spec(rate=0.0)))


@pytest.mark.parametrize("bad", ["fixed", "uniform:2,1", "exp:-1", "gauss:1", "fixed:x", "uniform:1"])
def test_bad_tool_time_is_a_clear_error(bad):
    with pytest.raises(InvalidRequest, match="tool time"):
        ToolTime.parse(bad)


def test_tool_time_means():
    assert ToolTime.parse("fixed:3").mean == 3
    assert ToolTime.parse("uniform:10,20").mean == 15
    assert ToolTime.parse("uniform:10,20").spec == "uniform:10,20"


def test_validate_rejects_a_context_overflow():
    with pytest.raises(InvalidRequest, match="context"):
        spec(prompt_tokens=500).validate(max_context=512)
    spec().validate(max_context=512)


def test_no_recompute_judged_from_cached_tokens():
    ok = TurnRecord(0, 1, True, cached_tokens=19, history_tokens=20)
    assert ok.no_recompute is True                  # the last sampled token never went through the model
    assert TurnRecord(0, 1, True, cached_tokens=0, history_tokens=20).no_recompute is False
    assert TurnRecord(0, 0, True, cached_tokens=0, history_tokens=0).no_recompute is None   # first turn


def test_summary_counts_failures_and_abandoned_turns():
    recs = [TurnRecord(0, 0, True, latency_ms=10.0, new_tokens=2), TurnRecord(0, 1, True, latency_ms=30.0,
                                                                             cached_tokens=11, history_tokens=12,
                                                                             new_tokens=2, tool_s=1.0),
            TurnRecord(1, 0, False, "CapacityError"), TurnRecord(1, 1, False, "abandoned")]
    s = summarize(recs, wall_s=2.0, planned=4, slo_ms=100)
    assert s["success_rate"] == 0.5 and s["errors"] == {"CapacityError": 1, "abandoned": 1}
    assert s["no_recompute_share"] == 1.0 and s["returning_turns"] == 1
    assert s["turn_ms"]["max"] == 30.0 and s["sustained"] is False
    assert s["tokens_per_s"] == 2.0


def test_helpers():
    assert crossings([1, 2, 3], [1, 3, 5], [2, 2, 2]) == [1.5]
    assert crossings([1, 2], [1, 1], [2, 2]) == []
    assert live_agents([(0, 2), (1, 3), (5, 6)])["max"] == 2
    samples = [{"t": i, "kv_device": i % 7} for i in range(1000)]
    assert max(s["kv_device"] for s in downsample(samples, 50)) == 6
    assert len(downsample(samples, 50)) == 50
    st = {"memory": {"kv_device": 5, "kv_parked": 3}}
    assert stat(st, "kv_device") == 5 and stat(st, "kv_host") == 3 and stat(st, "bytes_moved") is None


class _FakeResult:
    def __init__(self, new: int, cached: int):
        self.token_ids = [1] * new
        self.cached_tokens = cached
        self.computed_tokens = 0
        self.timings = {"queue_ms": 0.0, "restore_ms": 0.0, "prefill_ms": 1.0, "compute_ms": 2.0}


class _FakeSession:
    def __init__(self, client, index):
        self.client, self.index, self.tokens, self.closed = client, index, 0, False

    def generate(self, prompt, max_new_tokens, ignore_eos):
        if self.index in self.client.fail_agents and self.tokens > 0:
            raise CapacityError("full")
        cached = max(0, self.tokens - 1)
        self.tokens += len(prompt) + max_new_tokens
        return _FakeResult(max_new_tokens, cached)

    def signal_phase(self, phase):
        self.client.signals.append(phase)

    def close(self):
        self.closed = True


class _FakeClient:
    """Stands in for djinn.connect(): agent k's second turn raises when k is in fail_agents."""

    def __init__(self, fail_agents=()):
        self.fail_agents, self.sessions, self.signals = set(fail_agents), [], []

    def model(self, name):
        return self

    def session(self):
        s = _FakeSession(self, len(self.sessions))
        self.sessions.append(s)
        return s

    def stats(self):
        return {"memory": {"kv_device": 0, "kv_parked": 0}}


def test_runner_counts_errors_without_crashing_and_closes_every_session():
    client = _FakeClient(fail_agents={1})
    plans = build(spec(n=3, rate=0.0, tool=ToolTime.parse("fixed:0.01")))
    run = run_agents(client, "m", plans, RunOptions(new_tokens=2, deadline_s=20, slo_ms=1e6, progress=False))
    assert run["planned_turns"] == 9 and run["ok_turns"] == 7
    assert run["errors"] == {"CapacityError": 1, "abandoned": 1}
    assert all(s.closed for s in client.sessions) and len(client.sessions) == 3
    assert client.signals.count("IO_WAIT") == client.signals.count("ACTIVE") == 5   # 2 + 1 (failed) + 2
    assert run["no_recompute_share"] == 1.0 and not run["cut_short"]


def test_runner_time_bound_marks_unrun_turns():
    client = _FakeClient()
    plans = build(spec(n=2, rate=0.0, tool=ToolTime.parse("fixed:30")))
    run = run_agents(client, "m", plans, RunOptions(new_tokens=2, deadline_s=0.5, slo_ms=1e6, progress=False))
    assert run["cut_short"] and run["errors"].get("not_run") == 4 and run["ok_turns"] == 2
    assert all(s.closed for s in client.sessions)


def test_sweep_order_of_n():
    from djinn.bench.agent_presets import PRESETS, resolve
    from djinn.bench.agents import next_n

    def runs(*flags):
        return [{"n": n, "sustained": ok} for n, ok in flags]

    seeds = resolve("seeds", False, {"n": [8, 16, 32], "max_n": 64})
    assert next_n(seeds, []) == (8, None)
    assert next_n(seeds, runs((8, True), (16, False))) == (32, None)
    assert next_n(seeds, runs((8, False), (16, False)))[0] is None            # the cliff is already visible
    assert next_n(seeds, runs((8, True), (16, True), (32, True))) == (40, None)   # beyond the list
    assert next_n(seeds, runs((8, True), (16, True), (32, True), (40, True), (56, False)))[0] is None
    assert next_n(seeds, runs((8, True), (16, True), (32, True), (40, True), (56, True)))[0] is None  # 72 > max_n
    quick = PRESETS["quick"]
    assert next_n(quick, runs((2, False), (4, False))) == (8, None)          # smoke runs keep every point
    assert next_n(quick, runs((2, True), (4, True), (8, True)))[0] is None


def test_stats_in_either_shape():
    from djinn.bench.metrics import delta, moved_bytes

    assert moved_bytes({"bytes_moved": 10}) == 10
    assert moved_bytes({"bytes_moved": {"out": 3, "in": 4}}) == 7          # by direction
    assert moved_bytes({"swaps": {"bytes_out": 1, "bytes_in": 2}}) == 3
    assert moved_bytes({"memory": {}}) is None
    swaps = {"swaps": {"out": 2, "in": 1, "dropped": 0}}
    assert stat(swaps, "decisions") == {"out": 2, "in": 1, "dropped": 0}   # swap counters stand in
    assert delta({"a": 5, "b": {"c": 3}, "ok": True}, {"a": 2, "b": {"c": 1}, "ok": False}) == \
        {"a": 3, "b": {"c": 2}, "ok": None}


def test_a_shared_prefix_starts_every_agents_first_prompt_and_nothing_else():
    plain, shared = build(spec()), build(spec(shared_prefix_tokens=12))
    prefix = shared[0].prompts[0][:12]
    assert all(p.prompts[0][:12] == prefix for p in shared)
    assert len({tuple(p.prompts[0][12:]) for p in shared}) == len(shared)    # each agent's own part differs
    for a, b in zip(plain, shared):   # the rest of the plan is the unshared one's
        assert b.prompts[0][12:] == a.prompts[0] and b.prompts[1:] == a.prompts[1:] and b.tool_s == a.tool_s
    assert build(spec(shared_prefix_tokens=12, seed=8))[0].prompts[0][:12] != prefix
    assert spec(shared_prefix_tokens=12).final_tokens == spec().final_tokens + 12
    assert not set(prefix) & {256, 257, 258}
